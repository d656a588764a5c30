"""Storage moves of a served image through `hikkoshi nbd move`, real clients writing meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.block.move_journal import Journal
from hikkoshi.guest.guest_image import GuestImage
from hikkoshi.guest.workloads import BLOCK_SIZE, console_result, verify_diskcheck_image
from hikkoshi.nbd.control import ControlError, control_request
from tests.support.guests import guest, run_guest
from tests.support.images import make_image
from tests.support.servers import Served, hikkoshi_server, run_tool, stop

__all__ = ["guest"]  # the fixture, shared with the boot tests

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo", "fio")),
    reason="needs qemu-utils, libnbd-bin and fio",
)


@contextlib.contextmanager
def serving(image: Path, tmp_path: Path) -> Iterator[Served]:
    with hikkoshi_server(str(image), "--export", "disk", "--control", f"unix:{tmp_path / 'ctl.sock'}") as s:
        yield s


def move(tmp_path: Path, to: Path, *args: str, check: bool = True) -> dict[str, Any]:
    """Run `hikkoshi nbd move --json`; return its final status."""
    proc = run_tool(
        sys.executable, "-m", "hikkoshi", "nbd", "move", "--control", f"unix:{tmp_path / 'ctl.sock'}",
        "--to", str(to), "--json", *args, timeout=120, check=False,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    if not proc.stdout.strip():
        return {"exit": proc.returncode, "stderr": proc.stderr}
    status: dict[str, Any] = json.loads(proc.stdout)
    status["exit"] = proc.returncode
    return status


def fio(uri: str, *args: str) -> subprocess.Popen[str]:
    """fio on the export in the background; crc32c headers in every block."""
    argv = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", "--verify=crc32c"]
    return subprocess.Popen(
        [*argv, "--verify_fatal=1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def fio_done(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail("fio did not finish")
    assert proc.returncode == 0, out + err
    job: dict[str, Any] = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    return job


def equal_to_export(served: Served, path: Path) -> None:
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), served.export_uri("disk"))


def assert_moved(src: Path, dst: Path) -> None:
    assert not src.exists(), "the source must be deleted after a move"
    assert dst.exists()
    assert not Journal.path_for(src).exists()


@pytest.mark.parametrize("mode", ["mirror", "dbt"])
def test_fio_verifies_across_a_move(tmp_path: Path, mode: str) -> None:
    src = make_image(tmp_path / "src.raw", 64 * MiB)
    (tmp_path / "b").mkdir()
    dst = tmp_path / "b" / "disk.raw"
    with serving(src, tmp_path) as s:
        uri = s.export_uri("disk")
        # 24 MiB of 4 KiB writes at 6 MB/s: about 4 s, across the whole move; then fio reads it all back.
        job = ["--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={48 * MiB}", f"--io_size={24 * MiB}"]
        writer = fio(uri, *job, "--rate=6m", "--do_verify=1")
        status = move(tmp_path, dst, "--mode", mode, "--bandwidth", "16M")
        assert status["phase"] == "done" and status["mode"] == mode
        written = fio_done(writer)
        assert written["write"]["io_bytes"] == 24 * MiB and written["read"]["io_bytes"] == 24 * MiB
        assert_moved(src, dst)
        # Read back again from the new file alone, by a new client.
        fio_done(fio(uri, *job, "--verify_only"))
        equal_to_export(s, dst)


def test_dbt_that_cannot_converge_falls_back_and_mirror_takes_one_pass(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", 64 * MiB, data_every=MiB)  # fully allocated
    dst1, dst2 = tmp_path / "d1.raw", tmp_path / "d2.raw"
    with serving(src, tmp_path) as s:
        uri = s.export_uri("disk")
        # Unthrottled 4 KiB writes over the whole disk dirty it faster than a 24 MB/s copy can follow.
        heavy = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=100%", "--time_based", "--runtime=14"]
        writer = fio(uri, *heavy, "--do_verify=0")
        dbt = move(tmp_path, dst1, "--mode", "dbt", "--bandwidth", "24M")
        assert dbt["phase"] == "done"
        assert dbt["fallback_to_mirror"], dbt["passes"]
        assert len(dbt["passes"]) >= 2
        mirror = move(tmp_path, dst2, "--mode", "mirror", "--bandwidth", "48M")
        assert mirror["phase"] == "done" and not mirror["fallback_to_mirror"]
        assert len(mirror["passes"]) == 1, mirror["passes"]
        fio_done(writer)
        assert not dst1.exists()  # it was the source of the second move
        assert_moved(src, dst2)
        equal_to_export(s, dst2)


def test_thin_keeps_holes_and_zeroes_as_holes_thick_allocates(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", 32 * MiB, data_every=8 * MiB)  # 4 MiB of data
    with src.open("r+b") as f:  # 2 MiB of allocated zeroes: a thin copy leaves them out
        f.seek(3 * MiB)
        f.write(bytes(2 * MiB))
    reference = src.read_bytes()
    thin, thick = tmp_path / "thin.raw", tmp_path / "thick.raw"
    with serving(src, tmp_path) as s:
        status = move(tmp_path, thin)
        assert status["copied_bytes"] == 4 * MiB and status["zero_bytes"] == 2 * MiB
        assert thin.stat().st_blocks * 512 <= 4 * MiB + 64 * 1024
        assert thin.read_bytes() == reference
        move(tmp_path, thick, "--thick")
        assert thick.stat().st_blocks * 512 >= 32 * MiB
        assert thick.read_bytes() == reference
        equal_to_export(s, thick)


def test_refusals_leave_everything_as_it_was(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", 16 * MiB)
    other = make_image(tmp_path / "other.raw", MiB)
    with serving(src, tmp_path):
        for to, message in [
            (other, "exists"),
            (src, "is the source"),
            (tmp_path / "nodir" / "x.raw", "no directory"),
        ]:
            out = move(tmp_path, to, check=False)
            assert out["exit"] == 2 and message in out["stderr"]
        assert src.exists() and not Journal.path_for(src).exists()
        with pytest.raises(ControlError, match="bad rate"):
            asyncio.run(control_request(tmp_path / "ctl.sock", "move", to=str(tmp_path / "y"), bandwidth="x"))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a destination that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_destination_full_fails_cleanly_while_the_guest_keeps_writing(tmp_path: Path, small_fs: Path) -> None:
    src = make_image(tmp_path / "src.raw", 128 * MiB, data_every=8 * MiB)  # 16 MiB of data: fits at first
    dst = small_fs / "disk.raw"
    with serving(src, tmp_path) as s:
        too_big = make_image(tmp_path / "big.raw", 64 * MiB, data_every=MiB)
        del too_big  # (the preflight check is exercised below with the real image after it grows)
        # 64 MiB of new data while the copy runs: the destination fills up long before the end.
        job = ["--rw=write", "--bs=1M", "--iodepth=4", f"--offset={16 * MiB}", f"--size={64 * MiB}"]
        writer = fio(s.export_uri("disk"), *job, "--do_verify=0", "--rate=24m")
        status = move(tmp_path, dst, "--mode", "dbt", "--bandwidth", "12M", check=False)
        fio_done(writer)
        assert status["exit"] == 1 and status["phase"] == "failed", status
        assert "No space left" in status["error"]
        assert not dst.exists() and src.exists() and not Journal.path_for(src).exists()
        checker = fio(s.export_uri("disk"), *job, "--verify_only")
        fio_done(checker)
        # Now the disk has ~80 MiB of data: the move is refused before anything is written.
        refused = move(tmp_path, dst, check=False)
        assert refused["exit"] == 2 and "free" in refused["stderr"]
        assert not dst.exists()


@pytest.mark.parametrize("point", ["move-copying", "move-holding", "move-switched", "move-served"])
def test_crash_at_each_step_loses_nothing(
    tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_image(tmp_path / "src.raw", 32 * MiB)
    dst = tmp_path / "new.raw"
    monkeypatch.setenv("HIKKOSHI_CRASH_AT", point)
    with serving(src, tmp_path) as s:
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 3M", "-c", "flush", s.export_uri("disk"))
        reference = src.read_bytes()
        move(tmp_path, dst, check=False)
        s.proc.wait(timeout=20)
        assert s.proc.returncode == -9  # it died at the point, without cleaning up
    assert Journal.path_for(src).exists()
    monkeypatch.delenv("HIKKOSHI_CRASH_AT")
    with hikkoshi_server(str(src), "--export", "disk") as again:
        # The restart finished the move, or undid it.
        assert Journal.path_for(src).exists() is False
        if point in ("move-copying", "move-holding"):
            assert src.exists() and not dst.exists()
            kept = src
        else:
            assert_moved(src, dst)
            kept = dst
        assert kept.read_bytes() == reference
        equal_to_export(again, kept)


def test_dirty_bitmaps_over_the_control_socket_and_nbd(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", 16 * MiB)
    sock = tmp_path / "ctl.sock"

    def ctl(command: str, **args: Any) -> Any:
        return asyncio.run(control_request(sock, command, **args))

    with serving(src, tmp_path) as s:
        uri = s.export_uri("disk")
        run_tool("qemu-io", "-f", "raw", "-c", "write 0 4k", uri)  # before the bitmap: not recorded
        assert ctl("bitmap-add", name="since-t0") == {"name": "since-t0", "granularity": 65536}
        run_tool(
            "qemu-io", "-f", "raw", "-c", "write 1M 4k", "-c", "write -z 5M 130k", "-c", "discard 9M 64k", uri
        )
        runs = ctl("bitmap-get", name="since-t0")["runs"]
        assert runs == [[MiB, 65536], [5 * MiB, 3 * 65536], [9 * MiB, 65536]]
        out = run_tool("nbdinfo", "--json", "--map=hikkoshi:dirty:since-t0", uri).stdout
        dirty = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]
        assert dirty == [(MiB, 65536), (5 * MiB, 3 * 65536), (9 * MiB, 65536)]
        listed = run_tool("nbdinfo", "--list", "--json", uri.rsplit("/", 1)[0] + "/").stdout
        assert "hikkoshi:dirty:since-t0" in listed
        ctl("bitmap-clear", name="since-t0")
        assert ctl("bitmap-list") == [{"name": "since-t0", "granularity": 65536, "dirty_bytes": 0}]
        ctl("bitmap-remove", name="since-t0")
        with pytest.raises(ControlError, match="no bitmap"):
            ctl("bitmap-get", name="since-t0")
    assert os.path.exists(src)


@pytest.mark.slow
def test_guest_writes_through_the_export_during_a_move(guest: GuestImage, tmp_path: Path) -> None:
    blocks, run = 1024, 4242
    src = make_image(tmp_path / "src.raw", 48 * MiB, data_every=MiB)
    original = src.read_bytes()
    dst = tmp_path / "moved.raw"
    with serving(src, tmp_path) as s:
        # 6 MB/s: the copy is still running while the guest boots and writes.
        mover = subprocess.Popen(
            [sys.executable, "-m", "hikkoshi", "nbd", "move", "--control", f"unix:{tmp_path / 'ctl.sock'}",
             "--to", str(dst), "--json", "--bandwidth", "6M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            result = run_guest(
                guest, s.export_uri("disk"), "diskcheck", tmp_path, {"blocks": blocks, "run": run}
            )
            out, err = mover.communicate(timeout=120)
        finally:
            stop(mover)
        assert mover.returncode == 0, out + err
        status = json.loads(out)
        line = console_result(result.console, "HIKKOSHI-DISKCHECK")
        assert line == f"HIKKOSHI-DISKCHECK OK blocks={blocks} run={run}", result.console[-3000:]
        assert status["elapsed"] > result.seconds / 2, "the move should overlap the guest's run"
        assert_moved(src, dst)
        equal_to_export(s, dst)
    assert verify_diskcheck_image(dst, run=run, blocks=blocks) == blocks
    with dst.open("rb") as f:
        f.seek(blocks * BLOCK_SIZE)
        assert f.read() == original[blocks * BLOCK_SIZE :]
