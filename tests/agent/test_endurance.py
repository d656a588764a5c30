"""The endurance run, short (``python -m bench.run_endurance`` makes 40 moves, restarts, then 10 more):
one busy guest moved by real agents through every mode once (postcopy, hybrid, precopy, shared, quick,
storage-migrate) round three agents, its agent restarted while idle, a migration interrupted by a
SIGKILL of its destination's agent, one more move; the guest checks its ring after every move, and at
the end nothing is left on any host but the VM where it runs, whose image then verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.endurance_plan import MODES
from bench.run_endurance import main


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_endurance_short(tmp_path: Path) -> None:
    args = ["--moves", "6", "--after", "1", "--agents", "3"]
    status = main([*args, "--workdir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "results")])
    (path,) = (tmp_path / "results").glob("endurance-*.json")
    results = json.loads(path.read_text())
    assert status == 0, results["failures"]
    assert results["moves_done"] == 7
    assert set(results["per_mode"]) == set(MODES)
    assert [e["phase"] for e in results["events"] if "phase" in e] in (["rolled-back"], ["done"])
    assert results["guest"]["verified"]
    assert not any(results["leftovers"].values()) and not results["scratch"]
