"""A VM's disk service with real processes and real clients: every kind of disk it serves, and the changes
between them (a relocation that completes becomes a plain file; a remote disk pulled in becomes one too),
across kill -9 and restarts, with the bytes checked against their source every time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.vm.disk_serving import DiskPlan, DiskServing, Holder, Serving
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import parse_spec, spec_to_toml
from tests.support.images import random_image
from tests.support.servers import hikkoshi_server, stop

MiB = 1 << 20


def _control(path: Path, command: str, **args: Any) -> Any:
    import asyncio

    from hikkoshi.nbd.control import control_request

    return asyncio.run(control_request(path, command, **args))


def _home(tmp: Path, size: int, plan: DiskPlan | None = None) -> VmHome:
    home = VmHome(tmp / "vm")
    home.path.mkdir()
    spec = parse_spec({"name": "vm", "memory_mib": 64, "disks": [{"name": "disk0", "size": str(size)}]})
    home.spec_file.write_text(spec_to_toml(spec))
    if plan is not None:
        home.save_disk_plan(plan)
    return home


@contextlib.contextmanager
def disk_service(home: VmHome, run: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """The VM's disk service as its supervisor starts it; (process, export URI, control socket)."""
    from hikkoshi.daemons.entry import disk_service_argv

    rundir = RunDir(run)
    rundir.path.mkdir(exist_ok=True)
    cmd = disk_service_argv(home, rundir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("hikkoshi: serving"), (line, proc.stderr.read() if proc.stderr else "")
        yield proc, f"nbd+unix:///disk0?socket={rundir.nbd_socket}", rundir.nbd_control
    finally:
        stop(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


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
        status: dict[str, Any] = _control(control, "status")["disks"]["disk0"]
        if status["kind"] == kind:
            return status
        time.sleep(0.1)
    raise AssertionError(f"disk0 never became {kind}: {_control(control, 'status')}")


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
        home = _home(tmp_path, size, plan)
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
        assert _control(control, "status")["disks"]["disk0"]["kind"] == "file"
        assert _read_all(uri, size, tmp_path) == bytes(expected)


def test_a_relocation_survives_kill_9_and_carries_on(tmp_path: Path) -> None:
    size = 32 * MiB
    src, data = _source(tmp_path, size)
    with hikkoshi_server(str(src), "--export", "disk0") as up:
        serving = DiskServing(kind=Serving.RELOCATING, upstream=up.export_uri("disk0"), bandwidth="4M")
        home = _home(tmp_path, size, DiskPlan(disks={"disk0": serving}))
        with disk_service(home, tmp_path / "run") as (proc, uri, control):
            _write(uri, 0, 0x11, 4096)  # acknowledged and flushed before the crash
            deadline = time.monotonic() + 60
            while _control(control, "status")["disks"]["disk0"]["relocation"]["present_bytes"] < 4 * MiB:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert json.loads(home.disk_plan_file.read_text())["disks"]["disk0"]["kind"] == "relocating"
        with disk_service(home, tmp_path / "run") as (_proc, uri, control):
            _control(control, "bandwidth", export="disk0", rate=None)
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
        home = _home(tmp_path, size, DiskPlan(disks={"disk0": remote}))
        assert not (home.path / "disk0.raw").exists()
        with disk_service(home, tmp_path / "run") as (_proc, uri, control):
            assert _read_all(uri, size, tmp_path) == data
            _write(uri, 2 * MiB, 0x22, 8192)
            # The holder's file has it: a flush through the pass-through is a flush there.
            with held.open("rb") as f:
                f.seek(2 * MiB)
                assert f.read(8192) == b"\x22" * 8192
            _control(control, "localize", export="disk0")
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
    home = _home(tmp_path, size)
    random_image(home.path / "disk0.raw", size)
    with disk_service(home, tmp_path / "run") as (_proc, _uri, control):
        from hikkoshi.nbd.control import ControlError

        with pytest.raises(ControlError, match="disk disk0 is file, not remote"):
            _control(control, "localize", export="disk0")
        with pytest.raises(ControlError, match="not relocating"):
            _control(control, "invalidate", export="disk0")
        with pytest.raises(ControlError, match="no export named 'nope'"):
            _control(control, "stats", export="nope")
        with pytest.raises(ControlError, match="bitmap-add: name: Field required"):
            _control(control, "bitmap-add", export="disk0")
        with pytest.raises(ControlError, match="Extra inputs are not permitted"):
            _control(control, "status", colour="blue")
        # Pausing or resuming a disk that is a plain file already: nothing to do, not an error.
        assert _control(control, "resume", export="disk0")["kind"] == "file"
