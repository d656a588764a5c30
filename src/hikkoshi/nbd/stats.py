"""Per-export statistics: requests, bytes, latency, and access counts per region (the export's heat map)."""

from __future__ import annotations

import time
from typing import Any

from hikkoshi.nbd.constants import Command

#: Latency buckets: bucket i counts requests that took < 2**i microseconds (the last bucket is open).
_LATENCY_BUCKETS = 24
_MAX_REGIONS = 4096
# Plain ints for the hot path.
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_RESIZE = int(Command.RESIZE)
_MODIFY = frozenset({_WRITE, int(Command.WRITE_ZEROES), int(Command.TRIM)})


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
        self.counts[command if command <= _RESIZE else -1] += 1
        if error:
            self.errors += 1
        elif command == _READ or command in _MODIFY:
            if command == _READ:
                self.bytes_read += length
                regions = self.region_reads
            else:
                if command == _WRITE:
                    self.bytes_written += length
                regions = self.region_writes
            first = offset >> self.shift
            if (offset + (length or 1) - 1) >> self.shift == first:
                regions[first] += 1
            else:
                self._touch(regions, offset, length)
        self.latency_total_ns += elapsed_ns
        # Bucket by ~microseconds (ns >> 10) as a power of two.
        bucket = (elapsed_ns >> 10).bit_length()
        self.latency[bucket if bucket < _LATENCY_BUCKETS else _LATENCY_BUCKETS - 1] += 1

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

    def heat_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Access counts of the regions covering a byte range, as block status extents (length, count)."""
        out: list[tuple[int, int]] = []
        end = offset + length
        pos = offset
        size = 1 << self.shift
        while pos < end:
            region = pos >> self.shift
            stop = min((region + 1) * size, end)
            count = 0
            if region < len(self.region_reads):
                count = min(self.region_reads[region] + self.region_writes[region], 0xFFFFFFFF)
            if out and out[-1][1] == count:
                out[-1] = (out[-1][0] + stop - pos, count)
            else:
                out.append((stop - pos, count))
            pos = stop
        return out
