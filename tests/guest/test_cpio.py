"""The newc cpio writer: round trips, layout rules, and what an independent cpio makes of it."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hikkoshi.guest import cpio

ENTRIES = [
    cpio.directory("bin"),
    cpio.directory("dev"),
    cpio.directory("tmp", 0o1777),
    cpio.regular_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
    cpio.symlink("bin/sh", "tool"),
    cpio.char_device("dev/console", 5, 1),
    cpio.regular_file("empty", b""),
    # Lengths 1..4 exercise every padding case of name and data.
    cpio.regular_file("a", b"x"),
    cpio.regular_file("ab", b"xy"),
    cpio.regular_file("abc", b"xyz"),
    cpio.regular_file("abcd", b"wxyz"),
    cpio.regular_file("big", bytes(range(256)) * 1000 + b"tail"),
]


def _busybox() -> str | None:
    return shutil.which("busybox") or shutil.which("cpio")


def test_round_trip() -> None:
    data = cpio.pack_newc(ENTRIES)
    assert cpio.read_newc(data) == ENTRIES


def test_layout_is_aligned_and_ends_with_trailer() -> None:
    data = cpio.pack_newc(ENTRIES)
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!\0" in data[-128:]
    # Every member header starts on a 4-byte boundary: walk the headers by hand.
    pos = 0
    names = []
    while True:
        assert pos % 4 == 0
        assert data[pos : pos + 6] == b"070701"
        namesize = int(data[pos + 94 : pos + 102], 16)
        filesize = int(data[pos + 54 : pos + 62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        names.append(name)
        if name == "TRAILER!!!":
            break
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + -filesize % 4
    assert names == [e.name for e in ENTRIES] + ["TRAILER!!!"]


def test_same_entries_same_bytes() -> None:
    assert cpio.pack_newc(ENTRIES) == cpio.pack_newc(list(ENTRIES))


def test_fields() -> None:
    (console,) = (e for e in cpio.read_newc(cpio.pack_newc(ENTRIES)) if e.name == "dev/console")
    assert stat.S_ISCHR(console.mode)
    assert (console.rdev_major, console.rdev_minor) == (5, 1)
    link = cpio.read_newc(cpio.pack_newc([cpio.symlink("l", "target")]))[0]
    assert link.is_symlink and link.data == b"target"


def test_leading_slash_is_dropped() -> None:
    assert cpio.read_newc(cpio.pack_newc([cpio.regular_file("/init", b"x")]))[0].name == "init"


@pytest.mark.parametrize(
    "entries",
    [
        [cpio.regular_file("a", b""), cpio.regular_file("a", b"")],
        [cpio.regular_file("", b"")],
        [cpio.CpioEntry("d", stat.S_IFDIR | 0o755, b"data")],
    ],
)
def test_rejects_bad_entries(entries: list[cpio.CpioEntry]) -> None:
    with pytest.raises(cpio.CpioError):
        cpio.pack_newc(entries)


def test_reader_rejects_damage() -> None:
    data = cpio.pack_newc(ENTRIES)
    with pytest.raises(cpio.CpioError, match="magic"):
        cpio.read_newc(b"070707" + data[6:])
    with pytest.raises(cpio.CpioError):
        cpio.read_newc(data[:-200])  # the trailer is gone
    with pytest.raises(cpio.CpioError):
        cpio.read_newc(data[:50])


@pytest.mark.skipif(_busybox() is None, reason="needs busybox or cpio")
def test_independent_cpio_lists_it(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.pack_newc(ENTRIES))
    tool = _busybox()
    assert tool is not None
    cmd = [tool, "cpio", "-t"] if tool.endswith("busybox") else [tool, "-t", "--quiet"]
    listed = subprocess.run(cmd, input=archive.read_bytes(), capture_output=True, check=True)
    assert listed.stdout.decode().split() == [e.name for e in ENTRIES]


@pytest.mark.skipif(_busybox() is None, reason="needs busybox or cpio")
def test_independent_cpio_extracts_it(tmp_path: Path) -> None:
    # No device node: creating one needs root.
    entries = [e for e in ENTRIES if not stat.S_ISCHR(e.mode) and e.name != "dev"]
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.pack_newc(entries))
    out = tmp_path / "out"
    out.mkdir()
    tool = _busybox()
    assert tool is not None
    cmd = [tool, "cpio", "-i", "-d"] if tool.endswith("busybox") else [tool, "-i", "-d", "--quiet"]
    subprocess.run(cmd, input=archive.read_bytes(), cwd=out, capture_output=True, check=True)
    for entry in entries:
        path = out / entry.name
        if entry.is_dir:
            assert path.is_dir()
        elif entry.is_symlink:
            assert path.readlink() == Path(entry.data.decode())
        else:
            assert path.read_bytes() == entry.data
            assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(entry.mode)
