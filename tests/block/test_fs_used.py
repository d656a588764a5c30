"""fs_used: the blocks ext2/3/4 file systems use, checked against dumpe2fs and debugfs on real images made
by mke2fs, inside MBR and GPT partition tables, and against random and mutated bytes; images whose free
ranges are zeroed still check clean and hold the same files."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import random
import re
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hikkoshi.block import fs_used as fsu
from hikkoshi.block.fs_used import Range, fs_used_hint, fs_used_ranges
from hikkoshi.block.fs_used.bit_runs import set_bit_runs
from hikkoshi.block.partitions import parse_gpt_header, parse_mbr
from hikkoshi.block.ranges import complement, intersect, merge, subtract

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/sbin", "/usr/sbin"])


def _tool(name: str) -> str:
    path = shutil.which(name, path=SBIN)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


ReadFn = Callable[[int, int], Awaitable[bytes]]
MiB = 1 << 20
FILES = {"a.bin": 3_000_000, "b.bin": 70_000, "sub/c.bin": 5_000, "sub/empty": 0}


# --- building and reading images ---------------------------------------------------------------------------


def populate(src: Path, files: dict[str, int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    for name, size in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return src


def mkfs(
    path: Path,
    size: int,
    kind: str = "ext4",
    block_size: int = 4096,
    opts: tuple[str, ...] = (),
    files: dict[str, int] | None = None,
    offset: int = 0,
) -> Path:
    """A sparse image file of ``size`` bytes with a file system from mke2fs populated from a directory
    (``offset``: the file system starts there, the file must already be large enough)."""
    src = populate(path.with_name(path.name + ".src"), FILES if files is None else files)
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)
    argv = [_tool(f"mkfs.{kind}"), "-q", "-F", "-d", str(src), "-b", str(block_size), *opts]
    if offset:
        argv += ["-E", f"offset={offset}", str(path), f"{size // 1024}k"]
    else:
        argv += [str(path)]
    subprocess.run(argv, check=True, capture_output=True)
    return path


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[mmap.mmap]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        yield mm


def reader(data: bytes | bytearray | mmap.mmap, log: list[tuple[int, int]] | None = None) -> ReadFn:
    async def read(off: int, n: int) -> bytes:
        if log is not None:
            log.append((off, n))
        return bytes(data[off : off + n])

    return read


def scan(data: bytes | bytearray | mmap.mmap, strict: bool = True) -> list[Range] | None:
    fn = fs_used_ranges if strict else fs_used_hint
    return asyncio.run(fn(reader(data), len(data)))


def check_ranges(ranges: list[Range] | None, disk_size: int) -> None:
    """A valid answer: None, or sorted, merged, non-empty ranges inside the disk."""
    if ranges is None:
        return
    pos = -1
    for off, length in ranges:
        assert isinstance(off, int) and isinstance(length, int)
        assert length > 0 and off > pos and off + length <= disk_size, ranges
        pos = off + length


# --- the truth from dumpe2fs -------------------------------------------------------------------------------


@dataclass
class Group:
    first: int
    last: int
    uninit: bool
    free: list[tuple[int, int]]  # inclusive block ranges


@dataclass
class Truth:
    block_size: int
    cluster: int  # blocks per cluster
    blocks: int
    first_block: int
    groups: list[Group]
    journal: list[int]  # the journal's blocks in logical order ([] without an internal journal)
    journal_clean: bool  # its superblock says it is empty
    itable_spare: list[tuple[int, int]]  # [start, end): inode table blocks past every used inode (csum only)

    @property
    def spare(self) -> list[tuple[int, int]]:
        """[start, end) blocks that the strict scan calls free on top of the bitmaps' free blocks: the
        body of a clean journal, the never-used ends of inode tables."""
        body = [(b, b + 1) for b in self.journal[1:]] if self.journal_clean else []
        return merge(body + self.itable_spare)

    def used_map(self, strict: bool = True) -> bytearray:
        """One byte per block of the file system: 1 if used (for the strict scan, or for the hint)."""
        used = bytearray(b"\x01") * self.blocks
        for g in self.groups:
            for a, b in g.free:
                used[a : b + 1] = bytes(b + 1 - a)
        for a, b in self.spare if strict else ():
            used[a:b] = bytes(b - a)
        return used


def fs_name(image: Path, offset: int = 0) -> str:
    """How e2fsprogs names a file system at ``offset`` in an image."""
    return f"{image}?offset={offset}" if offset else str(image)


def inode_blocks(image: Path, inode: int, offset: int = 0) -> list[int]:
    """An inode's data blocks in logical order (holes left out), from debugfs (not its tree blocks)."""
    out = subprocess.run(
        [_tool("debugfs"), "-R", f"stat <{inode}>", fs_name(image, offset)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    runs = []
    for m in re.finditer(
        r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?", out.partition("BLOCKS:")[2] or out.partition("EXTENTS:")[2]
    ):
        first, last, phys = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3))
        runs.append((first, [phys + i for i in range(last - first + 1)]))
    return [b for _, blocks in sorted(runs) for b in blocks]


