"""What the load sampler reads of a VM: its exports' latency counts summed, its taps' bytes."""

from __future__ import annotations

from pathlib import Path

from hikkoshi.agent.load_sampler import latency_histogram, nbd_counters, tap_bytes


def test_latency_counts_summed_over_exports() -> None:
    stats = {
        "disk0": {"latency_us": {"p99": 512.0, "histogram_log2": [1, 2, 3]}, "bytes_read": 5},
        "disk1": {"latency_us": {"p99": 2048.0, "histogram_log2": [0, 0, 0, 4]}, "bytes_written": 7},
        "junk": "not an export",
    }
    assert latency_histogram(stats) == (1, 2, 3, 4)
    assert nbd_counters(stats) == (5, 7, 2.048)
    assert latency_histogram({}) == ()


def test_tap_bytes_from_sysfs() -> None:
    lo = Path("/sys/class/net/lo/statistics")
    expected = int((lo / "rx_bytes").read_text()) + int((lo / "tx_bytes").read_text())
    got = tap_bytes({"0": "lo"})
    assert got >= expected  # the loopback only counts up
    assert tap_bytes({"0": "no-such-tap"}) == 0 and tap_bytes({"0": "../etc"}) == 0 and tap_bytes(None) == 0
