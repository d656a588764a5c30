"""Writing fetched data to the proxy's cache file off the event loop.

One thread writes, in the order the writes were given: writes to one file serialise in the kernel anyway.
It takes every write queued meanwhile at once, joins the ones that continue each other into one
``pwritev`` (a sequential reader's fetches do), and reports the whole batch back to the event loop in one
call: the loop and the thread hand the GIL and wake-ups back and forth once per batch, not per write.

A second thread puts page-cache pages under a fetch's range while its data is still on the way
(``POSIX_FADV_WILLNEED``; a hint, never awaited): new pages can cost more than the copy into them (on a VM
each may be a fault in the host), and the writer would otherwise take that cost alone, page by page, under
the file's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hikkoshi.block import fallocate

#: Most buffers and bytes joined into one ``pwritev``.
_MAX_IOV = 64
_MAX_JOINED = 64 << 20


@dataclass(frozen=True, slots=True)
class Write:
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Punch:
    """Deallocate a range (it reads back as zeroes)."""

    offset: int
    length: int


Op = Write | Punch


class CacheWriter:
    """The writer and prefault threads of one cache file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: deque[tuple[list[Op], asyncio.Future[None]]] = deque()
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Threads exit once their executor is collected, so a dropped proxy leaves none behind.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hikkoshi-cache-writer")
        self._prefaulter = ThreadPoolExecutor(1, thread_name_prefix="hikkoshi-cache-prefault")

    def prefault(self, offset: int, length: int) -> None:
        """Start bringing a range into the page cache; never waited for."""
        self._prefaulter.submit(_will_need, self.fd, offset, length)

    def write(self, ops: list[Op]) -> asyncio.Future[None]:
        """Carry out ``ops`` in order; the future fails with the first error (later ops are then skipped)."""
        loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((ops, fut))
        if not self._draining:
            self._draining = True
            self._writer.submit(self._drain)
        return fut

    def close(self) -> None:
        """Wait for everything queued; nothing may use the fd after this."""
        self._prefaulter.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    # --- the writer thread ---------------------------------------------------------------------------------

    def _drain(self) -> None:
        queue = self._queue
        while True:
            batch = []
            while queue:
                batch.append(queue.popleft())
            if not batch:
                # Whoever queues next sees the flag down and starts another drain; a write queued just
                # before the flag went down is seen here.
                self._draining = False
                if not queue:
                    return
                self._draining = True
                continue
            results = self._run(batch)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                    loop.call_soon_threadsafe(_complete, results)

    def _run(
        self, batch: list[tuple[list[Op], asyncio.Future[None]]]
    ) -> list[tuple[asyncio.Future[None], BaseException | None]]:
        results: list[tuple[asyncio.Future[None], BaseException | None]] = []
        # Writes of consecutive jobs that continue each other are joined; a failure fails every job
        # whose bytes were in the failed call.
        group: list[Write] = []
        members: list[int] = []
        failed: dict[int, BaseException] = {}

        def flush() -> None:
            if not group:
                return
            try:
                _pwritev(self.fd, group)
            except OSError as exc:
                for i in members:
                    failed.setdefault(i, exc)
            group.clear()
            members.clear()

        for i, (ops, _) in enumerate(batch):
            for op in ops:
                if i in failed:
                    break
                if isinstance(op, Write):
                    end = group[-1].offset + len(group[-1].data) if group else -1
                    joined = sum(len(w.data) for w in group)
                    if op.offset != end or len(group) >= _MAX_IOV or joined >= _MAX_JOINED:
                        flush()
                    group.append(op)
                    if not members or members[-1] != i:
                        members.append(i)
                else:
                    flush()
                    try:
                        fallocate.punch_hole(self.fd, op.offset, op.length)
                    except OSError as exc:
                        failed.setdefault(i, exc)
        flush()
        for i, (_, fut) in enumerate(batch):
            results.append((fut, failed.get(i)))
        return results


def _pwritev(fd: int, writes: list[Write]) -> None:
    """Write consecutive buffers with as few calls as the kernel allows."""
    offset = writes[0].offset
    views = [w.data for w in writes]
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise OSError(errno.EIO, "the cache file took no bytes")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _complete(results: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for fut, exc in results:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _will_need(fd: int, offset: int, length: int) -> None:
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
