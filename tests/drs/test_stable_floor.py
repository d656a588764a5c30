"""A load too small to matter is stable however noisy (an idle guest's few percent of a core)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.drs import load


def test_floor() -> None:
    noisy_idle = (0.01, 0.04, 0.02, 0.05)
    assert not load.stable(noisy_idle, 0.3)
    assert load.stable(noisy_idle, 0.3, floor=0.05)
    assert not load.stable((0.5, 2.0, 0.5, 2.0), 0.3, floor=0.05)


@given(st.lists(st.floats(0, 100), min_size=2, max_size=20), st.floats(0, 1), st.floats(0, 10))
def test_a_floor_never_makes_a_load_unstable(samples: list[float], cv: float, floor: float) -> None:
    if load.stable(samples, cv):
        assert load.stable(samples, cv, floor)
