"""A VM's disk service with real processes and real clients: every kind of disk it serves, and the changes
between them (a relocation that completes becomes a plain file; a remote disk pulled in becomes one too),
across kill -9 and restarts, with the bytes checked against their source every time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.vm.disk_serving import DiskPlan, DiskServing, Holder, Serving
from tests.support.disk_services import disk_service, verb, vm_home
from tests.support.images import random_image
from tests.support.servers import hikkoshi_server

MiB = 1 << 20


def _read_all(uri: str, size: int, tmp: Path) -> bytes:
    out = tmp / "read.raw"
    out.unlink(missing_ok=True)
    subprocess.run(["nbdcopy", uri, str(out)], check=True, capture_output=True, timeout=120)
    return out.read_bytes()[:size]


def _write(uri: str, offset: int, pattern: int, length: int) -> None:
    cmd = ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", "-c", "flush", uri]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _wait_kind(control: Path, kind: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = verb(control, "status")["disks"]["disk0"]
        if status["kind"] == kind:
            return status
        time.sleep(0.1)
    raise AssertionError(f"disk0 never became {kind}: {verb(control, 'status')}")


def _source(tmp: Path, size: int) -> tuple[Path, bytes]:
    path = tmp / "src.raw"
    return path, random_image(path, size, seed=11)


def test_a_relocation_that_completes_is_an_ordinary_file(tmp_path: Path) -> None:
    """Served at once, complete in the background, then the file serves: no bitmap, no plan left, the
    same bytes, and a restart serves it as a file (no source needed any more)."""
    size = 16 * MiB
    src, data = _source(tmp_path, size)
    with hikkoshi_server(str(src), "--export", "disk0") as up:
        plan = DiskPlan(
            disks={"disk0": DiskServing(kind=Serving.RELOCATING, upstream=up.export_uri("disk0"))}
        )
        home = vm_home(tmp_path, size, plan)
        with disk_service(home, tmp_path / "run") as (_proc, uri, control):
            assert _read_all(uri, size, tmp_path) == data  # served at once, fetched on demand
            _write(uri, 4 * MiB, 0x5A, 65536)
            status = _wait_kind(control, "file")
            assert "relocation" not in status and status["path"] == str(home.path / "disk0.raw")
            assert not home.disk_plan_file.exists()
            assert not (home.path / "disk0.raw.bitmap").exists()
            expected = bytearray(data)
            expected[4 * MiB : 4 * MiB + 65536] = b"\x5a" * 65536
            assert _read_all(uri, size, tmp_path) == bytes(expected)
    # The source is gone; the disk needs nothing of it.
    with disk_service(home, tmp_path / "run") as (_proc, uri, control):
        assert verb(control, "status")["disks"]["disk0"]["kind"] == "file"
        assert _read_all(uri, size, tmp_path) == bytes(expected)


def test_a_relocation_survives_kill_9_and_carries_on(tmp_path: Path) -> None:
    size = 32 * MiB
    src, data = _source(tmp_path, size)
    with hikkoshi_server(str(src), "--export", "disk0") as up:
        serving = DiskServing(kind=Serving.RELOCATING, upstream=up.export_uri("disk0"), bandwidth="4M")
        home = vm_home(tmp_path, size, DiskPlan(disks={"disk0": serving}))
        with disk_service(home, tmp_path / "run") as (proc, uri, control):
            _write(uri, 0, 0x11, 4096)  # acknowledged and flushed before the crash
            deadline = time.monotonic() + 60
            while verb(control, "status")["disks"]["disk0"]["relocation"]["present_bytes"] < 4 * MiB:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert json.loads(home.disk_plan_file.read_text())["disks"]["disk0"]["kind"] == "relocating"
        with disk_service(home, tmp_path / "run") as (_proc, uri, control):
            verb(control, "bandwidth", export="disk0", rate=None)
            _wait_kind(control, "file")
            got = _read_all(uri, size, tmp_path)
    assert got[:4096] == b"\x11" * 4096 and got[4096:] == data[4096:]
    assert not home.disk_plan_file.exists() and not (home.path / "disk0.raw.bitmap").exists()


def test_a_remote_disk_passes_through_and_is_pulled_in(tmp_path: Path) -> None:
    """A disk held by another host: writes are acknowledged only once the holder has them; pulled in
    (``localize``) while written to, it becomes a file with every write, and the holder can go."""
    size = 16 * MiB
    held, data = _source(tmp_path, size)
    with hikkoshi_server(str(held), "--export", "disk0") as holder:
        remote = DiskServing(
            kind=Serving.REMOTE, upstream=holder.export_uri("disk0"), holder=Holder(host="h", home="/x")
        )
        home = vm_home(tmp_path, size, DiskPlan(disks={"disk0": remote}))
        assert not (home.path / "disk0.raw").exists()
        with disk_service(home, tmp_path / "run") as (_proc, uri, control):
            assert _read_all(uri, size, tmp_path) == data
            _write(uri, 2 * MiB, 0x22, 8192)
            # The holder's file has it: a flush through the pass-through is a flush there.
            with held.open("rb") as f:
                f.seek(2 * MiB)
                assert f.read(8192) == b"\x22" * 8192
            verb(control, "localize", export="disk0")
            _write(uri, 6 * MiB, 0x33, 8192)  # while the disk is being pulled in
            status = _wait_kind(control, "file")
            assert status["path"] == str(home.path / "disk0.raw")
            got = _read_all(uri, size, tmp_path)
        expected = bytearray(data)
        expected[2 * MiB : 2 * MiB + 8192] = b"\x22" * 8192
        expected[6 * MiB : 6 * MiB + 8192] = b"\x33" * 8192
        assert got == bytes(expected)
    # The holder is gone: the disk is this host's own file now.
    with disk_service(home, tmp_path / "run") as (_proc, uri, _control_path):
        assert _read_all(uri, size, tmp_path) == bytes(expected)


def test_control_verbs_refuse_what_does_not_apply(tmp_path: Path) -> None:
    size = 4 * MiB
    home = vm_home(tmp_path, size)
    random_image(home.path / "disk0.raw", size)
    with disk_service(home, tmp_path / "run") as (_proc, _uri, control):
        from hikkoshi.nbd.control import ControlError

        with pytest.raises(ControlError, match="disk disk0 is file, not remote"):
            verb(control, "localize", export="disk0")
        with pytest.raises(ControlError, match="not relocating"):
            verb(control, "invalidate", export="disk0")
        with pytest.raises(ControlError, match="no export named 'nope'"):
            verb(control, "stats", export="nope")
        with pytest.raises(ControlError, match="bitmap-add: name: Field required"):
            verb(control, "bitmap-add", export="disk0")
        with pytest.raises(ControlError, match="Extra inputs are not permitted"):
            verb(control, "status", colour="blue")
        # Pausing or resuming a disk that is a plain file already: nothing to do, not an error.
        assert verb(control, "resume", export="disk0")["kind"] == "file"
