"""A VM migrates again and again, whatever state its last move left it in: after a relocation (postcopy,
hybrid), after a mirror (precopy), with its disks held by the host it left (shared), back home to that
host, and through a storage migration that pulls a held disk in; a busy guest checks its data all along,
and nothing of it is left behind where it no longer is."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hikkoshi.daemons import supervisor_client as control
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.home import VmHome
from tests.support.migrations import cleanup, finish_and_verify, hosts, migrate
from tests.support.vms import console, guest, guest_vm, short_runtime_dir, wait_console

__all__ = ["guest", "hosts", "short_runtime_dir"]


@pytest.fixture
def runtime_a() -> Path:
    """Host A's runtime directory (the tests' default)."""
    return Path(os.environ["HIKKOSHI_RUNTIME_DIR"])


def _leftovers(home: VmHome) -> list[str]:
    """Files of a running VM's home that a finished move must not leave."""
    return sorted(p.name for p in home.path.iterdir() if p.name.endswith(".bitmap") or p.name == "disks.json")


def _still_writing(home: VmHome, run: int) -> None:
    mark = len(console(home))
    wait_console(home, rf"PROGRESS run={run} ", after=mark)


@pytest.mark.slow
def test_a_vm_migrates_again_in_every_state(
    guest: GuestImage,
    hosts: tuple[Datastore, Datastore, Path],
    runtime_a: Path,
    tmp_path: Path,
) -> None:
    a, b, runtime_b = hosts
    a2 = Datastore.init(tmp_path / "a2")
    run = random.randrange(1, 2**31)
    params = {"run": run, "progress": 4, "scrub": 16, "rate": 4, "mb": 16}
    home = guest_vm(
        a, guest, "again", "busy", params, memory_mib=160, disks=[{"name": "disk0", "size": "32M"}]
    )
    on_a, on_b, on_a2 = a.home("again"), b.home("again"), a2.home("again")
    control.start_vm(home, runtime_dir=runtime_a)
    with cleanup(on_a), cleanup(on_b), cleanup(on_a2):
        wait_console(home, rf"PROGRESS run={run} durable=([89]|\d\d+) ")

        def move(src: Datastore, dst: Datastore, runtime: Path, *extra: str) -> None:
            code, record = migrate(src, dst, runtime, "again", *extra)
            assert code == 0 and record["phase"] == "done", record
            _still_writing(dst.home("again"), run)

        # A relocation, then the relocated disk moves on (it is a plain file of B's now).
        move(a, b, runtime_b, "--storage", "postcopy")
        assert not on_a.path.exists() and _leftovers(on_b) == []
        move(b, a, runtime_a, "--storage", "hybrid")
        assert not on_b.path.exists() and _leftovers(on_a) == []
        move(a, b, runtime_b, "--storage", "precopy")
        assert not on_a.path.exists() and _leftovers(on_b) == []

        # Shared storage: B keeps the disk and serves it; A's VM reads it there.
        move(b, a, runtime_a, "--storage", "shared")
        assert on_b.read_state()["state"] == "serving" and (on_b.path / "disk0.raw").exists()
        assert not (on_a.path / "disk0.raw").exists()
        # Home to B, whatever mode is asked: B's supervisor takes QEMU up again, no disk data moves.
        move(a, b, runtime_b, "--quick")
        assert not on_a.path.exists() and on_b.read_state()["state"] == "running"
        assert _leftovers(on_b) == []

        # Shared again, then a storage migration on A pulls the held disk into A's other datastore.
        move(b, a, runtime_a, "--storage", "shared")
        cmd_ok = _storage_migrate(a, a2)
        assert cmd_ok
        assert not on_b.path.exists(), "the holder is released once the disk is A's own"
        assert not on_a.path.exists() and (on_a2.path / "disk0.raw").exists() and _leftovers(on_a2) == []
        _still_writing(on_a2, run)

        # From there, on to B once more, relocated.
        move(a2, b, runtime_b, "--storage", "hybrid")
        assert not on_a2.path.exists() and _leftovers(on_b) == []
        finish_and_verify(on_b, run)


def _storage_migrate(src: Datastore, dst: Datastore) -> bool:
    cmd = [sys.executable, "-m", "hikkoshi", "storage-migrate", "again", "--datastore", str(src.path)]
    cmd += ["--to-datastore", str(dst.path), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    record = json.loads(done.stdout) if done.stdout.startswith("{") else {}
    assert done.returncode == 0 and record.get("phase") == "done", (done.stdout[-2000:], done.stderr[-2000:])
    return True
