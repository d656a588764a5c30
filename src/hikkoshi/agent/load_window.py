"""Load figures over a recent window, from raw counters sampled every few seconds. Pure.

Each sample of a VM is its QEMU process's CPU time (all threads: utime + stime, in clock ticks), its
resident memory, its NBD service's byte counters and request latency, and the bytes its NICs' taps
moved. Rates come from two samples in a row: cores busy = CPU seconds used / seconds passed; read,
write and network rates likewise. A counter that went back (the VM restarted, or its disk service did)
starts the VM's window afresh.

A datastore's latency is a percentile over every request of every VM on it in the interval: each
disk service counts its requests' latencies in log2 buckets since it started; the interval's counts are
the difference of two readings, summed over the datastore's VMs (:class:`DatastoreLatency`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hikkoshi.cluster.models import VmLoad


@dataclass(frozen=True)
class Raw:
    """One reading of a VM's counters."""

    at: float
    """Seconds (monotonic)."""
    cpu_ticks: int
    rss: int
    """Bytes."""
    bytes_read: int = 0
    bytes_written: int = 0
    latency_ms: float = 0.0
    net_bytes: int = 0
    """Bytes received and sent by the VM's taps."""


@dataclass(frozen=True)
class Point:
    """One sample of the window: rates over the interval that ended with it."""

    cpu: float
    memory: int
    read: float
    write: float
    latency_ms: float
    network: float = 0.0


def point(before: Raw, after: Raw, hz: int) -> Point | None:
    """The rates between two readings; None when they cannot be compared (no time passed, or a
    counter went back)."""
    dt = after.at - before.at
    if dt <= 0 or after.cpu_ticks < before.cpu_ticks:
        return None
    if after.bytes_read < before.bytes_read or after.bytes_written < before.bytes_written:
        return None
    network = max(0, after.net_bytes - before.net_bytes)  # a tap made again starts from 0: no rate
    return Point(
        cpu=(after.cpu_ticks - before.cpu_ticks) / hz / dt,
        memory=after.rss,
        read=(after.bytes_read - before.bytes_read) / dt,
        write=(after.bytes_written - before.bytes_written) / dt,
        latency_ms=after.latency_ms,
        network=network / dt if after.net_bytes >= before.net_bytes else 0.0,
    )


class LoadWindow:
    """The last ``size`` samples of every VM (by uuid)."""

    def __init__(self, size: int = 30, hz: int = 100) -> None:
        if size < 1 or hz < 1:
            raise ValueError("a window holds at least one sample, at a positive clock rate")
        self.size = size
        self.hz = hz
        self._last: dict[str, Raw] = {}
        self._points: dict[str, deque[Point]] = {}

    def add(self, uuid: str, raw: Raw) -> None:
        """A new reading of VM ``uuid``."""
        before = self._last.get(uuid)
        self._last[uuid] = raw
        if before is None:
            return
        p = point(before, raw, self.hz)
        if p is None:
            self._points.pop(uuid, None)
            return
        self._points.setdefault(uuid, deque(maxlen=self.size)).append(p)

    def keep(self, uuids: Iterable[str]) -> None:
        """Forget VMs not in ``uuids`` (gone, stopped, migrated away)."""
        wanted = set(uuids)
        for d in (self._last, self._points):
            for u in [u for u in d if u not in wanted]:
                del d[u]

    def load(self, uuid: str, datastore: str | None = None, allocated: int = 0) -> VmLoad:
        """VM ``uuid``'s window (empty until two readings were compared)."""
        pts = tuple(self._points.get(uuid, ()))
        return VmLoad(
            cpu=tuple(round(p.cpu, 4) for p in pts),
            memory=tuple(p.memory for p in pts),
            disk_read=tuple(round(p.read, 1) for p in pts),
            disk_write=tuple(round(p.write, 1) for p in pts),
            disk_latency_ms=tuple(round(p.latency_ms, 3) for p in pts),
            network=tuple(round(p.network, 1) for p in pts),
            datastore=datastore,
            disk_allocated=allocated,
        )

    def uuids(self) -> list[str]:
        return sorted(self._points)


def percentile_ms(histogram: Sequence[int], fraction: float) -> float:
    """The upper bound (ms) of the log2-microsecond bucket holding ``fraction`` of the requests counted
    in ``histogram`` (bucket i: below 2**(i+1) us); 0 with no requests."""
    total = sum(histogram)
    if total <= 0:
        return 0.0
    seen = 0
    for i, n in enumerate(histogram):
        seen += n
        if seen >= fraction * total:
            return (1 << (i + 1)) / 1000
    return (1 << len(histogram)) / 1000


class DatastoreLatency:
    """Per datastore, the last ``size`` intervals' latency percentile over all its VMs' requests."""

    def __init__(self, size: int = 30, fraction: float = 0.9) -> None:
        self.size = size
        self.fraction = fraction
        self._last: dict[str, tuple[int, ...]] = {}
        self._window: dict[str, deque[float]] = {}

    def add(self, readings: Mapping[str, tuple[str, Sequence[int]]]) -> None:
        """One sample: VM uuid -> (its datastore, its disk service's cumulative histogram now). A VM
        read for the first time, or whose counts went back (restarted), adds nothing this time."""
        merged: dict[str, list[int]] = {}
        for uuid, (store, hist) in readings.items():
            now = tuple(hist)
            before = self._last.get(uuid)
            self._last[uuid] = now
            if (
                not store
                or before is None
                or len(before) != len(now)
                or any(a < b for a, b in zip(now, before, strict=True))
            ):
                continue
            into = merged.setdefault(store, [0] * len(now))
            if len(into) != len(now):
                continue
            for i, (a, b) in enumerate(zip(now, before, strict=True)):
                into[i] += a - b
        for uuid in [u for u in self._last if u not in readings]:
            del self._last[uuid]
        for store, hist in merged.items():
            if sum(hist):
                self._window.setdefault(store, deque(maxlen=self.size)).append(
                    percentile_ms(hist, self.fraction)
                )

    def windows(self) -> dict[str, tuple[float, ...]]:
        """Datastore uuid -> its percentile per interval with requests (ms, oldest first)."""
        return {store: tuple(round(x, 3) for x in w) for store, w in self._window.items()}
