"""A relocation: one disk served at once from a local cache while it is filled from its source (seed 004,
xNBD done right): the proxy device, its background copy, their status and their control.

The cache is a sparse file of the source's size with a bitmap beside it (``CACHE.bitmap``) whose header
must match the cache and the source: a cache of another source, block size or size is refused, never
served. A restart with the same cache carries on where the last run stood (nothing flushed is lost).

:meth:`Relocation.run` connects (if the proxy serves before its source is reached), copies until every
block is local and lets the source go. Then :meth:`Relocation.hand_over` makes the cache an ordinary
file: the caller (a VM's disk service) serves it as such and the bitmap is deleted.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hikkoshi.block.background import BackgroundCopy
from hikkoshi.block.bitmap_file import BitmapFile, BitmapHeader, BitmapMismatch
from hikkoshi.block.dirty_bitmap import DIRTY_FLAG
from hikkoshi.block.file import RawFile
from hikkoshi.block.fs_used import fs_used_hint, fs_used_ranges
from hikkoshi.block.move_journal import fsync_dir
from hikkoshi.block.proxy import ProxyDevice
from hikkoshi.block.tracking import DIRTY_CONTEXT_PREFIX
from hikkoshi.block.upstream import Upstream
from hikkoshi.nbd.client import Reconnect
from hikkoshi.nbd.control import ControlError
from hikkoshi.nbd.uri import NbdUri

DEFAULT_BLOCK_SIZE = 64 << 10


@dataclass(frozen=True)
class RelocationOptions:
    """How a relocation copies (policy knobs)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    connections: int = 4
    upstream_timeout: float | None = 30.0
    """How long a request that needs the source waits for it when it is unreachable (``None``: as long
    as it takes)."""
    background: bool = True
    """Copy everything in the background (else only what is read, on demand)."""
    start_paused: bool = False
    """The background copy waits for ``resume`` (a postcopy migration's destination)."""
    dirty_bitmap: str | None = None
    """The source's dirty bitmap of a migration (hybrid, postcopy): kept until ``invalidate`` dropped
    the cached blocks it marks; those blocks are not copied before."""
    bandwidth: float | None = None
    """Background copy rate limit, bytes/s."""
    skip_fs_free: bool = False
    """Do not copy blocks a cleanly unmounted ext2/3/4 file system reports free."""
    tls: ssl.SSLContext | None = None
    """The client context for an ``nbds://`` source (this host's certificate, the cluster CA)."""

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs < 4096 or bs > 1 << 20 or bs & (bs - 1):
            raise ValueError("the cache block size must be a power of two from 4K to 1M")


def bitmap_path(cache: Path) -> Path:
    """Where a cache's bitmap lives."""
    return cache.with_name(cache.name + ".bitmap")


def open_existing_cache(cache: Path, block_size: int, identity: str) -> BitmapFile | None:
    """The bitmap of a cache left by an earlier run, checked against this one; None for a fresh start."""
    bitmap = bitmap_path(cache)
    if not cache.exists():
        if bitmap.exists():
            raise BitmapMismatch(f"{bitmap} exists without its cache {cache}; remove it to start over")
        return None
    if not bitmap.exists():
        if cache.stat().st_size:
            raise BitmapMismatch(f"{cache} exists but has no bitmap: its contents cannot be trusted")
        return None
    header = BitmapHeader.decode(bitmap.read_bytes()[:4096])
    if header.identity != identity:
        raise BitmapMismatch(f"{cache} caches {header.identity!r}, not {identity!r}")
    if header.block_size != block_size:
        raise BitmapMismatch(f"{cache} uses block size {header.block_size}, not {block_size}")
    return BitmapFile.open(bitmap, block_size, cache.stat().st_size, identity)


