"""The body of a clean internal journal: allocated, yet holding nothing anyone will read.

Every block of an internal journal (``s_journal_inum``, no journal device) but its first, the journal
superblock, when that says the journal is empty (``s_start`` 0, ``s_errno`` 0) on a cleanly unmounted
file system. jbd2 then replays nothing and only ever writes the body; recovery after a later crash stops
at the first block that is not the next transaction's, zeroes included. The journal inode must be a
regular file in use, mapped by an extent tree or a block map that checks out
(:mod:`~hikkoshi.block.fs_used.journal_map`), every journal block ``[0, s_maxlen)`` mapped exactly once,
inside the file system, on no group metadata, marked used in the block bitmap; the journal superblock
must have jbd2's magic, the file system's block size, and ``0 < s_first < s_maxlen <=`` the inode's size.
Its tree or indirect blocks stay used. Reads go through the
:class:`~hikkoshi.block.fs_used.reader.Reader`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hikkoshi.block.fs_used.errors import Malformed
from hikkoshi.block.fs_used.groups import Group
from hikkoshi.block.fs_used.journal_map import block_map, extent_map
from hikkoshi.block.fs_used.reader import Reader
from hikkoshi.block.fs_used.superblock import Ext, check_inside, u16, u32
from hikkoshi.block.ranges import Span, intersect, merge, subtract, total

_S_IFMT, _S_IFREG = 0xF000, 0x8000
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_JBD2_MAGIC = 0xC03B3998
_JBD2_SUPERBLOCK_V1, _JBD2_SUPERBLOCK_V2 = 3, 4


async def journal_body(
    reader: Reader,
    ext: Ext,
    groups: Sequence[Group],
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
        raise Malformed("both a journal inode and a journal device")
    bs = ext.block_size
    g, index = divmod(inum - 1, ext.inodes_per_group)
    if g >= len(groups):
        raise Malformed(f"journal inode {inum} does not exist")
    if marks is not None and index >= marks[g]:
        raise Malformed(f"journal inode {inum} lies in the unused part of its inode table")
    raw = await reader.exact(ext.offset + groups[g].inode_table * bs + index * ext.inode_size, 128)
    mode, size_lo, links, flags, size_hi = (
        u16(raw, 0),
        u32(raw, 4),
        u16(raw, 0x1A),
        u32(raw, 0x20),
        u32(raw, 0x6C),
    )
    if mode & _S_IFMT != _S_IFREG or links == 0 or flags & _INLINE_DATA_FL:
        raise Malformed(f"journal inode {inum}: mode {mode:#o}, {links} links, flags {flags:#x}")
    length = (size_lo | size_hi << 32) // bs  # blocks, as jbd2 sees the journal file
    root = raw[0x28:0x64]
    if flags & _EXTENTS_FL:
        data, tree = await extent_map(reader, ext, root, length)
    else:
        data, tree = await block_map(reader, ext, root, length)
    if not data or data[0][0] != 0:
        raise Malformed("the journal's first block is not mapped")
    check_inside(ext, data[0][1], "journal superblock")
    jsb = await reader.exact(ext.offset + data[0][1] * bs, 1024)
    magic, blocktype, _seq, jbs, maxlen, jfirst, _sseq, jstart, errno = struct.unpack_from(">9I", jsb, 0)
    if magic != _JBD2_MAGIC or blocktype not in (_JBD2_SUPERBLOCK_V1, _JBD2_SUPERBLOCK_V2) or jbs != bs:
        raise Malformed(f"journal superblock: magic {magic:#x}, type {blocktype}, block size {jbs}")
    if not 1 <= jfirst < maxlen <= length:
        raise Malformed(f"journal superblock: first {jfirst}, length {maxlen} of {length} blocks")
    if jstart != 0 or errno != 0:
        raise Malformed(f"the journal is not empty (start {jstart}, errno {errno})")
    # Every block of the journal mapped, once; jbd2 uses no block at or beyond maxlen.
    pos = 0
    blocks: list[Span] = []
    for logical, physical, count in data:
        if logical >= maxlen:
            break
        if logical != pos:
            raise Malformed(
                f"journal block {min(pos, logical)} is {'unmapped' if logical > pos else 'mapped twice'}"
            )
        count = min(count, maxlen - logical)
        check_inside(ext, physical, "journal block")
        check_inside(ext, physical + count - 1, "journal block")
        blocks.append((physical, physical + count))
        pos = logical + count
    if pos != maxlen:
        raise Malformed(f"journal block {pos} is unmapped")
    merged = merge(blocks)
    if total(merged) != maxlen:
        raise Malformed("a block holds two journal blocks")
    if intersect(merged, merge(span for spans in meta for span in spans)) or intersect(merged, merge(tree)):
        raise Malformed("a journal block lies on file system metadata")
    if subtract(merged, used):
        raise Malformed("a journal block is free in the block bitmap")
    superblock = data[0][1]
    return subtract(merged, [(superblock, superblock + 1)])
