"""What one ext file system leaves free, from its bitmaps, read through the
:class:`~hikkoshi.block.fs_used.reader.Reader`.

:func:`analyse` probes the start of a partition for a superblock and answers the free byte spans of the
file system there, None if there is none, or [] (all used) if there is one that fails a check: geometry
and features (:mod:`~hikkoshi.block.fs_used.superblock`), the location of every group's bitmaps and
inode table (:mod:`~hikkoshi.block.fs_used.groups`), that each bitmap marks all the metadata known to lie
in its group, and, strictly, that the free count in each group descriptor equals the free bits found and
that the file system was cleanly unmounted. Failures are logged as warnings.

Strictly, two kinds of allocated blocks that hold nothing the guest's kernel (or e2fsck) will read count
as free too: the never-used ends of inode tables (:mod:`~hikkoshi.block.fs_used.inode_tables`) and the
body of a clean journal (:mod:`~hikkoshi.block.fs_used.journal`); on a 10 % full image they are most of
the metadata. A failure in either keeps that part used, and the rest of the answer stands.

Memory is bounded: a file system keeps at most :data:`MAX_RUNS` used runs, each group its share
(:mod:`~hikkoshi.block.fs_used.bit_runs` coarsens a group with more).
"""

from __future__ import annotations

import logging

from hikkoshi.block.fs_used.bit_runs import set_bit_runs
from hikkoshi.block.fs_used.errors import Malformed, Unreadable
from hikkoshi.block.fs_used.groups import Group, group_metadata, parse_descriptors
from hikkoshi.block.fs_used.inode_tables import itable_marks, unused_itable_blocks
from hikkoshi.block.fs_used.journal import journal_body
from hikkoshi.block.fs_used.reader import Reader
from hikkoshi.block.fs_used.superblock import Ext, parse_super, unclean
from hikkoshi.block.partitions import Partition
from hikkoshi.block.ranges import Span, complement, merge, subtract

log = logging.getLogger("hikkoshi.block.fs_used")

MAX_RUNS = 1 << 19  # used runs kept per file system (memory bound for huge, fragmented ones)


async def _descriptors(reader: Reader, ext: Ext) -> list[Group]:
    """The group descriptors of ``ext``, its descriptor blocks read in one batch."""
    bs = ext.block_size
    locations = [ext.desc_block(nr) for nr in range(ext.desc_blocks)]
    if max(locations) >= ext.blocks_count:
        raise Malformed("group descriptors beyond the end of the file system")
    blocks = await reader.blocks((ext.offset + b * bs for b in locations), bs)
    table = b"".join(blocks[ext.offset + b * bs] for b in locations)
    return parse_descriptors(table, ext)


async def used_blocks(reader: Reader, ext: Ext, strict: bool) -> list[Span]:
    """The used blocks [start, end) of ``ext`` (merged), from its bitmaps; :class:`Malformed` on doubt.
    Strict: less the body of a clean journal and the never-used ends of inode tables, where they check
    out (else they stay used and a warning is logged)."""
    bs, ratio = ext.block_size, ext.ratio
    groups = await _descriptors(reader, ext)
    meta = group_metadata(ext, groups)
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
                raise Malformed(f"group {g}: the block bitmap marks group metadata free")
        if strict and nbits - x.bit_count() != grp.free:
            raise Malformed(f"group {g}: {nbits - x.bit_count()} free clusters, descriptor says {grp.free}")
        for c0, c1 in set_bit_runs(x, nbits, budget):
            used.append((first + c0 * ratio, min(first + c1 * ratio, end)))
    used = merge(used)
    if not strict:
        return used
    spare: list[Span] = []
    marks: list[int] | None = None
    if itables:
        try:
            marks = itable_marks(ext, groups, bitmaps)
        except Malformed as exc:
            log.warning("ext file system at byte %d: %s; keeping its inode tables", ext.offset, exc)
        else:
            spare += unused_itable_blocks(ext, groups, marks)
    try:
        spare += await journal_body(reader, ext, groups, meta, used, marks)
    except Malformed as exc:
        log.warning("ext file system at byte %d: %s; keeping its journal", ext.offset, exc)
    return subtract(used, merge(spare)) if spare else used


async def analyse(reader: Reader, part: Partition, strict: bool) -> list[Span] | None:
    """The free byte spans of the ext file system at the start of ``part``; None if there is none; []
    (fully used) if there is one that does not check out."""
    if part.length < 2048:
        return None
    try:
        raw = await reader.exact(part.start + 1024, 1024)
    except Unreadable:
        return None
    try:
        ext = parse_super(raw, part.start, part.length)
    except Malformed as exc:
        log.warning("ext file system at byte %d: %s; treating it as fully used", part.start, exc)
        return []
    if ext is None:
        return None
    if strict and (why := unclean(ext)) is not None:
        log.warning(
            "ext file system at byte %d: %s, so its bitmaps may lag; treating it as fully used",
            part.start,
            why,
        )
        return []
    try:
        used = await used_blocks(reader, ext, strict)
    except Malformed as exc:
        log.warning("ext file system at byte %d: %s; treating it as fully used", part.start, exc)
        return []
    free_blocks = complement(used, ext.first_data_block, ext.blocks_count)
    bs = ext.block_size
    return [(ext.offset + a * bs, ext.offset + b * bs) for a, b in free_blocks]
