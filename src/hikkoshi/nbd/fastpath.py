"""The server's fast paths for large reads of a plain file: ``sendfile``, else reused reply buffers.

Answering a 1 MiB read with ``os.pread`` costs a fresh 1 MiB ``bytes`` every time: the allocator maps (or
grows the heap by) a megabyte, the kernel faults in and zeroes 256 pages, and freeing it trims the heap
again, several times the cost of the copy itself; then the bytes are copied once more into the socket.
When the device is a plain file (exactly :class:`~hikkoshi.block.file.RawFile`: a subclass may change what
``read`` returns) there are cheaper ways:

* ``sendfile`` from the image straight into the socket, when the connection is plain TCP or a Unix socket
  (never TLS), structured replies were negotiated, and the transport has nothing queued, so the bytes put
  on the socket behind its back cannot overtake bytes it still holds. Whatever does not fit goes through
  the transport. The data chunk goes out without the DONE flag and a NONE chunk ends the reply, so a read
  error met after the chunk header left is still reported, as an error chunk (the spec allows both after
  a content chunk, even with DF).
* otherwise ``preadv`` into a reused buffer. A buffer handed to the transport may still be referred to by
  it until its bytes are sent (uvloop keeps views of unsent data), so it is reused only once the transport
  reports an empty write buffer.

Either way a large reply is written at once rather than at the end of the batch, so the client receives it
while the server reads the next, and the socket gets a send buffer large enough to take a whole queue of
such replies (when the kernel allows more than TCP's autotuning would reach on its own).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .constants import ChunkType, ReplyFlag
from .device import BlockDevice
from .server_transmission import chunk_header, offset_data_header

#: Reads at least this large take the paths below; smaller ones are cheapest as a fresh ``bytes`` in a
#: batched write.
BIG_READ = 64 * 1024
_MIN_BUFFER = 64 * 1024
#: The most reusable bytes one connection keeps.
_MAX_KEPT = 16 * 1024 * 1024
#: Send buffer asked for (the kernel doubles it): a queue depth of 1 MiB replies.
_SNDBUF = 4 * 1024 * 1024

Out = list[bytes | bytearray | memoryview]


def _file_fd(device: BlockDevice) -> int:
    """The fd whose bytes ``device.read`` returns verbatim, or -1."""
    from ..block.file import RawFile  # a device layer: imported late to keep the protocol package below it

    if type(device) is RawFile:
        return device.fd
    return -1


def _sysctl(name: str) -> int:
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def _stream_socket(transport: asyncio.BaseTransport) -> Any:
    sock = transport.get_extra_info("socket")
    try:
        if sock is None or sock.type != socket.SOCK_STREAM or sock.fileno() < 0:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    return sock


def widen_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Raise the socket's send buffer to ``_SNDBUF`` if that is more than the kernel gives it anyway.

    Setting SO_SNDBUF turns TCP's send buffer autotuning off, so it is set only when the result (capped by
    the kernel at twice ``wmem_max``) exceeds autotuning's ceiling (the last field of ``tcp_wmem``).
    """
    sock = _stream_socket(transport)
    if sock is None:
        return
    try:
        granted = 2 * min(_SNDBUF, _sysctl("net/core/wmem_max"))
        current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if sock.family != socket.AF_UNIX:
            current = max(current, _sysctl("net/ipv4/tcp_wmem"))
        if granted > current:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
    except (AttributeError, OSError, ValueError):
        pass


def _plain_socket_fd(transport: asyncio.BaseTransport) -> int:
    """The fd of the stream socket right under ``transport``, or -1 when there is TLS (or no socket)."""
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object"):
        return -1
    sock = _stream_socket(transport)
    return -1 if sock is None else int(sock.fileno())


class FastPath:
    """Large-read fast paths of one connection on one transport (a TLS upgrade makes a new one)."""

    __slots__ = ("_batch", "_free", "_held", "_kept", "_ready", "file_fd", "sock_fd", "transport")

    def __init__(self, transport: asyncio.Transport, device: BlockDevice) -> None:
        self.transport = transport
        self.file_fd = _file_fd(device)
        self.sock_fd = -1
        self._ready = False  # socket looked at (on the first large read)
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0
        self._batch: list[bytearray] = []  # taken, not yet handed to the transport
        self._held: list[bytearray] = []  # handed to the transport, maybe not sent yet

    def _prepare(self) -> None:
        self._ready = True
        widen_send_buffer(self.transport)
        self.sock_fd = _plain_socket_fd(self.transport)

    # --- reused buffers ------------------------------------------------------------------------------------

    def _give_back(self, bufs: list[bytearray]) -> None:
        for buf in bufs:
            size = len(buf)
            if self._kept + size <= _MAX_KEPT:
                self._free.setdefault(size, []).append(buf)
                self._kept += size
        bufs.clear()

    def _drained(self) -> bool:
        return not self.transport.get_write_buffer_size() and not self.transport.is_closing()

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

    def flush(self, out: Out) -> None:
        """Write ``out`` now (it is emptied) and settle."""
        if not self._ready:
            self._prepare()
        self.transport.writelines(out)
        out.clear()
        self.settle()

    # --- sendfile ------------------------------------------------------------------------------------------

    def send(self, out: Out, handle: int, offset: int, length: int) -> bool | OSError:
        """Answer a structured READ with sendfile, writing the replies pending in ``out`` first.

        False if sendfile cannot be used now (TLS, or the transport has bytes queued): nothing was done.
        Otherwise ``out`` holds what must still be written after the bytes already sent. On True the reply
        is complete there; on an ``OSError`` (reading the file failed after the data chunk's header left)
        the data chunk has been padded with zeroes and the caller must end the reply with an error chunk.
        """
        if not self._ready:
            self._prepare()
        transport = self.transport
        if length < int(os.environ.get("HK_SFMIN", "0")):
            return False
        if self.sock_fd < 0 or transport.get_write_buffer_size() or transport.is_closing():
            return False
        out.append(offset_data_header(handle, offset, length, done=False))
        transport.writelines(out)
        out.clear()
        sent = 0
        part = length * int(os.environ.get("HK_SPLIT", "100")) // 100
        if not transport.get_write_buffer_size() and not transport.is_closing():
            try:
                while sent < part:
                    n = os.sendfile(self.sock_fd, self.file_fd, offset + sent, part - sent)
                    if n <= 0:
                        break  # end of file: the rest is read (and padded) below
                    sent += n
            except OSError:
                # EAGAIN: the socket is full. Anything else (a dying socket, a read error) is met again, and
                # reported properly, by the transport or by the read below.
                pass
        if sent < length:
            try:
                out.append(self.pread(offset + sent, length - sent))
            except OSError as exc:
                out.append(bytes(length - sent))
                return exc
        out.append(chunk_header(ReplyFlag.DONE, ChunkType.NONE, handle, 0))
        return True
