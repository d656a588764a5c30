"""Which byte ranges of a disk its ext2/3/4 file systems use, read from their block bitmaps (and, for
skipping, less what e2image also leaves out: the body of a clean journal, the never-used ends of inode
tables).

The relocation proxy copies these ranges before the rest of the disk (and, with ``--skip-fs-free``, copies
nothing else). The answer is conservative: a byte is *free* only when an ext file system that checks out
says so, in every plausible reading of the disk's layout. Everything else is *used*: partition tables,
gaps, partitions without an ext file system, extended partitions (wholesale), the tail of a partition
behind its file system, and any file system that fails a check.

Layout. The disk may be read as a whole-disk file system (plausible when the superblock at byte 1024
checks out, not merely its magic), as an MBR (primary entries, 512-byte sectors) or as a GPT (only behind a
protective MBR, as Linux does; primary header, else the backup; 512- or 4096-byte sectors; the MBR entries
of a hybrid MBR are then ignored). When more than one reading is plausible (a whole-disk superblock *and*
a partition table), a byte is free only if every reading says so. Partitions are probed for an ext
superblock whatever their type; overlapping partitions leave free only what none of them uses.

Bitmaps. Each block group's bitmap has one bit per block (per cluster with bigalloc). A group flagged
``BLOCK_UNINIT`` (honoured only with ``gdt_csum``/``metadata_csum``, as the kernel does) has no bitmap on
disk; the kernel computes it: superblock and descriptor backups (per ``sparse_super``/``sparse_super2``/
``meta_bg``), reserved GDT blocks, and the group's own bitmaps and inode table when they lie inside it. We
compute the same, and additionally mark the bitmaps and inode tables of *every* group that ``flex_bg``
placed inside the uninitialised group, and the MMP block. (mke2fs does not leave such a group
uninitialised, so on its file systems this adds nothing — the tests match dumpe2fs exactly — but a
doubtful file system stays safe.)

Checks. Geometry (block size, counts, groups), features (unknown ones make the layout unknowable), the
locations of every group's bitmaps and inode table (inside the file system, inside their group without
``flex_bg``, overlapping neither each other nor any superblock or descriptor copy), that each bitmap marks all
the metadata known to lie in its group, and — for :func:`fs_used_ranges` — that the free count in each
group descriptor equals the free bits we found, and that the file system was cleanly unmounted. Any
failure: that file system counts as fully used and a warning is logged. Only ``OSError`` from ``read``
propagates.

Beyond the bitmaps (:func:`fs_used_ranges` only). Two kinds of allocated blocks hold nothing the guest's
kernel (or e2fsck) will read as meaningful, and count as free too; on a 10 % full image they are most of
the metadata (a 1 GiB ext4 has a 32 MiB journal and 16 MiB of inode tables):

- The *journal body*: every block of an internal journal (``s_journal_inum``, no journal device) but its
  first, the journal superblock, when that says the journal is empty (``s_start`` 0, ``s_errno`` 0) on a
  cleanly unmounted file system. jbd2 then replays nothing and only ever writes the body; recovery after a
  later crash stops at the first block that is not the next transaction's, zeroes included. The journal
  inode must be a regular file in use, mapped by an extent tree (index blocks read level by level; depth
  at most 5; no unwritten extents) or an ext2/3 block map (indirect blocks read level by level), every
  journal block ``[0, s_maxlen)`` mapped exactly once, inside the file system, on no group metadata,
  marked used in the block bitmap; the journal superblock must have jbd2's magic, the file system's block
  size, and ``0 < s_first < s_maxlen <=`` the inode's size. Its tree or indirect blocks stay used.
- The *unused ends of inode tables*: with ``gdt_csum``/``metadata_csum`` (as the kernel: otherwise the
  field means nothing) a group's ``bg_itable_unused`` counts the inodes at the end of its table that were
  never used (all of them with ``INODE_UNINIT``); the kernel reads no inode there, zeroes new ones before
  use, and its lazy init zeroes those blocks anyway, as does mke2fs when it does not defer it. The blocks
  that hold no inode below that mark are free. Checked, for every group: the mark within the table, no
  inode at or past it in use in the inode bitmap (read with the block bitmaps), the bitmap's free inodes
  equal to the descriptor's count, ``INODE_UNINIT`` only with every inode free, the reserved inodes (below
  ``s_first_ino``, at least 11) below the marks.

A failure in either keeps that part used (the journal, or all the inode tables), the rest of the answer
stands, and a warning is logged.

Cleanliness. A mounted (or crashed) ext3/4 file system has ``needs_recovery`` set: its journal may hold
committed bitmap updates that are not yet in place, and the guest's memory may hold allocations whose data
already reached the disk. Its on-disk bitmaps prove nothing, so :func:`fs_used_ranges` treats it as fully
used (likewise ext2 without the clean flag, and any file system with the error flag).
:func:`fs_used_hint` skips those checks: its ranges are a good *order* for copying (the bitmaps lag the
guest by seconds), never a licence to skip the rest.

Cost. Reads are few and large: the descriptor table in one go, block (and, strict, inode) bitmaps
coalesced when they lie within :data:`MAX_GAP` of each other (``flex_bg`` packs them back to back) up to
:data:`MAX_READ`, at most :data:`CONCURRENCY` at once; then the journal inode, any levels of its tree, and
its superblock. Bits become runs with big-integer operations, a Python step per run; a
group with more than its share of :data:`MAX_RUNS` runs is described in coarser granules (more "used").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hikkoshi.block.partitions import Partition, parse_gpt_entries, parse_gpt_header, parse_mbr
from hikkoshi.block.ranges import Span, complement, intersect, merge, subtract, to_ranges, total

Range = tuple[int, int]  # (byte offset, byte length) on the whole disk
ReadFn = Callable[[int, int], Awaitable[bytes]]

log = logging.getLogger("hikkoshi.block.fs_used")

MAX_READ = 4 << 20  # bytes in one read of coalesced metadata blocks
MAX_GAP = 256 << 10  # unwanted bytes read to join two wanted blocks into one request
CONCURRENCY = 16  # reads in flight
MAX_RUNS = 1 << 19  # used runs kept per file system (memory bound for huge, fragmented ones)

_MAGIC = 0xEF53
_STATE_VALID = 0x1
_STATE_ERROR = 0x2
_STATE_ORPHANS = 0x4

_COMPAT_HAS_JOURNAL = 0x4
_COMPAT_LAZY_BG = 0x40
_COMPAT_EXCLUDE_INODE = 0x80
_COMPAT_EXCLUDE_BITMAP = 0x100
_COMPAT_SPARSE_SUPER2 = 0x200

_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_INCOMPAT_MMP = 0x100
_INCOMPAT_FLEX_BG = 0x200
# Features whose presence leaves the block-bitmap layout as we read it: filetype, recover (checked
# separately), meta_bg, extents, 64bit, mmp, flex_bg, ea_inode, dirdata, csum_seed, largedir,
# inline_data, encrypt, casefold. Anything else (compression, journal_dev, new bits): unknowable.
_INCOMPAT_KNOWN = 0x2 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000
_INCOMPAT_KNOWN |= 0x8000 | 0x10000 | 0x20000

_RO_COMPAT_SPARSE_SUPER = 0x1
_RO_COMPAT_GDT_CSUM = 0x10
_RO_COMPAT_BIGALLOC = 0x200
_RO_COMPAT_METADATA_CSUM = 0x400
# sparse_super, large_file, btree_dir, huge_file, gdt_csum, dir_nlink, extra_isize, quota, bigalloc,
# metadata_csum, readonly, project, verity, orphan_present. Not: has_snapshot, replica, shared_blocks.
_RO_COMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000
_RO_COMPAT_KNOWN |= 0x8000 | 0x10000

_BG_INODE_UNINIT = 0x1
_BG_BLOCK_UNINIT = 0x2

_S_IFMT, _S_IFREG = 0xF000, 0x8000
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_EXTENT_MAGIC = 0xF30A
_EXTENT_MAX_DEPTH = 5
_JBD2_MAGIC = 0xC03B3998
_JBD2_SUPERBLOCK_V1, _JBD2_SUPERBLOCK_V2 = 3, 4


class _Malformed(Exception):
    """Data that does not check out: the file system (or table) is treated as fully used."""


class _Unreadable(_Malformed):
    """A read outside the disk, or one that came back short."""


T = TypeVar("T")


# --- public API -------------------------------------------------------------------------------------------


async def fs_used_ranges(read: ReadFn, disk_size: int) -> list[Range] | None:
    """The byte ranges of the disk that are not provably free, sorted and merged; None if the disk holds
    no ext2/3/4 file system at all (then nothing is known and the caller copies in plain order).

    ``read(offset, length)`` returns disk bytes; its ``OSError`` propagates, nothing else is raised.
    Free means: free in the block bitmap of a cleanly unmounted ext file system that passes every check
    (see the module docstring). Safe for skipping the free rest.
    """
    return await _scan(read, disk_size, strict=True)


async def fs_used_hint(read: ReadFn, disk_size: int) -> list[Range] | None:
    """Like :func:`fs_used_ranges`, but also trusts the bitmaps of file systems that are mounted or were
    not cleanly unmounted (and tolerates group free counts that lag their bitmaps). For ordering a copy
    only: a guest may use blocks that these bitmaps do not show yet."""
    return await _scan(read, disk_size, strict=False)


# --- reading ----------------------------------------------------------------------------------------------


async def _bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run ``jobs`` with at most ``limit`` in flight; results in order. On an error the others are
    cancelled and the error itself (not a group) propagates, so callers can catch ``OSError``."""
    results: dict[int, T] = {}
    next_job = 0

    async def worker() -> None:
        nonlocal next_job
        while next_job < len(jobs):
            i = next_job
            next_job += 1
            results[i] = await jobs[i]()

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(jobs)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return [results[i] for i in range(len(jobs))]


