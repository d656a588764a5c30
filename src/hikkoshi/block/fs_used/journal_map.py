"""Where the journal's blocks lie: its inode's extent tree (ext4) or block map (ext2/3), read level by
level through the :class:`~hikkoshi.block.fs_used.reader.Reader`, one read batch per level.

Both answer the mapped runs sorted by logical block and the blocks the mapping itself occupies (tree or
indirect blocks), and say "journal" when something does not check out: the journal inode is the only
one read. Checked: extent node magic, entry counts and depths (at most 5, as the parent says), no
unwritten or empty extents, tree and indirect blocks inside the file system, and no more tree than the
file has blocks; anything else raises :class:`~hikkoshi.block.fs_used.errors.Malformed`.
"""

from __future__ import annotations

import struct

from hikkoshi.block.fs_used.errors import Malformed
from hikkoshi.block.fs_used.reader import Reader
from hikkoshi.block.fs_used.superblock import Ext, check_inside
from hikkoshi.block.ranges import Span

BlockRun = tuple[int, int, int]  # (logical block, physical block, blocks)

_EXTENT_MAGIC = 0xF30A
_EXTENT_MAX_DEPTH = 5


async def extent_map(reader: Reader, ext: Ext, root: bytes, length: int) -> tuple[list[BlockRun], list[Span]]:
    """The extents (sorted by logical block) and tree blocks of an inode's extent tree."""
    bs = ext.block_size
    data: list[BlockRun] = []
    tree: list[Span] = []
    level: list[tuple[bytes, int]] = [(root, -1)]  # (node, the depth its parent says it has)
    while level:
        children: list[tuple[int, int]] = []  # (block, depth)
        for node, want in level:
            magic, entries, most, depth = struct.unpack_from("<HHHH", node, 0)
            if magic != _EXTENT_MAGIC or entries > most or 12 + 12 * most > len(node):
                raise Malformed(f"journal extent node: magic {magic:#x}, {entries} of {most} entries")
            if depth > _EXTENT_MAX_DEPTH or want not in (-1, depth):
                raise Malformed(f"journal extent node of depth {depth}")
            for at in range(12, 12 + 12 * entries, 12):
                if depth == 0:
                    logical, count, hi, lo = struct.unpack_from("<IHHI", node, at)
                    if not 0 < count <= 32768:  # 0, or an unwritten extent (jbd2 cannot map those)
                        raise Malformed(f"journal extent of length field {count}")
                    data.append((logical, lo | hi << 32, count))
                else:
                    _logical, lo, hi = struct.unpack_from("<IIH", node, at)
                    check_inside(ext, lo | hi << 32, "journal extent tree block")
                    children.append((lo | hi << 32, depth - 1))
        if len(tree) + len(children) > length + 1:  # more tree than journal: no sane tree
            raise Malformed("journal extent tree larger than the journal")
        tree.extend((b, b + 1) for b, _ in children)
        nodes = await reader.blocks((ext.offset + b * bs for b, _ in children), bs)
        level = [(nodes[ext.offset + b * bs], d) for b, d in children]
    data.sort()
    return data, tree


async def block_map(reader: Reader, ext: Ext, root: bytes, length: int) -> tuple[list[BlockRun], list[Span]]:
    """The mapped runs (sorted by logical block) and indirect blocks of an inode's block map (ext2/3),
    below logical block ``length``."""
    bs = ext.block_size
    per = bs // 4
    ptrs = struct.unpack_from("<15I", root)
    data: list[BlockRun] = [(i, p, 1) for i, p in enumerate(ptrs[:12]) if p]
    level: list[tuple[int, int, int]] = []  # (block, height, first logical block)
    base = 12
    for height, p in enumerate(ptrs[12:], 1):
        if p and base < length:
            level.append((p, height, base))
        base += per**height
    tree: list[Span] = []
    while level:
        if len(tree) + len(level) > length + 1:
            raise Malformed("journal block map larger than the journal")
        for b, _, _ in level:
            check_inside(ext, b, "journal indirect block")
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
    runs: list[BlockRun] = []
    for logical, physical, count in data:
        if runs and runs[-1][0] + runs[-1][2] == logical and runs[-1][1] + runs[-1][2] == physical:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + count)
        else:
            runs.append((logical, physical, count))
    return runs, tree
