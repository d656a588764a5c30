"""The never-used ends of inode tables, which hold nothing anyone reads. Pure.

With ``gdt_csum``/``metadata_csum`` (as the kernel: otherwise the field means nothing) a group's
``bg_itable_unused`` counts the inodes at the end of its table that were never used (all of them with
``INODE_UNINIT``); the kernel reads no inode there, zeroes new ones before use, and its lazy init zeroes
those blocks anyway, as does mke2fs when it does not defer it. The blocks that hold no inode below that
mark are free. Checked, for every group: the mark within the table, no inode at or past it in use in the
inode bitmap, the bitmap's free inodes equal to the descriptor's count, ``INODE_UNINIT`` only with every
inode free, the reserved inodes (below ``s_first_ino``, at least 11) below the marks.
"""

from __future__ import annotations

from collections.abc import Sequence

from hikkoshi.block.fs_used.errors import Malformed
from hikkoshi.block.fs_used.groups import Group
from hikkoshi.block.fs_used.superblock import Ext
from hikkoshi.block.ranges import Span


def itable_marks(ext: Ext, groups: Sequence[Group], bitmaps: dict[int, bytes]) -> list[int]:
    """For each group, how many inodes at the start of its inode table may be in use: all but the
    ``bg_itable_unused`` at its end (none with ``INODE_UNINIT``). Only with group checksums (the caller's
    check), as the kernel. Checked: no inode at or beyond the mark is in use in the inode bitmap, the
    bitmap agrees with the descriptor's free-inode count, the reserved inodes lie below the marks."""
    ipg = ext.inodes_per_group
    if ext.first_ino < 11:
        raise Malformed(f"first inode {ext.first_ino}")
    marks: list[int] = []
    for g, grp in enumerate(groups):
        if grp.inode_uninit:
            if grp.free_inodes != ipg:
                raise Malformed(f"group {g}: INODE_UNINIT, yet {grp.free_inodes} of {ipg} inodes free")
            mark = 0
        else:
            if grp.itable_unused > ipg:
                raise Malformed(f"group {g}: {grp.itable_unused} unused inodes of {ipg}")
            mark = ipg - grp.itable_unused
            raw = bitmaps[ext.offset + grp.inode_bitmap * ext.block_size]
            x = int.from_bytes(raw[: (ipg + 7) // 8], "little") & ((1 << ipg) - 1)
            if x >> mark:
                raise Malformed(f"group {g}: an inode beyond the first {mark} (bg_itable_unused) is in use")
            if ipg - x.bit_count() != grp.free_inodes:
                raise Malformed(
                    f"group {g}: {ipg - x.bit_count()} free inodes, descriptor says {grp.free_inodes}"
                )
        if mark < min(max(ext.first_ino - 1 - g * ipg, 0), ipg):
            raise Malformed(f"group {g}: reserved inodes beyond the first {mark} (bg_itable_unused)")
        marks.append(mark)
    return marks


def unused_itable_blocks(ext: Ext, groups: Sequence[Group], marks: Sequence[int]) -> list[Span]:
    """The blocks of each inode table that hold no inode below its group's mark."""
    out: list[Span] = []
    for grp, mark in zip(groups, marks, strict=True):
        first = -(-(mark * ext.inode_size) // ext.block_size)
        if first < ext.inode_table_blocks:
            out.append((grp.inode_table + first, grp.inode_table + ext.inode_table_blocks))
    return out
