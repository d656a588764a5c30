"""A disk held by another host, served through this one: every request goes to the holder's export.

Shared storage (DESIGN: the destination opens the same export) makes a VM run on one host while its
disk files stay on another, the holder. The VM's own disk service still serves QEMU on this host; for
such a disk its export is this pass-through, so the host knows how its disk is served, tracks the
guest's writes in its dirty bitmaps (a later migration needs them) and measures the guest's latency.

Rules: a write, TRIM or zeroing is acknowledged only after the holder acknowledged it; FUA and FLUSH
go through, so an acknowledged FLUSH is durable at the holder. Requests may finish in any order.

:class:`Gate` lets a disk service change what serves such a disk (e.g. pull it into a local file):
:meth:`Gate.drain` holds new requests and waits for those in flight, so nothing acknowledged later by
the holder can be missed by whatever serves the disk next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from hikkoshi.block.upstream import Upstream
from hikkoshi.nbd.constants import BASE_ALLOCATION
from hikkoshi.nbd.device import BlockDevice, Buffer, Capabilities, MaybeAwaitable

#: What a pass-through promises whatever the holder is: plain requests, each forwarded.
REMOTE_CAPABILITIES = Capabilities(fast_zero=False, cache=False, multi_conn=True)


class RemoteDevice(BlockDevice):
    """Forwards every request to the holder's export (``upstream``, already opened or opening)."""

    meta_contexts = (BASE_ALLOCATION,)

    def __init__(self, upstream: Upstream, size: int) -> None:
        self.upstream = upstream
        self.size = size
        self.capabilities = REMOTE_CAPABILITIES

    def read(self, offset: int, length: int) -> Awaitable[Buffer]:
        return self.upstream.read_buffer(offset, length, demand=True)

    def write(self, offset: int, data: memoryview, fua: bool) -> Awaitable[None]:
        # The view is valid only until this returns: copy before the first await.
        return self.upstream.write(offset, bytes(data), fua)

    def flush(self) -> Awaitable[None]:
        return self.upstream.flush()

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None]:
        return self.upstream.trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> Awaitable[None]:
        return self.upstream.write_zeroes(offset, length, no_hole=not may_trim, fua=fua)

    async def _extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.upstream.extents(offset, length)

    def extents(self, context: str, offset: int, length: int) -> MaybeAwaitable[list[tuple[int, int]]]:
        if context != BASE_ALLOCATION:
            return [(length, 0)]
        return self._extents(offset, length)


class Gate(BlockDevice):
    """Counts the requests in flight to ``inner`` and can hold new ones (see the module's docstring)."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.capabilities = inner.capabilities
        self.meta_contexts = inner.meta_contexts
        self._open = asyncio.Event()
        self._open.set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def drain(self) -> AsyncIterator[None]:
        """Hold new requests and wait until none is in flight; they go on when the block ends."""
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()

    async def _run(self, call: object) -> object:
        if not self._open.is_set():
            await self._open.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            result = call() if callable(call) else call
            if isinstance(result, Awaitable):
                result = await result
            return result
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def read(self, offset: int, length: int) -> Buffer:
        result = await self._run(lambda: self.inner.read(offset, length))
        assert isinstance(result, bytes | bytearray | memoryview)
        return result

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        # Copied now: the caller's view is valid only until this call returns (it may be held first).
        copy = memoryview(bytes(data))
        await self._run(lambda: self.inner.write(offset, copy, fua))

    async def flush(self) -> None:
        await self._run(self.inner.flush)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._run(lambda: self.inner.trim(offset, length, fua))

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> None:
        await self._run(lambda: self.inner.write_zeroes(offset, length, may_trim, fast_only, fua))

    async def extents(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        result = await self._run(lambda: self.inner.extents(context, offset, length))
        assert isinstance(result, list)
        return result

    def close(self) -> None:
        self.inner.close()
