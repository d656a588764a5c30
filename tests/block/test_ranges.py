"""block.ranges: the interval algebra, checked against sets of points (every span is small enough to list
its points) and against its own laws."""

from __future__ import annotations

import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.block.ranges import (
    Extent,
    Labelled,
    Span,
    align_in,
    align_out,
    clip,
    coalesce,
    complement,
    extents_in,
    intersect,
    merge,
    relabel,
    runs,
    subtract,
    to_ranges,
    to_spans,
    total,
    union,
)

# Any spans, empty and overlapping ones included; and merged ones.
spans = st.lists(
    st.tuples(st.integers(0, 100), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])), max_size=10
)
merged = spans.map(merge)
bounds = st.tuples(st.integers(-10, 130), st.integers(-10, 130))


def points(s: list[Span]) -> set[int]:
    return {p for start, end in s for p in range(start, end)}


def is_merged(s: list[Span]) -> bool:
    return all(a < b for a, b in s) and all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(s))


@given(spans, st.randoms())
def test_merge_keeps_the_points_in_merged_form_whatever_the_order(s: list[Span], rnd: random.Random) -> None:
    m = merge(s)
    assert is_merged(m)
    assert points(m) == points(s)
    assert merge(m) == m  # idempotent
    shuffled = list(s)
    rnd.shuffle(shuffled)
    assert merge(shuffled) == m  # order-independent
    assert total(m) <= total(s)


@given(spans, spans)
def test_union_is_the_points_of_both(a: list[Span], b: list[Span]) -> None:
    u = union(a, b)
    assert is_merged(u) and points(u) == points(a) | points(b)
    assert u == union(b, a)


@given(merged, merged)
def test_set_operations_match_sets_of_points(a: list[Span], b: list[Span]) -> None:
    for result, expected in (
        (intersect(a, b), points(a) & points(b)),
        (subtract(a, b), points(a) - points(b)),
        (complement(a, 10, 90), set(range(10, 90)) - points(a)),
    ):
        assert is_merged(result)
        assert points(result) == expected


@given(merged, merged)
def test_subtract_then_union_restores(a: list[Span], b: list[Span]) -> None:
    assert union(subtract(a, b), intersect(a, b)) == a
    assert total(subtract(a, b)) + total(intersect(a, b)) == total(a)
    assert intersect(a, b) == intersect(b, a)
    assert subtract(a, a) == [] and intersect(a, a) == a


@given(merged, bounds)
def test_clip_and_complement_partition_the_bounds(a: list[Span], lohi: tuple[int, int]) -> None:
    lo, hi = lohi
    inside, outside = clip(a, lo, hi), complement(a, lo, hi)
    assert points(inside) == {p for p in points(a) if lo <= p < hi}
    assert total(inside) <= max(hi - lo, 0)  # totals never exceed the span
    assert total(outside) <= max(hi - lo, 0)
    assert union(inside, outside) == ([(lo, hi)] if lo < hi else [])
    assert intersect(inside, outside) == []


@given(st.lists(st.tuples(st.integers(-50, 50), st.integers(0, 50))))
def test_ranges_and_spans_round_trip(rs: list[tuple[int, int]]) -> None:
    assert to_ranges(to_spans(rs)) == rs
    assert total(to_spans(rs)) == sum(n for _, n in rs)


@given(spans, st.integers(1, 16))
def test_align_out_covers_every_unit_touched(s: list[Span], unit: int) -> None:
    out = align_out(s, unit)
    assert is_merged(out)
    assert points(out) == {p // unit for p in points(s)}


@given(spans, st.integers(1, 16), st.none() | st.integers(0, 130))
def test_align_in_keeps_the_units_inside_one_span(s: list[Span], unit: int, limit: int | None) -> None:
    out = align_in(s, unit, limit)
    assert is_merged(out)

    def inside(u: int, start: int, end: int) -> bool:
        # The last unit before ``limit`` ends there, however short it is.
        unit_end = (u + 1) * unit if limit is None else min((u + 1) * unit, limit)
        return start <= u * unit and unit_end <= end and (limit is None or u * unit < limit)

    top = max([e for _, e in s] + [0]) // unit + 2
    assert points(out) == {u for u in range(top) for a, b in s if inside(u, a, b)}


@given(st.lists(st.integers(0, 30), max_size=30))
def test_runs_rebuild_the_points_in_order(ps: list[int]) -> None:
    out = runs(ps)
    assert [p for first, n in out for p in range(first, first + n)] == ps
    assert all(n > 0 for _, n in out)
    # Maximal: a run never continues straight into the next one.
    assert all(f1 + n1 != f2 for (f1, n1), (f2, _) in itertools.pairwise(out))


labelled = st.lists(st.tuples(st.integers(0, 100), st.integers(0, 20), st.integers(0, 3)), max_size=8).map(
    lambda xs: sorted(xs)
)


def label_of(extents: list[Labelled]) -> dict[int, int]:
    """Byte -> label, the first extent covering a byte winning."""
    out: dict[int, int] = {}
    for offset, length, label in extents:
        for p in range(offset, offset + length):
            out.setdefault(p, label)
    return out


@given(labelled, merged, st.integers(0, 3))
def test_relabel_changes_the_labels_inside_only(ext: list[Labelled], s: list[Span], label: int) -> None:
    out = relabel(ext, s, label)
    assert all(n > 0 for _, n, _ in out)
    # Every extent becomes pieces of itself, in order, covering it exactly.
    pieces = iter(out)
    for offset, length, old in ext:
        pos = offset
        while pos < offset + length:
            p_off, p_len, p_label = next(pieces)
            assert p_off == pos
            for p in range(p_off, p_off + p_len):
                assert p_label == (label if p in points(s) else old)
            pos += p_len
        assert pos == offset + length
    assert next(pieces, None) is None


@given(labelled, bounds, st.integers(0, 3))
def test_extents_in_describes_every_byte_of_the_window(
    ext: list[Labelled], lohi: tuple[int, int], fill: int
) -> None:
    lo, hi = lohi
    out = extents_in(ext, lo, hi, fill)
    assert all(n > 0 for n, _ in out)
    assert sum(n for n, _ in out) == max(hi - lo, 0)
    truth = label_of(ext)
    got = [label for n, label in out for _ in range(n)]
    assert got == [truth.get(p, fill) for p in range(lo, hi)]


@given(st.lists(st.tuples(st.integers(-2, 5), st.integers(0, 2))))
def test_coalesce_keeps_the_labels_in_fewest_extents(extents: list[Extent]) -> None:
    out = coalesce(extents)
    assert [label for n, label in out for _ in range(n)] == [
        label for n, label in extents for _ in range(max(n, 0))
    ]
    assert all(n > 0 for n, _ in out)
    assert all(l1 != l2 for (_, l1), (_, l2) in itertools.pairwise(out))
