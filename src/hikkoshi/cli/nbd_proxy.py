"""`hikkoshi nbd proxy`: serve a disk at once from a local cache while relocating it from an upstream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hikkoshi.block.background import BackgroundCopy
from hikkoshi.block.bitmap_file import BitmapFile, BitmapHeader, BitmapMismatch
from hikkoshi.block.dirty_bitmap import DIRTY_FLAG
from hikkoshi.block.file import RawFile
from hikkoshi.block.fs_used import fs_used_hint, fs_used_ranges
from hikkoshi.block.proxy import ProxyDevice
from hikkoshi.block.throttle import parse_rate
from hikkoshi.block.tracking import DIRTY_CONTEXT_PREFIX
from hikkoshi.block.upstream import Upstream
from hikkoshi.cli.nbd_limits import add_limit_arguments, limits_from_args
from hikkoshi.cli.nbd_serve import announce
from hikkoshi.nbd.client import Reconnect
from hikkoshi.nbd.control import ControlError, ControlServer
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer
from hikkoshi.nbd.uri import NbdUri


def add_parser(sub: Any) -> None:
    p = sub.add_parser("proxy", help="serve a disk from a local cache, relocating it from an upstream export")
    p.add_argument("--upstream", required=True, metavar="URI", help="the source export (nbd://, nbd+unix://)")
    p.add_argument(
        "--cache", required=True, type=Path, metavar="PATH", help="local cache file (bitmap: PATH.bitmap)"
    )
    p.add_argument(
        "--listen", action="append", metavar="ADDR", help="HOST:PORT or unix:PATH (default 127.0.0.1:10809)"
    )
    p.add_argument("--export", metavar="NAME", help="export name (default: the upstream's)")
    p.add_argument(
        "--control", metavar="unix:PATH", help="JSON control socket (status, pause, resume, bandwidth)"
    )
    p.add_argument(
        "--block-size", default="64K", metavar="SIZE", help="cache block size, 4K..1M (default 64K)"
    )
    p.add_argument("--no-background", action="store_true", help="fetch only what the guest reads")
    p.add_argument(
        "--start-paused", action="store_true", help="background copy starts paused (control: resume)"
    )
    p.add_argument(
        "--dirty-bitmap",
        metavar="NAME",
        help="the upstream's dirty bitmap NAME (meta context hikkoshi:dirty:NAME) tracks writes made "
        "there after this proxy started; the upstream is kept until the control command 'invalidate' "
        "has dropped the cached blocks it names",
    )
    p.add_argument("--bandwidth", metavar="RATE", help="limit the background copy, e.g. 50M, 100Mbit")
    p.add_argument(
        "--size",
        type=int,
        metavar="BYTES",
        help="the upstream's size, if known: serve at once and connect meanwhile (reads that need the "
        "upstream wait for it; an upstream of another size ends the proxy before any is sent)",
    )
    p.add_argument("--connections", type=int, default=4, help="upstream connections if it allows multi-conn")
    p.add_argument(
        "--upstream-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long a request waits for an unreachable upstream before EIO (default 30)",
    )
    p.add_argument(
        "--skip-fs-free",
        action="store_true",
        help="do not copy blocks an ext2/3/4 file system on the disk reports free (they become zeroes)",
    )
    add_limit_arguments(p)
    p.set_defaults(func=proxy_command)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise ValueError(f"bad size {text!r}") from None


def open_existing_cache(cache: Path, block_size: int, identity: str) -> BitmapFile | None:
    """The bitmap of a cache left by an earlier run, checked against this one; None for a fresh start."""
    bitmap_path = cache.with_name(cache.name + ".bitmap")
    if not cache.exists():
        if bitmap_path.exists():
            raise BitmapMismatch(f"{bitmap_path} exists without its cache {cache}; remove it to start over")
        return None
    if not bitmap_path.exists():
        if cache.stat().st_size:
            raise BitmapMismatch(f"{cache} exists but has no bitmap: its contents cannot be trusted")
        return None
    header = BitmapHeader.decode(bitmap_path.read_bytes()[:4096])
    if header.identity != identity:
        raise BitmapMismatch(f"{cache} caches {header.identity!r}, not {identity!r}")
    if header.block_size != block_size:
        raise BitmapMismatch(f"{cache} uses block size {header.block_size}, not {block_size}")
    return BitmapFile.open(bitmap_path, block_size, cache.stat().st_size, identity)


def create_cache(cache: Path, size: int, block_size: int, identity: str) -> BitmapFile:
    """A new sparse cache of the upstream's size, with an empty bitmap."""
    with open(cache, "wb") as f:
        f.truncate(size)
        os.fsync(f.fileno())
    return BitmapFile.open(cache.with_name(cache.name + ".bitmap"), block_size, size, identity)


