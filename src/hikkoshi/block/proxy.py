"""The relocation proxy (seed 004, xNBD done right): serve a disk at once from a local cache, fetching
missing blocks from the source on demand; writes stay local.

Rules that make it correct:
- A block is marked present only after its data is in the cache file; the on-disk bitmap only claims
  blocks whose data was fsynced before the bitmap was written (flush snapshots the bits first).
- Concurrent reads of a missing block share one fetch. Fetched bytes never overwrite what the guest wrote:
  a guest write to a block whose fetch is in flight waits for it, and installing skips present blocks.
- A read waiting for a fetch is answered from the fetched buffer as soon as it arrives (the cache write
  goes on meanwhile), unless a guest write landed on one of its blocks since: then it reads the cache once
  the fetch is installed. Either way the reply holds what a read concurrent with those writes may see.
- A partial write to a missing block fetches that block first (only the partial blocks), then writes.
- Fetched data is written to the cache from a worker thread (cache_writer.py), so the event loop keeps
  serving; at most ``_MAX_UNWRITTEN`` fetched bytes wait for it, so a fast source cannot fill memory.
- Replies may complete in any order; nothing here depends on the upstream answering in order.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hikkoshi.block import fallocate
from hikkoshi.block.bitmap_file import BitmapFile
from hikkoshi.block.buffers import BufferPool
from hikkoshi.block.cache_writer import CacheWriter, Op, Punch, Write
from hikkoshi.block.file import RawFile
from hikkoshi.block.presence import PresenceMap
from hikkoshi.block.ranges import (
    Labelled,
    Range,
    clip,
    coalesce,
    extents_in,
    merge,
    relabel,
    to_ranges,
    to_spans,
)
from hikkoshi.block.upstream import Upstream
from hikkoshi.nbd.constants import BASE_ALLOCATION, AllocationFlag
from hikkoshi.nbd.device import BlockDevice, Buffer, Capabilities, MaybeAwaitable

log = logging.getLogger("hikkoshi.block.proxy")

_ZEROS = bytes(1 << 20)
_HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
#: Fetched bytes that may wait for the cache writer before new fetches wait for it in turn.
_MAX_UNWRITTEN = 32 << 20
#: Fetch buffers kept for reuse (bytes): all that may wait for the writer, and replies still being sent.
_POOL_BYTES = _MAX_UNWRITTEN + (16 << 20)


class _Fetch:
    """One upstream read of consecutive missing blocks, shared by every request that needs them."""

    __slots__ = ("arrived", "count", "data", "done", "installed", "skipped", "start")

    def __init__(self, loop: asyncio.AbstractEventLoop, start: int, count: int) -> None:
        self.start = start
        self.count = count
        #: The fetched bytes, once they arrived.
        self.data: bytearray | None = None
        #: Resolved when the data is here (or the fetch failed).
        self.arrived: asyncio.Future[None] = loop.create_future()
        #: Resolved when the blocks are in the cache and marked present (or the fetch failed).
        self.done: asyncio.Future[None] = loop.create_future()
        # A waiter may have gone (client left): never warn about an unretrieved failure.
        self.arrived.add_done_callback(_retrieve)
        self.done.add_done_callback(_retrieve)
        self.installed = False
        #: Blocks the guest wrote while the fetch was in flight (not installed: the guest's data wins).
        self.skipped: list[int] = []

    def fail(self, error: BaseException) -> None:
        for fut in (self.arrived, self.done):
            if not fut.done():
                fut.set_exception(error)

    def serves(self, presence: PresenceMap, first: int, last: int) -> bool:
        """Whether the fetched bytes are what blocks first..last (all this fetch's) should read as.

        Guest changes wait for in-flight fetches (``_settle``), so no block of a fetch should become present
        before it installs them; this only guards the read against one that did.
        """
        if self.data is None:
            return False
        if self.installed:
            return not any(first <= b <= last for b in self.skipped)
        return not any(presence.test(b) for b in range(first, last + 1))


@dataclass
class ProxyCounters:
    """What the proxy did, for status and reports."""

    started: float = field(default_factory=time.monotonic)
    fetched_demand: int = 0
    fetched_background: int = 0
    zero_marked: int = 0
    reads_local: int = 0
    reads_fetched: int = 0
    fetch_errors: int = 0
    #: (monotonic time, bytes fetched so far) samples for rates.
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def fetched(self) -> int:
        return self.fetched_demand + self.fetched_background

    def sample(self) -> None:
        now = time.monotonic()
        self.samples.append((now, self.fetched()))
        while len(self.samples) > 2 and self.samples[0][0] < now - 10:
            self.samples.popleft()

    def rate(self) -> float:
        """Bytes per second fetched over the last ~10 s."""
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class ProxyDevice(BlockDevice):
    """A cache file in front of an upstream export."""

    meta_contexts = (BASE_ALLOCATION,)

    def __init__(
        self, local: RawFile, bitmap: BitmapFile, upstream: Upstream, fetch_size: int = 1 << 20
    ) -> None:
        # A complete cache is opened without its upstream (closed, no connection): nothing to check.
        if upstream.clients and local.size != upstream.size:
            raise OSError(errno.EINVAL, f"cache is {local.size} bytes but the upstream is {upstream.size}")
        self.local = local
        self.bitmap = bitmap
        self.presence = bitmap.presence
        self.upstream = upstream
        self.size = local.size
        self.block_size = self.presence.block_size
        max_request = upstream.max_request if upstream.clients else fetch_size
        self.fetch_blocks = max(1, min(fetch_size, max_request) // self.block_size)
        #: How far a demand miss reads ahead (in fetches of at most fetch_blocks, issued in parallel).
        self.readahead_blocks = max(self.fetch_blocks, (4 << 20) // self.block_size)
        #: Off while a migration's destination waits for its switchover: what QEMU reads then (a sector
        #: at start-up) is fetched alone, not with megabytes behind it that would cross a WAN next to
        #: the memory stream only to be invalidated.
        self.readahead = True
        self.capabilities = Capabilities(fast_zero=local.capabilities.fast_zero)
        self.counters = ProxyCounters()
        #: Upstream allocation as (offset, length, flags), learned at start; used for block status.
        self.source_map: list[tuple[int, int, int]] = []
        self._inflight: dict[int, _Fetch] = {}
        #: Fetched bytes not yet written to the cache, and whether there is room for more.
        self._unwritten = 0
        self._write_room = asyncio.Event()
        self._write_room.set()
        fetch_bytes = self.fetch_blocks * self.block_size
        self._buffers = BufferPool(fetch_bytes, max(1, _POOL_BYTES // fetch_bytes))
        self._writer = CacheWriter(local.fd)
        self._flush_lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None
        self.detached = upstream.closed
        self.complete_event = asyncio.Event()
        if self.presence.complete:
            self.complete_event.set()

    def attach(self, tg: asyncio.TaskGroup) -> None:
        """Give the proxy the task group that owns its fetches (they outlive the requests that start them)."""
        self._tg = tg

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def upstream_state(self) -> str:
        if self.detached:
            return "detached"
        return "connected" if self.upstream.connected else "reconnecting"

    # --- reads ---------------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> MaybeAwaitable[Buffer]:
        if self.presence.all_present(offset, length):
            self.counters.reads_local += 1
            return self.local.read(offset, length)
        self.counters.reads_fetched += 1
        return self._read_missing(offset, length)

    def read_fd(self) -> int:
        # Once everything is local, the server may read the cache file itself (its sendfile path).
        # Large reads then bypass read() and are not counted in reads_local: the hit rate is final anyway.
        return self.local.read_fd() if self.presence.complete else -1

    async def _read_missing(self, offset: int, length: int) -> Buffer:
        missing = self.presence.missing(offset, length)
        self._join(self._with_readahead(missing), demand=True)
        # Wait for the blocks this read needs, not for its readahead.
        fetches = _unique(self._inflight[b] for b in missing if b in self._inflight)
        if len(fetches) == 1 and missing:
            fetch = fetches[0]
            first, last = missing[0], missing[-1]
            if (
                len(missing)
                == last - first + 1
                == (offset + length - 1) // self.block_size - offset // self.block_size + 1
            ):
                # Every block of the read was missing and is in this one fetch: answer from its buffer.
                await asyncio.shield(fetch.arrived)  # shared with every reader of the fetch
                if fetch.serves(self.presence, first, last):
                    assert fetch.data is not None
                    lo = offset - fetch.start * self.block_size
                    return memoryview(fetch.data)[lo : lo + length]
        await _wait_all([f.done for f in fetches])
        return self.local.read(offset, length)

    def _with_readahead(self, missing: list[int]) -> list[int]:
        """Extend a demand fetch with the missing blocks right after it: guests read sequentially."""
        if not missing or not self.readahead:
            return missing
        out = list(missing)
        b = missing[-1] + 1
        while len(out) < self.readahead_blocks and b < self.presence.blocks:
            if self.presence.test(b) or b in self._inflight:
                break
            out.append(b)
            b += 1
        return out

    def cache(self, offset: int, length: int) -> MaybeAwaitable[None]:
        missing = self.presence.missing(offset, length)
        return self.ensure(missing, demand=True) if missing else None

    # --- fetching ------------------------------------------------------------------------------------------

    def ensure(self, blocks: list[int], demand: bool) -> Awaitable[None]:
        """Make blocks present, joining fetches already in flight; fails with EIO if the upstream does."""
        return _wait_all([f.done for f in self._join(blocks, demand)])

    def _join(self, blocks: list[int], demand: bool) -> list[_Fetch]:
        """The fetches that make ``blocks`` present: those in flight, and new ones for the rest."""
        loop = asyncio.get_running_loop()
        joined: list[_Fetch] = []
        run_start = -1
        run_len = 0
        runs: list[tuple[int, int]] = []
        presence = self.presence
        inflight = self._inflight
        for b in blocks:
            if presence.test(b):
                continue
            fetch = inflight.get(b)
            if fetch is not None:
                if not joined or joined[-1] is not fetch:
                    joined.append(fetch)
                continue
            if run_len and b == run_start + run_len and run_len < self.fetch_blocks:
                run_len += 1
            else:
                if run_len:
                    runs.append((run_start, run_len))
                run_start, run_len = b, 1
        if run_len:
            runs.append((run_start, run_len))
        for start, count in runs:
            fetch = _Fetch(loop, start, count)
            for b in range(start, start + count):
                inflight[b] = fetch
            joined.append(fetch)
            self._spawn(self._fetch(fetch, demand))
        return _unique(joined)

    def _spawn(self, coro: Any) -> None:
        if self._tg is None:
            raise RuntimeError("proxy is not attached to a task group")
        self._tg.create_task(coro)

    async def _fetch(self, fetch: _Fetch, demand: bool) -> None:
        start, count = fetch.start, fetch.count
        offset = start * self.block_size
        length = min(count * self.block_size, self.size - offset)
        accounted = 0
        try:
            if self.detached:
                raise ConnectionError("upstream already detached")
            while not self._write_room.is_set():
                await self._write_room.wait()
            self._owe(length)
            accounted = length
            self._writer.prefault(offset, length)
            if length == self._buffers.size:
                data = await self.upstream.read_into(offset, self._buffers.take(), demand=demand)
            else:
                data = await self.upstream.read_buffer(offset, length, demand=demand)
            fetch.data = data
            fetch.arrived.set_result(None)
            await self._install(fetch, data)
        except Exception as exc:  # every failure goes to the waiters, never up into the task group
            self.counters.fetch_errors += 1
            fetch.fail(
                OSError(errno.EIO, f"fetching {length} bytes at {offset} from {self.upstream.uri}: {exc}")
            )
            self._forget(fetch)
            return
        finally:
            self._owe(-accounted)
        if demand:
            self.counters.fetched_demand += length
        else:
            self.counters.fetched_background += length
        self.counters.sample()
        self._forget(fetch)
        if not fetch.done.done():
            fetch.done.set_result(None)
        self._check_complete()

    def _owe(self, nbytes: int) -> None:
        """Account fetched bytes on their way to the cache (negative: written, or never coming)."""
        self._unwritten += nbytes
        if self._unwritten > _MAX_UNWRITTEN:
            self._write_room.clear()
        else:
            self._write_room.set()

    def _forget(self, fetch: _Fetch) -> None:
        inflight = self._inflight
        for b in range(fetch.start, fetch.start + fetch.count):
            if inflight.get(b) is fetch:
                del inflight[b]

    async def _install(self, fetch: _Fetch, data: bytearray) -> None:
        """Write fetched data for blocks still missing, then mark them present.

        The blocks are in ``_inflight`` until the fetch is done, so no guest write waiting for them lands
        meanwhile; one that did not wait (its partial edges were fetched first) made its blocks present,
        and those are skipped: the worker thread's pwrite cannot overwrite a guest's data.
        """
        presence = self.presence
        bs = self.block_size
        start = fetch.start
        runs: list[tuple[int, int, bool]] = []  # (first block, end block, all zero)
        b = start
        end = start + fetch.count
        while b < end:
            if presence.test(b):  # written by the guest while the fetch was in flight: its data wins
                fetch.skipped.append(b)
                b += 1
                continue
            run = b
            while b < end and not presence.test(b):
                b += 1
            lo = (run - start) * bs
            hi = min((b - start) * bs, len(data))
            runs.append((run, b, _all_zero(data, lo, hi)))
        if runs:
            await self._writer.write(self._cache_ops(start, data, runs))
        for run, stop, _ in runs:
            for blk in range(run, stop):
                if presence.test(blk):  # the guest wrote it while the pwrite ran (see above)
                    fetch.skipped.append(blk)
                presence.set(blk)
        fetch.installed = True

    def _cache_ops(self, start: int, data: bytearray, runs: list[tuple[int, int, bool]]) -> list[Op]:
        """What puts fetched runs into the cache (zero runs become holes, keeping it sparse)."""
        bs = self.block_size
        view = memoryview(data)
        ops: list[Op] = []
        for run, stop, zero in runs:
            lo = (run - start) * bs
            hi = min((stop - start) * bs, len(data))
            if zero and self.local.can_punch:
                ops.append(Punch(run * bs, hi - lo))  # also clears stale bytes of an earlier crash
            else:
                ops.append(Write(run * bs, view[lo:hi]))
        return ops

    def mark_zero(self, start: int, count: int) -> int:
        """Mark missing blocks that the source reports as zero present, as holes; return bytes marked."""
        marked = 0
        for b in range(start, min(start + count, self.presence.blocks)):
            if self.presence.test(b) or b in self._inflight:
                continue
            off, n = self.presence.block_span(b)
            if self.local.can_punch:
                fallocate.punch_hole(self.local.fd, off, n)
            else:
                os.pwrite(self.local.fd, _ZEROS[:n] if n <= len(_ZEROS) else bytes(n), off)
            self.presence.set(b)
            marked += n
        self.counters.zero_marked += marked
        self._check_complete()
        return marked

    def _check_complete(self) -> None:
        if self.presence.complete and not self.complete_event.is_set():
            self.complete_event.set()

    # --- writes --------------------------------------------------------------------------------------------

    def _inflight_in(self, offset: int, length: int) -> list[int]:
        """Blocks of a byte range whose fetch is in flight (a change must let it land first)."""
        if not self._inflight:
            return []
        return [b for b in self.presence.block_range(offset, length) if b in self._inflight]

    def _must_wait(self, offset: int, length: int) -> list[int]:
        """Blocks to make present before changing a range: missing partial edges, and blocks in flight."""
        if not length:
            return []
        presence = self.presence
        bs = self.block_size
        first = offset // bs
        last = (offset + length - 1) // bs
        end = offset + length
        wait: list[int] = []
        if offset % bs and not presence.test(first):
            wait.append(first)
        if end % bs and end < self.size and not presence.test(last) and last not in wait:
            wait.append(last)
        wait += [b for b in self._inflight_in(offset, length) if b not in wait]
        return wait

    def _modify(
        self, offset: int, length: int, apply: Callable[[], Any], fua: bool, wait: list[int]
    ) -> MaybeAwaitable[None]:
        """Apply a local change to a byte range once the blocks in ``wait`` (from _must_wait) are present."""
        if not wait:
            self._apply(offset, length, apply)
            return self.flush() if fua else None

        async def slow() -> None:
            await self.ensure(wait, demand=True)
            await self._settle(offset, length)
            self._apply(offset, length, apply)
            if fua:
                await self.flush()

        return slow()

    async def _settle(self, offset: int, length: int) -> None:
        """Wait until no fetch is in flight over a range: while a change waited for others, a read may
        have started one, and its cache write must not land after the change."""
        while inflight := self._inflight_in(offset, length):
            await self.ensure(inflight, True)

    def _apply(self, offset: int, length: int, apply: Callable[[], Any]) -> None:
        result = apply()
        if result is not None:  # the local file never defers these; keep the rule explicit
            raise RuntimeError("local cache operation did not complete synchronously")
        for b in self.presence.block_range(offset, length):
            self.presence.set(b)
        self._check_complete()

    def write(self, offset: int, data: memoryview, fua: bool) -> MaybeAwaitable[None]:
        wait = self._must_wait(offset, len(data))
        if wait:
            data = memoryview(
                bytes(data)
            )  # the view dies when we return; the slow path needs the bytes later
        return self._modify(offset, len(data), lambda: self.local.write(offset, data, False), fua, wait)

    def trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        inflight = self._inflight_in(offset, length)
        if not inflight:
            return self._trim(offset, length, fua)

        async def after_fetches() -> None:
            await self.ensure(inflight, True)
            await self._settle(offset, length)
            result = self._trim(offset, length, fua)
            if result is not None:
                await result

        return after_fetches()

    def _trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        # TRIM is advisory: only whole blocks are affected, so nothing is ever fetched for it.
        bs = self.block_size
        start = -(-offset // bs) * bs
        end = min((offset + length) // bs * bs, self.size) if offset + length < self.size else self.size
        if end > start:
            self._apply(start, end - start, lambda: self.local.trim(start, end - start, False))
        # Partial blocks that are present may be trimmed too (they read back as zeroes either way).
        for lo, hi in ((offset, min(start, offset + length)), (max(end, offset), offset + length)):
            if hi > lo and self.presence.all_present(lo, hi - lo):
                self.local.trim(lo, hi - lo, False)
        return self.flush() if fua else None

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> MaybeAwaitable[None]:
        wait = self._must_wait(offset, length)
        if fast_only and wait:
            # Zeroing a partial missing block needs a fetch: not fast.
            raise OSError(errno.ENOTSUP, "zeroing would need a fetch from the upstream")
        return self._modify(
            offset,
            length,
            lambda: self.local.write_zeroes(offset, length, may_trim, fast_only, False),
            fua,
            wait,
        )

    # --- durability ----------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """fsync the cache, then persist the bitmap as it was before the fsync."""
        async with self._flush_lock:
            snapshot = {i: self.presence.page(i) for i in self.presence.dirty_pages}
            self.presence.dirty_pages.clear()
            try:
                await asyncio.to_thread(os.fdatasync, self.local.fd)
                await asyncio.to_thread(self.bitmap.write_pages, snapshot)
            except BaseException:
                self.presence.dirty_pages.update(snapshot)
                raise

    # --- block status --------------------------------------------------------------------------------------

    def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        if context != BASE_ALLOCATION:
            return [(length, 0)]
        out: list[tuple[int, int]] = []
        end = offset + length
        pos = offset
        bs = self.block_size
        while pos < end:
            block = pos // bs
            present = self.presence.test(block)
            run_end = pos
            b = block
            while run_end < end and self.presence.test(b) == present:
                b += 1
                run_end = min(b * bs, end)
            if present:
                out += self.local.extents(context, pos, run_end - pos)
            else:
                out += self._source_extents(pos, run_end - pos)
            pos = run_end
        return coalesce(out)

    def _source_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Allocation of missing ranges as the source reported it at start (data if unknown)."""
        return [(n, flags & _HOLE) for n, flags in extents_in(self.source_map, offset, offset + length, 0)]

    # --- invalidation -------------------------------------------------------------------------------------

    async def invalidate(self, ranges: list[tuple[int, int]]) -> int:
        """Forget cached blocks the source changed after they were fetched; the bytes now missing again.

        Only valid while no client has written here (a migration calls it before the destination guest
        runs): a whole block is dropped even if the range covers a part of it. Fetches in flight over
        the ranges land first, so none can install old data after the drop. The new bitmap is made
        durable before this returns.
        """
        if self.detached:
            raise OSError(errno.ESHUTDOWN, "the upstream is released; nothing can be fetched again")
        ranges = to_ranges(clip(merge(to_spans(ranges)), 0, self.size))
        while waits := [b for o, n in ranges for b in self._inflight_in(o, n)]:
            await self.ensure(waits, True)
        dropped = 0
        for offset, length in ranges:
            for b in self.presence.block_range(offset, length):
                if self.presence.clear(b):
                    dropped += self.presence.block_span(b)[1]
        if dropped:
            # What the source said about these ranges at start no longer holds: they are data now.
            self.source_map = _overlay_data(self.source_map, ranges)
            self.complete_event.clear()
        await self.flush()
        return dropped

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def detach(self) -> None:
        """Everything is local: make it durable, then let go of the source."""
        await self.flush()
        if not self.detached:
            self.detached = True
            self._buffers.clear()  # nothing is fetched any more
            await self.upstream.close()
            log.info(
                "relocation complete: %d bytes local; upstream %s released", self.size, self.upstream.uri
            )

    def retire(self) -> None:
        """Complete, flushed and detached, the cache is served as a plain file by another layer now: stop
        the writer, close the bitmap; the local file stays open for its new owner."""
        self._writer.close()
        self._buffers.clear()
        self.bitmap.close(clean=True)

    def stop(self, clean: bool) -> None:
        """Release everything; ``clean``: the cache was flushed (the bitmap says so for the next run)."""
        self._writer.close()  # nothing may use the cache's fd once it is closed
        self._buffers.clear()
        self.bitmap.close(clean=clean)
        self.local.close()

    def close(self) -> None:
        self.stop(clean=True)


def _all_zero(data: bytearray, lo: int, hi: int) -> bool:
    # Data blocks almost always differ from zero in their first bytes: decide those without a scan.
    head = min(hi, lo + 16)
    if data[lo:head] != _ZEROS[: head - lo]:
        return False
    return data.count(0, lo, hi) == hi - lo


def _overlay_data(source_map: list[Labelled], ranges: list[Range]) -> list[Labelled]:
    """``source_map`` with ``ranges`` turned into plain data (flags 0)."""
    return relabel(source_map, merge(to_spans(ranges)), 0)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _unique(fetches: Iterable[_Fetch]) -> list[_Fetch]:
    """Each fetch once, in order of first appearance."""
    seen: set[int] = set()
    out: list[_Fetch] = []
    for f in fetches:
        if id(f) not in seen:
            seen.add(id(f))
            out.append(f)
    return out


async def _wait_all(waits: list[asyncio.Future[None]]) -> None:
    if not waits:
        return
    # Wait for every fetch (not just the first failure) so no exception is left unretrieved. The futures
    # are shared by every request that joined the fetch: shielded, so a waiter that is cancelled (its
    # client left) cancels only its own wait, never the fetch's completion that others wait for.
    results = await asyncio.gather(*(asyncio.shield(w) for w in waits), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
