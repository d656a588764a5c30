"""Reusable buffers for fetched blocks.

A fresh 1 MiB ``bytearray`` per fetch is costly: it is zeroed, and its pages are often faulted in anew
(the allocator returns freed megabytes to the kernel), several times the cost of receiving into it. The
proxy receives fetches into buffers it reuses instead.

A fetched buffer travels on after the fetch: views of it answer guest reads and may wait in a transport
until sent, and a worker thread writes it to the cache. Rather than have each of those give it back,
the pool reuses a buffer only once nothing but the pool refers to it any more (CPython's reference count
says so exactly: every view of a buffer holds a reference to it).
"""

from __future__ import annotations

import sys
from collections import deque

#: References to a free buffer seen by ``sys.getrefcount``: the pool's deque, the local name, the argument.
_FREE_REFS = 3


class BufferPool:
    """Buffers of one size, at most ``keep`` of them kept for reuse."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._bufs: deque[bytearray] = deque()

    def take(self) -> bytearray:
        """A buffer of ``size`` bytes that nothing else refers to (contents undefined)."""
        bufs = self._bufs
        # Buffers go back in the order they were taken, and are freed roughly in that order too.
        for _ in range(len(bufs)):
            buf = bufs[0]
            bufs.rotate(-1)
            if sys.getrefcount(buf) == _FREE_REFS:
                return buf
            del buf
        buf = bytearray(self.size)
        if len(bufs) < self.keep:
            bufs.append(buf)
        return buf

    def clear(self) -> None:
        """Drop the kept buffers (those still in use live on with their users)."""
        self._bufs.clear()
