"""Which byte ranges of a disk its ext2/3/4 file systems use, read from their block bitmaps (and, for
skipping, less what e2image also leaves out: the body of a clean journal, the never-used ends of inode
tables).

The relocation proxy copies these ranges before the rest of the disk (and, with ``--skip-fs-free``, copies
nothing else). The answer is conservative: a byte is *free* only when an ext file system that checks out
says so, in every plausible reading of the disk's layout. Everything else is *used*: partition tables,
gaps, partitions without an ext file system, extended partitions (wholesale), the tail of a partition
behind its file system, and any file system that fails a check (a warning is logged). Only ``OSError``
from ``read`` propagates.

Cleanliness. A mounted (or crashed) file system's on-disk bitmaps prove nothing, so
:func:`fs_used_ranges` treats it as fully used. :func:`fs_used_hint` skips that check (and tolerates
group free counts that lag their bitmaps): its ranges are a good *order* for copying (the bitmaps lag
the guest by seconds), never a licence to skip the rest.

The package, one idea a module; the pure ones (no I/O) are marked so.

- :mod:`~hikkoshi.block.fs_used.disk`: the public functions; the disk's plausible layouts, and the
  answer they agree on.
- :mod:`~hikkoshi.block.fs_used.filesystem`: one ext file system, from its bitmaps to its free blocks.
- :mod:`~hikkoshi.block.fs_used.reader`: metadata reads, coalesced, bounded, never short.
- :mod:`~hikkoshi.block.fs_used.superblock` (pure): geometry, features, cleanliness.
- :mod:`~hikkoshi.block.fs_used.groups` (pure): group descriptors and the metadata in each group.
- :mod:`~hikkoshi.block.fs_used.bit_runs` (pure): bitmaps to runs of set bits.
- :mod:`~hikkoshi.block.fs_used.inode_tables` (pure): the never-used ends of inode tables.
- :mod:`~hikkoshi.block.fs_used.journal`: the body of a clean journal.
- :mod:`~hikkoshi.block.fs_used.journal_map`: the journal inode's extent tree or block map.
- :mod:`~hikkoshi.block.fs_used.errors` (pure): what says "does not check out".

Intervals are :mod:`hikkoshi.block.ranges`'s. The tunables (:data:`MAX_READ`, :data:`MAX_GAP`,
:data:`CONCURRENCY`, :data:`MAX_RUNS`) are re-exported here for reading; they take effect where they are
defined.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hikkoshi.block.fs_used.disk import fs_used_hint, fs_used_ranges
    from hikkoshi.block.fs_used.filesystem import MAX_RUNS
    from hikkoshi.block.fs_used.reader import CONCURRENCY, MAX_GAP, MAX_READ, ReadFn
    from hikkoshi.block.ranges import Range

#: Where each public name lives. Loaded when first asked for, so that importing one of the pure
#: modules (which imports this package first) does not load the reader and its asyncio with it.
_HOMES = {
    "fs_used_hint": "hikkoshi.block.fs_used.disk",
    "fs_used_ranges": "hikkoshi.block.fs_used.disk",
    "MAX_RUNS": "hikkoshi.block.fs_used.filesystem",
    "CONCURRENCY": "hikkoshi.block.fs_used.reader",
    "MAX_GAP": "hikkoshi.block.fs_used.reader",
    "MAX_READ": "hikkoshi.block.fs_used.reader",
    "ReadFn": "hikkoshi.block.fs_used.reader",
    "Range": "hikkoshi.block.ranges",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "CONCURRENCY",
    "MAX_GAP",
    "MAX_READ",
    "MAX_RUNS",
    "Range",
    "ReadFn",
    "fs_used_hint",
    "fs_used_ranges",
]