def dumpe2fs(image: Path, offset: int = 0) -> Truth:
    out = subprocess.run(
        [_tool("dumpe2fs"), fs_name(image, offset)], check=True, capture_output=True, text=True
    ).stdout

    def field(label: str) -> int:
        m = re.search(rf"^{label}:\s+(\d+)", out, re.M)
        assert m, label
        return int(m.group(1))

    bs = field("Block size")
    cluster = field("Cluster size") // bs if "Cluster size:" in out else 1
    ipg, inode_size = field("Inodes per group"), field("Inode size")
    features = re.search(r"^Filesystem features:(.*)$", out, re.M)
    assert features
    csum = {"metadata_csum", "uninit_bg"} & set(features.group(1).split())
    groups: list[Group] = []
    itable_spare = []
    for m in re.finditer(
        r"^Group \d+: \(Blocks (\d+)-(\d+)\)[^\n]*?(\[[^\]]*\])?\n(.*?)(?=^Group |\Z)", out, re.M | re.S
    ):
        free_line = re.search(r"^\s+Free blocks: ?(.*)$", m.group(4), re.M)
        assert free_line
        free = []
        for part in filter(None, (p.strip() for p in free_line.group(1).split(","))):
            a, _, b = part.partition("-")
            # With bigalloc, a range ends at the first block of its last free cluster.
            free.append((int(a), int(b or a) + cluster - 1))
        groups.append(Group(int(m.group(1)), int(m.group(2)), "BLOCK_UNINIT" in (m.group(3) or ""), free))
        table = re.search(r"Inode table at (\d+)-(\d+)", m.group(4))
        unused = re.search(r"(\d+) unused inodes", m.group(4))  # with group checksums, unless 0
        assert table
        if csum:
            in_use = ipg - (int(unused.group(1)) if unused else 0)
            first_spare = int(table.group(1)) + -(-in_use * inode_size // bs)
            if first_spare <= int(table.group(2)):
                itable_spare.append((first_spare, int(table.group(2)) + 1))
    journal: list[int] = []
    if "Journal inode:" in out:
        journal = inode_blocks(image, field("Journal inode"), offset)[: field("Total journal blocks")]
    clean = "Journal inode:" in out and field("Journal start") == 0
    return Truth(
        bs, cluster, field("Block count"), field("First block"), groups, journal, clean, itable_spare
    )


def used_map(ranges: list[Range], offset: int, block_size: int, blocks: int) -> bytearray:
    """Our answer as one byte per block of the file system at ``offset``: 1 if (partly) used."""
    used = bytearray(blocks)
    end = offset + blocks * block_size
    for off, length in ranges:
        a, b = max(off, offset), min(off + length, end)
        if a < b:
            first, last = (a - offset) // block_size, -(-(b - offset) // block_size)
            used[first:last] = b"\x01" * (last - first)
    return used


def assert_matches(ranges: list[Range] | None, truth: Truth, offset: int = 0, strict: bool = True) -> None:
    """Per group: exactly dumpe2fs's used blocks, less (``strict``) the body of a clean journal and the
    never-used ends of inode tables. (For an uninitialised group both tools compute the bitmap; we promise
    only a superset there, but match mke2fs's layouts exactly.) Blocks before the first group count as
    used."""
    assert ranges is not None
    mine = used_map(ranges, offset, truth.block_size, truth.blocks)
    real = truth.used_map(strict)
    assert mine[: truth.first_block] == b"\x01" * truth.first_block
    for i, g in enumerate(truth.groups):
        a, b = mine[g.first : g.last + 1], real[g.first : g.last + 1]
        diff = [g.first + j for j in range(len(a)) if a[j] != b[j]]
        assert not diff, f"group {i} ({'uninit' if g.uninit else 'bitmap'}): differs at blocks {diff[:10]}"


def free_outside(ranges: list[Range], disk_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The free bytes (as [start, end)) that are not inside [lo, hi)."""
    free = complement([(o, o + n) for o, n in ranges], 0, disk_size)
    return [(a, b) for a, b in free if a < lo or b > hi]


# --- single file systems -----------------------------------------------------------------------------------

CASES = {
    "ext4-4k": ("ext4", 4096, 1024 * MiB, ()),
    "ext4-1k": ("ext4", 1024, 64 * MiB, ()),
    "ext4-1k-noflex": ("ext4", 1024, 64 * MiB, ("-O", "^flex_bg")),
    "ext4-32bit-desc": ("ext4", 4096, 512 * MiB, ("-O", "^64bit")),
    "ext4-gdt-csum": ("ext4", 4096, 512 * MiB, ("-O", "^metadata_csum,uninit_bg")),
    "ext4-small-groups": ("ext4", 4096, 256 * MiB, ("-g", "4096")),
    "ext4-meta-bg": ("ext4", 1024, 128 * MiB, ("-O", "meta_bg,^resize_inode")),
    "ext4-sparse-super2": ("ext4", 4096, 1024 * MiB, ("-O", "sparse_super2")),
    "ext4-bigalloc": ("ext4", 4096, 1024 * MiB, ("-O", "bigalloc", "-C", "65536")),
    "ext4-1k-bigalloc-meta-bg": (
        "ext4",
        1024,
        128 * MiB,
        ("-O", "bigalloc,meta_bg,^resize_inode", "-C", "4096"),
    ),
    "ext4-noflex-gdt-csum": ("ext4", 1024, 64 * MiB, ("-O", "^flex_bg,^metadata_csum,uninit_bg")),
    "ext3-4k": ("ext3", 4096, 512 * MiB, ()),
    "ext2-4k": ("ext2", 4096, 256 * MiB, ()),
    "ext2-1k": ("ext2", 1024, 32 * MiB, ()),
    "ext2-no-sparse-super": ("ext2", 1024, 32 * MiB, ("-O", "^sparse_super,^resize_inode")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_disk_matches_dumpe2fs(tmp_path: Path, case: str) -> None:
    kind, bs, size, opts = CASES[case]
    image = mkfs(tmp_path / "fs.img", size, kind, bs, opts)
    truth = dumpe2fs(image)
    with mapped(image) as mm:
        ranges = scan(mm)
        hint = scan(mm, strict=False)
    check_ranges(ranges, size)
    assert_matches(ranges, truth)
    assert_matches(hint, truth, strict=False)
    assert ranges is not None and hint is not None
    assert subtract([(o, o + n) for o, n in ranges], [(o, o + n) for o, n in hint]) == []
    assert (ranges == hint) == (not truth.spare)
    assert not free_outside(ranges, size, 0, truth.blocks * truth.block_size)
    # Files of known sizes are inside the used part.
    assert sum(n for _, n in ranges) >= sum(FILES.values())


def test_ten_percent_full_is_mostly_free(tmp_path: Path) -> None:
    """1 GiB, ~100 MiB of files: the used part is the data plus under 1 % of metadata (the 32 MiB journal
    and the inode tables' unused ends are free, unlike for the hint)."""
    size = 1024 * MiB
    files = {f"f{i}.bin": 10 * MiB for i in range(10)}
    image = mkfs(tmp_path / "fs.img", size, files=files)
    with mapped(image) as mm:
        t0 = time.perf_counter()
        ranges = scan(mm)
        elapsed = time.perf_counter() - t0
    assert ranges is not None
    used = sum(n for _, n in ranges)
    data = sum(files.values())
    assert data <= used < data + 0.01 * size, used / size
    with mapped(image) as mm:
        hint = scan(mm, strict=False)
    assert hint is not None and sum(n for _, n in hint) > data + 0.04 * size
    assert_matches(ranges, dumpe2fs(image))
    assert elapsed < 2.0


def test_large_sparse_fs_is_fast_and_coalesced(tmp_path: Path) -> None:
    """64 GiB (513 groups): few reads, bounded concurrency, well under a second."""
    size = 64 << 30
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([_tool("mkfs.ext4"), "-q", "-F", str(image)], check=True, capture_output=True)
    calls: list[tuple[int, int]] = []
    in_flight = peak = 0

    with mapped(image) as mm:

        async def read(off: int, n: int) -> bytes:
            nonlocal in_flight, peak
            calls.append((off, n))
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0)  # let the others start: as a network client would
            in_flight -= 1
            return bytes(mm[off : off + n])

        t0 = time.perf_counter()
        ranges = asyncio.run(fs_used_ranges(read, size))
        elapsed = time.perf_counter() - t0
    truth = dumpe2fs(image)
    assert_matches(ranges, truth)
    assert ranges is not None and sum(n for _, n in ranges) < 0.05 * size
    assert len(calls) < 64, len(calls)
    assert 1 < peak <= fsu.CONCURRENCY
    assert elapsed < 2.0


def test_through_nbd(tmp_path: Path) -> None:
    from hikkoshi.nbd.client import NbdClient
    from tests.support.servers import hikkoshi_server

    image = mkfs(tmp_path / "fs.img", 256 * MiB)
    with mapped(image) as mm:
        expected = scan(mm)
    with hikkoshi_server(str(image), "--export", "disk") as s:

        async def main() -> list[Range] | None:
            async with NbdClient(s.export_uri("disk")) as c:
                return await fs_used_ranges(c.read, c.size)

        ranges = asyncio.run(main())
    assert ranges == expected
    assert_matches(ranges, dumpe2fs(image))


# --- partition tables ---------------------------------------------------------------------------------------


def mbr(entries: list[tuple[int, int, int]], status: int = 0) -> bytes:
    """Sector 0 with primary entries (type, first LBA, sectors)."""
    sector = bytearray(512)
    for i, (ptype, start, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, status, b"", ptype, b"", start, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


LINUX_FS = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le


def write_gpt(f: BinaryIO, disk_size: int, parts: list[tuple[int, int]]) -> None:
    """A protective MBR, primary and backup GPT with ``parts`` as (first LBA, last LBA)."""
    last = disk_size // 512 - 1
    entries = bytearray(128 * 128)
    for i, (a, b) in enumerate(parts):
        struct.pack_into("<16s16sQQQ", entries, i * 128, LINUX_FS, uuid.uuid4().bytes, a, b, 0)
    disk_guid = uuid.uuid4().bytes

    def header(my: int, alt: int, entries_lba: int) -> bytes:
        h = bytearray(512)
        struct.pack_into(
            "<8sIIIIQQQQ16sQIII", h, 0, b"EFI PART", 0x10000, 92, 0, 0, my, alt, 34, last - 33,
            disk_guid, entries_lba, 128, 128, zlib.crc32(entries),
        )  # fmt: skip
        struct.pack_into("<I", h, 16, zlib.crc32(h[:92]))
        return bytes(h)

    for off, data in (
        (0, mbr([(0xEE, 1, min(last, 0xFFFFFFFF))])),
        (512, header(1, last, 2)),
        (1024, bytes(entries)),
        ((last - 32) * 512, bytes(entries)),
        (last * 512, header(last, 1, last - 32)),
    ):
        f.seek(off)
        f.write(data)


def test_mbr_disk(tmp_path: Path) -> None:
    """MBR: an ext4 partition at 1 MiB (made with mkfs -E offset), a partition of random bytes, an
    extended partition holding an ext2 file system, free space: only the ext4 file system has free bytes."""
    size = 160 * MiB
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    p1, p1_len = 1 * MiB, 64 * MiB
    p2, p2_len = 66 * MiB, 16 * MiB
    p3, p3_len = 90 * MiB, 40 * MiB
    mkfs(disk, p1_len, offset=p1)
    mkfs(disk, 32 * MiB, "ext2", 1024, offset=p3 + MiB)  # a "logical" partition inside the extended one
    table = [
        (0x83, p1 // 512, p1_len // 512),
        (0x83, p2 // 512, p2_len // 512),
        (0x05, p3 // 512, p3_len // 512),
    ]
    with open(disk, "r+b") as f:
        f.seek(p2)
        f.write(random.Random(2).randbytes(p2_len))
        f.seek(0)
        f.write(mbr(table))
    truth = dumpe2fs(disk, p1)
    with mapped(disk) as mm:
        ranges = scan(mm)
    check_ranges(ranges, size)
    assert_matches(ranges, truth, p1)
    assert ranges is not None
    assert not free_outside(ranges, size, p1, p1 + p1_len)
    assert ranges[0][0] == 0  # the MBR and the gap before the partition
    assert ranges[-1][0] <= p2 and sum(ranges[-1]) == size  # random partition, extended one, tail


def test_gpt_disk(tmp_path: Path) -> None:
    """GPT: ext4 and ext2 (1 KiB blocks) partitions; the backup header serves when the primary is bad;
    nothing is known when both are bad."""
    size = 200 * MiB
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    parts = [(2048, 2048 + 64 * MiB // 512 - 1), (68 * MiB // 512, 68 * MiB // 512 + 48 * MiB // 512 - 1)]
    mkfs(disk, 64 * MiB, offset=parts[0][0] * 512)
    mkfs(disk, 48 * MiB, "ext2", 1024, offset=parts[1][0] * 512)
    with open(disk, "r+b") as f:
        write_gpt(f, size, parts)
    truths = [dumpe2fs(disk, a * 512) for a, _ in parts]
    data = bytearray(disk.read_bytes())
    ranges = scan(data)
    check_ranges(ranges, size)
    for (a, _), truth in zip(parts, truths, strict=True):
        assert_matches(ranges, truth, a * 512)
    assert ranges is not None
    free = complement([(o, o + n) for o, n in ranges], 0, size)
    assert all(any(a * 512 <= s and e <= (b + 1) * 512 for a, b in parts) for s, e in free)

    data[512 + 40] ^= 0xFF  # primary header CRC fails: the backup serves
    assert scan(data) == ranges
    data[size - 512 + 40] ^= 0xFF  # backup too: a protective MBR alone says nothing
    assert scan(data) is None


def test_both_layouts_plausible(tmp_path: Path) -> None:
    """A whole-disk file system that also carries an MBR whose partition holds no file system: a byte is
    free only if both readings say so — here, none is."""
    size = 64 * MiB
    image = mkfs(tmp_path / "fs.img", size)
    data = bytearray(image.read_bytes())
    whole = scan(data)
    assert whole is not None and whole != [(0, size)]
    data[:512] = mbr([(0x83, 2048, (size - MiB) // 512)])
    assert scan(data) == [(0, size)]


def test_stale_backup_gpt_is_ignored(tmp_path: Path) -> None:
    """mkfs on a whole disk that had a GPT zaps the first sectors, not the backup GPT at the end: without
    a protective MBR it is no layout."""
    size = 64 * MiB
    image = mkfs(tmp_path / "fs.img", size)
    head = image.read_bytes()[: 34 * 512]
    before = scan(image.read_bytes())
    with open(image, "r+b") as f:
        write_gpt(f, size, [(2048, 4095)])
        f.seek(0)
        f.write(head)  # mkfs's first sectors; the backup GPT stays
    assert scan(image.read_bytes()) == before


def test_overlapping_partitions(tmp_path: Path) -> None:
    """A partition overlapping an ext partition takes away its free space where they overlap."""
    size = 128 * MiB
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    mkfs(disk, 64 * MiB, offset=MiB)
    data = bytearray(disk.read_bytes())
    data[:512] = mbr([(0x83, 2048, 64 * MiB // 512)])
    alone = scan(data)
    data[:512] = mbr([(0x83, 2048, 64 * MiB // 512), (0x83, 33 * MiB // 512, 64 * MiB // 512)])
    both = scan(data)
    assert alone is not None and both is not None
    free_alone = complement([(o, o + n) for o, n in alone], 0, size)
    free_both = complement([(o, o + n) for o, n in both], 0, size)
    assert free_both == subtract(free_alone, [(33 * MiB, 97 * MiB)])


def test_partition_parsers() -> None:
    assert parse_mbr(bytes(512), 1 << 30) is None
    assert parse_mbr(mbr([]), 1 << 30) is None  # a signature but no entries: no table
    assert parse_mbr(mbr([(0x83, 2048, 2048)], status=0x12), 1 << 30) is None  # boot code, not a table
    table = parse_mbr(mbr([(0x83, 2048, 2048), (0x0F, 4096, 1 << 30), (0x83, 1 << 30, 8)]), 10 * MiB)
    assert table is not None and not table.protective
    assert [(p.start, p.length, p.probe) for p in table.partitions] == [
        (MiB, MiB, True),
        (2 * MiB, 8 * MiB, False),
    ]
    assert parse_gpt_header(bytes(512), 512, 1, 1 << 30) is None


# --- cleanliness and corruption -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ext4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """64 MiB, 1 KiB blocks, 8 groups (flex_bg, uninit groups), with files."""
    return mkfs(tmp_path_factory.mktemp("small") / "fs.img", 64 * MiB, "ext4", 1024).read_bytes()


def _sb_field(data: bytearray, at: int, fmt: str, update: Callable[[int], int]) -> None:
    (value,) = struct.unpack_from(fmt, data, 1024 + at)
    struct.pack_into(fmt, data, 1024 + at, update(value))


def _descriptor(data: bytes | bytearray, g: int) -> int:
    """Byte offset of group ``g``'s descriptor in a 1 KiB-block image (GDT at block 2)."""
    desc_size = struct.unpack_from("<H", data, 1024 + 0xFE)[0] if data[1024 + 0x60] & 0x80 else 32
    return 2048 + g * desc_size


@pytest.mark.parametrize(
    ("field", "fmt", "update", "why"),
    [
        (0x60, "<I", lambda v: v | 0x4, "journal needs recovery"),
        (0x3A, "<H", lambda v: v & ~1, "not marked clean"),
        (0x3A, "<H", lambda v: v | 2, "error flag"),
    ],
)
def test_unclean_fs_is_fully_used_unless_hint(
    small_ext4: bytes,
    caplog: pytest.LogCaptureFixture,
    field: int,
    fmt: str,
    update: Callable[[int], int],
    why: str,
) -> None:
    clean = scan(small_ext4, strict=False)
    data = bytearray(small_ext4)
    _sb_field(data, field, fmt, update)
    with caplog.at_level(logging.WARNING, logger="hikkoshi.block.fs_used"):
        assert scan(data) == [(0, len(data))]
    assert why in caplog.text
    assert scan(data, strict=False) == clean


def test_bitmap_free_count_mismatch(small_ext4: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A used data block cleared in the bitmap: the group's free count no longer agrees, so the strict
    scan distrusts the file system; the hint believes the bitmap."""
    data = bytearray(small_ext4)
    bb = struct.unpack_from("<I", data, _descriptor(data, 0))[0]
    clean = scan(data, strict=False)
    assert clean is not None
    last_used = (clean[0][0] + clean[0][1]) // 1024 - 1  # a file's block at the end of group 0's first run
    data[bb * 1024 + (last_used - 1) // 8] &= ~(1 << ((last_used - 1) % 8)) & 0xFF
    with caplog.at_level(logging.WARNING):
        assert scan(data) == [(0, len(data))]
    assert "free clusters, descriptor says" in caplog.text
    hint = scan(data, strict=False)
    assert hint is not None and hint != clean


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # Group 1's block bitmap beyond the end of the file system.
        (lambda d: struct.pack_into("<I", d, _descriptor(d, 1), 1 << 30), "outside"),
        # Group 1's block bitmap on group 0's.
        (
            lambda d: d.__setitem__(
                slice(_descriptor(d, 1), _descriptor(d, 1) + 4), d[_descriptor(d, 0) :][:4]
            ),
            "overlaps",
        ),
        # Group 0's inode table marked free in its bitmap (first inode table block).
        (
            lambda d: d.__setitem__(
                struct.unpack_from("<I", d, _descriptor(d, 0))[0] * 1024
                + (struct.unpack_from("<I", d, _descriptor(d, 0) + 8)[0] - 1) // 8,
                0,
            ),
            "marks group metadata free",
        ),
        # More blocks than the disk has.
        (lambda d: _sb_field(d, 0x4, "<I", lambda v: v * 4), "extent"),
        # A feature we do not know.
        (lambda d: _sb_field(d, 0x60, "<I", lambda v: v | 0x40000000), "incompatible features"),
    ],
)
def test_inconsistent_fs_is_fully_used(
    small_ext4: bytes, caplog: pytest.LogCaptureFixture, mutate: Callable[[bytearray], None], message: str
) -> None:
    data = bytearray(small_ext4)
    mutate(data)
    with caplog.at_level(logging.WARNING):
        hint = scan(data, strict=False)
    assert message in caplog.text
    assert hint in ([(0, len(data))], None)  # a broken whole-disk superblock is no plausible layout at all


def test_no_file_system() -> None:
    assert scan(bytes(4 * MiB)) is None
    assert scan(random.Random(3).randbytes(MiB)) is None
    assert scan(b"") is None
    assert scan(bytes(1000)) is None


def test_read_errors_propagate(small_ext4: bytes) -> None:
    for fail_at in range(16):
        calls = 0

        async def read(off: int, n: int, fail_at: int = fail_at) -> bytes:
            nonlocal calls
            calls += 1
            if calls > fail_at:
                raise OSError(5, "EIO")
            await asyncio.sleep(0)
            return small_ext4[off : off + n]

        try:
            result = asyncio.run(fs_used_ranges(read, len(small_ext4)))
        except OSError as exc:
            assert exc.errno == 5
        else:
            assert result == scan(small_ext4)


def test_short_reads_are_not_trusted(small_ext4: bytes) -> None:
    async def read(off: int, n: int) -> bytes:
        return small_ext4[off : off + n // 2] if n > 1024 else small_ext4[off : off + n]

    assert asyncio.run(fs_used_ranges(read, len(small_ext4))) == [(0, len(small_ext4))]


# --- beyond the bitmaps: the body of a clean journal, the unused ends of inode tables -----------------------


def garbage_file(path: Path, size: int, seed: int) -> Path:
    """Random bytes: what the free space of a used disk holds (mkfs then runs with -E nodiscard)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))
    return path


def keep_only(image: Path, ranges: list[Range], out: Path) -> Path:
    """A sparse copy of ``image`` holding only ``ranges``, zeroes elsewhere: what the relocation proxy
    leaves with --skip-fs-free."""
    with open(image, "rb") as src, open(out, "wb") as dst:
        dst.truncate(image.stat().st_size)
        for off, n in ranges:
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(n))
    return out


def e2fsck(image: Path, *opts: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("e2fsck"), *opts, str(image)], capture_output=True, text=True, check=False)


def tree(root: Path) -> dict[str, bytes]:
    """The files under ``root`` (no lost+found) by relative path, with their contents."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


def files_of(image: Path, into: Path) -> dict[str, bytes]:
    into.mkdir()
    subprocess.run([_tool("debugfs"), "-R", f"rdump / {into}", str(image)], check=True, capture_output=True)
    return tree(into)


def fragmented_journal(path: Path) -> Path:
    """A 12 MiB ext4 (1 KiB blocks) whose free space is 2200 one-block holes when tune2fs adds its 1 MiB
    journal: an extent tree of depth 2 (a root of index entries, an index block, leaves)."""
    src = path.with_name(path.name + ".src")
    files = {f"f{i}": 1024 for i in range(4400)}

    def make(extra: dict[str, int]) -> int:
        populate(src, files | extra, seed=7)
        with open(path, "wb") as f:
            f.truncate(12 * MiB)
        argv = [_tool("mkfs.ext4"), "-q", "-F", "-b", "1024", "-I", "128", "-N", "4600", "-O", "^has_journal"]
        subprocess.run([*argv, "-d", str(src), str(path)], check=True, capture_output=True)
        return int(re.findall(r"^Free blocks:\s+(\d+)", dumpe2fs_header(path), re.M)[0])

    free = make({})
    assert make({"zz": (free - 40) * 1024}) <= 64  # full but for the holes to come
    rm = "".join(f"rm /f{i}\n" for i in range(0, 4400, 2))
    subprocess.run(
        [_tool("debugfs"), "-w", "-f", "-", str(path)], input=rm.encode(), check=True, capture_output=True
    )
    for i in range(0, 4400, 2):
        (src / f"f{i}").unlink()
    subprocess.run([_tool("tune2fs"), "-J", "size=1", str(path)], check=True, capture_output=True)
    return path


def dumpe2fs_header(image: Path) -> str:
    return subprocess.run(
        [_tool("dumpe2fs"), "-h", str(image)], check=True, capture_output=True, text=True
    ).stdout


SPARE_CASES = {
    # name: (kind, block size, size, mkfs options, has group checksums)
    "ext4-4k": ("ext4", 4096, 256 * MiB, (), True),
    "ext4-1k": ("ext4", 1024, 64 * MiB, (), True),
    "ext4-gdt-csum": ("ext4", 4096, 256 * MiB, ("-O", "^metadata_csum,uninit_bg"), True),
    "ext4-no-csum": ("ext4", 4096, 256 * MiB, ("-O", "^metadata_csum,^uninit_bg"), False),
    "ext3-4k": ("ext3", 4096, 256 * MiB, (), False),  # block-mapped journal (double indirect)
    "ext3-1k": ("ext3", 1024, 64 * MiB, (), False),
}


@pytest.mark.parametrize("case", list(SPARE_CASES))
def test_clean_journal_body_and_unused_inode_tables_are_free(tmp_path: Path, case: str) -> None:
    """The journal's superblock stays used, its body is free; the inode table blocks holding used inodes
    stay used, the rest are free with group checksums (bg_itable_unused) and used without."""
    kind, bs, size, opts, csum = SPARE_CASES[case]
    image = mkfs(tmp_path / "fs.img", size, kind, bs, opts)
    truth = dumpe2fs(image)
    with mapped(image) as mm:
        ranges = scan(mm)
        hint = scan(mm, strict=False)
    assert ranges is not None and hint is not None
    mine = used_map(ranges, 0, bs, truth.blocks)
    assert truth.journal_clean and len(truth.journal) >= 1024
    assert mine[truth.journal[0]] == 1
    assert not any(mine[b] for b in truth.journal[1:])
    assert all(used_map(hint, 0, bs, truth.blocks)[b] for b in truth.journal)
    out = subprocess.run([_tool("dumpe2fs"), str(image)], check=True, capture_output=True, text=True).stdout
    tables = [(int(a), int(b) + 1) for a, b in re.findall(r"Inode table at (\d+)-(\d+)", out)]
    # Group 0 holds the used inodes (the reserved ones, the root, lost+found and our few files).
    a = tables[0][0]
    inodes = len(FILES) + 12
    inode_size = int(re.findall(r"^Inode size:\s+(\d+)", out, re.M)[0])
    holding = -(-inodes * inode_size // bs)
    assert mine[a : a + holding] == b"\x01" * holding
    table_blocks = sum(b - a for a, b in tables)
    free_table_blocks = sum(1 for a, b in tables for x in range(a, b) if not mine[x])
    if csum:
        assert free_table_blocks > 0.9 * table_blocks
    else:
        assert free_table_blocks == 0
    assert_matches(ranges, truth)


@pytest.mark.parametrize(
    ("case", "garbage"),
    [("ext4-4k", True), ("ext4-1k", True), ("ext4-gdt-csum", False), ("ext3-4k", True), ("ext3-1k", False)],
)
def test_zeroing_the_free_ranges_keeps_the_fs_intact(tmp_path: Path, case: str, garbage: bool) -> None:
    """A copy with only the used ranges (zeroes elsewhere, also where the source holds random garbage):
    e2fsck -fn finds nothing, every file reads back the same."""
    kind, bs, size, opts, _ = SPARE_CASES[case]
    image = tmp_path / "fs.img"
    if garbage:
        garbage_file(image, size, seed=11)
        opts = (*opts, "-E", "nodiscard")
    mkfs(image, size, kind, bs, opts)
    src = image.with_name(image.name + ".src")
    with mapped(image) as mm:
        ranges = scan(mm)
    assert ranges is not None
    copy = keep_only(image, ranges, tmp_path / "copy.img")
    check = e2fsck(copy, "-fn")
    assert check.returncode == 0, check.stdout + check.stderr
    assert files_of(copy, tmp_path / "files") == tree(src)
    assert_matches(ranges, dumpe2fs(image))


def test_fragmented_journal(tmp_path: Path) -> None:
    """A journal in 1000 one-block extents (extent tree of depth 2): its body is free, its tree blocks
    stay used, and zeroing the free ranges leaves the file system intact."""
    image = fragmented_journal(tmp_path / "fs.img")
    stat = subprocess.run(
        [_tool("debugfs"), "-R", "stat <8>", str(image)], check=True, capture_output=True, text=True
    ).stdout
    assert "(ETB1)" in stat  # depth 2
    tree_blocks = [int(b) for b in re.findall(r"\(ETB\d\):(\d+)", stat)]
    truth = dumpe2fs(image)
    assert len(truth.journal) == 1024 and truth.journal_clean
    with mapped(image) as mm:
        ranges = scan(mm)
    assert_matches(ranges, truth)
    assert ranges is not None
    mine = used_map(ranges, 0, 1024, truth.blocks)
    assert tree_blocks and all(mine[b] for b in tree_blocks)
    assert sum(1 for b in truth.journal if not mine[b]) == 1023
    copy = keep_only(image, ranges, tmp_path / "copy.img")
    check = e2fsck(copy, "-fn")
    assert check.returncode == 0, check.stdout + check.stderr
    assert files_of(copy, tmp_path / "files") == tree(image.with_name("fs.img.src"))


@pytest.fixture
def small_image(small_ext4: bytes, tmp_path: Path) -> tuple[bytearray, Truth]:
    path = tmp_path / "small.img"
    path.write_bytes(small_ext4)
    return bytearray(small_ext4), dumpe2fs(path)


def _jsb_field(at: int, value: int) -> Callable[[bytearray, int], None]:
    return lambda d, jsb: struct.pack_into(">I", d, jsb + at, value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_jsb_field(0x1C, 1), "journal is not empty"),  # s_start: transactions to replay
        (_jsb_field(0x20, 5), "journal is not empty"),  # s_errno: the journal was aborted
        (_jsb_field(0x0, 0x12345678), "journal superblock: magic"),
        (_jsb_field(0xC, 4096), "block size"),
        (_jsb_field(0x10, 1 << 20), "length"),  # s_maxlen beyond the journal inode's size
        (_jsb_field(0x14, 0), "first 0"),
    ],
)
def test_doubtful_journal_stays_used(
    small_image: tuple[bytearray, Truth],
    caplog: pytest.LogCaptureFixture,
    mutate: Callable[[bytearray, int], None],
    message: str,
) -> None:
    """A journal whose superblock does not say "clean and empty" keeps all its blocks; the rest of the
    answer (inode tables included) is unchanged."""
    data, truth = small_image
    assert truth.journal_clean
    mutate(data, truth.journal[0] * truth.block_size)  # the journal superblock
    with caplog.at_level(logging.WARNING):
        ranges = scan(data)
    assert message in caplog.text and "keeping its journal" in caplog.text
    mine = used_map(ranges or [], 0, truth.block_size, truth.blocks)
    expected = truth.used_map()
    for b in truth.journal:
        expected[b] = 1
    assert mine == expected


def _journal_inode(data: bytes | bytearray) -> int:
    """Byte offset of inode 8 in the 1 KiB-block image."""
    table: int = struct.unpack_from("<I", data, _descriptor(data, 0) + 8)[0]
    inode_size: int = struct.unpack_from("<H", data, 1024 + 0x58)[0]
    return table * 1024 + 7 * inode_size


def _journal_onto_inode_table(d: bytearray) -> None:
    extent = _journal_inode(d) + 0x28 + 12
    jsb = struct.unpack_from("<I", d, extent + 8)[0] * 1024
    target = struct.unpack_from("<I", d, _descriptor(d, 0) + 8)[0] + 4  # inodes 17-20 (256 bytes each)
    d[target * 1024 : target * 1024 + 1024] = d[jsb : jsb + 1024]
    struct.pack_into("<I", d, extent + 8, target)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # Not a regular file.
        (lambda d: struct.pack_into("<H", d, _journal_inode(d), 0o40600), "mode"),
        # No longer linked.
        (lambda d: struct.pack_into("<H", d, _journal_inode(d) + 0x1A, 0), "links"),
        # Its extent header broken.
        (lambda d: struct.pack_into("<H", d, _journal_inode(d) + 0x28, 0x1234), "extent node"),
        # Its extent's start beyond the file system.
        (lambda d: struct.pack_into("<I", d, _journal_inode(d) + 0x28 + 12 + 8, 1 << 30), "outside"),
        # Its extent shortened: journal blocks unmapped.
        (lambda d: struct.pack_into("<H", d, _journal_inode(d) + 0x28 + 12 + 4, 100), "unmapped"),
        # Its extent moved onto group 0's inode table (past inode 8), the journal superblock with it.
        (_journal_onto_inode_table, "on file system metadata"),
        # Block-mapped instead of extent-mapped: the extent header read as block numbers.
        (lambda d: struct.pack_into("<I", d, _journal_inode(d) + 0x20, 0), "journal superblock"),
    ],
)
def test_doubtful_journal_inode_stays_used(
    small_image: tuple[bytearray, Truth],
    caplog: pytest.LogCaptureFixture,
    mutate: Callable[[bytearray], None],
    message: str,
) -> None:
    data, truth = small_image
    mutate(data)
    with caplog.at_level(logging.WARNING):
        ranges = scan(data)
    assert message in caplog.text and "keeping its journal" in caplog.text
    mine = used_map(ranges or [], 0, truth.block_size, truth.blocks)
    expected = truth.used_map()
    for b in truth.journal:
        expected[b] = 1
    assert mine == expected


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # An inode past the mark (bg_itable_unused) in use in group 0's inode bitmap.
        (
            lambda d: d.__setitem__(
                struct.unpack_from("<I", d, _descriptor(d, 0) + 4)[0] * 1024 + 1000 // 8, 1 << (1000 % 8)
            ),
            "beyond the first",
        ),
        # More unused inodes than inodes.
        (lambda d: struct.pack_into("<H", d, _descriptor(d, 0) + 0x1C, 60000), "unused inodes of"),
        # The free-inode count disagrees with the bitmap.
        (lambda d: struct.pack_into("<H", d, _descriptor(d, 0) + 0xE, 7), "free inodes, descriptor says"),
        # Group 0 flagged INODE_UNINIT: its inodes are in use.
        (lambda d: d.__setitem__(_descriptor(d, 0) + 0x12, d[_descriptor(d, 0) + 0x12] | 1), "INODE_UNINIT"),
        # Group 1 INODE_UNINIT but with inodes in use.
        (lambda d: struct.pack_into("<H", d, _descriptor(d, 1) + 0xE, 7), "INODE_UNINIT"),
        # A first inode below the reserved ones.
        (lambda d: _sb_field(d, 0x54, "<I", lambda v: 5), "first inode"),
    ],
)
def test_doubtful_inode_tables_stay_used(
    small_image: tuple[bytearray, Truth],
    caplog: pytest.LogCaptureFixture,
    mutate: Callable[[bytearray], None],
    message: str,
) -> None:
    """Inode table ends whose descriptors do not check out stay used; the journal body is still free."""
    data, truth = small_image
    mutate(data)
    with caplog.at_level(logging.WARNING):
        ranges = scan(data)
    assert message in caplog.text and "keeping its inode tables" in caplog.text
    mine = used_map(ranges or [], 0, truth.block_size, truth.blocks)
    expected = truth.used_map()
    for a, b in truth.itable_spare:
        expected[a:b] = b"\x01" * (b - a)
    assert mine == expected


def test_relocated_image_mounts_and_recovers(tmp_path: Path) -> None:
    """The kernel on a copy with zeroed free ranges (root and loop devices only): the files read back;
    new files take never-used inodes and the zeroed journal takes their transactions; a snapshot taken
    while mounted (a crash) is recovered by e2fsck from that journal; unmounted, the copy checks clean."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    image = garbage_file(tmp_path / "fs.img", 128 * MiB, seed=13)
    mkfs(image, 128 * MiB, opts=("-E", "nodiscard"))
    with mapped(image) as mm:
        ranges = scan(mm)
    assert ranges is not None
    copy = keep_only(image, ranges, tmp_path / "copy.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-o", "loop", str(copy), str(mnt)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a loop device here")
    try:
        assert tree(mnt) == tree(image.with_name("fs.img.src"))
        new = populate(mnt / "new", {f"d{i % 7}/n{i}": 3000 + i for i in range(600)}, seed=17)
        written = tree(new)
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        crashed = tmp_path / "crashed.img"
        shutil.copyfile(copy, crashed)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert e2fsck(copy, "-fn").returncode == 0
    recovered = e2fsck(crashed, "-fy")
    assert recovered.returncode in (0, 1), recovered.stdout + recovered.stderr
    assert "recovering journal" in recovered.stdout + recovered.stderr
    check = e2fsck(crashed, "-fn")
    assert check.returncode == 0, check.stdout + check.stderr
    for img, where in ((copy, "a"), (crashed, "b")):
        files = files_of(img, tmp_path / where)
        assert {k.removeprefix("new/"): v for k, v in files.items() if k.startswith("new/")} == written


# --- properties ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.data())
def test_runs_are_exact_or_cover(nbits: int, data: st.DataObject) -> None:
    x = data.draw(st.integers(min_value=0, max_value=(1 << nbits) - 1))
    budget = data.draw(st.integers(min_value=1, max_value=64))
    runs = set_bit_runs(x, nbits, budget)
    covered = sum(((1 << (b - a)) - 1) << a for a, b in runs)
    assert all(0 <= a < b <= nbits for a, b in runs)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs))
    exact = (x & ~(x << 1)).bit_count() <= budget
    assert covered == x if exact else (covered & x) == x
    assert len(runs) <= max(budget + 1, 1)


spans = st.lists(
    st.tuples(st.integers(0, 100), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])), max_size=8
)


@given(spans, spans)
def test_interval_algebra(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    def points(s: list[tuple[int, int]]) -> set[int]:
        return {p for x, y in s for p in range(x, y)}

    ma, mb = merge(a), merge(b)
    assert points(ma) == points(a)
    assert points(intersect(ma, mb)) == points(a) & points(b)
    assert points(subtract(ma, mb)) == points(a) - points(b)
    assert points(complement(ma, 10, 90)) == set(range(10, 90)) - points(a)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=1 << 16))
def test_random_disks(blob: bytes) -> None:
    check_ranges(scan(blob), len(blob))


def _sectors(draw: st.DrawFn) -> bytes:
    """A disk that starts like a partitioned one, or like a file system, with random fields."""
    size = draw(st.sampled_from([4096, 65536, 1 << 20]))
    disk = bytearray(size)
    kind = draw(st.sampled_from(["mbr", "gpt", "ext"]))
    if kind == "mbr":
        entries = draw(
            st.lists(st.tuples(st.integers(0, 255), st.integers(0, 4096), st.integers(0, 4096)), max_size=4)
        )
        disk[:512] = mbr(entries)
    elif kind == "gpt":
        disk[:512] = mbr([(0xEE, 1, size // 512 - 1)])
        disk[512:1024] = draw(st.binary(min_size=512, max_size=512))
        disk[512:520] = b"EFI PART"
    else:
        disk[1024:2048] = draw(st.binary(min_size=1024, max_size=1024))
        disk[1024 + 0x38 : 1024 + 0x3A] = b"\x53\xef"
    return bytes(disk)


@settings(max_examples=200, deadline=None)
@given(st.composite(_sectors)())
def test_random_structures(disk: bytes) -> None:
    check_ranges(scan(disk), len(disk))
    check_ranges(scan(disk, strict=False), len(disk))


@pytest.fixture(scope="module")
def fuzz_images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Small real images to mutate: ext4 with 1 KiB and 4 KiB blocks (many groups), and a GPT disk."""
    d = tmp_path_factory.mktemp("fuzz")
    few = {"a": 40_000, "b/c": 3000}
    images = [
        mkfs(d / "a.img", 4 * MiB, "ext4", 1024, files=few).read_bytes(),
        mkfs(d / "b.img", 8 * MiB, "ext4", 4096, ("-g", "256", "-N", "256"), files=few).read_bytes(),
    ]
    disk = d / "gpt.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    mkfs(disk, 4 * MiB, "ext2", 1024, files=few, offset=MiB)
    with open(disk, "r+b") as f:
        write_gpt(f, 8 * MiB, [(2048, 2048 + 8191)])
    images.append(disk.read_bytes())
    return images


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_images(fuzz_images: list[bytes], data: st.DataObject) -> None:
    """Random bytes changed in the metadata of real images: always a valid answer, never an exception."""
    image = bytearray(data.draw(st.sampled_from(fuzz_images)))
    hot = st.one_of(
        st.integers(0, 3 * 4096),  # partition table, superblock, descriptors of the 1 KiB image
        st.integers(1024, 1024 + 0x300),  # superblock fields
        st.integers(MiB, MiB + 16 * 1024),  # the file system inside the GPT disk
        st.integers(0, len(image) - 1),
    )
    for pos, value in data.draw(st.lists(st.tuples(hot, st.integers(0, 255)), min_size=1, max_size=8)):
        if pos < len(image):
            image[pos] = value
    check_ranges(scan(image), len(image))
    check_ranges(scan(image, strict=False), len(image))