class _Reader:
    """Disk reads that never leave the disk and never come back short (else :class:`_Malformed`)."""

    def __init__(self, read: ReadFn, disk_size: int) -> None:
        self._read = read
        self.disk_size = disk_size
        self.requests = 0

    async def exact(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise _Unreadable(f"read of {length} bytes at {offset} is outside the disk")
        self.requests += 1
        data = await self._read(offset, length)
        if len(data) != length:
            raise _Unreadable(f"read of {length} bytes at {offset} returned {len(data)}")
        return bytes(data)

    async def blocks(self, offsets: Iterable[int], size: int) -> dict[int, bytes]:
        """``size`` bytes at each offset, fetched in few, large, concurrent reads."""
        batches: list[tuple[int, int, list[int]]] = []  # (start, end, offsets)
        for off in sorted(set(offsets)):
            if batches and off - batches[-1][1] <= MAX_GAP and off + size - batches[-1][0] <= MAX_READ:
                start, end, members = batches[-1]
                members.append(off)
                batches[-1] = (start, max(end, off + size), members)
            else:
                batches.append((off, off + size, [off]))

        def job(start: int, end: int) -> Callable[[], Awaitable[bytes]]:
            return lambda: self.exact(start, end - start)

        datas = await _bounded([job(s, e) for s, e, _ in batches], CONCURRENCY)
        out: dict[int, bytes] = {}
        for (start, _end, members), data in zip(batches, datas, strict=True):
            for off in members:
                out[off] = data[off - start : off - start + size]
        return out


# --- ext superblock ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ext:
    """The geometry of one ext file system, checked."""

    offset: int  # byte offset on the disk
    block_size: int
    ratio: int  # blocks per cluster (bigalloc), else 1
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    clusters_per_group: int
    inode_table_blocks: int
    inodes_per_group: int
    inode_size: int
    first_ino: int
    journal_inum: int  # 0 without an internal journal
    journal_dev: int
    desc_size: int
    groups: int
    reserved_gdt: int
    first_meta_bg: int
    state: int
    compat: int
    incompat: int
    ro_compat: int
    backup_bgs: tuple[int, int]
    mmp_block: int

    @property
    def end(self) -> int:
        return self.offset + self.blocks_count * self.block_size

    @property
    def desc_per_block(self) -> int:
        return self.block_size // self.desc_size

    @property
    def desc_blocks(self) -> int:
        return -(-self.groups // self.desc_per_block)

    @property
    def sb_block(self) -> int:
        """The block holding the primary superblock (byte 1024)."""
        return 1024 // self.block_size

    @property
    def meta_bg(self) -> bool:
        return bool(self.incompat & _INCOMPAT_META_BG)

    @property
    def uninit_honoured(self) -> bool:
        # The kernel honours BLOCK_UNINIT only with group descriptor checksums.
        return bool(self.ro_compat & (_RO_COMPAT_GDT_CSUM | _RO_COMPAT_METADATA_CSUM))

    def group_first(self, g: int) -> int:
        return self.first_data_block + g * self.blocks_per_group

    def group_end(self, g: int) -> int:
        return min(self.group_first(g) + self.blocks_per_group, self.blocks_count)

    def group_of(self, block: int) -> int:
        return (block - self.first_data_block) // self.blocks_per_group

    def has_super(self, g: int) -> bool:
        if g == 0:
            return True
        if self.compat & _COMPAT_SPARSE_SUPER2:
            return g in self.backup_bgs
        if g == 1 or not self.ro_compat & _RO_COMPAT_SPARSE_SUPER:
            return True
        if g % 2 == 0:
            return False
        for base in (3, 5, 7):
            n = g
            while n % base == 0:
                n //= base
            if n == 1:
                return True
        return False

    def desc_block(self, nr: int) -> int:
        """Where descriptor block ``nr`` lives (the primary copy)."""
        if not self.meta_bg or nr < self.first_meta_bg:
            return self.sb_block + 1 + nr
        g = nr * self.desc_per_block
        extra = int(self.has_super(g))
        if self.block_size == 1024 and nr == 0 and self.first_data_block == 0:
            extra += 1  # 1 KiB blocks with bigalloc: block 1 holds the superblock
        return self.group_first(g) + extra

    def base_meta(self, g: int) -> list[Span]:
        """Blocks at the start of group ``g`` for the superblock and descriptor copies (as the kernel
        counts them for an uninitialised group)."""
        first = self.group_first(g)
        sb_end = self.sb_block + 1 if g == 0 else first + 1
        has_super = self.has_super(g)
        meta_group, index = divmod(g, self.desc_per_block)
        if not self.meta_bg or meta_group < self.first_meta_bg:
            if not has_super:
                return []
            old_desc = self.first_meta_bg if self.meta_bg else self.desc_blocks
            return [(first, sb_end + old_desc + self.reserved_gdt)]
        out: list[Span] = [(first, sb_end)] if has_super else []
        if index in (0, 1, self.desc_per_block - 1):
            blk = self.desc_block(meta_group) if index == 0 else first + int(has_super)
            out.append((blk, blk + 1))
        return out


def _u16(raw: bytes, at: int) -> int:
    value: int = struct.unpack_from("<H", raw, at)[0]
    return value


def _u32(raw: bytes, at: int) -> int:
    value: int = struct.unpack_from("<I", raw, at)[0]
    return value


def _parse_super(raw: bytes, offset: int, span: int) -> _Ext | None:
    """The geometry in superblock ``raw`` of a file system at ``offset`` inside ``span`` bytes.

    None if it is no ext superblock (magic). :class:`_Malformed` if it is one whose geometry does not hold
    together — which also tells the caller the disk holds an ext file system here.
    """
    if len(raw) < 1024 or _u16(raw, 0x38) != _MAGIC:
        return None
    log_block = _u32(raw, 0x18)
    if log_block > 6:
        raise _Malformed(f"block size 2^(10+{log_block})")
    bs = 1024 << log_block
    rev = _u32(raw, 0x4C)
    if rev > 1:
        raise _Malformed(f"revision {rev}")
    compat, incompat, ro_compat = (_u32(raw, 0x5C), _u32(raw, 0x60), _u32(raw, 0x64)) if rev else (0, 0, 0)
    inode_size = _u16(raw, 0x58) if rev else 128
    if incompat & ~_INCOMPAT_KNOWN or incompat & _INCOMPAT_JOURNAL_DEV:
        raise _Malformed(f"incompatible features {incompat:#x}")
    if ro_compat & ~_RO_COMPAT_KNOWN:
        raise _Malformed(f"read-only-compatible features {ro_compat:#x}")
    if compat & (_COMPAT_LAZY_BG | _COMPAT_EXCLUDE_INODE | _COMPAT_EXCLUDE_BITMAP):
        raise _Malformed(f"compatible features {compat:#x} (lazy_bg / snapshot exclusion)")
    ratio = 1
    if ro_compat & _RO_COMPAT_BIGALLOC:
        log_cluster = _u32(raw, 0x1C)
        if not log_block <= log_cluster <= log_block + 16:
            raise _Malformed(f"cluster size 2^(10+{log_cluster})")
        ratio = 1 << (log_cluster - log_block)
    blocks_count = _u32(raw, 0x4)
    if incompat & _INCOMPAT_64BIT:
        blocks_count |= _u32(raw, 0x150) << 32
    first_data_block = _u32(raw, 0x14)
    blocks_per_group = _u32(raw, 0x20)
    clusters_per_group = _u32(raw, 0x24)
    inodes_per_group = _u32(raw, 0x28)
    if first_data_block != (1 if bs == 1024 and ratio == 1 else 0):
        raise _Malformed(f"first data block {first_data_block} with {bs}-byte blocks")
    if not 8 <= clusters_per_group <= 8 * bs or blocks_per_group != clusters_per_group * ratio:
        raise _Malformed(f"{blocks_per_group} blocks, {clusters_per_group} clusters per group")
    if not 0 < inodes_per_group <= 8 * bs:
        raise _Malformed(f"{inodes_per_group} inodes per group")
    if inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1):
        raise _Malformed(f"inode size {inode_size}")
    if blocks_count <= first_data_block + 1 or blocks_count * bs > span:
        raise _Malformed(f"{blocks_count} blocks of {bs} bytes in a {span}-byte extent")
    desc_size = 32
    if incompat & _INCOMPAT_64BIT:
        desc_size = _u16(raw, 0xFE)
        if desc_size < 64 or desc_size > min(bs, 1024) or desc_size & (desc_size - 1):
            raise _Malformed(f"descriptor size {desc_size}")
    reserved_gdt = _u16(raw, 0xCE)
    if reserved_gdt > bs // 4:
        raise _Malformed(f"{reserved_gdt} reserved GDT blocks")
    groups = -(-(blocks_count - first_data_block) // blocks_per_group)
    ext = _Ext(
        offset=offset,
        block_size=bs,
        ratio=ratio,
        blocks_count=blocks_count,
        first_data_block=first_data_block,
        blocks_per_group=blocks_per_group,
        clusters_per_group=clusters_per_group,
        inode_table_blocks=-(-(inodes_per_group * inode_size) // bs),
        inodes_per_group=inodes_per_group,
        inode_size=inode_size,
        first_ino=_u32(raw, 0x54) if rev else 11,
        journal_inum=_u32(raw, 0xE0) if compat & _COMPAT_HAS_JOURNAL else 0,
        journal_dev=_u32(raw, 0xE4),
        desc_size=desc_size,
        groups=groups,
        reserved_gdt=reserved_gdt,
        first_meta_bg=_u32(raw, 0x104) if incompat & _INCOMPAT_META_BG else 0,
        state=_u16(raw, 0x3A),
        compat=compat,
        incompat=incompat,
        ro_compat=ro_compat,
        backup_bgs=(_u32(raw, 0x24C), _u32(raw, 0x250)),
        mmp_block=struct.unpack_from("<Q", raw, 0x168)[0] if incompat & _INCOMPAT_MMP else 0,
    )
    if ext.first_meta_bg > ext.desc_blocks:
        raise _Malformed(f"first meta_bg {ext.first_meta_bg} beyond {ext.desc_blocks} descriptor blocks")
    return ext


def _unclean(ext: _Ext) -> str | None:
    """Why the on-disk bitmaps of ``ext`` cannot be trusted to be complete, or None."""
    if ext.state & _STATE_ERROR:
        return "it has the error flag set"
    if ext.incompat & _INCOMPAT_RECOVER:
        return "its journal needs recovery (mounted, or not cleanly unmounted)"
    if not ext.state & _STATE_VALID or ext.state & _STATE_ORPHANS:
        return "it is not marked clean (mounted, or not cleanly unmounted)"
    return None


# --- bits to runs -----------------------------------------------------------------------------------------

_BITS_OF = tuple(tuple(i for i in range(8) if v >> i & 1) for v in range(256))
_NONZERO = re.compile(rb"[^\x00]")


def _bit_positions(value: int, nbytes: int) -> list[int]:
    data = value.to_bytes(nbytes, "little")
    out: list[int] = []
    for m in _NONZERO.finditer(data):
        i = m.start()
        base = i * 8
        out.extend(base + b for b in _BITS_OF[data[i]])
    return out


def _runs(x: int, nbits: int, budget: int) -> list[Span]:
    """Runs [first, end) of the set bits of ``x`` (no bit at or above ``nbits``): exact when there are at
    most ``budget`` of them, else runs of whole granules with any bit set (a superset)."""
    if x == 0:
        return []
    if x == (1 << nbits) - 1:
        return [(0, nbits)]
    nbytes = (nbits + 7) // 8
    starts = x & ~(x << 1)  # a set bit whose lower neighbour is clear
    if starts.bit_count() <= budget:
        ends = x & ~(x >> 1)  # a set bit whose upper neighbour is clear
        return [
            (s, e + 1)
            for s, e in zip(_bit_positions(starts, nbytes), _bit_positions(ends, nbytes), strict=True)
        ]
    granule = 8  # bits; grow until the group has at most 2 * budget granules (hence <= budget + 1 runs)
    while -(-nbits // granule) > 2 * budget:
        granule *= 2
    data = x.to_bytes(nbytes, "little")
    step = granule // 8
    empty = bytes(step)
    out: list[Span] = []
    for i in range(0, nbytes, step):
        chunk = data[i : i + step]
        if chunk != empty[: len(chunk)]:
            first, end = i * 8, min(i * 8 + granule, nbits)
            if out and out[-1][1] == first:
                out[-1] = (out[-1][0], end)
            else:
                out.append((first, end))
    return out


# --- one ext file system ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free: int  # free clusters per the descriptor
    uninit: bool  # BLOCK_UNINIT, honoured
    free_inodes: int
    itable_unused: int  # inodes at the end of the table never used (meaningful with group checksums)
    inode_uninit: bool  # INODE_UNINIT, honoured


async def _descriptors(reader: _Reader, ext: _Ext) -> list[_Group]:
    bs = ext.block_size
    locations = [ext.desc_block(nr) for nr in range(ext.desc_blocks)]
    if max(locations) >= ext.blocks_count:
        raise _Malformed("group descriptors beyond the end of the file system")
    blocks = await reader.blocks((ext.offset + b * bs for b in locations), bs)
    table = b"".join(blocks[ext.offset + b * bs] for b in locations)
    wide = ext.desc_size >= 64
    groups: list[_Group] = []
    for g in range(ext.groups):
        at = g * ext.desc_size
        bb, ib, it, free, inodes, _dirs, flags = struct.unpack_from("<IIIHHHH", table, at)
        unused = _u16(table, at + 0x1C)
        if wide:
            bb_hi, ib_hi, it_hi, free_hi, inodes_hi = struct.unpack_from("<IIIHH", table, at + 0x20)
            bb, ib, it, free = bb | bb_hi << 32, ib | ib_hi << 32, it | it_hi << 32, free | free_hi << 16
            inodes, unused = inodes | inodes_hi << 16, unused | _u16(table, at + 0x32) << 16
        csum = ext.uninit_honoured
        groups.append(
            _Group(
                block_bitmap=bb,
                inode_bitmap=ib,
                inode_table=it,
                free=free,
                uninit=csum and bool(flags & _BG_BLOCK_UNINIT),
                free_inodes=inodes,
                itable_unused=unused,
                inode_uninit=csum and bool(flags & _BG_INODE_UNINIT),
            )
        )
    return groups


def _group_metadata(ext: _Ext, groups: Sequence[_Group]) -> list[list[Span]]:
    """For each group, the block extents of metadata known to lie in it; checks every location: inside
    the file system (and its own group without flex_bg), and overlapping no other metadata, superblock or
    descriptor copy."""
    flex = bool(ext.incompat & _INCOMPAT_FLEX_BG)
    inside: list[list[Span]] = [ext.base_meta(g) for g in range(len(groups))]
    extents: list[Span] = [span for spans in inside for span in spans]
    for g, grp in enumerate(groups):
        lo, hi = (ext.first_data_block, ext.blocks_count) if flex else (ext.group_first(g), ext.group_end(g))
        for start, length, what in (
            (grp.block_bitmap, 1, "block bitmap"),
            (grp.inode_bitmap, 1, "inode bitmap"),
            (grp.inode_table, ext.inode_table_blocks, "inode table"),
        ):
            if start < lo or start + length > hi:
                raise _Malformed(f"group {g}: {what} at block {start} is outside [{lo}, {hi})")
            extents.append((start, start + length))
            # An extent may cross into the next group (flex_bg inode tables do).
            for h in range(ext.group_of(start), ext.group_of(start + length - 1) + 1):
                inside[h].append((max(start, ext.group_first(h)), min(start + length, ext.group_end(h))))
    if ext.mmp_block:
        if not ext.first_data_block <= ext.mmp_block < ext.blocks_count:
            raise _Malformed(f"MMP block {ext.mmp_block} outside the file system")
        inside[ext.group_of(ext.mmp_block)].append((ext.mmp_block, ext.mmp_block + 1))
        extents.append((ext.mmp_block, ext.mmp_block + 1))
    extents.sort()
    for (_s0, e0), (s1, _e1) in itertools.pairwise(extents):
        if s1 < e0:
            raise _Malformed(f"group metadata overlaps at block {s1}")
    return inside


async def _ext_used_blocks(reader: _Reader, ext: _Ext, strict: bool) -> list[Span]:
    """The used blocks [start, end) of ``ext`` (merged), from its bitmaps; :class:`_Malformed` on doubt.
    Strict: less the body of a clean journal and the never-used ends of inode tables, where they check
    out (else they stay used and a warning is logged)."""
    bs, ratio = ext.block_size, ext.ratio
    groups = await _descriptors(reader, ext)
    meta = _group_metadata(ext, groups)
    wanted = [ext.offset + grp.block_bitmap * bs for grp in groups if not grp.uninit]
    itables = strict and ext.uninit_honoured
    if itables:  # the inode bitmaps too, in the same batches (flex_bg packs them next to the block bitmaps)
        wanted += [ext.offset + grp.inode_bitmap * bs for grp in groups if not grp.inode_uninit]
    bitmaps = await reader.blocks(wanted, bs)
    budget = max(16, MAX_RUNS // len(groups))
    used: list[Span] = []
    for g, grp in enumerate(groups):
        first, end = ext.group_first(g), ext.group_end(g)
        nbits = -(-(end - first) // ratio)
        # Metadata in this group as a bit mask of clusters.
        meta_mask = 0
        for start, stop in meta[g]:
            c0, c1 = (start - first) // ratio, min(-(-(stop - first) // ratio), nbits)
            if c1 > c0:
                meta_mask |= ((1 << (c1 - c0)) - 1) << c0
        if grp.uninit:
            x = meta_mask
        else:
            raw = bitmaps[ext.offset + grp.block_bitmap * bs]
            x = int.from_bytes(raw[: (nbits + 7) // 8], "little") & ((1 << nbits) - 1)
            if (x & meta_mask) != meta_mask:
                raise _Malformed(f"group {g}: the block bitmap marks group metadata free")
        if strict and nbits - x.bit_count() != grp.free:
            raise _Malformed(f"group {g}: {nbits - x.bit_count()} free clusters, descriptor says {grp.free}")
        for c0, c1 in _runs(x, nbits, budget):
            used.append((first + c0 * ratio, min(first + c1 * ratio, end)))
    used = merge(used)
    if not strict:
        return used
    spare: list[Span] = []
    marks: list[int] | None = None
    if itables:
        try:
            marks = _itable_marks(ext, groups, bitmaps)
        except _Malformed as exc:
            log.warning("ext file system at byte %d: %s; keeping its inode tables", ext.offset, exc)
        else:
            spare += _unused_itable_blocks(ext, groups, marks)
    try:
        spare += await _journal_body(reader, ext, groups, meta, used, marks)
    except _Malformed as exc:
        log.warning("ext file system at byte %d: %s; keeping its journal", ext.offset, exc)
    return subtract(used, merge(spare)) if spare else used


# --- never-used inode table blocks ------------------------------------------------------------------------


def _itable_marks(ext: _Ext, groups: Sequence[_Group], bitmaps: dict[int, bytes]) -> list[int]:
    """For each group, how many inodes at the start of its inode table may be in use: all but the
    ``bg_itable_unused`` at its end (none with ``INODE_UNINIT``). Only with group checksums (the caller's
    check), as the kernel. Checked: no inode at or beyond the mark is in use in the inode bitmap, the
    bitmap agrees with the descriptor's free-inode count, the reserved inodes lie below the marks."""
    ipg = ext.inodes_per_group
    if ext.first_ino < 11:
        raise _Malformed(f"first inode {ext.first_ino}")
    marks: list[int] = []
    for g, grp in enumerate(groups):
        if grp.inode_uninit:
            if grp.free_inodes != ipg:
                raise _Malformed(f"group {g}: INODE_UNINIT, yet {grp.free_inodes} of {ipg} inodes free")
            mark = 0
        else:
            if grp.itable_unused > ipg:
                raise _Malformed(f"group {g}: {grp.itable_unused} unused inodes of {ipg}")
            mark = ipg - grp.itable_unused
            raw = bitmaps[ext.offset + grp.inode_bitmap * ext.block_size]
            x = int.from_bytes(raw[: (ipg + 7) // 8], "little") & ((1 << ipg) - 1)
            if x >> mark:
                raise _Malformed(f"group {g}: an inode beyond the first {mark} (bg_itable_unused) is in use")
            if ipg - x.bit_count() != grp.free_inodes:
                raise _Malformed(
                    f"group {g}: {ipg - x.bit_count()} free inodes, descriptor says {grp.free_inodes}"
                )
        if mark < min(max(ext.first_ino - 1 - g * ipg, 0), ipg):
            raise _Malformed(f"group {g}: reserved inodes beyond the first {mark} (bg_itable_unused)")
        marks.append(mark)
    return marks


def _unused_itable_blocks(ext: _Ext, groups: Sequence[_Group], marks: Sequence[int]) -> list[Span]:
    """The blocks of each inode table that hold no inode below its group's mark."""
    out: list[Span] = []
    for grp, mark in zip(groups, marks, strict=True):
        first = -(-(mark * ext.inode_size) // ext.block_size)
        if first < ext.inode_table_blocks:
            out.append((grp.inode_table + first, grp.inode_table + ext.inode_table_blocks))
    return out


# --- the body of a clean journal --------------------------------------------------------------------------

_Mapping = tuple[int, int, int]  # (logical block, physical block, blocks)


def _check_inside(ext: _Ext, block: int, what: str) -> None:
    if not ext.first_data_block <= block < ext.blocks_count:
        raise _Malformed(f"{what} at block {block} is outside the file system")


async def _journal_body(
    reader: _Reader,
    ext: _Ext,
    groups: Sequence[_Group],
    meta: Sequence[Sequence[Span]],
    used: Sequence[Span],
    marks: Sequence[int] | None,
) -> list[Span]:
    """The blocks of the internal journal after its superblock, when the journal is empty (its
    superblock's ``s_start`` is 0): jbd2 reads none of them on mount, only writes them (nor does e2fsck).
    [] without an internal journal. Checked: the journal inode (a regular file in use, mapped by an extent
    tree or block map that checks out), its superblock (magic, block size, length), every journal block
    mapped once, inside the file system, on no group metadata and marked used in the block bitmap."""
    inum = ext.journal_inum
    if inum == 0:
        return []  # no journal, or an external one: none of its blocks are here
    if ext.journal_dev:
        raise _Malformed("both a journal inode and a journal device")
    bs = ext.block_size
    g, index = divmod(inum - 1, ext.inodes_per_group)
    if g >= len(groups):
        raise _Malformed(f"journal inode {inum} does not exist")
    if marks is not None and index >= marks[g]:
        raise _Malformed(f"journal inode {inum} lies in the unused part of its inode table")
    raw = await reader.exact(ext.offset + groups[g].inode_table * bs + index * ext.inode_size, 128)
    mode, size_lo, links, flags, size_hi = (
        _u16(raw, 0),
        _u32(raw, 4),
        _u16(raw, 0x1A),
        _u32(raw, 0x20),
        _u32(raw, 0x6C),
    )
    if mode & _S_IFMT != _S_IFREG or links == 0 or flags & _INLINE_DATA_FL:
        raise _Malformed(f"journal inode {inum}: mode {mode:#o}, {links} links, flags {flags:#x}")
    length = (size_lo | size_hi << 32) // bs  # blocks, as jbd2 sees the journal file
    root = raw[0x28:0x64]
    if flags & _EXTENTS_FL:
        data, tree = await _extent_map(reader, ext, root, length)
    else:
        data, tree = await _block_map(reader, ext, root, length)
    if not data or data[0][0] != 0:
        raise _Malformed("the journal's first block is not mapped")
    _check_inside(ext, data[0][1], "journal superblock")
    jsb = await reader.exact(ext.offset + data[0][1] * bs, 1024)
    magic, blocktype, _seq, jbs, maxlen, jfirst, _sseq, jstart, errno = struct.unpack_from(">9I", jsb, 0)
    if magic != _JBD2_MAGIC or blocktype not in (_JBD2_SUPERBLOCK_V1, _JBD2_SUPERBLOCK_V2) or jbs != bs:
        raise _Malformed(f"journal superblock: magic {magic:#x}, type {blocktype}, block size {jbs}")
    if not 1 <= jfirst < maxlen <= length:
        raise _Malformed(f"journal superblock: first {jfirst}, length {maxlen} of {length} blocks")
    if jstart != 0 or errno != 0:
        raise _Malformed(f"the journal is not empty (start {jstart}, errno {errno})")
    # Every block of the journal mapped, once; jbd2 uses no block at or beyond maxlen.
    pos = 0
    blocks: list[Span] = []
    for logical, physical, count in data:
        if logical >= maxlen:
            break
        if logical != pos:
            raise _Malformed(
                f"journal block {min(pos, logical)} is {'unmapped' if logical > pos else 'mapped twice'}"
            )
        count = min(count, maxlen - logical)
        _check_inside(ext, physical, "journal block")
        _check_inside(ext, physical + count - 1, "journal block")
        blocks.append((physical, physical + count))
        pos = logical + count
    if pos != maxlen:
        raise _Malformed(f"journal block {pos} is unmapped")
    merged = merge(blocks)
    if total(merged) != maxlen:
        raise _Malformed("a block holds two journal blocks")
    if intersect(merged, merge(span for spans in meta for span in spans)) or intersect(merged, merge(tree)):
        raise _Malformed("a journal block lies on file system metadata")
    if subtract(merged, used):
        raise _Malformed("a journal block is free in the block bitmap")
    superblock = data[0][1]
    return subtract(merged, [(superblock, superblock + 1)])


async def _extent_map(
    reader: _Reader, ext: _Ext, root: bytes, length: int
) -> tuple[list[_Mapping], list[Span]]:
    """The extents (sorted by logical block) and tree blocks of an inode's extent tree."""
    bs = ext.block_size
    data: list[_Mapping] = []
    tree: list[Span] = []
    level: list[tuple[bytes, int]] = [(root, -1)]  # (node, the depth its parent says it has)
    while level:
        children: list[tuple[int, int]] = []  # (block, depth)
        for node, want in level:
            magic, entries, most, depth = struct.unpack_from("<HHHH", node, 0)
            if magic != _EXTENT_MAGIC or entries > most or 12 + 12 * most > len(node):
                raise _Malformed(f"journal extent node: magic {magic:#x}, {entries} of {most} entries")
            if depth > _EXTENT_MAX_DEPTH or want not in (-1, depth):
                raise _Malformed(f"journal extent node of depth {depth}")
            for at in range(12, 12 + 12 * entries, 12):
                if depth == 0:
                    logical, count, hi, lo = struct.unpack_from("<IHHI", node, at)
                    if not 0 < count <= 32768:  # 0, or an unwritten extent (jbd2 cannot map those)
                        raise _Malformed(f"journal extent of length field {count}")
                    data.append((logical, lo | hi << 32, count))
                else:
                    _logical, lo, hi = struct.unpack_from("<IIH", node, at)
                    _check_inside(ext, lo | hi << 32, "journal extent tree block")
                    children.append((lo | hi << 32, depth - 1))
        if len(tree) + len(children) > length + 1:  # more tree than journal: no sane tree
            raise _Malformed("journal extent tree larger than the journal")
        tree.extend((b, b + 1) for b, _ in children)
        nodes = await reader.blocks((ext.offset + b * bs for b, _ in children), bs)
        level = [(nodes[ext.offset + b * bs], d) for b, d in children]
    data.sort()
    return data, tree


async def _block_map(
    reader: _Reader, ext: _Ext, root: bytes, length: int
) -> tuple[list[_Mapping], list[Span]]:
    """The mapped runs (sorted by logical block) and indirect blocks of an inode's block map (ext2/3),
    below logical block ``length``."""
    bs = ext.block_size
    per = bs // 4
    ptrs = struct.unpack_from("<15I", root)
    data: list[_Mapping] = [(i, p, 1) for i, p in enumerate(ptrs[:12]) if p]
    level: list[tuple[int, int, int]] = []  # (block, height, first logical block)
    base = 12
    for height, p in enumerate(ptrs[12:], 1):
        if p and base < length:
            level.append((p, height, base))
        base += per**height
    tree: list[Span] = []
    while level:
        if len(tree) + len(level) > length + 1:
            raise _Malformed("journal block map larger than the journal")
        for b, _, _ in level:
            _check_inside(ext, b, "journal indirect block")
            tree.append((b, b + 1))
        nodes = await reader.blocks((ext.offset + b * bs for b, _, _ in level), bs)
        below: list[tuple[int, int, int]] = []
        for b, height, first in level:
            span = per ** (height - 1)
            for j, p in enumerate(struct.unpack_from(f"<{per}I", nodes[ext.offset + b * bs])):
                logical = first + j * span
                if p == 0 or logical >= length:
                    continue
                if height == 1:
                    data.append((logical, p, 1))
                else:
                    below.append((p, height - 1, logical))
        level = below
    data.sort()
    runs: list[_Mapping] = []
    for logical, physical, count in data:
        if runs and runs[-1][0] + runs[-1][2] == logical and runs[-1][1] + runs[-1][2] == physical:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + count)
        else:
            runs.append((logical, physical, count))
    return runs, tree


async def _analyse(reader: _Reader, part: Partition, strict: bool) -> list[Span] | None:
    """The free byte spans of the ext file system at the start of ``part``; None if there is none; []
    (fully used) if there is one that does not check out."""
    if part.length < 2048:
        return None
    try:
        raw = await reader.exact(part.start + 1024, 1024)
    except _Unreadable:
        return None
    try:
        ext = _parse_super(raw, part.start, part.length)
    except _Malformed as exc:
        log.warning("ext file system at byte %d: %s; treating it as fully used", part.start, exc)
        return []
    if ext is None:
        return None
    if strict and (why := _unclean(ext)) is not None:
        log.warning(
            "ext file system at byte %d: %s, so its bitmaps may lag; treating it as fully used",
            part.start,
            why,
        )
        return []
    try:
        used = await _ext_used_blocks(reader, ext, strict)
    except _Malformed as exc:
        log.warning("ext file system at byte %d: %s; treating it as fully used", part.start, exc)
        return []
    free_blocks = complement(used, ext.first_data_block, ext.blocks_count)
    bs = ext.block_size
    return [(ext.offset + a * bs, ext.offset + b * bs) for a, b in free_blocks]


# --- the disk ---------------------------------------------------------------------------------------------


async def _gpt(reader: _Reader) -> tuple[Partition, ...] | None:
    """The partitions of a valid GPT (primary, else backup header), or None."""
    size = reader.disk_size
    for ss in (512, 4096):
        if size < 3 * ss:
            continue
        candidates = [1]
        if size % ss == 0:
            candidates.append(size // ss - 1)
        for lba in candidates:
            try:
                header = parse_gpt_header(await reader.exact(lba * ss, ss), ss, lba, size)
                if header is None:
                    continue
                entries = await reader.exact(header.entries_offset, header.entries_length)
            except _Malformed:
                continue
            parts = parse_gpt_entries(entries, header, size)
            if parts is not None:
                return parts
    return None


async def _layouts(reader: _Reader) -> list[tuple[Partition, ...]]:
    """Every plausible reading of the disk as a list of partitions."""
    size = reader.disk_size
    layouts: list[tuple[Partition, ...]] = []
    try:
        # A whole-disk file system is plausible only if its superblock's geometry holds together;
        # magic bytes alone at 1024 may be boot-loader code or a GPT entry name.
        if _parse_super(await reader.exact(1024, 1024), 0, size) is not None:
            layouts.append((Partition(0, size),))
    except _Unreadable:
        pass
    except _Malformed as exc:
        log.warning("ext superblock at byte 1024 does not check out (%s); not a whole-disk file system", exc)
    mbr = parse_mbr(await reader.exact(0, 512), size)
    # Like Linux, believe a GPT only behind a protective MBR: a whole-disk mkfs zaps the first sectors but
    # leaves a stale backup GPT at the end of the disk.
    gpt = await _gpt(reader) if mbr is not None and mbr.protective else None
    if gpt is not None:
        layouts.append(gpt)
    elif mbr is not None:
        layouts.append(mbr.partitions)
    return layouts


async def _scan(read: ReadFn, disk_size: int, strict: bool) -> list[Range] | None:
    if disk_size < 2048:
        return None
    reader = _Reader(read, disk_size)
    layouts = await _layouts(reader)
    cache: dict[tuple[int, int], list[Span] | None] = {}
    found = False
    free: list[Span] | None = None
    for parts in layouts:
        frees: list[Span] = []
        doubtful: list[Span] = []  # bytes of a partition its file system does not show free
        for part in parts:
            key = (part.start, part.length)
            if key not in cache:
                cache[key] = await _analyse(reader, part, strict) if part.probe else None
            part_free = cache[key]
            found = found or part_free is not None
            part_free = part_free or []
            frees.extend(part_free)
            doubtful.extend(subtract([(part.start, part.end)], part_free))
        # Overlapping partitions: a byte is free only if no partition covering it has a use for it.
        layout_free = subtract(merge(frees), merge(doubtful))
        free = layout_free if free is None else intersect(free, layout_free)
    if not found:
        return None
    used = complement(free or [], 0, disk_size)
    log.debug(
        "file systems leave %d bytes free in %d reads",
        disk_size - total(used),
        reader.requests,
    )
    return to_ranges(used)
