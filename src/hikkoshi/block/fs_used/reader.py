"""Reads of file-system metadata: never outside the disk, never short, and few, large and concurrent.

:class:`Reader` wraps a ``read(offset, length)`` coroutine. :meth:`Reader.exact` raises
:class:`~hikkoshi.block.fs_used.errors.Unreadable` for a read outside the disk or one that comes back
short, and lets the ``OSError`` of ``read`` itself through. :meth:`Reader.blocks` fetches many blocks
(the descriptor table, every group's bitmaps, a level of a tree) coalesced into reads of at most
:data:`MAX_READ` bytes, joining blocks within :data:`MAX_GAP` of each other (``flex_bg`` packs bitmaps
back to back), with at most :data:`CONCURRENCY` reads in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from hikkoshi.block.fs_used.errors import Unreadable

ReadFn = Callable[[int, int], Awaitable[bytes]]

MAX_READ = 4 << 20  # bytes in one read of coalesced metadata blocks
MAX_GAP = 256 << 10  # unwanted bytes read to join two wanted blocks into one request
CONCURRENCY = 16  # reads in flight

T = TypeVar("T")


async def bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run ``jobs`` with at most ``limit`` in flight; results in order. On an error the others are
    cancelled and the error itself (not a group) propagates, so callers can catch ``OSError``."""
    results: dict[int, T] = {}
    next_job = 0

    async def worker() -> None:
        nonlocal next_job
        while next_job < len(jobs):
            i = next_job
            next_job += 1
            results[i] = await jobs[i]()

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(jobs)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return [results[i] for i in range(len(jobs))]


class Reader:
    """Disk reads that never leave the disk and never come back short (else :class:`Unreadable`)."""

    def __init__(self, read: ReadFn, disk_size: int) -> None:
        self._read = read
        self.disk_size = disk_size
        self.requests = 0

    async def exact(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, in one read."""
        if offset < 0 or length < 0 or offset + length > self.disk_size:
            raise Unreadable(f"read of {length} bytes at {offset} is outside the disk")
        self.requests += 1
        data = await self._read(offset, length)
        if len(data) != length:
            raise Unreadable(f"read of {length} bytes at {offset} returned {len(data)}")
        return bytes(data)

    async def blocks(self, offsets: Iterable[int], size: int) -> dict[int, bytes]:
        """``size`` bytes at each offset, fetched in few, large, concurrent reads."""
        batches: list[tuple[int, int, list[int]]] = []  # (start, end, offsets)
        for off in sorted(set(offsets)):
            if batches and off - batches[-1][1] <= MAX_GAP and off + size - batches[-1][0] <= MAX_READ:
                start, end, members = batches[-1]
                members.append(off)
                batches[-1] = (start, max(end, off + size), members)
            else:
                batches.append((off, off + size, [off]))

        def job(start: int, end: int) -> Callable[[], Awaitable[bytes]]:
            return lambda: self.exact(start, end - start)

        datas = await bounded([job(s, e) for s, e, _ in batches], CONCURRENCY)
        out: dict[int, bytes] = {}
        for (start, _end, members), data in zip(batches, datas, strict=True):
            for off in members:
                out[off] = data[off - start : off - start + size]
        return out
