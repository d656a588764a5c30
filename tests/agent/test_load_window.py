"""The load window: rates from raw counters, a window of the last N samples, a fresh start when a
counter goes back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.agent.load_window import DatastoreLatency, LoadWindow, Raw, percentile_ms, point


def test_rates_between_two_readings() -> None:
    p = point(Raw(10.0, 100, 1 << 20, 0, 0), Raw(12.0, 300, 2 << 20, 4000, 8000, 1.5), hz=100)
    assert p is not None
    assert p.cpu == 1.0 and p.memory == 2 << 20 and p.read == 2000 and p.write == 4000 and p.latency_ms == 1.5
    assert point(Raw(1.0, 5, 0), Raw(1.0, 6, 0), hz=100) is None  # no time passed
    assert point(Raw(1.0, 5, 0), Raw(2.0, 4, 0), hz=100) is None  # restarted
    assert point(Raw(1.0, 5, 0, 10), Raw(2.0, 6, 0, 5), hz=100) is None  # its disk service restarted


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40), st.integers(1, 10))
def test_window_keeps_the_last_samples(steps: list[int], size: int) -> None:
    w = LoadWindow(size, hz=100)
    ticks = 0
    for i, step in enumerate(steps):
        ticks += step
        w.add("vm", Raw(float(i), ticks, 4096 * (i + 1)))
    got = w.load("vm", "ds", 123)
    expected = [s / 100 for s in steps[1:]][-size:]
    assert list(got.cpu) == [round(x, 4) for x in expected]
    assert len(got.memory) == len(expected) and got.datastore == "ds" and got.disk_allocated == 123


def test_counter_going_back_starts_afresh_and_gone_vms_are_forgotten() -> None:
    w = LoadWindow(5, hz=100)
    for i in range(4):
        w.add("a", Raw(float(i), 100 * i, 1))
        w.add("b", Raw(float(i), 100 * i, 1))
    assert len(w.load("a").cpu) == 3
    w.add("a", Raw(5.0, 0, 1))  # QEMU restarted
    assert w.load("a").cpu == ()
    w.keep(["a"])
    assert w.uuids() == [] and w.load("b").cpu == ()


def test_network_rate_from_the_taps_counters() -> None:
    p = point(Raw(1.0, 0, 1, net_bytes=1000), Raw(3.0, 0, 1, net_bytes=9000), hz=100)
    assert p is not None and p.network == 4000
    again = point(Raw(1.0, 0, 1, net_bytes=9000), Raw(3.0, 0, 1, net_bytes=100), hz=100)
    assert again is not None and again.network == 0.0  # the tap was made again: no rate this time


def test_percentile_of_a_log2_histogram() -> None:
    assert percentile_ms([], 0.9) == 0.0 and percentile_ms([0, 0], 0.9) == 0.0
    # 9 requests under 2 us, 1 under 1024 us: p90 is in the first bucket, p99 in the tenth.
    hist = [9] + [0] * 8 + [1]
    assert percentile_ms(hist, 0.9) == 0.002 and percentile_ms(hist, 0.99) == 1.024


def test_datastore_latency_merges_its_vms_per_interval() -> None:
    d = DatastoreLatency(size=3)
    d.add({"a": ("ds1", [0, 0, 0]), "b": ("ds1", [0, 0, 0]), "c": ("ds2", [5, 0, 0])})
    assert d.windows() == {}  # first readings: nothing to compare with
    # In the interval: a made 9 fast requests, b one slow one; the p90 of the ten is fast.
    d.add({"a": ("ds1", [9, 0, 0]), "b": ("ds1", [0, 0, 1]), "c": ("ds2", [5, 0, 0])})
    assert d.windows() == {"ds1": (0.002,)}  # ds2 had no requests: no sample
    # b's service restarted (its counts went back): only a counts; then b again from its new counts.
    d.add({"a": ("ds1", [9, 4, 0]), "b": ("ds1", [0, 0, 0])})
    d.add({"a": ("ds1", [9, 4, 0]), "b": ("ds1", [0, 0, 3])})
    assert d.windows() == {"ds1": (0.002, 0.004, 0.008)}


@given(st.lists(st.lists(st.integers(0, 50), min_size=4, max_size=4), min_size=2, max_size=12))
def test_datastore_percentile_is_within_its_vms_buckets(increments: list[list[int]]) -> None:
    d = DatastoreLatency(size=50, fraction=0.9)
    total = [0, 0, 0, 0]
    d.add({"vm": ("ds", tuple(total))})
    for step in increments:
        total = [a + b for a, b in zip(total, step, strict=True)]
        d.add({"vm": ("ds", tuple(total))})
    got = d.windows().get("ds", ())
    assert len(got) == sum(1 for s in increments if sum(s))
    assert all(x in (0.002, 0.004, 0.008, 0.016) for x in got)
