"""`hikkoshi storage-migrate`: a running VM's home and disks move to another datastore; the guest never
stops (seed 000, Storage vMotion)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.diskwriter import verify_diskwriter_image
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.nbd.control import control_request
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome
from tests.support.vms import console, guest, guest_vm, running, short_runtime_dir, stop, wait_console

__all__ = ["guest", "short_runtime_dir"]

_DONE = re.compile(r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(\d+) written=\d+ records=\d+ OK")


def storage_migrate(a: Datastore, b: Datastore, name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    cmd = [sys.executable, "-m", "hikkoshi", "storage-migrate", name, "--datastore", str(a.path)]
    cmd += ["--to-datastore", str(b.path), "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def request(home: VmHome, command: str, **args: Any) -> Any:
    return asyncio.run(control.request(home, home.load_spec(), command, **args))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mirror", "dbt"])
def test_running_vm_moves_to_another_datastore(guest: GuestImage, tmp_path: Path, mode: str) -> None:
    a, b = Datastore.init(tmp_path / "a"), Datastore.init(tmp_path / "b")
    run = random.randrange(1, 2**31)
    home = guest_vm(a, guest, "svm", "diskwriter", {"run": run, "progress": 4, "scrub": 16})
    new = b.home("svm")
    with running(home) as info:
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        code, record = storage_migrate(a, b, "svm", "--mode", mode, "--bandwidth", "8M")
        assert code == 0, record
        assert record["kind"] == "storage" and record["phase"] == "done"
        assert [p["phase"] for p in record["phases"]] == [
            "precheck", "prepare-destination", "home-files", "storage-pre", "switchover", "cleanup", "done"
        ]  # fmt: skip
        moved = record["report"]["disks"]["disk0"]
        assert moved["copied_bytes"] > 0
        # The same processes run on, from the new home; the old one is gone.
        assert not home.path.exists()
        assert new.is_running() and new.supervisor_pid() == info["supervisor_pid"]
        status = request(new, "status")
        assert status["state"] == "running" and status["qemu_pid"] == info["qemu_pid"]
        exports = asyncio.run(control_request(Path(status["nbd_control"]), "exports"))
        assert exports[0]["path"] == str(new.path / "disk0.raw")
        # The console goes on in the new home, after everything from before the move.
        mark = len(console(new))
        wait_console(new, rf"PROGRESS run={run} ", after=mark)
        assert f"READY run={run}" in console(new)
        assert "rehomed" in (new.path / "supervisor.log").read_text()
        state = stop(new)
        assert state["exit"]["how"] == "acpi"
    done = _DONE.search(console(new))
    assert done is not None, console(new)[-3000:]
    last = int(done[2])
    assert verify_diskwriter_image(new.path / "disk0.raw", run=run, durable=last).last == last


@pytest.mark.slow
def test_failed_disk_move_is_undone(guest: GuestImage, tmp_path: Path) -> None:
    """Two disks; the second one's move is cancelled after the first moved: the first is moved back,
    the new home removed, and the VM runs on in its old home with its data intact."""
    a, b = Datastore.init(tmp_path / "a"), Datastore.init(tmp_path / "b")
    run = random.randrange(1, 2**31)
    disks = [{"name": "disk0", "size": "16M"}, {"name": "disk1", "size": "64M"}]
    home = guest_vm(a, guest, "undo", "diskwriter", {"run": run, "progress": 4, "scrub": 16}, disks=disks)
    (home.path / "disk1.raw").write_bytes(random.randbytes(64 << 20))  # data, so its move takes a while
    with running(home) as info:
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        nbd_control = Path(info["nbd_control"])

        def cancel_second_move() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    status = asyncio.run(control_request(nbd_control, "move-status", export="disk1"))
                except Exception:
                    time.sleep(0.05)
                    continue
                if status["copied_bytes"] > 4 << 20:
                    asyncio.run(control_request(nbd_control, "move-cancel", export="disk1"))
                    return
                time.sleep(0.05)

        canceller = threading.Thread(target=cancel_second_move)
        canceller.start()
        code, record = storage_migrate(a, b, "undo", "--bandwidth", "4M")
        canceller.join()
        assert code == 1, record
        assert record["phase"] == "rolled-back" and "cancelled" in record["error"], record
        assert not b.home("undo").path.exists()
        exports = {e["name"]: e["path"] for e in asyncio.run(control_request(nbd_control, "exports"))}
        assert exports == {"disk0": str(home.path / "disk0.raw"), "disk1": str(home.path / "disk1.raw")}
        assert request(home, "status")["state"] == "running"
        mark = len(console(home))
        wait_console(home, rf"PROGRESS run={run} ", after=mark)
        stop(home)
    done = _DONE.search(console(home))
    assert done is not None
    assert verify_diskwriter_image(home.path / "disk0.raw", run=run, durable=int(done[2])).last == int(
        done[2]
    )


@pytest.mark.slow
@pytest.mark.parametrize(("crash_at", "outcome"), [("storage-pre", "rolled-back"), ("cleanup", "done")])
def test_coordinator_crash_is_recovered(
    guest: GuestImage, tmp_path: Path, crash_at: str, outcome: str
) -> None:
    import os

    a, b = Datastore.init(tmp_path / "a"), Datastore.init(tmp_path / "b")
    run = random.randrange(1, 2**31)
    home = guest_vm(a, guest, "crashy", "diskwriter", {"run": run, "progress": 4, "scrub": 16})
    new = b.home("crashy")
    with running(home) as info:
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")
        cmd = [sys.executable, "-m", "hikkoshi", "storage-migrate", "crashy", "--datastore", str(a.path)]
        cmd += ["--to-datastore", str(b.path), "--json"]
        env = {**os.environ, "HIKKOSHI_CRASH_AT": f"migrate-{crash_at}"}
        assert subprocess.run(cmd, capture_output=True, timeout=300, env=env).returncode == -9
        cmd = [
            sys.executable,
            "-m",
            "hikkoshi",
            "migrations",
            "recover",
            "--datastore",
            str(a.path),
            "--json",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["phase"] == outcome
        live, gone = (new, home) if outcome == "done" else (home, new)
        assert not gone.path.exists()
        assert live.is_running() and request(live, "status")["qemu_pid"] == info["qemu_pid"]
        mark = len(console(live))
        wait_console(live, rf"PROGRESS run={run} ", after=mark)
        stop(live)
    done_line = _DONE.search(console(live))
    assert done_line is not None
    last = int(done_line[2])
    assert verify_diskwriter_image(live.path / "disk0.raw", run=run, durable=last).last == last
