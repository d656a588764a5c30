"""Which byte ranges of a disk its ext2/3/4 file systems use, read in every plausible layout of the disk.

Layout. The disk may be read as a whole-disk file system (plausible when the superblock at byte 1024
checks out, not merely its magic), as an MBR (primary entries, 512-byte sectors) or as a GPT (only behind a
protective MBR, as Linux does; primary header, else the backup; 512- or 4096-byte sectors; the MBR entries
of a hybrid MBR are then ignored). When more than one reading is plausible (a whole-disk superblock *and*
a partition table), a byte is free only if every reading says so. Partitions are probed for an ext
superblock whatever their type (:mod:`~hikkoshi.block.fs_used.filesystem`); overlapping partitions leave
free only what none of them uses. Everything else is used: partition tables, gaps, partitions without an
ext file system, extended partitions (wholesale), the tail of a partition behind its file system.
"""

from __future__ import annotations

import logging

from hikkoshi.block.fs_used.errors import Malformed, Unreadable
from hikkoshi.block.fs_used.filesystem import analyse
from hikkoshi.block.fs_used.reader import Reader, ReadFn
from hikkoshi.block.fs_used.superblock import parse_super
from hikkoshi.block.partitions import Partition, parse_gpt_entries, parse_gpt_header, parse_mbr
from hikkoshi.block.ranges import Range, Span, complement, intersect, merge, subtract, to_ranges, total

log = logging.getLogger("hikkoshi.block.fs_used")


async def fs_used_ranges(read: ReadFn, disk_size: int) -> list[Range] | None:
    """The byte ranges of the disk that are not provably free, sorted and merged; None if the disk holds
    no ext2/3/4 file system at all (then nothing is known and the caller copies in plain order).

    ``read(offset, length)`` returns disk bytes; its ``OSError`` propagates, nothing else is raised.
    Free means: free in the block bitmap of a cleanly unmounted ext file system that passes every check
    (see the package's docstring). Safe for skipping the free rest.
    """
    return await _scan(read, disk_size, strict=True)


async def fs_used_hint(read: ReadFn, disk_size: int) -> list[Range] | None:
    """Like :func:`fs_used_ranges`, but also trusts the bitmaps of file systems that are mounted or were
    not cleanly unmounted (and tolerates group free counts that lag their bitmaps). For ordering a copy
    only: a guest may use blocks that these bitmaps do not show yet."""
    return await _scan(read, disk_size, strict=False)


async def _gpt(reader: Reader) -> tuple[Partition, ...] | None:
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
            except Malformed:
                continue
            parts = parse_gpt_entries(entries, header, size)
            if parts is not None:
                return parts
    return None


async def _layouts(reader: Reader) -> list[tuple[Partition, ...]]:
    """Every plausible reading of the disk as a list of partitions."""
    size = reader.disk_size
    layouts: list[tuple[Partition, ...]] = []
    try:
        # A whole-disk file system is plausible only if its superblock's geometry holds together;
        # magic bytes alone at 1024 may be boot-loader code or a GPT entry name.
        if parse_super(await reader.exact(1024, 1024), 0, size) is not None:
            layouts.append((Partition(0, size),))
    except Unreadable:
        pass
    except Malformed as exc:
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
    reader = Reader(read, disk_size)
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
                cache[key] = await analyse(reader, part, strict) if part.probe else None
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
