"""Dirty tracking: the export layer that records which blocks were written, in named bitmaps.

Every served disk sits on this layer. A bitmap is created, read, cleared and removed through the control
socket, and is readable over NBD as the block status meta context ``hikkoshi:dirty:NAME`` (flag 1 =
dirty), so a remote peer (a migration's destination) can ask which blocks changed since it was created
or last cleared.

A block is marked *before* the write reaches the device below: a copier that cleared the bit and copies
the block concurrently will find it dirty again, never miss it. TRIM and WRITE_ZEROES count as writes.

The layer also holds the device below it as a swappable reference (:meth:`replace_inner`): the storage
move inserts its mirror there and finally puts the destination file in place, between two requests.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from hikkoshi.block.dirty_bitmap import DEFAULT_GRANULARITY, DirtyBitmap
from hikkoshi.nbd.device import BlockDevice, Buffer, Capabilities, MaybeAwaitable

DIRTY_CONTEXT_PREFIX = "hikkoshi:dirty:"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def then(result: MaybeAwaitable[None], done: Callable[[], None]) -> MaybeAwaitable[None]:
    """``result``, with ``done`` called when it finishes (at once if it already has, even on error).

    A request that completes asynchronously may land after a copier read the range: marking its blocks
    again when it finishes keeps the copier from missing it.
    """
    if result is None:
        done()
        return None

    async def finish() -> None:
        try:
            await result
        finally:
            done()

    return finish()


class TrackedDevice(BlockDevice):
    """Passes every request to ``inner``; marks modified ranges in every bitmap."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.capabilities: Capabilities = inner.capabilities
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self._maps: tuple[DirtyBitmap, ...] = ()

    # --- bitmaps ------------------------------------------------------------------------------------------

    @property
    def meta_contexts(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*self.inner.meta_contexts, *(DIRTY_CONTEXT_PREFIX + n for n in self.bitmaps))

    def add_bitmap(self, name: str, granularity: int = DEFAULT_GRANULARITY) -> DirtyBitmap:
        """Start recording writes in a new bitmap, all clean."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad bitmap name {name!r}: 1-64 of letters, digits, '_', '.', '-'")
        if name in self.bitmaps:
            raise ValueError(f"bitmap {name!r} exists")
        bitmap = DirtyBitmap(self.size, granularity)
        self.bitmaps[name] = bitmap
        self._maps = tuple(self.bitmaps.values())
        return bitmap

    def bitmap(self, name: str) -> DirtyBitmap:
        try:
            return self.bitmaps[name]
        except KeyError:
            raise ValueError(f"no bitmap named {name!r}") from None

    def remove_bitmap(self, name: str) -> None:
        self.bitmap(name)
        del self.bitmaps[name]
        self._maps = tuple(self.bitmaps.values())

    def _mark(self, offset: int, length: int) -> None:
        for bitmap in self._maps:
            bitmap.mark(offset, length)

    # --- the layer below ----------------------------------------------------------------------------------

    def replace_inner(self, inner: BlockDevice) -> BlockDevice:
        """Put another device of the same size below this layer; return the old one."""
        if inner.size != self.size:
            raise ValueError(f"replacement device is {inner.size} bytes, not {self.size}")
        old, self.inner = self.inner, inner
        self.capabilities = inner.capabilities
        return old

    # --- requests -----------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> MaybeAwaitable[Buffer]:
        return self.inner.read(offset, length)

    def read_fd(self) -> int:
        return self.inner.read_fd()

    def _marked_after(self, result: MaybeAwaitable[None], offset: int, length: int) -> MaybeAwaitable[None]:
        """Mark again when an asynchronous request finishes (see :func:`then`)."""
        if result is None:
            return None
        return then(result, lambda: self._mark(offset, length))

    def write(self, offset: int, data: memoryview, fua: bool) -> MaybeAwaitable[None]:
        if not self._maps:
            return self.inner.write(offset, data, fua)
        self._mark(offset, len(data))
        return self._marked_after(self.inner.write(offset, data, fua), offset, len(data))

    def flush(self) -> Awaitable[None]:
        return self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool) -> MaybeAwaitable[None]:
        if not self._maps:
            return self.inner.trim(offset, length, fua)
        self._mark(offset, length)
        return self._marked_after(self.inner.trim(offset, length, fua), offset, length)

    def write_zeroes(
        self, offset: int, length: int, may_trim: bool, fast_only: bool, fua: bool
    ) -> MaybeAwaitable[None]:
        if not self._maps:
            return self.inner.write_zeroes(offset, length, may_trim, fast_only, fua)
        self._mark(offset, length)
        return self._marked_after(
            self.inner.write_zeroes(offset, length, may_trim, fast_only, fua), offset, length
        )

    def cache(self, offset: int, length: int) -> MaybeAwaitable[None]:
        return self.inner.cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> MaybeAwaitable[list[tuple[int, int]]]:
        if context.startswith(DIRTY_CONTEXT_PREFIX):
            bitmap = self.bitmaps.get(context[len(DIRTY_CONTEXT_PREFIX) :])
            # A bitmap removed after the client selected it: say "all dirty", the safe answer.
            return [(length, 1)] if bitmap is None else bitmap.extents(offset, length)
        return self.inner.extents(context, offset, length)

    def close(self) -> None:
        self.inner.close()
