"""The standalone relocation proxy (``hikkoshi nbd proxy``): one disk served at once from a local cache
while it is relocated from its source, on the addresses given, until stopped.

A VM's disks are relocated inside the VM's own disk service (:mod:`disk_service`); this process is the
same relocation for a disk served by hand. At 100% the proxy flushes, lets the source go and keeps
serving the cache. Control verbs: status, stats, pause, resume, bandwidth, invalidate. SIGTERM or SIGINT:
requests in flight finish, the cache is flushed, the bitmap says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hikkoshi.block.throttle import parse_rate
from hikkoshi.daemons.disk_service import OneExport, Rate, Stats, announce
from hikkoshi.daemons.relocation import Relocation, RelocationOptions
from hikkoshi.daemons.verbs import NoArgs, Verbs
from hikkoshi.nbd.control import ControlServer
from hikkoshi.nbd.limits import ServerLimits
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer
from hikkoshi.nbd.uri import NbdUri


@dataclass(frozen=True)
class ProxySettings:
    """What ``hikkoshi nbd proxy`` was asked for."""

    upstream: NbdUri
    cache: Path
    listen: list[ListenAddress]
    export: str | None = None
    control: Path | None = None
    size: int | None = None
    """The source's size, if known: serve at once and connect meanwhile."""
    options: RelocationOptions = field(default_factory=RelocationOptions)
    limits: ServerLimits = field(default_factory=ServerLimits)
    describe_upstream: bool = False
    """Whether clients see the source's URI (the export's description)."""


def proxy_verbs(relocation: Relocation, export: Export) -> Verbs:
    """The proxy's control verbs."""
    verbs = Verbs()
    verb = verbs.verb

    @verb("status", NoArgs, "relocation progress")
    def status(_a: NoArgs) -> dict[str, Any]:
        return relocation.status()

    @verb("stats", Stats, "the export's requests, bytes and latency")
    def stats(a: Stats) -> dict[str, Any]:
        return {export.name: {"size": relocation.proxy.size, **export.stats.snapshot(a.regions)}}

    @verb("pause", OneExport, "pause the background copy")
    def pause(_a: OneExport) -> dict[str, Any]:
        relocation.pause()
        return relocation.status()

    @verb("resume", OneExport, "resume the background copy")
    def resume(_a: OneExport) -> dict[str, Any]:
        relocation.resume()
        return relocation.status()

    @verb("bandwidth", Rate, "set the background bandwidth (rate e.g. 50M; none: unlimited)")
    def bandwidth(a: Rate) -> dict[str, Any]:
        unlimited = a.rate in (None, "", "unlimited", "none")
        relocation.set_bandwidth(None if unlimited else parse_rate(str(a.rate)))
        return relocation.status()

    @verb("invalidate", OneExport, "drop blocks the upstream's dirty bitmap marks (migration)")
    async def invalidate(_a: OneExport) -> dict[str, Any]:
        return await relocation.invalidate()

    return verbs


async def run_proxy(settings: ProxySettings) -> int:
    """Serve until SIGTERM/SIGINT; the exit status."""
    relocation = await Relocation.open(settings.upstream, settings.cache, settings.options, settings.size)
    exports = ExportTable()
    export = Export(
        settings.export if settings.export is not None else settings.upstream.export,
        relocation.proxy,
        description=f"cache of {settings.upstream}" if settings.describe_upstream else "",
    )
    exports.add(export)
    server = NbdServer(exports, settings.listen, limits=settings.limits)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    control = ControlServer(settings.control) if settings.control else None
    clean = False
    try:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve())
            await server.ready.wait()
            if control is not None:
                proxy_verbs(relocation, export).install(control)
                await control.start()
            announce(server)
            copying = tg.create_task(relocation.run(tg))
            await serving
            copying.cancel()
        await relocation.proxy.flush()
        clean = True
    finally:
        if control is not None:
            await control.close()
        with contextlib.suppress(OSError):
            await relocation.proxy.upstream.close()
        relocation.close(clean)
    return 0
