"""Intervals of a disk and the algebra on them, written once for the relocation proxy, its copy plan and
the ext file-system reader. Pure: no I/O, no state; every function returns a new list and leaves its
arguments alone.

Forms. A *span* ``(start, end)`` is the half-open interval [start, end): the algebra works on spans. A
*range* ``(offset, length)`` is how the NBD protocol and the rest of hikkoshi speak of bytes;
:func:`to_spans` and :func:`to_ranges` convert at the edges. Units are whatever the caller counts in
(bytes, blocks, clusters). A list of spans is *merged* when it is sorted, no span is empty, and neighbours
neither overlap nor touch; :func:`merge` makes one. The set operations (:func:`union` aside) take merged
lists and return merged lists; fed anything else they answer wrongly rather than raise, because checking
would cost as much as the work (merge what comes from outside first).

Labelled maps. A *labelled extent* ``(offset, length, label)`` tags part of a disk (an allocation map's
flags, a heat map's counts); a block-status *extent* ``(length, label)`` is one of a run that starts at a
known offset, as NBD replies list them. :func:`relabel`, :func:`extents_in` and :func:`coalesce` are the
operations the proxy's block status needs on them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence

Span = tuple[int, int]  # [start, end)
Range = tuple[int, int]  # (offset, length)
Labelled = tuple[int, int, int]  # (offset, length, label)
Extent = tuple[int, int]  # (length, label), following the previous extent


# --- forms -----------------------------------------------------------------------------------------------


def to_spans(ranges: Iterable[Range]) -> list[Span]:
    """``(offset, length)`` ranges as spans, in the same order (not merged)."""
    return [(offset, offset + length) for offset, length in ranges]


def to_ranges(spans: Iterable[Span]) -> list[Range]:
    """Spans as ``(offset, length)`` ranges, in the same order."""
    return [(start, end - start) for start, end in spans]


def total(spans: Iterable[Span]) -> int:
    """The summed length of ``spans`` (what they cover, when they are merged)."""
    return sum(end - start for start, end in spans)


# --- set operations --------------------------------------------------------------------------------------


def merge(spans: Iterable[Span]) -> list[Span]:
    """The merged form of any spans: sorted, empty ones dropped, overlapping or touching ones joined."""
    out: list[Span] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def union(a: Iterable[Span], b: Iterable[Span]) -> list[Span]:
    """Everything in ``a`` or ``b`` (any spans), merged."""
    return merge(itertools.chain(a, b))


def intersect(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """What two merged lists have in common."""
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        # Step past whichever span ends first: it can meet nothing further in the other list.
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def complement(spans: Sequence[Span], lo: int, hi: int) -> list[Span]:
    """[lo, hi) less the merged ``spans``."""
    out: list[Span] = []
    pos = lo
    for start, end in spans:
        if end <= pos:
            continue
        if start >= hi:
            break
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < hi:
        out.append((pos, hi))
    return out


def subtract(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """What of merged ``a`` is not in merged ``b``."""
    if not a:
        return []
    return intersect(a, complement(b, a[0][0], a[-1][1]))


def clip(spans: Sequence[Span], lo: int, hi: int) -> list[Span]:
    """What of the merged ``spans`` lies in [lo, hi)."""
    return intersect(spans, [(lo, hi)]) if lo < hi else []


# --- units -----------------------------------------------------------------------------------------------


def align_out(spans: Iterable[Span], unit: int) -> list[Span]:
    """The units (``unit``-sized blocks, numbered from 0) that any of ``spans`` touches, merged."""
    return merge((start // unit, -(-end // unit)) for start, end in spans if end > start)


def align_in(spans: Iterable[Span], unit: int, limit: int | None = None) -> list[Span]:
    """The units lying wholly inside one of ``spans``, merged. Each span counts on its own: a unit that
    two touching spans cover between them is in neither (merge first if it should count).

    ``limit`` is the end of what the units divide (a disk whose size need not be a multiple of
    ``unit``): spans end there at the latest, and one that reaches it holds the short last unit.
    """
    out: list[Span] = []
    for start, end in spans:
        last = -(-limit // unit) if limit is not None and end >= limit else end // unit
        out.append((-(-start // unit), last))
    return merge(out)


def runs(points: Iterable[int]) -> list[Range]:
    """Consecutive integers, in the order given, as ``(first, count)`` runs (order kept, not sorted)."""
    out: list[Range] = []
    for p in points:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


# --- labelled maps ---------------------------------------------------------------------------------------


def relabel(extents: Iterable[Labelled], spans: Sequence[Span], label: int) -> list[Labelled]:
    """``extents`` (in any order) with what the merged ``spans`` cover of them labelled ``label``; the
    rest keeps its label, nothing moves, empty extents go."""
    starts = [start for start, _ in spans]
    out: list[Labelled] = []
    for offset, length, old in extents:
        end = offset + length
        pos = offset
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while i < len(spans) and spans[i][0] < end:
            lo, hi = max(spans[i][0], pos), min(spans[i][1], end)
            if lo < hi:
                if lo > pos:
                    out.append((pos, lo - pos, old))
                out.append((lo, hi - lo, label))
                pos = hi
            i += 1
        if pos < end:
            out.append((pos, end - pos, old))
    return out


def extents_in(extents: Iterable[Labelled], lo: int, hi: int, fill: int) -> list[Extent]:
    """[lo, hi) as block-status extents from ``extents`` (sorted by offset): what no extent covers is
    labelled ``fill``. Where extents overlap, the first one wins."""
    out: list[Extent] = []
    pos = lo
    for offset, length, label in extents:
        if pos >= hi or offset >= hi:
            break
        start, end = max(offset, pos), min(offset + length, hi)
        if end <= start:
            continue  # behind the window, or empty
        if start > pos:
            out.append((start - pos, fill))
        out.append((end - start, label))
        pos = end
    if pos < hi:
        out.append((hi - pos, fill))
    return out


def coalesce(extents: Iterable[Extent]) -> list[Extent]:
    """Block-status extents with empty ones dropped and neighbours of one label joined."""
    out: list[Extent] = []
    for length, label in extents:
        if length <= 0:
            continue
        if out and out[-1][1] == label:
            out[-1] = (out[-1][0] + length, label)
        else:
            out.append((length, label))
    return out
