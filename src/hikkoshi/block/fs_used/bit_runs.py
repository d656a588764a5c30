"""Runs of set bits in a bitmap held as one big integer. Pure.

A group's block bitmap becomes runs with big-integer operations and one Python step per run, not per
bit. A caller that bounds memory gives each bitmap a budget of runs; a bitmap with more is described in
coarser granules, which only ever says *more* is used.
"""

from __future__ import annotations

import re

from hikkoshi.block.ranges import Span

_BITS_OF = tuple(tuple(i for i in range(8) if v >> i & 1) for v in range(256))
_NONZERO = re.compile(rb"[^\x00]")


def _bit_positions(value: int, nbytes: int) -> list[int]:
    data = value.to_bytes(nbytes, "little")
    out: list[int] = []
    for m in _NONZERO.finditer(data):
        i = m.start()
        base = i * 8
        out.extend(base + b for b in _BITS_OF[data[i]])
    return out


def set_bit_runs(x: int, nbits: int, budget: int) -> list[Span]:
    """Runs [first, end) of the set bits of ``x`` (no bit at or above ``nbits``): exact when there are at
    most ``budget`` of them, else runs of whole granules with any bit set (a superset)."""
    if x == 0:
        return []
    if x == (1 << nbits) - 1:
        return [(0, nbits)]
    nbytes = (nbits + 7) // 8
    starts = x & ~(x << 1)  # a set bit whose lower neighbour is clear
    if starts.bit_count() <= budget:
        ends = x & ~(x >> 1)  # a set bit whose upper neighbour is clear
        return [
            (s, e + 1)
            for s, e in zip(_bit_positions(starts, nbytes), _bit_positions(ends, nbytes), strict=True)
        ]
    granule = 8  # bits; grow until the group has at most 2 * budget granules (hence <= budget + 1 runs)
    while -(-nbits // granule) > 2 * budget:
        granule *= 2
    data = x.to_bytes(nbytes, "little")
    step = granule // 8
    empty = bytes(step)
    out: list[Span] = []
    for i in range(0, nbytes, step):
        chunk = data[i : i + step]
        if chunk != empty[: len(chunk)]:
            first, end = i * 8, min(i * 8 + granule, nbits)
            if out and out[-1][1] == first:
                out[-1] = (out[-1][0], end)
            else:
                out.append((first, end))
    return out
