"""The geometry of an ext2/3/4 file system, read from its superblock and checked. Pure: bytes in, an
:class:`Ext` (or :class:`~hikkoshi.block.fs_used.errors.Malformed`) out.

Checked: block and cluster size, group geometry, inode size, that the file system fits its partition,
the descriptor size and reserved GDT blocks, and the features: an unknown incompatible or read-only
compatible feature, a journal device, ``lazy_bg`` or snapshot exclusion bitmaps make the layout
unknowable. :class:`Ext` then says where the superblock and descriptor copies lie in each group (per
``sparse_super``, ``sparse_super2`` and ``meta_bg``) as the kernel counts them.

:func:`unclean` says why a file system's bitmaps may lag what it holds: mounted or crashed ext3/4
(``needs_recovery``: its journal may hold committed bitmap updates not yet in place, and the guest's
memory allocations whose data already reached the disk), ext2 without the clean flag, or the error flag.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hikkoshi.block.fs_used.errors import Malformed
from hikkoshi.block.ranges import Span

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


@dataclass(frozen=True)
class Ext:
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
    def desc_per_block(self) -> int:
        """Group descriptors in one block."""
        return self.block_size // self.desc_size

    @property
    def desc_blocks(self) -> int:
        """Blocks the descriptor table takes."""
        return -(-self.groups // self.desc_per_block)

    @property
    def sb_block(self) -> int:
        """The block holding the primary superblock (byte 1024)."""
        return 1024 // self.block_size

    @property
    def meta_bg(self) -> bool:
        """Whether descriptors lie in meta block groups (from ``first_meta_bg`` on)."""
        return bool(self.incompat & _INCOMPAT_META_BG)

    @property
    def flex_bg(self) -> bool:
        """Whether a group's bitmaps and inode table may lie in another group."""
        return bool(self.incompat & _INCOMPAT_FLEX_BG)

    @property
    def uninit_honoured(self) -> bool:
        """Whether the ``*_UNINIT`` group flags (and ``bg_itable_unused``) mean anything: the kernel
        honours them only with group descriptor checksums."""
        return bool(self.ro_compat & (_RO_COMPAT_GDT_CSUM | _RO_COMPAT_METADATA_CSUM))

    def group_first(self, g: int) -> int:
        """The first block of group ``g``."""
        return self.first_data_block + g * self.blocks_per_group

    def group_end(self, g: int) -> int:
        """The block just past group ``g`` (the last group may be short)."""
        return min(self.group_first(g) + self.blocks_per_group, self.blocks_count)

    def group_of(self, block: int) -> int:
        """The group ``block`` lies in."""
        return (block - self.first_data_block) // self.blocks_per_group

    def has_super(self, g: int) -> bool:
        """Whether group ``g`` holds a superblock copy: every group, or with ``sparse_super`` groups 0, 1
        and the powers of 3, 5 and 7, or with ``sparse_super2`` group 0 and the two it names."""
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


def u16(raw: bytes, at: int) -> int:
    """The little-endian 16-bit field at ``at`` (ext is little-endian on disk)."""
    value: int = struct.unpack_from("<H", raw, at)[0]
    return value


def u32(raw: bytes, at: int) -> int:
    """The little-endian 32-bit field at ``at``."""
    value: int = struct.unpack_from("<I", raw, at)[0]
    return value


def check_inside(ext: Ext, block: int, what: str) -> None:
    """:class:`Malformed` unless ``block`` (``what`` it holds) lies inside the file system."""
    if not ext.first_data_block <= block < ext.blocks_count:
        raise Malformed(f"{what} at block {block} is outside the file system")


