"""Block groups of an ext file system: their descriptors, and the metadata known to lie in each. Pure.

A group's bitmap has one bit per block (per cluster with bigalloc). A group flagged ``BLOCK_UNINIT``
(honoured only with ``gdt_csum``/``metadata_csum``, as the kernel does) has no bitmap on disk; the kernel
computes it: superblock and descriptor backups, reserved GDT blocks, and the group's own bitmaps and
inode table when they lie inside it. :func:`group_metadata` computes the same, and additionally marks
the bitmaps and inode tables of *every* group that ``flex_bg`` placed inside the group, and the MMP
block. (mke2fs does not leave such a group uninitialised, so on its file systems this adds nothing, but a
doubtful file system stays safe.) It also checks every location: inside the file system (inside its own
group without ``flex_bg``), overlapping neither other metadata nor any superblock or descriptor copy.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hikkoshi.block.fs_used.errors import Malformed
from hikkoshi.block.fs_used.superblock import Ext, u16
from hikkoshi.block.ranges import Span

_BG_INODE_UNINIT = 0x1
_BG_BLOCK_UNINIT = 0x2


@dataclass(frozen=True)
class Group:
    """One group's descriptor, as far as the bitmaps need it."""

    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free: int  # free clusters per the descriptor
    uninit: bool  # BLOCK_UNINIT, honoured
    free_inodes: int
    itable_unused: int  # inodes at the end of the table never used (meaningful with group checksums)
    inode_uninit: bool  # INODE_UNINIT, honoured


def parse_descriptors(table: bytes, ext: Ext) -> list[Group]:
    """The group descriptors in ``table`` (the descriptor blocks, in order, joined); the uninit flags are
    kept only where the kernel honours them (with group checksums)."""
    wide = ext.desc_size >= 64
    groups: list[Group] = []
    for g in range(ext.groups):
        at = g * ext.desc_size
        bb, ib, it, free, inodes, _dirs, flags = struct.unpack_from("<IIIHHHH", table, at)
        unused = u16(table, at + 0x1C)
        if wide:
            bb_hi, ib_hi, it_hi, free_hi, inodes_hi = struct.unpack_from("<IIIHH", table, at + 0x20)
            bb, ib, it, free = bb | bb_hi << 32, ib | ib_hi << 32, it | it_hi << 32, free | free_hi << 16
            inodes, unused = inodes | inodes_hi << 16, unused | u16(table, at + 0x32) << 16
        csum = ext.uninit_honoured
        groups.append(
            Group(
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


def group_metadata(ext: Ext, groups: Sequence[Group]) -> list[list[Span]]:
    """For each group, the block extents of metadata known to lie in it; checks every location: inside
    the file system (and its own group without flex_bg), and overlapping no other metadata, superblock or
    descriptor copy."""
    flex = ext.flex_bg
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
                raise Malformed(f"group {g}: {what} at block {start} is outside [{lo}, {hi})")
            extents.append((start, start + length))
            # An extent may cross into the next group (flex_bg inode tables do).
            for h in range(ext.group_of(start), ext.group_of(start + length - 1) + 1):
                inside[h].append((max(start, ext.group_first(h)), min(start + length, ext.group_end(h))))
    if ext.mmp_block:
        if not ext.first_data_block <= ext.mmp_block < ext.blocks_count:
            raise Malformed(f"MMP block {ext.mmp_block} outside the file system")
        inside[ext.group_of(ext.mmp_block)].append((ext.mmp_block, ext.mmp_block + 1))
        extents.append((ext.mmp_block, ext.mmp_block + 1))
    extents.sort()
    for (_s0, e0), (s1, _e1) in itertools.pairwise(extents):
        if s1 < e0:
            raise Malformed(f"group metadata overlaps at block {s1}")
    return inside