def create_cache(cache: Path, size: int, block_size: int, identity: str) -> BitmapFile:
    """A new sparse cache of the source's size (mode 0600), with an empty bitmap."""
    fd = os.open(cache, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return BitmapFile.open(bitmap_path(cache), block_size, size, identity)


def _upstream(uri: NbdUri, options: RelocationOptions, upstream: Upstream | None) -> Upstream:
    if upstream is not None:
        return upstream
    extra = (DIRTY_CONTEXT_PREFIX + options.dirty_bitmap,) if options.dirty_bitmap else ()
    return Upstream(
        uri,
        connections=options.connections,
        reconnect=Reconnect(deadline=options.upstream_timeout),
        tls=options.tls if uri.tls else None,
        extra_contexts=extra,
    )


async def open_proxy(
    uri: NbdUri,
    cache: Path,
    options: RelocationOptions,
    size: int | None = None,
    upstream: Upstream | None = None,
) -> ProxyDevice:
    """Open (or create) the cache and its bitmap against the source; refuse anything inconsistent.

    With ``size`` the source is not connected here: :meth:`Relocation.run` does it while the proxy
    serves. ``upstream``: connections to the source that are open already (a remote disk pulled in)."""
    identity = str(uri)
    source = _upstream(uri, options, upstream)
    # Start-up file work is quick and happens before serving anyone: done inline.
    bitmap = open_existing_cache(cache, options.block_size, identity)
    if bitmap is not None and bitmap.presence.complete and upstream is None:
        source.closed = True  # nothing left to fetch: no need for the source any more
    try:
        if not source.closed and size is None and not source.clients:
            await source.open()
        if size is None and source.clients:
            size = source.size
        if bitmap is None:
            if size is None:
                raise BitmapMismatch(f"{cache}: the source's size is unknown")
            bitmap = create_cache(cache, size, options.block_size, identity)
        elif size is not None and size != bitmap.presence.disk_size:
            raise BitmapMismatch(f"the source is {size} bytes, the cache {bitmap.presence.disk_size}")
        device = ProxyDevice(RawFile(cache), bitmap, source)
    except BaseException:
        if bitmap is not None:
            bitmap.close(clean=False)
        if upstream is None:
            await source.close()
        raise
    return device


class Relocation:
    """One proxy device and its background copy (see the module's docstring)."""

    def __init__(self, proxy: ProxyDevice, options: RelocationOptions, connect_size: int | None) -> None:
        self.proxy = proxy
        self.options = options
        #: Serve first, connect in :meth:`run` (the size is known): set until connected.
        self._connect_size = connect_size
        # Skipping free blocks needs a file system whose bitmaps can be trusted (cleanly unmounted); for
        # a live guest the bitmaps only order the copy.
        self.copy = BackgroundCopy(
            proxy,
            enabled=options.background,
            bandwidth=options.bandwidth,
            fs_reader=fs_used_ranges if options.skip_fs_free else fs_used_hint,
            skip_fs_free=options.skip_fs_free,
            defer_context=DIRTY_CONTEXT_PREFIX + options.dirty_bitmap if options.dirty_bitmap else None,
        )
        if options.start_paused:
            self.copy.pause()
        if options.dirty_bitmap:
            # Held until the switchover's invalidation; what QEMU reads meanwhile is fetched alone.
            self.copy.detach_allowed.clear()
            proxy.readahead = False

    @classmethod
    async def open(
        cls,
        uri: NbdUri,
        cache: Path,
        options: RelocationOptions,
        size: int | None = None,
        upstream: Upstream | None = None,
    ) -> Relocation:
        """A relocation of ``uri`` into ``cache``; with ``size`` it serves before the source is reached."""
        # Fetched data is written to the cache by worker threads; each must get the GIL back quickly after
        # its pwrite, or every fetch waits up to the default 5 ms switch interval behind the event loop.
        sys.setswitchinterval(0.0002)
        proxy = await open_proxy(uri, cache, options, size, upstream)
        connect_later = size is not None and not proxy.upstream.closed and not proxy.upstream.clients
        return cls(proxy, options, proxy.size if connect_later else None)

    @property
    def complete(self) -> bool:
        """Every block is local and the source was let go."""
        return self.proxy.detached and self.proxy.presence.complete

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Connect if still needed, copy until everything is local, let the source go."""
        self.proxy.attach(tg)
        if self._connect_size is not None:
            await self.proxy.upstream.open(self._connect_size)
            self._connect_size = None
        # After the connection: the copy asks the source which meta contexts it has.
        await self.copy.run()

    def status(self) -> dict[str, Any]:
        """The relocation's figures, JSON-ready."""
        proxy, copy = self.proxy, self.copy
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
            "eta_s": round(remaining / rate, 1)
            if rate > 0 and remaining
            else (0.0 if not remaining else None),
            "fetch_errors": c.fetch_errors,
            "background_errors": copy.errors,
        }

    def pause(self) -> None:
        """Pause the background copy (demand fetches go on)."""
        self.copy.pause()

    def resume(self) -> None:
        """Resume the background copy."""
        self.copy.resume()

    def set_bandwidth(self, rate: float | None) -> None:
        """Limit the background copy (``None``: unlimited)."""
        self.copy.set_bandwidth(rate)

    def set_patience(self, seconds: float | None) -> None:
        """How long a request needing the source waits for it from now on (``None``: as long as it
        takes: past a migration's commit the disk has nowhere else to go)."""
        self.proxy.upstream.set_deadline(seconds)

    async def invalidate(self) -> dict[str, Any]:
        """Drop cached blocks the source's dirty bitmap marks (the migration's switchover); from then on
        the source may be let go once everything is local, and the guest runs here."""
        if self.options.dirty_bitmap is None:
            raise ControlError("this relocation has no dirty bitmap to invalidate from")
        context = DIRTY_CONTEXT_PREFIX + self.options.dirty_bitmap
        proxy = self.proxy
        t0 = time.monotonic()
        try:
            await proxy.upstream.wait_open()
            if not proxy.upstream.has_context(context):
                raise ControlError(f"the source does not offer {context}")
            extents = await proxy.upstream.map(context)
            ranges = [(o, n) for o, n, flags in extents if flags & DIRTY_FLAG]
            dropped = await proxy.invalidate(ranges)
        except OSError as exc:
            raise ControlError(f"invalidation failed: {exc}") from None
        self.copy.detach_allowed.set()
        proxy.readahead = True
        return {
            "dirty_bytes": sum(n for _o, n in ranges),
            "dropped_bytes": dropped,
            "seconds": round(time.monotonic() - t0, 4),
            **self.status(),
        }

    @property
    def file(self) -> RawFile:
        """The cache file (what serves the disk once the relocation is complete)."""
        return self.proxy.local

    async def hand_over(self) -> None:
        """The relocation is complete and the caller serves :attr:`file` in the proxy's place now: make
        everything durable and stop the proxy (requests it still had are local and finish on that same
        file). The bitmap stays until :meth:`drop_bitmap`: the caller records first that the disk is a
        file, so a crash in between never leaves a cache without the bitmap that vouches for it."""
        if not self.complete:
            raise ControlError("the relocation is not complete")
        await self.proxy.flush()
        self.proxy.retire()

    async def drop_bitmap(self) -> None:
        """After :meth:`hand_over` and the caller's record: delete the bitmap, durably."""
        path = bitmap_path(self.proxy.local.path)
        path.unlink(missing_ok=True)
        await asyncio.to_thread(fsync_dir, path.parent)

    def close(self, clean: bool) -> None:
        """Release everything (the service stops); the cache and bitmap stay for the next run."""
        self.proxy.stop(clean)


__all__ = [
    "BitmapMismatch",
    "Relocation",
    "RelocationOptions",
    "bitmap_path",
    "create_cache",
    "open_existing_cache",
    "open_proxy",
]
