"""Load figures over a recent window, from raw counters sampled every few seconds. Pure.

Each sample of a VM is its QEMU process's CPU time (all threads: utime + stime, in clock ticks), its
resident memory, and its NBD service's byte counters and request latency. Rates come from two samples
in a row: cores busy = CPU seconds used / seconds passed; read and write rates likewise. A counter that
went back (the VM restarted, or its disk service did) starts the VM's window afresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
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


@dataclass(frozen=True)
class Point:
    """One sample of the window: rates over the interval that ended with it."""

    cpu: float
    memory: int
    read: float
    write: float
    latency_ms: float


def point(before: Raw, after: Raw, hz: int) -> Point | None:
    """The rates between two readings; None when they cannot be compared (no time passed, or a
    counter went back)."""
    dt = after.at - before.at
    if dt <= 0 or after.cpu_ticks < before.cpu_ticks:
        return None
    if after.bytes_read < before.bytes_read or after.bytes_written < before.bytes_written:
        return None
    return Point(
        cpu=(after.cpu_ticks - before.cpu_ticks) / hz / dt,
        memory=after.rss,
        read=(after.bytes_read - before.bytes_read) / dt,
        write=(after.bytes_written - before.bytes_written) / dt,
        latency_ms=after.latency_ms,
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
            datastore=datastore,
            disk_allocated=allocated,
        )

    def uuids(self) -> list[str]:
        return sorted(self._points)