async def open_proxy(
    uri: NbdUri,
    cache: Path,
    block_size: int,
    connections: int,
    upstream_timeout: float,
    extra_contexts: tuple[str, ...] = (),
    size: int | None = None,
) -> ProxyDevice:
    """Open (or create) the cache and its bitmap against the upstream; refuse anything inconsistent.

    With ``size`` the upstream is not connected here: the caller does it (``upstream.open(size)``)
    while the proxy serves."""
    identity = str(uri)
    upstream = Upstream(
        uri,
        connections=connections,
        reconnect=Reconnect(deadline=upstream_timeout),
        extra_contexts=extra_contexts,
    )
    # Start-up file work is quick and happens before serving anyone: done inline.
    bitmap = open_existing_cache(cache, block_size, identity)
    if bitmap is not None and bitmap.presence.complete:
        upstream.closed = True  # nothing left to fetch: no need for the source any more
    try:
        if not upstream.closed and size is None:
            await upstream.open()
            size = upstream.size
        if bitmap is None:
            assert size is not None  # a complete cache has a bitmap
            bitmap = create_cache(cache, size, block_size, identity)
        elif size is not None and size != bitmap.presence.disk_size:
            raise BitmapMismatch(f"upstream is {size} bytes, the cache {bitmap.presence.disk_size}")
        device = ProxyDevice(RawFile(cache), bitmap, upstream)
    except BaseException:
        if bitmap is not None:
            bitmap.close(clean=False)
        await upstream.close()
        raise
    return device


def register_proxy_commands(
    control: ControlServer,
    proxy: ProxyDevice,
    copy: BackgroundCopy,
    dirty_bitmap: str | None = None,
    export: Export | None = None,
) -> None:
    def status(_args: dict[str, Any]) -> dict[str, Any]:
        return proxy_status(proxy, copy)

    def stats(args: dict[str, Any]) -> dict[str, Any]:
        """The export's request statistics, as the NBD service's ``stats`` gives them."""
        if export is None:
            return {}
        return {export.name: {"size": proxy.size, **export.stats.snapshot(bool(args.get("regions")))}}

    def pause(_args: dict[str, Any]) -> dict[str, Any]:
        copy.pause()
        return proxy_status(proxy, copy)

    def resume(_args: dict[str, Any]) -> dict[str, Any]:
        copy.resume()
        return proxy_status(proxy, copy)

    def bandwidth(args: dict[str, Any]) -> dict[str, Any]:
        rate = args.get("rate")
        copy.set_bandwidth(None if rate in (None, "", "unlimited") else parse_rate(str(rate)))
        return proxy_status(proxy, copy)

    async def invalidate(_args: dict[str, Any]) -> dict[str, Any]:
        """Drop cached blocks the upstream's dirty bitmap marks; then the upstream may be released."""
        if dirty_bitmap is None:
            raise ControlError("this proxy was started without --dirty-bitmap")
        context = DIRTY_CONTEXT_PREFIX + dirty_bitmap
        t0 = time.monotonic()
        try:
            await proxy.upstream.wait_open()
            if not proxy.upstream.has_context(context):
                raise ControlError(f"the upstream does not offer {context}")
            extents = await proxy.upstream.map(context)
            ranges = [(o, n) for o, n, flags in extents if flags & DIRTY_FLAG]
            dropped = await proxy.invalidate(ranges)
        except OSError as exc:
            raise ControlError(f"invalidation failed: {exc}") from None
        copy.detach_allowed.set()
        proxy.readahead = True  # the switchover is done: the guest runs here from now on
        return {
            "dirty_bytes": sum(n for _o, n in ranges),
            "dropped_bytes": dropped,
            "seconds": round(time.monotonic() - t0, 4),
            **proxy_status(proxy, copy),
        }

    control.register("status", status, "relocation progress")
    control.register("stats", stats, "the export's requests, bytes and latency; args: regions (bool)")
    control.register("invalidate", invalidate, "drop blocks the upstream's dirty bitmap marks (migration)")
    control.register("pause", pause, "pause the background copy")
    control.register("resume", resume, "resume the background copy")
    control.register("bandwidth", bandwidth, "set the background bandwidth; args: rate (e.g. 50M) or none")


