"""Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) against our server.

Each test asserts something that a wrong server would break: sizes, contents compared with the image file,
the allocation map, advertised capabilities, checksums, fio's own verification.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.control import control_request
from hikkoshi.nbd.errors import CommandError
from tests.support.images import make_image
from tests.support.servers import Served, hikkoshi_server, run_tool

MiB = 1 << 20
SIZE = 64 * MiB

needs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio")),
    reason="needs qemu-utils, libnbd-bin and fio",
)
pytestmark = needs


def run(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool(*argv, timeout=timeout, check=check)


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    proc = run(*argv, uri, check=check)
    if check:
        assert "verification failed" not in proc.stdout + proc.stderr, proc.stdout
    return proc


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def image_layout() -> list[tuple[int, int, int]]:
    """The allocation map of the ``image`` fixture: 1 MiB of data every 4 MiB, the rest holes."""
    out: list[tuple[int, int, int]] = []
    for off in range(0, SIZE, 4 * MiB):
        out.append((off, MiB, 0))
        out.append((off + MiB, 3 * MiB, 3))  # NBD_STATE_HOLE | NBD_STATE_ZERO
    return out


def merged(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, length, kind in extents:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((off, length, kind))
    return out


def kinds(extents: list[tuple[int, int, int]], offset: int, length: int) -> set[int]:
    """The extent types overlapping [offset, offset+length)."""
    return {k for off, n, k in extents if off < offset + length and off + n > offset}


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    entries = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    return merged([(e["offset"], e["length"], e["type"]) for e in entries])


def nbdinfo_json(uri: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run("nbdinfo", "--json", uri).stdout)
    return info


def stats(served: Served) -> dict[str, Any]:
    assert served.control is not None
    result: dict[str, Any] = asyncio.run(control_request(served.control, "stats", regions=True))
    return result


# --- qemu-img -------------------------------------------------------------------------------------------


def test_qemu_img_info_reports_the_file_size(served: Served, image: Path) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", served.export_uri("disk")).stdout)
    assert info["virtual-size"] == image.stat().st_size == SIZE


def test_qemu_img_compare_export_with_its_file(served: Served, image: Path, tmp_path: Path) -> None:
    uri = served.export_uri("disk")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri)
    # And compare notices a difference: a copy with one changed byte differs (exit status 1).
    other = tmp_path / "other.raw"
    shutil.copyfile(image, other)
    with open(other, "r+b") as f:
        f.seek(40 * MiB + 12345)
        f.write(b"\x01")
    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), uri, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"offset {(40 * MiB + 12345) // 512 * 512}!" in proc.stdout  # qemu reports the sector


def test_qemu_img_convert_export_to_file(served: Served, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.export_uri("disk"), str(out))
    assert out.stat().st_size == SIZE
    assert sha256(out) == sha256(image)


def test_qemu_img_convert_file_into_export(served: Served, image: Path, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", SIZE, seed=7, data_every=2 * MiB)
    assert sha256(src) != sha256(image)
    uri = served.export_uri("disk")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    assert sha256(image) == sha256(src)  # what the export wrote is in the served file


# --- qemu-io --------------------------------------------------------------------------------------------


def test_qemu_io_pattern_write_and_read(served: Served, image: Path) -> None:
    uri = served.export_uri("disk")
    qemu_io(uri, "write -P 0xab 2M 1M", "read -P 0xab 2M 1M", "write -P 0xcd 5M 64k", "read -P 0xcd 5M 64k")
    assert file_bytes(image, 2 * MiB, MiB) == b"\xab" * MiB
    assert file_bytes(image, 5 * MiB, 65536) == b"\xcd" * 65536
    # Pattern verification is real: a wrong pattern fails.
    proc = qemu_io(uri, "read -P 0xac 2M 4k", check=False)
    assert "Pattern verification failed" in proc.stdout + proc.stderr


def test_qemu_io_discard_reads_zeroes_and_makes_a_hole(served: Served, image: Path) -> None:
    uri = served.export_uri("disk")
    # Region 8M..9M holds random data; discard its middle.
    qemu_io(uri, "discard 8256k 512k", "read -P 0 8256k 512k")
    assert file_bytes(image, 8256 * 1024, 512 * 1024) == bytes(512 * 1024)
    assert file_bytes(image, 8 * MiB, 64 * 1024) != bytes(64 * 1024)  # the rest is untouched
    extents = nbd_map(uri)
    assert (8256 * 1024, 512 * 1024, 3) in extents
    assert kinds(extents, 8 * MiB, 64 * 1024) == {0}


def test_qemu_io_write_zeroes(served: Served, image: Path) -> None:
    uri = served.export_uri("disk")
    # Without -u the zeroes must stay allocated (NO_HOLE); with -u the server may punch a hole.
    qemu_io(uri, "write -z 12M 256k", "read -P 0 12M 256k", "write -z -u 16M 256k", "read -P 0 16M 256k")
    assert file_bytes(image, 12 * MiB, 256 * 1024) == bytes(256 * 1024)
    assert file_bytes(image, 16 * MiB, 256 * 1024) == bytes(256 * 1024)
    assert file_bytes(image, 12 * MiB + 256 * 1024, 4096) != bytes(4096)  # neighbours untouched
    extents = nbd_map(uri)
    assert kinds(extents, 16 * MiB, 256 * 1024) == {3}  # unmapped: a hole reading as zeroes
    assert kinds(extents, 16 * MiB + 256 * 1024, 768 * 1024) == {0}
    # Zeroes written with NO_HOLE are never reported as a hole.
    assert kinds(extents, 12 * MiB, MiB) == {0}


def test_qemu_io_unaligned_io(served: Served, image: Path) -> None:
    uri = served.export_uri("disk")
    before = file_bytes(image, 0, 3 * MiB)
    qemu_io(
        uri,
        "write -P 0x11 3 511",
        "write -P 0x22 1 1",
        "write -P 0x33 1048575 3",  # across the data/hole boundary at 1 MiB
        "write -P 0x44 2097151 1",  # the last byte of a hole region
        "read -P 0x11 3 511",
        "read -P 0x22 1 1",
        "read -P 0x33 1048575 3",
        "read -P 0x44 2097151 1",
    )
    expected = bytearray(before)
    expected[3:514] = b"\x11" * 511
    expected[1] = 0x22
    expected[1048575:1048578] = b"\x33" * 3
    expected[2097151] = 0x44
    assert file_bytes(image, 0, 3 * MiB) == bytes(expected)
    # Unaligned reads of what was there before: the byte before the first write is unchanged.
    proc = qemu_io(uri, f"read -P {before[0]} 0 1", f"read -P {before[514]} 514 1")
    assert "read 1/1 bytes at offset 514" in proc.stdout
    # Odd-sized unaligned zeroes inside a data region: exactly those bytes become zero.
    around = bytearray(file_bytes(image, 4 * MiB, 8192))
    qemu_io(uri, "write -z 4194307 1021", "read -P 0 4194307 1021")
    around[3:1024] = bytes(1021)
    assert file_bytes(image, 4 * MiB, 8192) == bytes(around)


def test_read_only_export_refuses_writes(image: Path) -> None:
    original = sha256(image)
    with hikkoshi_server(str(image), "--export", "disk", "--read-only") as s:
        uri = s.export_uri("disk")
        # qemu sees the read-only flag and refuses to open for writing at all.
        proc = qemu_io(uri, "write -P 0xab 0 4k", check=False)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "Permission denied" in out or "Operation not permitted" in out, out
        assert "wrote" not in out
        # Reads work.
        first = file_bytes(image, 0, 1)[0]
        proc = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P {first} 0 1", uri)
        assert "verification failed" not in proc.stdout
        # A client that writes anyway gets EPERM from the server, and the connection goes on.

        async def write_anyway() -> None:
            async with NbdClient(uri) as c:
                assert c.read_only
                with pytest.raises(CommandError) as err:
                    await c.write(0, b"\xab" * 4096)
                assert err.value.errno == 1  # EPERM
                with pytest.raises(CommandError) as err:
                    await c.write_zeroes(0, 4096)
                assert err.value.errno == 1
                with pytest.raises(CommandError) as err:
                    await c.trim(0, 4096)
                assert err.value.errno == 1
                assert await c.read(0, 1) == bytes([first])

        asyncio.run(write_anyway())
    assert sha256(image) == original


# --- nbdinfo --------------------------------------------------------------------------------------------


def test_nbdinfo_json_writable_export(served: Served) -> None:
    info = nbdinfo_json(served.export_uri("disk"))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    assert export["can_multi_conn"] is True
    assert export["can_flush"] is True
    assert export["can_fua"] is True
    assert export["can_trim"] is True
    assert export["can_zero"] is True
    assert export["can_cache"] is True
    assert export["can_df"] is True
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_json_read_only_export(image: Path) -> None:
    with hikkoshi_server(str(image), "--export", "disk", "--read-only") as s:
        (export,) = nbdinfo_json(s.export_uri("disk"))["exports"]
    assert export["is_read_only"] is True
    assert export["export-size"] == SIZE
    assert export["can_trim"] is False
    assert export["can_zero"] is False
    assert export["can_fast_zero"] is False
    assert export["can_fua"] is False


#: nbdinfo --can FLAG: expected answer for a writable and for a read-only export of a file.
CAN = {
    "flush": (True, True),
    "trim": (True, False),
    "zero": (True, False),
    "fast-zero": (True, False),
    "fua": (True, False),
    "cache": (True, True),
    "multi-conn": (True, True),
    "df": (True, True),
}


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_nbdinfo_can(image: Path, read_only: bool) -> None:
    # nbdinfo --can exits 0 for true, 2 for false.
    args = [str(image), "--export", "disk"] + (["--read-only"] if read_only else [])
    with hikkoshi_server(*args) as s:
        got = {
            flag: run("nbdinfo", "--can", flag, s.export_uri("disk"), check=False).returncode for flag in CAN
        }
    expected = {flag: 0 if answers[read_only] else 2 for flag, answers in CAN.items()}
    assert got == expected


def test_nbdinfo_is_read_only(image: Path, served: Served) -> None:
    assert run("nbdinfo", "--is", "read-only", served.export_uri("disk"), check=False).returncode == 2
    with hikkoshi_server(str(image), "--export", "disk", "--read-only") as s:
        assert run("nbdinfo", "--is", "read-only", s.export_uri("disk"), check=False).returncode == 0


def test_nbdinfo_map_matches_the_image_layout(served: Served) -> None:
    assert nbd_map(served.export_uri("disk")) == image_layout()


def test_nbdinfo_map_after_writes(served: Served) -> None:
    uri = served.export_uri("disk")
    qemu_io(uri, "write -P 0x5a 2M 64k")
    expected = image_layout()
    expected[1:2] = [(MiB, MiB, 3), (2 * MiB, 64 * 1024, 0), (2 * MiB + 64 * 1024, 2 * MiB - 64 * 1024, 3)]
    assert nbd_map(uri) == expected


def test_nbdinfo_totals(served: Served) -> None:
    # --totals: 16 MiB of the 64 MiB are data.
    proc = run("nbdinfo", "--map", "--totals", "--json", served.export_uri("disk"))
    totals = {e["type"]: e["size"] for e in json.loads(proc.stdout)}
    assert totals == {0: 16 * MiB, 3: 48 * MiB}


def test_nbdinfo_list_shows_every_export(tmp_path: Path) -> None:
    imgs = [make_image(tmp_path / f"{n}.raw", (i + 1) * 8 * MiB, seed=i) for i, n in enumerate("abc")]
    names = ["--export", "alpha", "--export", "beta", "--export", "gamma"]
    with hikkoshi_server(*map(str, imgs), *names, "--describe-paths") as s:
        info = json.loads(run("nbdinfo", "--list", "--json", s.uri).stdout)
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"alpha", "beta", "gamma"}
    assert [exports[n]["export-size"] for n in ("alpha", "beta", "gamma")] == [8 * MiB, 16 * MiB, 24 * MiB]
    assert exports["beta"]["description"] == str(imgs[1].resolve())


# --- nbdcopy --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_export_to_file(served: Served, image: Path, tmp_path: Path, connections: int) -> None:
    out = tmp_path / "copy.raw"
    run(
        "nbdcopy",
        f"--connections={connections}",
        f"--threads={connections}",
        served.export_uri("disk"),
        str(out),
        timeout=60,
    )
    assert sha256(out) == sha256(image)
    s = stats(served)["disk"]
    assert s["bytes_read"] >= 16 * MiB  # at least the data; holes may be skipped via block status
    assert s["errors"] == 0
    # We advertise multi-conn: nbdcopy opens as many connections as it was allowed.
    assert s["connections_total"] == connections


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_file_to_export(served: Served, image: Path, tmp_path: Path, connections: int) -> None:
    src = make_image(tmp_path / "src.raw", SIZE, seed=99, data_every=3 * MiB)
    expected = sha256(src)
    assert expected != sha256(image)
    run(
        "nbdcopy",
        f"--connections={connections}",
        f"--threads={connections}",
        "--flush",
        str(src),
        served.export_uri("disk"),
        timeout=60,
    )
    assert sha256(image) == expected
    s = stats(served)["disk"]
    assert s["connections_total"] == connections
    assert s["requests"].get("FLUSH", 0) >= 1  # --flush: nbdcopy flushed before it finished
    assert s["errors"] == 0
    # Read back through the server too.
    back = tmp_path / "back.raw"
    run("nbdcopy", served.export_uri("disk"), str(back), timeout=60)
    assert sha256(back) == expected


def test_nbdcopy_destination_keeps_holes(served: Served, tmp_path: Path) -> None:
    # nbdcopy skips holes using our block status: the copy is sparse where the image is.
    out = tmp_path / "copy.raw"
    run("nbdcopy", served.export_uri("disk"), str(out), timeout=60)
    assert out.stat().st_blocks * 512 <= 20 * MiB


def test_libnbd_clients_that_flush_are_let_go(served: Served, tmp_path: Path) -> None:
    """libnbd sends FLUSH, then DISC, then waits for the server to close: the server must close.

    (Each nbdcopy --flush run takes well under a second; one that hangs means the server kept the
    connection open after NBD_CMD_DISC.)
    """
    src = make_image(tmp_path / "small.raw", 4 * MiB, seed=3)
    for _ in range(6):
        run(
            "nbdcopy",
            "--flush",
            "--connections=1",
            "--threads=1",
            str(src),
            served.export_uri("disk"),
            timeout=20,
        )
    s = stats(served)["disk"]
    assert s["connections_total"] == 6
    assert s["requests"]["FLUSH"] >= 6


# --- fio ------------------------------------------------------------------------------------------------


def fio_json(*args: str, timeout: float = 120) -> dict[str, Any]:
    proc = run("fio", "--output-format=json", *args, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify" not in proc.stderr.lower(), proc.stderr
    start = proc.stdout.index("{")
    result: dict[str, Any] = json.loads(proc.stdout[start:])
    return result


def test_fio_randwrite_verify_crc32c(served: Served, image: Path) -> None:
    size = 8 * MiB
    result = fio_json(
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.export_uri('disk')}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--offset={16 * MiB}",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    )
    (job,) = result["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == size
    assert job["read"]["io_bytes"] == size  # the verify pass read everything back
    s = stats(served)["disk"]
    assert s["errors"] == 0
    assert s["bytes_written"] >= size


def test_fio_mixed_block_sizes_verify(served: Served) -> None:
    # Unaligned-size requests (bssplit, 512-byte multiples) across the data/hole layout.
    result = fio_json(
        "--name=mixed",
        "--ioengine=nbd",
        f"--uri={served.export_uri('disk')}",
        "--rw=randwrite",
        "--bssplit=512/20:1536/20:4k/30:68k/30",
        "--iodepth=16",
        f"--offset={3 * MiB}",
        f"--size={4 * MiB}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    )
    (job,) = result["jobs"]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0