def parse_super(raw: bytes, offset: int, span: int) -> Ext | None:
    """The geometry in superblock ``raw`` of a file system at ``offset`` inside ``span`` bytes.

    None if it is no ext superblock (magic). :class:`Malformed` if it is one whose geometry does not hold
    together — which also tells the caller the disk holds an ext file system here.
    """
    if len(raw) < 1024 or u16(raw, 0x38) != _MAGIC:
        return None
    log_block = u32(raw, 0x18)
    if log_block > 6:
        raise Malformed(f"block size 2^(10+{log_block})")
    bs = 1024 << log_block
    rev = u32(raw, 0x4C)
    if rev > 1:
        raise Malformed(f"revision {rev}")
    compat, incompat, ro_compat = (u32(raw, 0x5C), u32(raw, 0x60), u32(raw, 0x64)) if rev else (0, 0, 0)
    inode_size = u16(raw, 0x58) if rev else 128
    if incompat & ~_INCOMPAT_KNOWN or incompat & _INCOMPAT_JOURNAL_DEV:
        raise Malformed(f"incompatible features {incompat:#x}")
    if ro_compat & ~_RO_COMPAT_KNOWN:
        raise Malformed(f"read-only-compatible features {ro_compat:#x}")
    if compat & (_COMPAT_LAZY_BG | _COMPAT_EXCLUDE_INODE | _COMPAT_EXCLUDE_BITMAP):
        raise Malformed(f"compatible features {compat:#x} (lazy_bg / snapshot exclusion)")
    ratio = 1
    if ro_compat & _RO_COMPAT_BIGALLOC:
        log_cluster = u32(raw, 0x1C)
        if not log_block <= log_cluster <= log_block + 16:
            raise Malformed(f"cluster size 2^(10+{log_cluster})")
        ratio = 1 << (log_cluster - log_block)
    blocks_count = u32(raw, 0x4)
    if incompat & _INCOMPAT_64BIT:
        blocks_count |= u32(raw, 0x150) << 32
    first_data_block = u32(raw, 0x14)
    blocks_per_group = u32(raw, 0x20)
    clusters_per_group = u32(raw, 0x24)
    inodes_per_group = u32(raw, 0x28)
    if first_data_block != (1 if bs == 1024 and ratio == 1 else 0):
        raise Malformed(f"first data block {first_data_block} with {bs}-byte blocks")
    if not 8 <= clusters_per_group <= 8 * bs or blocks_per_group != clusters_per_group * ratio:
        raise Malformed(f"{blocks_per_group} blocks, {clusters_per_group} clusters per group")
    if not 0 < inodes_per_group <= 8 * bs:
        raise Malformed(f"{inodes_per_group} inodes per group")
    if inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1):
        raise Malformed(f"inode size {inode_size}")
    if blocks_count <= first_data_block + 1 or blocks_count * bs > span:
        raise Malformed(f"{blocks_count} blocks of {bs} bytes in a {span}-byte extent")
    desc_size = 32
    if incompat & _INCOMPAT_64BIT:
        desc_size = u16(raw, 0xFE)
        if desc_size < 64 or desc_size > min(bs, 1024) or desc_size & (desc_size - 1):
            raise Malformed(f"descriptor size {desc_size}")
    reserved_gdt = u16(raw, 0xCE)
    if reserved_gdt > bs // 4:
        raise Malformed(f"{reserved_gdt} reserved GDT blocks")
    groups = -(-(blocks_count - first_data_block) // blocks_per_group)
    ext = Ext(
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
        first_ino=u32(raw, 0x54) if rev else 11,
        journal_inum=u32(raw, 0xE0) if compat & _COMPAT_HAS_JOURNAL else 0,
        journal_dev=u32(raw, 0xE4),
        desc_size=desc_size,
        groups=groups,
        reserved_gdt=reserved_gdt,
        first_meta_bg=u32(raw, 0x104) if incompat & _INCOMPAT_META_BG else 0,
        state=u16(raw, 0x3A),
        compat=compat,
        incompat=incompat,
        ro_compat=ro_compat,
        backup_bgs=(u32(raw, 0x24C), u32(raw, 0x250)),
        mmp_block=struct.unpack_from("<Q", raw, 0x168)[0] if incompat & _INCOMPAT_MMP else 0,
    )
    if ext.first_meta_bg > ext.desc_blocks:
        raise Malformed(f"first meta_bg {ext.first_meta_bg} beyond {ext.desc_blocks} descriptor blocks")
    return ext


def unclean(ext: Ext) -> str | None:
    """Why the on-disk bitmaps of ``ext`` cannot be trusted to be complete, or None."""
    if ext.state & _STATE_ERROR:
        return "it has the error flag set"
    if ext.incompat & _INCOMPAT_RECOVER:
        return "its journal needs recovery (mounted, or not cleanly unmounted)"
    if not ext.state & _STATE_VALID or ext.state & _STATE_ORPHANS:
        return "it is not marked clean (mounted, or not cleanly unmounted)"
    return None
