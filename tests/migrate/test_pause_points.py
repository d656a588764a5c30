"""The jobs' pause hook (a test hook): off without its environment variable; with it, a job holds at the
phase named in ``pause-at`` until its marker file is removed, and nowhere else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hikkoshi.migrate import pause_points


def test_holds_at_the_phase_asked_until_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pause_points.ENV, str(tmp_path))
    (tmp_path / "pause-at").write_text("switchover\n")
    marker = tmp_path / "m1.paused"

    async def scenario() -> None:
        await asyncio.wait_for(pause_points.reached("m1", "memory-precopy"), 1)  # not this phase
        assert not marker.exists()
        held = asyncio.create_task(pause_points.reached("m1", "switchover"))
        for _ in range(100):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        assert marker.read_text() == "switchover"
        await asyncio.sleep(0.1)
        assert not held.done()
        marker.unlink()
        await asyncio.wait_for(held, 1)

    asyncio.run(scenario())


def test_off_without_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pause_points.ENV, raising=False)
    (tmp_path / "pause-at").write_text("switchover")
    asyncio.run(asyncio.wait_for(pause_points.reached("m1", "switchover"), 1))
    assert list(tmp_path.iterdir()) == [tmp_path / "pause-at"]
