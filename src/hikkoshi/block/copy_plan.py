"""The order of the background copy, decided as a pure function.

Zero regions of the source are never copied: they become holes marked present. Then, in order: hot
regions (the source export's access counts, busiest first), blocks a file system uses (ext2/3/4 bitmaps),
and the rest of the data in disk order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hikkoshi.nbd.constants import AllocationFlag

Range = tuple[int, int]  # (offset, length) in bytes


@dataclass(frozen=True)
class CopyPlan:
    """Block runs (first block, count): to mark as zero, and to copy in order."""

    zero: list[tuple[int, int]]
    copy: list[tuple[int, int]]

    @property
    def copy_blocks(self) -> int:
        return sum(n for _, n in self.copy)


def plan_copy(
    disk_size: int,
    block_size: int,
    source_map: Sequence[tuple[int, int, int]],
    heat: Sequence[tuple[int, int, int]] = (),
    fs_used: Sequence[Range] | None = None,
    skip_fs_free: bool = False,
) -> CopyPlan:
    """Plan the copy.

    ``source_map``: (offset, length, base:allocation flags) covering the disk (gaps count as data).
    ``heat``: (offset, length, access count) regions. ``fs_used``: byte ranges a file system allocates;
    with ``skip_fs_free`` the rest is treated as zero (the guest's file system does not care what free
    blocks hold), otherwise it is copied last.
    """
    blocks = (disk_size + block_size - 1) // block_size
    state = bytearray(blocks)  # 0 unplanned data, 1 zero, 2 planned
    zero_runs: list[tuple[int, int]] = []
    for offset, length, flags in source_map:
        if flags & AllocationFlag.ZERO:
            # Only blocks entirely inside a zero extent may be skipped.
            first = -(-offset // block_size)
            end = min(offset + length, disk_size)
            last = end // block_size if end < disk_size else blocks
            for b in range(first, last):
                state[b] = 1
    used_mask: bytearray | None = None
    if fs_used is not None:
        used_mask = bytearray(blocks)
        for b in _blocks_of(fs_used, block_size, blocks):
            used_mask[b] = 1
        if skip_fs_free:
            for b in range(blocks):
                if not used_mask[b]:
                    state[b] = 1
    zero_runs = _runs(b for b in range(blocks) if state[b] == 1)

    order: list[int] = []

    def take(candidates: Iterable[int]) -> None:
        for b in candidates:
            if state[b] == 0:
                state[b] = 2
                order.append(b)

    for offset, length, _count in sorted(heat, key=lambda h: (-h[2], h[0])):
        if _count > 0:
            take(_blocks_of([(offset, length)], block_size, blocks))
    if used_mask is not None:
        take(b for b in range(blocks) if used_mask[b])
    take(range(blocks))
    return CopyPlan(zero_runs, _runs(order))


def _blocks_of(ranges: Iterable[Range], block_size: int, blocks: int) -> Iterable[int]:
    for offset, length in ranges:
        if length <= 0:
            continue
        first = max(0, offset // block_size)
        last = min(blocks, (offset + length - 1) // block_size + 1)
        yield from range(first, last)


def _runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Group consecutive block numbers (in the given order) into runs."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out