def proxy_status(proxy: ProxyDevice, copy: BackgroundCopy) -> dict[str, Any]:
    """The relocation's figures, JSON-ready."""
    c = proxy.counters
    c.sample()
    presence = proxy.presence
    reads = c.reads_local + c.reads_fetched
    rate = c.rate()
    remaining = proxy.size - presence.present_bytes
    return {
        "size": proxy.size,
        "block_size": proxy.block_size,
        "present_bytes": presence.present_bytes,
        "percent": round(100.0 * presence.present_bytes / proxy.size, 2) if proxy.size else 100.0,
        "upstream": proxy.upstream_state,
        "upstream_uri": str(proxy.upstream.uri),
        "phase": copy.phase,
        "paused": copy.paused,
        "bandwidth": copy.throttle.rate,
        "fetched_demand_bytes": c.fetched_demand,
        "fetched_background_bytes": c.fetched_background,
        "zero_bytes": c.zero_marked,
        "reads_local": c.reads_local,
        "reads_fetched": c.reads_fetched,
        "hit_rate": round(c.reads_local / reads, 4) if reads else None,
        "rate_bytes_s": round(rate),
        "eta_s": round(remaining / rate, 1) if rate > 0 and remaining else (0.0 if not remaining else None),
        "fetch_errors": c.fetch_errors,
        "background_errors": copy.errors,
    }


async def run_proxy(args: argparse.Namespace) -> int:
    # Fetched data is written to the cache by worker threads; each must get the GIL back quickly after
    # its pwrite, or every fetch waits up to the default 5 ms switch interval behind the event loop.
    sys.setswitchinterval(0.0002)
    block_size = parse_size(args.block_size)
    if block_size < 4096 or block_size > 1 << 20 or block_size & (block_size - 1):
        raise ValueError("--block-size must be a power of two from 4K to 1M")
    uri = NbdUri.parse(args.upstream)
    limits = limits_from_args(args)
    extra = (DIRTY_CONTEXT_PREFIX + args.dirty_bitmap,) if args.dirty_bitmap else ()
    proxy = await open_proxy(
        uri, args.cache, block_size, args.connections, args.upstream_timeout, extra, args.size
    )
    # Given the size, the proxy serves before its upstream is reached: whoever waits for it to listen
    # (a VM's start, QEMU's own) does not wait for the connections too, round trips across a WAN.
    connect_later = args.size is not None and not proxy.upstream.closed
    # Skipping free blocks needs a file system whose bitmaps can be trusted (cleanly unmounted); for a live
    # guest the bitmaps only order the copy.
    fs_reader = fs_used_ranges if args.skip_fs_free else fs_used_hint
    copy = BackgroundCopy(
        proxy,
        enabled=not args.no_background,
        bandwidth=parse_rate(args.bandwidth) if args.bandwidth else None,
        fs_reader=fs_reader,
        skip_fs_free=args.skip_fs_free,
        defer_context=DIRTY_CONTEXT_PREFIX + args.dirty_bitmap if args.dirty_bitmap else None,
    )
    if args.start_paused:
        copy.pause()
    if args.dirty_bitmap:
        copy.detach_allowed.clear()
        proxy.readahead = False
    exports = ExportTable()
    export = Export(
        args.export if args.export is not None else uri.export,
        proxy,
        description=f"cache of {uri}" if args.describe_paths else "",
    )
    exports.add(export)
    listen = [ListenAddress.parse(a) for a in (args.listen or ["127.0.0.1:10809"])]
    server = NbdServer(exports, listen, limits=limits)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    control = ControlServer(Path(args.control.removeprefix("unix:"))) if args.control else None
    clean = False
    try:
        async with asyncio.TaskGroup() as tg:
            proxy.attach(tg)
            serving = tg.create_task(server.serve())
            await server.ready.wait()
            if control is not None:
                register_proxy_commands(control, proxy, copy, args.dirty_bitmap, export)
                await control.start()
            announce(server)
            if connect_later:
                await proxy.upstream.open(proxy.size)
            # After the connection: the copy asks the upstream which meta contexts it has.
            copying = tg.create_task(copy.run())
            await serving
            copying.cancel()
        await proxy.flush()
        clean = True
    finally:
        if control is not None:
            await control.close()
        with contextlib.suppress(OSError):
            await proxy.upstream.close()
        proxy.bitmap.close(clean=clean)
        proxy.local.close()
    return 0


def proxy_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.runtime import run_reporting

    return run_reporting(run_proxy(args), "hikkoshi nbd proxy", (OSError, ValueError, BitmapMismatch))
