"""The link between two sites as a migration that just ran measured it, kept in etcd for the next
prediction (:mod:`hikkoshi.cluster.links`): the bandwidth QEMU's memory stream got (its average
``mbps`` over the transfer, from the final ``query-migrate``) and the round trip to the destination
(the least TCP connect time to its agent of a few tries, taken after the migration: off its path)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from hikkoshi.aio import within
from hikkoshi.cluster.links import Links
from hikkoshi.cluster.models import LinkRecord

log = logging.getLogger("hikkoshi.agent")

#: Streams shorter or smaller than this say more about their start than about the link.
MIN_TRANSFER_MS = 20
MIN_TRANSFER_BYTES = 4 << 20


def stream_bandwidth(report: dict[str, Any]) -> float | None:
    """Bytes per second the migration's memory stream got, from its report; ``None`` if it moved too
    little, too briefly, to tell."""
    info = report.get("migrate_info") or {}
    ram = info.get("ram") or {}
    mbps = ram.get("mbps")
    total = info.get("total-time") or 0
    setup = info.get("setup-time") or 0
    moved = ram.get("transferred") or 0
    if not isinstance(mbps, int | float) or mbps <= 0 or total - setup < MIN_TRANSFER_MS:
        return None
    if not isinstance(moved, int) or moved < MIN_TRANSFER_BYTES:
        return None
    return float(mbps) * 1e6 / 8


async def connect_rtt_ms(url: str, tries: int = 3, limit: float = 5.0) -> float | None:
    """The least TCP connect time (ms) to ``url``'s host and port of ``tries``; ``None`` if unreachable."""
    parts = urlsplit(url)
    if parts.hostname is None:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    best: float | None = None
    for _ in range(tries):
        t0 = time.monotonic()
        try:
            _reader, writer = await within(asyncio.open_connection(parts.hostname, port), limit)
        except (OSError, TimeoutError):
            continue
        spent = (time.monotonic() - t0) * 1000
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        best = spent if best is None else min(best, spent)
    return best


async def record_link(
    links: Links, source_site: str, destination_site: str, report: dict[str, Any], url: str, migration: str
) -> LinkRecord | None:
    """Store what the migration ``migration`` (to the agent at ``url``) measured of the link between
    the two sites; ``None`` (nothing stored) if it did not measure enough."""
    bandwidth = stream_bandwidth(report)
    rtt = await connect_rtt_ms(url)
    if bandwidth is None or rtt is None:
        info = report.get("migrate_info") or {}
        log.info(
            "link %s-%s not measured by migration %s (stream: %s ms, %s; RTT: %s)",
            source_site,
            destination_site,
            migration,
            info.get("total-time"),
            info.get("ram"),
            rtt,
        )
        return None
    link = LinkRecord(
        a=source_site, b=destination_site, bandwidth=bandwidth, rtt_ms=round(rtt, 3), migration=migration
    )
    await links.record(link)
    log.info(
        "link %s-%s measured by migration %s: %.1f MB/s, RTT %.2f ms",
        source_site,
        destination_site,
        migration,
        bandwidth / 1e6,
        rtt,
    )
    return link
