"""A migration's timeline as data and a person's cancel, against real agents and a real guest: the
samples grow while the migration runs (``offset`` gives only what is new), a cancel before the commit
point rolls the migration back and the guest runs on at the source; a second cancel, an unknown id,
and a cancel without the token are refused."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hikkoshi.guest.guest_image import GuestImage
from tests.support.agent_vms import create_busy, vm_names
from tests.support.agents import AgentProc, agents
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools


def _api(agent: AgentProc) -> httpx.Client:
    token = agent.token_file.read_text().strip()
    return httpx.Client(base_url=agent.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _wait(api: httpx.Client, path: str, ok: Any, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        data = api.get(path).json()
        if ok(data):
            return data
        time.sleep(0.3)
    raise AssertionError(f"{path}: {data}")


@pytest.mark.slow
def test_samples_live_and_cancel_rolls_back(guest: GuestImage, tmp_path: Path) -> None:
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b), _api(a) as api:
        create_busy(a, "held", run)
        # A slow memory stream (the guest dirties faster than it goes): the migration stays in pre-copy.
        body = {"to": b.url, "bandwidth": "16Mbit", "auto_converge": False}
        mid = api.post("/v1/vms/held/migrate", json=body).json()["id"]
        _wait(api, f"/v1/migrations/{mid}/samples", lambda d: any(s["memory_done"] for s in d["samples"]))
        first = api.get(f"/v1/migrations/{mid}/samples").json()
        assert first["running"] and first["offset"] == 0 and first["total"] == len(first["samples"])
        assert all(isinstance(s["t"], float) for s in first["samples"])
        later = _wait(
            api, f"/v1/migrations/{mid}/samples?offset={first['total']}", lambda d: d["samples"] != []
        )
        assert later["offset"] == first["total"] and later["total"] > first["total"]
        # No token: refused like everything else.
        assert httpx.post(f"{a.url}/v1/migrations/{mid}/cancel").status_code == 401
        cancelled = api.post(f"/v1/migrations/{mid}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        done = _wait(api, f"/v1/migrations/{mid}", lambda d: not d["running"])
        assert done["phase"] == "rolled-back", done
        again = api.post(f"/v1/migrations/{mid}/cancel")
        assert again.status_code == 409 and "not running" in again.json()["detail"]
        assert api.post("/v1/migrations/0123456789ab/cancel").status_code == 404
        assert api.get("/v1/migrations/0123456789ab/samples").status_code == 404
        # The guest runs on at the source; nothing of it is left at the destination.
        assert vm_names(a) == {"held": "running"} and vm_names(b) == {}
        # After the end the samples come from the database, the same ones and more.
        saved = api.get(f"/v1/migrations/{mid}/samples").json()
        assert not saved["running"] and saved["total"] >= later["total"]
        assert saved["samples"][: first["total"]] == first["samples"]
