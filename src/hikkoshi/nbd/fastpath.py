"""The server's fast path for large reads of a plain file: reused reply buffers, each reply sent at once.

Answering a 1 MiB read with ``os.pread`` costs a fresh 1 MiB ``bytes`` every time: the allocator maps (or
grows the heap by) a megabyte, the kernel faults in and zeroes 256 pages, and freeing it trims the heap
again, several times the cost of the copy itself. When the device reads straight from a file
(its ``read_fd``) the server reads into buffers it reuses instead: they come from, and go back to, the
server's payload memory (:mod:`hikkoshi.nbd.memory`), whose reservation the caller holds for each reply.

A buffer handed to the transport may still be referred to by it until its bytes are sent (uvloop keeps
views of unsent data), so it is reused only once the transport reports an empty write buffer.

A large reply is also written at once rather than at the end of the batch, so the client receives it
while the server reads the next one, and the socket gets a send buffer large enough to take a whole queue
of such replies (when the kernel allows more than TCP's autotuning would reach on its own).

Better still, on a plain (not TLS) socket whose transport has nothing queued, the reply goes straight to
the socket: its header (and the replies batched before it) with one ``sendmsg(MSG_MORE)``, its payload
with ``sendfile``, which hands the kernel the page cache's pages instead of copying them twice through
our buffers; that copying was most of the server's CPU on large reads. Nothing can overtake those bytes:
the transport is empty and this thread writes them before anything else. When the socket fills up
part-way, what is left of the reply is read into a buffer and queued in the transport like any other, so
later replies queue behind it and a client that stops reading still pauses us (``pause_writing``).
Over TLS the socket carries records, so replies always go through the transport there.

``sendfile`` queues references to the page cache's pages, not copies: a write processed after the read
but before the client has taken the data from its socket may show in that data. NBD allows it: the
client had the two requests in flight at once (the server may process those in any order), or the write
came from another client while this read had not completed.

A client on this host (TCP loopback) also gets Reno as its connection's congestion control: see
:func:`loopback_congestion_control`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from typing import Any

from hikkoshi.nbd.device import BlockDevice
from hikkoshi.nbd.memory import PayloadMemory

log = logging.getLogger("hikkoshi.nbd.server")

#: Reads at least this large use reused buffers and go out at once; smaller ones are cheapest as a fresh
#: ``bytes`` in a batched write.
BIG_READ = 64 * 1024
_MIN_BUFFER = 64 * 1024
#: The most reusable bytes a FastPath keeps when it is given no server memory to share.
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


def loopback_congestion_control(transport: asyncio.BaseTransport) -> None:
    """Use Reno on a TCP connection whose peer is on this host: there is no network to model there.

    A model-based congestion control (BBR, a common default) sizes its window from the measured round trip,
    which on loopback is microseconds: a few 64 KiB segments of a queue of 1 MiB replies go out when they are
    written and the rest whenever the client's acknowledgements arrive, that is in the client's time slice,
    and more so when other work competes for the CPUs (reordering, spurious retransmissions, a pacing rate
    measured while the client was not running). Reno's window grows until loss, and loopback loses nothing.
    """
    sock: Any = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return
        peer = ipaddress.ip_address(sock.getpeername()[0])
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        if peer.is_loopback:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    except (AttributeError, OSError, ValueError):
        pass  # Reno is built into every Linux kernel, but this is only an optimisation


class FastPath:
    """Reply buffers for the large reads of one connection on one transport (TLS makes a new one)."""

    __slots__ = (
        "_batch",
        "_held",
        "_memory",
        "_sock",
        "_sock_tried",
        "_widened",
        "file_fd",
        "transport",
    )

    def __init__(
        self, transport: asyncio.Transport, device: BlockDevice, memory: PayloadMemory | None = None
    ) -> None:
        self.transport = transport
        #: The file to read from, or -1 when reads must go through ``device.read``; see :meth:`use`.
        self.file_fd = device.read_fd()
        self._widened = False
        self._memory = memory if memory is not None else PayloadMemory(_MAX_KEPT)
        self._batch: list[bytearray] = []  # taken, not yet handed to the transport
        self._held: list[bytearray] = []  # handed to the transport, maybe not sent yet
        # Our own descriptor of the transport's socket, for sendmsg flags and sendfile: made on first use,
        # None when replies must go through the transport (TLS, or no socket to be had).
        self._sock: socket.socket | None = None
        self._sock_tried = False

    def close(self) -> None:
        """Let go of our descriptor of the socket (the connection only ends once both are closed)."""
        sock, self._sock, self._sock_tried = self._sock, None, True
        if sock is not None:
            sock.close()

    def _direct(self) -> socket.socket | None:
        if not self._sock_tried:
            self._sock_tried = True
            self._sock = _own_socket(self.transport)
        return self._sock

    def _give_back(self, bufs: list[bytearray]) -> None:
        for buf in bufs:
            self._memory.give(buf)
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

    @property
    def holding(self) -> bool:
        """Buffers of replies are still with the transport (or not yet handed to it)."""
        return bool(self._held or self._batch)

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

        The buffer is the power of two from 64 KiB that holds ``length``: the caller's reservation covers it.
        The view must be handed to the transport before the next :meth:`settle`.
        """
        buf = self._memory.take(max(_MIN_BUFFER, 1 << (length - 1).bit_length()))
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

    def _tune(self) -> None:
        # Once per connection, when the first large reply goes out.
        if not self._widened:
            self._widened = True
            widen_send_buffer(self.transport)
            loopback_congestion_control(self.transport)

    def flush(self, out: list[bytes | bytearray | memoryview]) -> None:
        """Write ``out`` now (it is emptied) and settle."""
        self._tune()
        self.transport.writelines(out)
        out.clear()
        self.settle()

    def send_read(
        self, out: list[bytes | bytearray | memoryview], header: bytes, offset: int, length: int
    ) -> OSError | None:
        """Send ``out`` (earlier replies; emptied), then a read's reply: ``header`` and the file's bytes.

        Raises OSError, leaving ``out`` as it was, when the file cannot be read before anything of this
        reply went out (the caller replies with an error). Returns the error that broke the connection or
        the reply off part-way (the client may hold a header without its data: the connection must end).
        """
        sock = self._direct() if self._drained() else None
        if sock is None:
            data = self.pread(offset, length)
            out += (header, data)
            self.flush(out)
            return None
        self._tune()
        bufs = [*out, header]
        total = sum(len(b) for b in bufs)
        try:
            # MSG_MORE: the header waits for its payload instead of leaving as a tiny segment of its own.
            sent = sock.sendmsg(bufs, (), socket.MSG_MORE)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return self._broken(exc)  # the client is gone
        if sent == total:
            out.clear()
            return self._send_payload(sock, offset, length)
        # The socket is full: the rest goes through the transport, and everything after it too.
        unsent = _unsent(bufs, sent)
        if total - sent >= len(header):
            # Not a byte of this reply went out yet: a read error can still be replied to.
            out[:] = unsent[:-1]
            data = self.pread(offset, length)
            out += (header, data)
        else:
            out.clear()
            try:
                data = self.pread(offset, length)
            except OSError as exc:
                return self._broken(exc)
            out += (*unsent, data)
        self.flush(out)
        return None

    def _send_payload(self, sock: socket.socket, offset: int, length: int) -> OSError | None:
        done = 0
        try:
            while done < length:
                n = os.sendfile(sock.fileno(), self.file_fd, offset + done, length - done)
                if n == 0:
                    break  # the file ends here (it shrank): pread pads the rest with zeroes
                done += n
        except BlockingIOError:
            pass  # the socket is full: the rest goes through the transport
        except OSError as exc:
            return self._broken(exc)  # the file or the connection failed after the header went out
        if done < length:
            try:
                data = self.pread(offset + done, length - done)
            except OSError as exc:
                return self._broken(exc)
            self.flush([data])
        return None

    def _broken(self, exc: OSError) -> OSError:
        # A client that went away is routine; a file failing in the middle of a reply is not.
        level = logging.INFO if isinstance(exc, ConnectionError) else logging.ERROR
        peer = self.transport.get_extra_info("peername") or "unix"
        log.log(level, "client %s: a read reply broke off (%s); disconnecting it", peer, exc)
        return exc


def _unsent(bufs: list[bytes | bytearray | memoryview], sent: int) -> list[bytes | bytearray | memoryview]:
    """What is left of ``bufs`` once their first ``sent`` bytes are written."""
    for i, buf in enumerate(bufs):
        size = len(buf)
        if sent < size:
            return [memoryview(buf)[sent:], *bufs[i + 1 :]] if sent else bufs[i:]
        sent -= size
    return []


def _own_socket(transport: asyncio.Transport) -> socket.socket | None:
    """Our own descriptor of the transport's socket, or None if replies must go through the transport."""
    if (
        transport.get_extra_info("sslcontext") is not None
        or transport.get_extra_info("ssl_object") is not None
    ):
        return None  # TLS: the socket carries records, not our bytes
    sock: Any = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        if sock.type != socket.SOCK_STREAM:
            return None
        own = socket.socket(fileno=os.dup(sock.fileno()))
    except (AttributeError, OSError, ValueError):
        return None
    own.setblocking(False)  # shared with the transport's descriptor, already non-blocking: say it here too
    return own
