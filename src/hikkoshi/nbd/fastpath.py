"""The server's fast path for large reads of a plain file: reused reply buffers, each reply sent at once.

Answering a 1 MiB read with ``os.pread`` costs a fresh 1 MiB ``bytes`` every time: the allocator maps (or
grows the heap by) a megabyte, the kernel faults in and zeroes 256 pages, and freeing it trims the heap
again, several times the cost of the copy itself. When the device reads straight from a file
(its ``read_fd``) the server reads into buffers it reuses instead.

A buffer handed to the transport may still be referred to by it until its bytes are sent (uvloop keeps
views of unsent data), so it is reused only once the transport reports an empty write buffer.

A large reply is also written at once rather than at the end of the batch, so the client receives it
while the server reads the next one, and the socket gets a send buffer large enough to take a whole queue
of such replies (when the kernel allows more than TCP's autotuning would reach on its own).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .device import BlockDevice

#: Reads at least this large use reused buffers and go out at once; smaller ones are cheapest as a fresh
#: ``bytes`` in a batched write.
BIG_READ = 64 * 1024
_MIN_BUFFER = 64 * 1024
#: The most reusable bytes one connection keeps.
_MAX_KEPT = 16 * 1024 * 1024
#: Send buffer asked for (the kernel doubles it): a queue depth of 1 MiB replies.
_SNDBUF = 4 * 1024 * 1024


def _sysctl(name: str) -> int:
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def widen_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Raise the socket's send buffer to ``_SNDBUF`` if that is more than the kernel gives it anyway.

    Setting SO_SNDBUF turns TCP's send buffer autotuning off, so it is set only when the result (capped by
    the kernel at twice ``wmem_max``) exceeds autotuning's ceiling (the last field of ``tcp_wmem``).
    """
    sock: Any = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        if sock.type != socket.SOCK_STREAM:
            return
        granted = 2 * min(_SNDBUF, _sysctl("net/core/wmem_max"))
        current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if sock.family != socket.AF_UNIX:
            current = max(current, _sysctl("net/ipv4/tcp_wmem"))
        if granted > current:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
    except (AttributeError, OSError, ValueError):
        pass


class FastPath:
    """Reply buffers for the large reads of one connection on one transport (TLS makes a new one)."""

    __slots__ = ("_batch", "_free", "_held", "_kept", "_widened", "file_fd", "transport")

    def __init__(self, transport: asyncio.Transport, device: BlockDevice) -> None:
        self.transport = transport
        #: The file to read from, or -1 when reads must go through ``device.read``; see :meth:`use`.
        self.file_fd = device.read_fd()
        self._widened = False
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0
        self._batch: list[bytearray] = []  # taken, not yet handed to the transport
        self._held: list[bytearray] = []  # handed to the transport, maybe not sent yet

    def _give_back(self, bufs: list[bytearray]) -> None:
        for buf in bufs:
            size = len(buf)
            if self._kept + size <= _MAX_KEPT:
                self._free.setdefault(size, []).append(buf)
                self._kept += size
        bufs.clear()

    def _drained(self) -> bool:
        return not self.transport.get_write_buffer_size() and not self.transport.is_closing()

    def use(self, device: BlockDevice) -> None:
        """Start a batch on ``device`` (the export's device, or the file under it, may have changed)."""
        self.file_fd = device.read_fd()
        self.reclaim()

    def reclaim(self) -> None:
        """Reuse the buffers of earlier replies once the transport has sent everything."""
        if self._held and self._drained():
            self._give_back(self._held)

    def settle(self) -> None:
        """Call after handing everything taken so far to the transport."""
        if not self._batch:
            return
        if self._drained():
            self._give_back(self._batch)
        else:
            self._held += self._batch
            self._batch.clear()

    def pread(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` in a reused buffer, zero-padded past the end of the file.

        The view must be handed to the transport before the next :meth:`settle`.
        """
        size = max(_MIN_BUFFER, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            buf = free.pop()
            self._kept -= size
        else:
            buf = bytearray(size)
        self._batch.append(buf)
        view = memoryview(buf)[:length]
        done = 0
        while done < length:
            n = os.preadv(self.file_fd, [view[done:]], offset + done)
            if n <= 0:
                view[done:] = bytes(length - done)
                break
            done += n
        return view

    def flush(self, out: list[bytes | bytearray | memoryview]) -> None:
        """Write ``out`` now (it is emptied) and settle."""
        if not self._widened:
            self._widened = True
            widen_send_buffer(self.transport)
        self.transport.writelines(out)
        out.clear()
        self.settle()
