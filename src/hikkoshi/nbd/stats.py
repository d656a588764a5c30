"""Per-export statistics: requests, bytes, latency, and access counts per region (the export's heat map)."""

from __future__ import annotations

import time
from typing import Any

from .constants import Command

#: Latency buckets: bucket i counts requests that took < 2**i microseconds (the last bucket is open).
_LATENCY_BUCKETS = 24
_MAX_REGIONS = 4096


def region_shift(size: int) -> int:
    """log2 of the region size: at least 1 MiB, and few enough regions to keep the map small."""
    shift = 20
    while (size >> shift) >= _MAX_REGIONS:
        shift += 1
    return shift


class ExportStats:
    """Counters of one export, shared by all its connections."""

    def __init__(self, size: int) -> None:
        self.started = time.time()
        self.shift = region_shift(size)
        regions = (size >> self.shift) + 1
        self.region_reads = [0] * regions
        self.region_writes = [0] * regions
        # Indexed by command number: the hot path must not build enum members.
        self.counts = [0] * (max(Command) + 2)
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.latency = [0] * _LATENCY_BUCKETS
        self.latency_total_ns = 0
        self.connections = 0
        self.connections_total = 0

    def record(self, command: int, offset: int, length: int, elapsed_ns: int, error: int) -> None:
        """Count one finished request."""
        self.counts[command if command <= Command.RESIZE else -1] += 1
        if error:
            self.errors += 1
        elif command == Command.READ:
            self.bytes_read += length
            self._touch(self.region_reads, offset, length)
        elif command in (Command.WRITE, Command.WRITE_ZEROES, Command.TRIM):
            if command == Command.WRITE:
                self.bytes_written += length
            self._touch(self.region_writes, offset, length)
        self.latency_total_ns += elapsed_ns
        # Bucket by ~microseconds (ns >> 10) as a power of two.
        self.latency[min((elapsed_ns >> 10).bit_length(), _LATENCY_BUCKETS - 1)] += 1

    def _touch(self, regions: list[int], offset: int, length: int) -> None:
        first = offset >> self.shift
        last = (offset + max(length, 1) - 1) >> self.shift
        if first == last:
            regions[first] += 1
        else:
            for r in range(first, min(last, len(regions) - 1) + 1):
                regions[r] += 1

    def requests(self) -> dict[str, int]:
        """Requests per command name (only those seen)."""
        names = [c.name for c in Command] + ["UNKNOWN"]
        return {names[i]: n for i, n in enumerate(self.counts) if n}

    def percentile_us(self, fraction: float) -> float:
        """Upper bound of the latency bucket holding the given fraction of requests, in microseconds."""
        total = sum(self.latency)
        if not total:
            return 0.0
        seen = 0
        for i, n in enumerate(self.latency):
            seen += n
            if seen >= fraction * total:
                return float(1 << (i + 1))
        return float(1 << _LATENCY_BUCKETS)

    def snapshot(self, regions: bool = False) -> dict[str, Any]:
        """A JSON-ready view; ``regions`` adds the per-region access counts."""
        total = sum(self.latency)
        out: dict[str, Any] = {
            "uptime_s": round(time.time() - self.started, 3),
            "connections": self.connections,
            "connections_total": self.connections_total,
            "requests": self.requests(),
            "errors": self.errors,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "latency_us": {
                "mean": round(self.latency_total_ns / total / 1000, 1) if total else 0.0,
                "p50": self.percentile_us(0.5),
                "p99": self.percentile_us(0.99),
                "histogram_log2": self.latency,
            },
        }
        if regions:
            out["region_size"] = 1 << self.shift
            out["region_reads"] = self.region_reads
            out["region_writes"] = self.region_writes
        return out
