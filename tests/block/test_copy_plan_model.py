"""block.copy_plan against a model written from its contract, block by block, on byte ranges that need
not be block-aligned and a disk whose last block may be short."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.block.copy_plan import plan_copy
from hikkoshi.block.ranges import Range, runs

BS = 16


def model(
    size: int,
    source: list[tuple[int, int, int]],
    heat: list[tuple[int, int, int]],
    used: list[Range] | None,
    skip: bool,
) -> tuple[list[Range], list[Range]]:
    blocks = -(-size // BS)

    def block_end(b: int) -> int:
        return min((b + 1) * BS, size)

    def touched(o: int, n: int) -> list[int]:
        # In whole blocks: bytes past the end of the disk still touch its (short) last block.
        return [b for b in range(blocks) if n > 0 and o < (b + 1) * BS and b * BS < o + n]

    # A block is zero if one zero extent holds all of it.
    zero = {b for b in range(blocks) for o, n, f in source if f & 2 and o <= b * BS and block_end(b) <= o + n}
    used_blocks = sorted({b for o, n in used or [] for b in touched(o, n)})
    if used is not None and skip:
        zero |= set(range(blocks)) - set(used_blocks)
    order: list[int] = []
    for o, n, count in sorted(heat, key=lambda h: (-h[2], h[0])):
        if count > 0:
            order += [b for b in touched(o, n) if b not in zero and b not in order]
    order += [b for b in used_blocks if b not in zero and b not in order]
    order += [b for b in range(blocks) if b not in zero and b not in order]
    return runs(sorted(zero)), runs(order)


ranges = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 80)), max_size=6)


@given(
    size=st.integers(0, 300),
    source=st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 120), st.sampled_from([0, 1, 2, 3])), max_size=6
    ),
    heat=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60), st.integers(0, 3)), max_size=5),
    used=st.none() | ranges,
    skip=st.booleans(),
)
def test_copy_plan_matches_its_model(
    size: int,
    source: list[tuple[int, int, int]],
    heat: list[tuple[int, int, int]],
    used: list[Range] | None,
    skip: bool,
) -> None:
    plan = plan_copy(size, BS, source, heat=heat, fs_used=used, skip_fs_free=skip)
    assert (plan.zero, plan.copy) == model(size, source, heat, used, skip)
