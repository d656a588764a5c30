"""Which byte ranges of a disk its ext2/3/4 file systems use: :func:`fs_used_ranges` (safe for skipping
the rest) and :func:`fs_used_hint` (an order for copying only). The reading and its checks are in
:mod:`hikkoshi.block.fs_used.disk`."""

from hikkoshi.block.fs_used.disk import (
    CONCURRENCY,
    MAX_GAP,
    MAX_READ,
    MAX_RUNS,
    Range,
    ReadFn,
    fs_used_hint,
    fs_used_ranges,
)

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
