"""The load window: rates from raw counters, a window of the last N samples, a fresh start when a
counter goes back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.agent.load_window import LoadWindow, Raw, point


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
