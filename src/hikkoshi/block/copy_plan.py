"""The order of the background copy, decided as a pure function.

Zero regions of the source are never copied: they become holes marked present. Then, in order: hot
regions (the source export's access counts, busiest first), blocks a file system uses (ext2/3/4 bitmaps),
and the rest of the data in disk order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from hikkoshi.block.ranges import Range, Span, align_in, align_out, clip, complement, runs, to_spans
from hikkoshi.nbd.constants import AllocationFlag


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
    zero = [(offset, offset + length) for offset, length, flags in source_map if flags & AllocationFlag.ZERO]
    # Only blocks entirely inside a zero extent may be skipped (the disk's short last block counts).
    for first, end in clip(align_in(zero, block_size, limit=disk_size), 0, blocks):
        state[first:end] = b"\x01" * (end - first)
    used: list[Span] | None = None
    if fs_used is not None:
        used = _blocks_of(fs_used, block_size, blocks)
        if skip_fs_free:
            for first, end in complement(used, 0, blocks):
                state[first:end] = b"\x01" * (end - first)
    zero_runs = runs(b for b in range(blocks) if state[b] == 1)

    order: list[int] = []

    def take(candidates: Iterable[int]) -> None:
        for b in candidates:
            if state[b] == 0:
                state[b] = 2
                order.append(b)

    for offset, length, _count in sorted(heat, key=lambda h: (-h[2], h[0])):
        if _count > 0:
            take(_each(_blocks_of([(offset, length)], block_size, blocks)))
    if used is not None:
        take(_each(used))
    take(range(blocks))
    return CopyPlan(zero_runs, runs(order))


def _blocks_of(ranges: Iterable[Range], block_size: int, blocks: int) -> list[Span]:
    """The blocks of the disk that byte ``ranges`` touch, merged."""
    return clip(align_out(to_spans(ranges), block_size), 0, blocks)


def _each(spans: Iterable[Span]) -> Iterator[int]:
    for first, end in spans:
        yield from range(first, end)
