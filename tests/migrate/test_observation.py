"""Migrations as observations: their inputs survive JSON, a report becomes an observation only with the
figures it needs, and the calibration rests on the runs of the same mode when there are enough."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.migrate.convergence import build_schedule
from hikkoshi.migrate.observation import (
    MINIMUM_RUNS,
    RECENT_RUNS,
    calibration_for,
    migration_json,
    migration_of,
    observed_of,
)
from hikkoshi.migrate.predict import Calibration, Disk, Link, Migration, Mode, Observed, predict

MIB = 1 << 20
sizes = st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 40))


@st.composite
def migrations(draw: st.DrawFn) -> tuple[Migration, int, bool]:
    size = draw(st.integers(64 * MIB, 64 << 30))
    limit = draw(st.integers(1, 5000))
    postcopy = draw(st.booleans())
    m = Migration(
        memory_bytes=size,
        dirty_rate=draw(st.floats(0, 4e9, allow_nan=False)),
        link=Link(draw(st.floats(1e3, 1e11, allow_nan=False)), draw(st.floats(0, 500, allow_nan=False))),
        mode=draw(st.sampled_from(list(Mode))),
        disks=tuple(
            Disk(s, a)
            for s, a in draw(
                st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 40)), max_size=3)
            )
            if a <= s
        ),
        disk_write_rate=draw(st.floats(0, 1e9, allow_nan=False)),
        schedule=build_schedule(limit, allow_postcopy=postcopy),
        resident_bytes=draw(st.none() | st.integers(0, size)),
    )
    return m, limit, postcopy


@given(migrations())
def test_inputs_survive_json(case: tuple[Migration, int, bool]) -> None:
    m, limit, postcopy = case
    assert migration_of(migration_json(m, limit, postcopy)) == m


@pytest.mark.parametrize(
    "broken",
    [{}, {"memory_bytes": 1}, {"memory_bytes": "x", "dirty_rate": 0, "link": {}, "mode": "hybrid"}],
)
def test_what_is_not_a_migration(broken: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        migration_of(broken)


def _migration(mode: Mode = Mode.HYBRID) -> Migration:
    return Migration(memory_bytes=192 * MIB, dirty_rate=4 * MIB, link=Link(100e6, 0.2), mode=mode)


REPORT = {
    "elapsed_s": 4.2,
    "time_to_destination_s": 3.9,
    "memory_started": 3.1,
    "phases_s": {"prepare-destination": 1.5},
    "migrate_info": {"downtime": 130},
}


def test_a_report_becomes_an_observation() -> None:
    inputs = migration_json(_migration(), 300)
    got = observed_of(inputs, REPORT)
    assert got == Observed(_migration(), 4200.0, 130.0, 3900.0, 3100.0, 1500.0)
    bare = {k: v for k, v in REPORT.items() if k in ("elapsed_s", "time_to_destination_s", "migrate_info")}
    assert observed_of(inputs, bare) == Observed(_migration(), 4200.0, 130.0, 3900.0)
    for missing in ("elapsed_s", "time_to_destination_s", "migrate_info"):
        assert observed_of(inputs, {k: v for k, v in REPORT.items() if k != missing}) is None
    assert observed_of({"mode": "hybrid"}, REPORT) is None
    assert observed_of(inputs, {**REPORT, "elapsed_s": -1}) is None


def _run(mode: Mode, finish_ms: float) -> Observed:
    """A run as a calibration with ``finish_ms`` of clean-up would have predicted it."""
    m = _migration(mode)
    p = predict(m, replace(Calibration(), finish_ms=finish_ms))
    assert p.time_to_destination_ms is not None
    return Observed(m, p.total_time_ms, p.downtime_ms, p.time_to_destination_ms)


def test_the_calibration_rests_on_the_same_mode_when_there_are_enough() -> None:
    assert calibration_for([], Mode.HYBRID) == (Calibration(), 0)
    hybrid = [_run(Mode.HYBRID, 2000.0) for _ in range(MINIMUM_RUNS)]
    shared = [_run(Mode.SHARED, 100.0) for _ in range(2)]
    # Enough hybrid runs: a hybrid migration calibrates on them alone.
    got, n = calibration_for([*shared, *hybrid], Mode.HYBRID)
    assert n == MINIMUM_RUNS and got.finish_ms == pytest.approx(2000.0, abs=1)
    # Too few shared runs: a shared migration calibrates on every run.
    got, n = calibration_for([*shared, *hybrid], Mode.SHARED)
    assert n == MINIMUM_RUNS + 2
    # The most recent runs only.
    old = [_run(Mode.HYBRID, 9000.0) for _ in range(RECENT_RUNS)]
    got, n = calibration_for([*old, *[_run(Mode.HYBRID, 500.0) for _ in range(RECENT_RUNS)]], Mode.HYBRID)
    assert n == RECENT_RUNS and got.finish_ms == pytest.approx(500.0, abs=1)
