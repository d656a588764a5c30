"""The migration predictor: properties over generated migrations, calibration, the benchmark's cases."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hikkoshi.migrate.convergence import Schedule, build_schedule
from hikkoshi.migrate.predict import (
    Calibration,
    Disk,
    Finish,
    Link,
    Migration,
    Mode,
    Observed,
    calibrate,
    predict,
    predict_disk_move,
)
from hikkoshi.migrate.storage_modes import StorageMode

MIB = 1 << 20
GIB = 1 << 30

memory = st.integers(64 * MIB, 64 * GIB)
rate = st.floats(0, 4 * GIB, allow_nan=False)
bandwidth = st.floats(1e6, 10e9, allow_nan=False)
rtt = st.floats(0, 300, allow_nan=False)
modes = st.sampled_from(list(Mode))
disks = st.lists(
    st.integers(0, 200 * GIB).flatmap(lambda size: st.builds(Disk, st.just(size), st.integers(0, size))),
    max_size=3,
).map(tuple)
schedules = st.builds(
    build_schedule,
    st.integers(50, 2000),
    steps=st.integers(1, 5),
    auto_converge=st.booleans(),
    allow_postcopy=st.booleans(),
    max_seconds=st.floats(10, 3600),
)
# One downtime limit, no throttle, no post-copy: nothing steers, so only the workload decides.
fixed_schedules = st.integers(50, 2000).map(lambda ms: Schedule(downtime_ms=(ms,), max_seconds=3600))


@st.composite
def migrations(draw: st.DrawFn, schedule: st.SearchStrategy[Schedule] = schedules) -> Migration:
    size = draw(memory)
    return Migration(
        memory_bytes=size,
        dirty_rate=draw(rate),
        link=Link(draw(bandwidth), draw(rtt)),
        mode=draw(modes),
        disks=draw(disks),
        disk_write_rate=draw(st.floats(0, 2 * GIB)),
        schedule=draw(schedule),
        resident_bytes=draw(st.none() | st.integers(0, size)),
    )


def test_modes_are_the_storage_modes() -> None:
    assert [m.value for m in Mode] == [m.value for m in StorageMode]


@settings(max_examples=300, deadline=None)
@given(migrations())
def test_what_every_prediction_keeps(m: Migration) -> None:
    p = predict(m)
    cal = Calibration()
    assert p.bytes >= m.first_pass_bytes  # the first pass sends all the guest's memory
    assert p.memory_bytes >= m.first_pass_bytes
    assert p.rounds >= 1
    assert p.total_time_ms >= cal.stream_start_ms(m.link)
    if p.converges:
        assert p.time_to_destination_ms is not None
        assert cal.stream_start_ms(m.link) <= p.time_to_destination_ms <= p.total_time_ms
        # The limit binds what QEMU controls (the last memory); the fixed part of a switchover comes on top.
        assert p.downtime_ms <= m.schedule.downtime_ms[-1] + cal.switchover_fixed_ms(m.link) + 1e-6
        assert p.disk_bytes >= (m.disk_bytes if m.mode is not Mode.SHARED else 0)
    else:
        assert p.finish is Finish.ABORT and p.time_to_destination_ms is None and p.downtime_ms == 0
    if p.finish is Finish.POSTCOPY:
        assert m.schedule.allow_postcopy
    if m.mode is Mode.SHARED:
        assert p.disk_bytes == 0


@settings(max_examples=200, deadline=None)
@given(migrations())
def test_downtime_within_the_last_limit_without_fixed_costs(m: Migration) -> None:
    bare = Calibration(switchover_ms=0, switchover_rtts=0)
    p = predict(m, bare)
    if p.converges:
        assert p.downtime_ms <= m.schedule.downtime_ms[-1] + 1e-6
        assert p.downtime_ms <= p.downtime_limit_ms + 1e-6


@settings(max_examples=300, deadline=None)
@given(migrations(fixed_schedules), rate, rate)
def test_monotonic_in_the_dirty_rate(m: Migration, a: float, b: float) -> None:
    """With nothing to steer, a guest dirtying faster never migrates faster or cheaper. (With a full
    schedule it can: a rate just under the stall threshold is never escalated; see the module.)"""
    low, high = sorted((a, b))
    p, q = predict(replace(m, dirty_rate=low)), predict(replace(m, dirty_rate=high))
    if q.converges:
        assert p.converges
    if p.converges and q.converges:
        assert p.rounds <= q.rounds
        assert p.total_time_ms <= q.total_time_ms * (1 + 1e-9)
        assert p.bytes <= q.bytes * (1 + 1e-9) + 1
        assert p.time_to_destination_ms is not None and q.time_to_destination_ms is not None
        assert p.time_to_destination_ms <= q.time_to_destination_ms * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(migrations(fixed_schedules), bandwidth, bandwidth)
def test_inversely_monotonic_in_bandwidth(m: Migration, a: float, b: float) -> None:
    slow, fast = sorted((a, b))
    p, q = (
        predict(replace(m, link=Link(slow, m.link.rtt_ms))),
        predict(replace(m, link=Link(fast, m.link.rtt_ms))),
    )
    if p.converges:
        assert q.converges
    if p.converges and q.converges:
        assert q.total_time_ms <= p.total_time_ms * (1 + 1e-9)
        assert q.rounds <= p.rounds


@settings(max_examples=100, deadline=None)
@given(migrations(fixed_schedules), rtt, rtt)
def test_a_longer_round_trip_never_helps(m: Migration, a: float, b: float) -> None:
    near, far = sorted((a, b))
    p, q = (
        predict(replace(m, link=Link(m.link.bandwidth, near))),
        predict(replace(m, link=Link(m.link.bandwidth, far))),
    )
    assert p.converges == q.converges
    assert p.total_time_ms <= q.total_time_ms + 1e-6
    assert p.downtime_ms <= q.downtime_ms + 1e-6


def test_an_idle_guest_needs_one_pass() -> None:
    m = Migration(memory_bytes=4 * GIB, dirty_rate=0, link=Link(1.25e9, 0.2))
    p = predict(m)
    assert p.converges and p.rounds == 1 and p.bytes == 4 * GIB
    assert p.downtime_ms == pytest.approx(Calibration().switchover_fixed_ms(m.link))
    assert p.to_json()["total_time_ms"] == round(p.total_time_ms, 1)
    assert {"total_time_ms", "downtime_ms", "bytes", "time_to_destination_ms", "converges", "rounds"} <= set(
        p.to_json()
    )


def test_the_schedule_escalates_then_gives_up_or_post_copies() -> None:
    # Dirtying faster than the link: it cannot shrink. Limits rise, throttling follows, then the end.
    m = Migration(memory_bytes=8 * GIB, dirty_rate=2 * GIB, link=Link(1.25e9, 0.2))
    aborted = predict(replace(m, schedule=build_schedule(300, auto_converge=False)))
    assert not aborted.converges and aborted.finish is Finish.ABORT
    assert aborted.downtime_limit_ms == 300
    post = predict(replace(m, schedule=build_schedule(300, auto_converge=False, allow_postcopy=True)))
    assert post.converges and post.finish is Finish.POSTCOPY
    assert post.time_to_destination_ms is not None and post.time_to_destination_ms < post.total_time_ms
    throttled = predict(replace(m, schedule=build_schedule(300)))
    assert throttled.converges and throttled.throttle_percent >= 40
    assert "throttle" in throttled.explanation


def test_storage_modes_order_as_they_should() -> None:
    base = Migration(
        memory_bytes=4 * GIB,
        dirty_rate=50 * MIB,
        link=Link(1.25e9, 0.2),
        disks=(Disk(100 * GIB, 40 * GIB),),
        disk_write_rate=20 * MIB,
    )
    shared, pre, post, hybrid = (predict(replace(base, mode=mode)) for mode in Mode)
    assert shared.total_time_ms < min(pre.total_time_ms, post.total_time_ms, hybrid.total_time_ms)
    # Post-copy puts the guest on the destination first and pulls the disk after; precopy the reverse.
    assert post.time_to_destination_ms == shared.time_to_destination_ms
    assert pre.time_to_destination_ms is not None and post.time_to_destination_ms is not None
    assert pre.time_to_destination_ms > post.time_to_destination_ms
    assert pre.time_to_destination_ms == pytest.approx(pre.total_time_ms - Calibration().finish_ms)
    # Writes during the mirror add to it; hybrid re-copies what was written after its copy.
    assert pre.disk_bytes > 40 * GIB and hybrid.disk_bytes > 40 * GIB and post.disk_bytes == 40 * GIB


def test_the_benchmark_wan_case_is_about_right() -> None:
    """docs/BENCHMARKS.md, WAN (150 ms, 100 Mbit/s), idle 256 MiB guest, 64 MiB sent, 64 MiB thin disk:
    postcopy and hybrid put it on the destination in 5.9-6.7 s (0.4-1.2 s before the stream starts)."""
    m = Migration(
        memory_bytes=256 * MIB,
        resident_bytes=64 * MIB,
        dirty_rate=0.05 * MIB,
        link=Link(100e6 / 8, 150),
        mode=Mode.POSTCOPY,
        disks=(Disk(64 * MIB, 8 * MIB),),
    )
    p = predict(m)
    assert p.time_to_destination_ms is not None
    assert 5000 < p.time_to_destination_ms < 8000


def test_a_disk_move() -> None:
    p = predict_disk_move(10 * GIB, 0, 500e6)
    assert p.total_time_ms == pytest.approx(10 * GIB / 500e6 * 1000)
    busy = predict_disk_move(10 * GIB, 100e6, 500e6)
    assert busy.total_time_ms > p.total_time_ms and busy.bytes > p.bytes and busy.downtime_ms == 0


# --- calibration -----------------------------------------------------------------------------------------

TRUE = Calibration(
    setup_ms=900, destination_start_ms=400, start_rtts=3, switchover_ms=35, switchover_rtts=2, finish_ms=120
)


def _observed(m: Migration, cal: Calibration, noise: float = 0.0) -> Observed:
    p = predict(m, cal)
    assert p.time_to_destination_ms is not None
    return Observed(m, p.total_time_ms + noise, p.downtime_ms + noise, p.time_to_destination_ms + noise)


def test_calibrate_recovers_the_constants_that_made_the_runs() -> None:
    runs = [
        _observed(
            Migration(
                memory_bytes=(1 + i % 4) * GIB,
                dirty_rate=(i * 37 % 150) * MIB,
                link=Link(1.25e9 if i % 2 else 125e6, [0.2, 20.0, 80.0, 150.0][i % 4]),
                mode=list(Mode)[i % 4],
                disks=(Disk(20 * GIB, (i % 5 + 1) * GIB),),
                disk_write_rate=(i % 3) * 5 * MIB,
            ),
            TRUE,
        )
        for i in range(24)
    ]
    got = calibrate(runs)
    assert got.switchover_ms == pytest.approx(TRUE.switchover_ms, abs=1)
    assert got.switchover_rtts == pytest.approx(TRUE.switchover_rtts, abs=0.05)
    # The runs only show when the stream started: max(setup, destination start) + the round trips.
    assert max(got.setup_ms, got.destination_start_ms) + got.start_rtts * 150 == pytest.approx(
        max(TRUE.setup_ms, TRUE.destination_start_ms) + TRUE.start_rtts * 150, abs=5
    )
    assert got.finish_ms == pytest.approx(TRUE.finish_ms, abs=1)
    for o in runs:
        p = predict(o.migration, got)
        assert p.total_time_ms == pytest.approx(o.total_time_ms, rel=0.01)


def test_calibrate_with_recorded_phases_and_nothing_usable() -> None:
    m = Migration(memory_bytes=GIB, dirty_rate=0, link=Link(1.25e9, 0.2))
    run = replace(_observed(m, TRUE), destination_start_ms=400 + 3 * 0.2, stream_start_ms=900 + 3 * 0.2)
    got = calibrate([run])
    assert got.destination_start_ms == pytest.approx(400, abs=1)
    assert got.setup_ms == pytest.approx(900, abs=1)
    assert calibrate([]) == Calibration()


@settings(max_examples=50, deadline=None)
@given(st.lists(migrations(fixed_schedules), min_size=1, max_size=6))
def test_calibrate_never_returns_negative_constants(ms: list[Migration]) -> None:
    runs = [_observed(m, TRUE, noise=-500) for m in ms if predict(m, TRUE).converges]
    assume(runs)
    got = calibrate(runs)
    assert min(got.setup_ms, got.destination_start_ms, got.switchover_ms, got.finish_ms) >= 0
