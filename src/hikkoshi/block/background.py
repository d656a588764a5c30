"""The background copy of a relocation: everything the guest has not asked for yet, in priority order,
under a bandwidth limit, pausable; when every block is local the proxy lets go of the source.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable

from hikkoshi.block.copy_plan import CopyPlan, plan_copy
from hikkoshi.block.dirty_bitmap import DIRTY_FLAG
from hikkoshi.block.proxy import ProxyDevice
from hikkoshi.block.ranges import Range
from hikkoshi.block.throttle import Throttle
from hikkoshi.nbd.constants import BASE_ALLOCATION, HIKKOSHI_HEAT
from hikkoshi.nbd.errors import CommandError

log = logging.getLogger("hikkoshi.block.background")

#: Finds the byte ranges a file system on the disk uses, reading through the given function; None if none.
FsReader = Callable[[Callable[[int, int], Awaitable[bytes]], int], Awaitable[list[Range] | None]]


class BackgroundCopy:
    """Owns the copy loop of one proxy."""

    def __init__(
        self,
        proxy: ProxyDevice,
        *,
        enabled: bool = True,
        bandwidth: float | None = None,
        concurrency: int = 8,
        checkpoint_seconds: float = 5.0,
        fs_reader: FsReader | None = None,
        skip_fs_free: bool = False,
        defer_context: str | None = None,
        defer_refresh: float = 2.0,
    ) -> None:
        self.proxy = proxy
        self.enabled = enabled
        self.throttle = Throttle(bandwidth)
        self.concurrency = concurrency
        self.checkpoint_seconds = checkpoint_seconds
        self.fs_reader = fs_reader
        self.skip_fs_free = skip_fs_free
        self._running = asyncio.Event()
        self._running.set()
        #: Whether the upstream may be let go once everything is local. A migration holds it until the
        #: switchover has invalidated what the guest changed on the source meanwhile.
        self.detach_allowed = asyncio.Event()
        self.detach_allowed.set()
        self.plan: CopyPlan | None = None
        self.phase = "starting"
        self.errors = 0
        #: A migration's dirty bitmap on the source (its meta context). Until the switchover (while
        #: ``detach_allowed`` is clear) the blocks it marks are not copied: it only grows until then, so
        #: each of them would be dropped there for sure, its copy wasted on the link the memory stream
        #: needs. They are copied after the switchover, with the rest. Its map is read again every
        #: ``defer_refresh`` seconds; a block marked since is merely copied twice.
        self.defer_context = defer_context
        self.defer_refresh = defer_refresh
        self._dirty_starts: list[int] = []
        self._dirty_ends: list[int] = []
        self._dirty_read = -defer_refresh

    # --- control -------------------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def set_bandwidth(self, rate: float | None) -> None:
        self.throttle.rate = rate

    # --- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Plan, copy, and detach the upstream when complete (also when the guest made it complete)."""
        proxy = self.proxy
        if not proxy.detached:
            # Started paused (a postcopy migration's destination): the source is still changing, so
            # even its map is not taken until the copy may begin.
            if self.paused:
                self.phase = "paused"
                await self._running.wait()
            await self._learn()
            if self.enabled:
                self.phase = "copying"
                await self._copy_all()
            else:
                self.phase = "on-demand only"
            while True:
                await proxy.complete_event.wait()
                if not self.detach_allowed.is_set():
                    self.phase = "holding upstream"
                    await self.detach_allowed.wait()
                if proxy.presence.complete:
                    break
                # An invalidation made blocks missing again: fetch them too.
                if self.enabled:
                    self.phase = "copying"
                    await self._copy_all(first_round=False)
            self.phase = "detaching"
            await proxy.detach()
        self.phase = "complete"

    async def _learn(self) -> None:
        """What the source looks like: allocation, heat, file system; then mark zero regions present."""
        proxy = self.proxy
        upstream = proxy.upstream
        self.phase = "mapping"
        try:
            if upstream.has_context(BASE_ALLOCATION):
                proxy.source_map = await upstream.map(BASE_ALLOCATION)
            heat: list[tuple[int, int, int]] = []
            if upstream.has_context(HIKKOSHI_HEAT):
                heat = await upstream.map(HIKKOSHI_HEAT)
            fs_used = await self.fs_reader(upstream.read, proxy.size) if self.fs_reader else None
        except (OSError, ConnectionError) as exc:
            log.warning("could not map the source (%s); copying everything in disk order", exc)
            heat, fs_used = [], None
        self.plan = plan_copy(
            proxy.size,
            proxy.block_size,
            proxy.source_map,
            heat=heat,
            fs_used=fs_used,
            skip_fs_free=self.skip_fs_free,
        )
        for start, count in self.plan.zero:
            proxy.mark_zero(start, count)

    async def _copy_all(self, first_round: bool = True) -> None:
        proxy = self.proxy
        assert self.plan is not None
        last_checkpoint = time.monotonic()
        slots = asyncio.Semaphore(self.concurrency)
        async with asyncio.TaskGroup() as tg:
            backoff = 0.1
            rounds = [self.plan.copy] if first_round else []
            while not proxy.presence.complete:
                progress_before = proxy.presence.present
                deferred = 0
                for start, count in rounds.pop(0) if rounds else list(proxy.presence.missing_runs()):
                    for chunk in range(start, start + count, proxy.fetch_blocks):
                        blocks = proxy.presence.missing(
                            chunk * proxy.block_size,
                            min(proxy.fetch_blocks, start + count - chunk) * proxy.block_size,
                        )
                        if blocks and self._deferring():
                            kept = await self._not_dirty(blocks)
                            deferred += len(blocks) - len(kept)
                            blocks = kept
                        if not blocks:
                            continue
                        await self._running.wait()
                        await self.throttle.take(len(blocks) * proxy.block_size)
                        await slots.acquire()
                        tg.create_task(self._fetch(blocks, slots))
                        if time.monotonic() - last_checkpoint > self.checkpoint_seconds:
                            last_checkpoint = time.monotonic()
                            tg.create_task(self._checkpoint())
                # Let this round's fetches land before judging progress.
                for _ in range(self.concurrency):
                    await slots.acquire()
                for _ in range(self.concurrency):
                    slots.release()
                if deferred and proxy.presence.present == progress_before and self._deferring():
                    # All that is left is what the guest changed on the source: after the switchover.
                    self.phase = "waiting for the switchover"
                    await self.detach_allowed.wait()
                    self.phase = "copying"
                    backoff = 0.1
                elif proxy.presence.present == progress_before and not proxy.presence.complete:
                    await asyncio.sleep(backoff)  # the upstream is failing; its client is reconnecting
                    backoff = min(backoff * 2, 5.0)
                else:
                    backoff = 0.1
        await self._checkpoint()

    def _deferring(self) -> bool:
        return self.defer_context is not None and not self.detach_allowed.is_set()

    async def _not_dirty(self, blocks: list[int]) -> list[int]:
        """``blocks`` without those the source's dirty bitmap marks (as last read)."""
        assert self.defer_context is not None
        now = time.monotonic()
        if now - self._dirty_read >= self.defer_refresh:
            self._dirty_read = now
            upstream = self.proxy.upstream
            bs = self.proxy.block_size
            try:
                if upstream.has_context(self.defer_context):
                    dirty = [(o, n) for o, n, f in await upstream.map(self.defer_context) if f & DIRTY_FLAG]
                    self._dirty_starts = [o // bs for o, _ in dirty]
                    self._dirty_ends = [-(-(o + n) // bs) for o, n in dirty]
            except (OSError, CommandError) as exc:  # the last map stands; a dirty block copied is only waste
                log.info("could not read the source's dirty bitmap (%s)", exc)
        starts, ends = self._dirty_starts, self._dirty_ends
        if not starts:
            return blocks
        out = []
        for b in blocks:
            i = bisect.bisect_right(starts, b) - 1
            if i < 0 or b >= ends[i]:
                out.append(b)
        return out

    async def _fetch(self, blocks: list[int], slots: asyncio.Semaphore) -> None:
        try:
            await self.proxy.ensure(blocks, demand=False)
        except OSError as exc:
            self.errors += 1
            log.info("background fetch failed (%s); it will be retried", exc)
        finally:
            slots.release()

    async def _checkpoint(self) -> None:
        """Make background progress durable even if the guest never flushes."""
        try:
            await self.proxy.flush()
        except OSError as exc:
            log.error("checkpoint of the cache failed: %s", exc)
