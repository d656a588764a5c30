"""A busy guest moves between two agents in every way a disk can follow, encrypted, and each disk
listener a migration opens is for the other host only, read-only where that host only reads, and gone
when the migration is: precopy (the destination listens for the source's mirror until it finishes),
shared storage (the host that keeps the disks listens for the host the VM runs on, for as long as it
runs there, and again after its disk service is killed), and home to the host holding its disks (which
stops listening for the host it came from)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.identity.authority import issue_host
from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.control import control_request
from hikkoshi.vm.home import VmHome
from tests.support.agent_vms import create_busy, stop_and_verify, vm_names, wait_console
from tests.support.agents import AgentProc, agents, cluster_ca
from tests.support.vms import guest as guest
from tests.support.vms import need_qemu_tools


def _disk_service(agent: AgentProc, vm: str) -> dict[str, Any]:
    """The status of the VM's disk service on ``agent``'s host (through its control socket)."""
    home = VmHome(agent.datastores["main"] / vm)
    status: dict[str, Any] = asyncio.run(control_request(Path(home.read_state()["nbd_control"]), "status"))
    return status


def _peer_listeners(agent: AgentProc, vm: str) -> list[dict[str, Any]]:
    return [x for x in _disk_service(agent, vm)["listeners"] if not x["names"][0].startswith("unix:")]


def _migrate(a: AgentProc, vm: str, b: AgentProc, storage: str) -> dict[str, Any]:
    record: dict[str, Any] = a.json("migrate", vm, "--to", b.url, "--storage", storage, "--json", timeout=600)
    assert record["phase"] == "done", record
    assert record["report"]["encrypted"] is True
    return record


def _still_writing(agent: AgentProc, vm: str, run: int) -> None:
    mark = len(agent.cli("vm", "console", vm).stdout)
    wait_console(agent, vm, rf"PROGRESS run={run} ", after=mark)


async def _read(address: str, ca: Path, ids: Path | None) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    if ids is not None:
        ctx.load_cert_chain(ids / "host-cert.pem", ids / "host-key.pem")
    async with NbdClient(f"nbds://{address}/disk0?tls-hostname=beta", tls=ctx, connect_timeout=10) as c:
        return await c.read(0, 4096)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four migrations and a disk service restart, under TCG
def test_disk_listeners_follow_the_vm(guest: GuestImage, tmp_path: Path) -> None:
    need_qemu_tools()
    run = random.randrange(1, 2**31)
    with agents(tmp_path, "alpha", "beta") as (a, b):
        assert a.ca_file is not None
        create_busy(a, "roamer", run)
        # Precopy to B: B listened for A's mirror, and no longer does.
        _migrate(a, "roamer", b, "precopy")
        assert vm_names(b) == {"roamer": "running"} and vm_names(a) == {}
        assert _peer_listeners(b, "roamer") == []
        assert not (b.datastores["main"] / "roamer" / "disks.json").exists()
        _still_writing(b, "roamer", run)
        # Shared, back to A: B keeps the disks and listens for A alone, read-write (A writes through).
        _migrate(b, "roamer", a, "shared")
        (held,) = _peer_listeners(b, "roamer")
        assert held["peers"] == ["alpha"] and held["tls"] is True and held["read_only"] is False
        assert held["names"][0].startswith("127.0.0.1:")
        plan = json.loads((a.datastores["main"] / "roamer" / "disks.json").read_text())
        upstream = plan["disks"]["disk0"]["upstream"]
        assert upstream.startswith("nbds://127.0.0.1:") and upstream.endswith("?tls-hostname=beta")
        assert plan["disks"]["disk0"]["holder"]["host"] == "beta"
        _still_writing(a, "roamer", run)
        # Nobody else reaches them there: not another host of the cluster, not a client without one.
        mallory = tmp_path / "pki" / "mallory"
        issue_host(cluster_ca(tmp_path), "mallory", mallory, ["127.0.0.1"])
        for who in (mallory, None):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                asyncio.run(_read(held["names"][0], a.ca_file, who))
        # B's disk service dies: restarted, it listens for A again where A's pass-through expects it.
        b_home = VmHome(b.datastores["main"] / "roamer")
        before = int(b_home.read_state()["nbd_pid"])
        os.kill(before, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while int(b_home.read_state().get("nbd_pid") or before) == before or not b_home.read_state().get(
            "nbd_running"
        ):
            assert time.monotonic() < deadline, b_home.read_state()
            time.sleep(0.2)
        assert _peer_listeners(b, "roamer") == [held]
        _still_writing(a, "roamer", run)
        # Home to B, which holds its disks: nothing moves, and B stops listening for A.
        record = _migrate(a, "roamer", b, "hybrid")
        assert record["report"].get("storage_note") == "the destination holds the disks: only memory moves"
        assert _peer_listeners(b, "roamer") == []
        assert vm_names(b) == {"roamer": "running"} and vm_names(a) == {}
        assert not (a.datastores["main"] / "roamer").exists()
        mark = len(b.cli("vm", "console", "roamer").stdout)
        wait_console(b, "roamer", rf"PROGRESS run={run} ", after=mark)
        stop_and_verify(b, "roamer", run, mark)
