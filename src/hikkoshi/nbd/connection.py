"""One client of the NBD server: a thin asyncio shell around the sans-I/O handshake and request reader.

One ``BufferedProtocol`` per connection receives straight into the request reader's buffer. Requests a
device answers at once (page-cache reads and writes) are handled inside the data callback and their
replies leave in one ``writelines`` per batch: no task per request. Requests whose answer must be
awaited (flush, fetches from an upstream) run as tasks owned by the connection's task group.

Payload memory. Every payload byte the connection holds beyond its reader's own small buffer is covered
by a reservation in the server's :class:`~hikkoshi.nbd.memory.PayloadMemory`, made before the bytes exist:
a WRITE's payload once its first bytes have arrived (never on its header's say-so), a large READ's reply
before it is read. A connection holds at most ``limits.connection_memory`` at once; a request that needs
more than it has left waits for its own earlier replies to drain, and one that needs more than the server
has left waits its turn in the server's queue. Either way the connection stops reading meanwhile: the
client's further requests wait in its socket. Payloads longer than the connection's memory are streamed
in pieces of it (:mod:`hikkoshi.nbd.payload_streams`): a WRITE's to the device as each piece is complete,
a READ's reply as the client takes the previous piece. The transport pauses us as soon as it holds a
byte it could not send, and resumes us once it is empty again: that is when reply memory is released.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from hikkoshi.nbd.access import Access, ReadOnlyCatalogue
from hikkoshi.nbd.constants import (
    HIKKOSHI_HEAT,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from hikkoshi.nbd.device import BlockDevice
from hikkoshi.nbd.errors import ProtocolError
from hikkoshi.nbd.exports import Export
from hikkoshi.nbd.fastpath import BIG_READ, FastPath
from hikkoshi.nbd.limits import UNNEGOTIATED_MAX_PAYLOAD, client_key
from hikkoshi.nbd.memory import ConnectionMemory
from hikkoshi.nbd.payload_streams import Out, PayloadStreams, StreamedWrite
from hikkoshi.nbd.request_reader import Request, RequestReader
from hikkoshi.nbd.server_handshake import NEED_DATA, Aborted, Negotiated, ServerHandshake, StartTLS, TLSMode
from hikkoshi.nbd.server_transmission import (
    FLAG_FUA,
    SessionRules,
    block_status_reply,
    check_request,
    chunk_header,
    error_reply,
    offset_data_header,
    simple_reply,
)

if TYPE_CHECKING:
    from hikkoshi.nbd.server import NbdServer

log = logging.getLogger("hikkoshi.nbd.server")

#: Receive buffer during negotiation (options accumulate in the handshake's own buffer).
_HANDSHAKE_BUFFER = 16 * 1024
#: Batched small replies go out once they add up to this much.
_FLUSH_BYTES = 256 * 1024
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_ERRNO_MAP = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value for an exception raised by a device."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, Errno.EIO)
    return Errno.EIO


class ServerConnection(PayloadStreams, asyncio.BufferedProtocol):
    """One client connection: negotiation, then requests."""

    #: Reused buffers for large reads of a plain file, made by ``_process`` for each transport.
    _fast: FastPath | None = None

    def __init__(self, server: NbdServer, access: Access | None = None) -> None:
        self.server = server
        #: What the listener this client came through allows (TLS, which peers, read-only).
        self.access = access or server.access
        self.limits = server.limits
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: What the per-address cap counts this client as (None: not capped); see limits.client_key.
        self.key: str | None = None
        self.unix = False
        self.handshake: ServerHandshake | None = ServerHandshake(
            ReadOnlyCatalogue(server.exports) if self.access.read_only else server.exports,
            TLSMode.REQUIRED if self.access.tls else TLSMode.NONE,
            max_payload=self.limits.max_payload,
        )
        self._hs_buf = bytearray(_HANDSHAKE_BUFFER)
        self.reader: RequestReader | None = None
        self.export: Export | None = None
        self.rules: SessionRules | None = None
        self.contexts: list[tuple[int, str]] = []
        self._signal: asyncio.Future[str] = self._loop.create_future()
        self._tg: asyncio.TaskGroup | None = None
        self._slow: set[asyncio.Task[None]] = set()
        self._closing = False
        self._write_paused = False
        self._holds: set[str] = set()  # why reading is paused (it resumes when there is no reason left)
        self.mem = ConnectionMemory(server.memory, self.limits.connection_memory, self._wake_soon)
        self._stash: Request | None = None  # a request that waits for memory
        self._write: StreamedWrite | None = None
        self._busy = False  # a task has the request stream: a streamed READ, a WRITE piece at the device
        self._progress = asyncio.Event()  # a grant, a release or a drain: a waiting task looks again
        # Idleness (after negotiation, TCP clients, when limits.idle_timeout is set).
        self._last_activity = self._loop.time()
        self._device_waits = 0
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- asyncio protocol callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock: Any = transport.get_extra_info("socket")
        self.unix = getattr(sock, "family", None) == socket.AF_UNIX
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer and not self.unix else "unix"
        self.key = None if self.unix else client_key(peer)
        if self.server.adopt(self) and self.handshake is not None:
            self.transport.write(self.handshake.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fast is not None:
            self._fast.close()  # its copy of the socket's descriptor would keep the connection open
        self.mem.free()
        self._progress.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._notify("closed")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.reader is not None:
            return self.reader.get_buffer(sizehint)
        return memoryview(self._hs_buf)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_activity = self._loop.time()
        try:
            if self.reader is not None:
                self.reader.buffer_updated(nbytes)
                self._process()
            else:
                self._negotiate(memoryview(self._hs_buf)[:nbytes])
        except ProtocolError as exc:
            log.warning("client %s: %s; disconnecting it", self.peer, exc)
            self._abort()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        # The client is not taking its replies as fast as we make them: take no new requests until it has
        # taken all of them (the low-water mark is 0 in transmission: resume_writing means empty).
        self._write_paused = True
        self._hold("writing")

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_activity = self._loop.time()
        self._settle_drain()
        self._unhold("writing")
        if self.transport is not None and not self._closing and self._has_work():
            # Requests left in the buffer when writing paused: no new data may come to wake us.
            self._process_safely()

    def _process_safely(self) -> None:
        try:
            self._process()
        except ProtocolError as exc:
            log.warning("client %s: %s; disconnecting it", self.peer, exc)
            self._abort()

    def _has_work(self) -> bool:
        reader = self.reader
        return reader is not None and bool(reader.buffered or self._stash or self._write)

    def _hold(self, reason: str) -> None:
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._holds.add(reason)

    def _unhold(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- lifetime (owned by the server's task group) -----------------------------------------------------

    def _notify(self, what: str) -> None:
        if not self._signal.done():
            self._signal.set_result(what)

    async def _wait_signal(self) -> str:
        what = await self._signal
        self._signal = self._loop.create_future()
        return what

    async def run(self) -> None:
        """Own the connection until it closes: TLS upgrade, slow requests, graceful close."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.reader is not None:
                    # uvloop reads as soon as the connection is made: a whole session (options and
                    # requests) may have arrived before this task started. It waited in the buffer.
                    self._process_safely()
                await self._negotiation_phase()
                if self.reader is not None:
                    while await self._wait_signal() != "closed":
                        pass
        except* ssl.SSLError as group:
            log.warning("client %s: TLS failed: %s", self.peer, group.exceptions[0])
        except* (TimeoutError, ConnectionError, OSError) as group:
            log.info("client %s: %s", self.peer, group.exceptions[0])
        except* Exception as group:
            # A bug must cost one connection, not the server and every other client.
            log.error("client %s: internal error, connection dropped: %r", self.peer, group.exceptions[0])
        finally:
            self._abort()
            self.mem.free()
            if self.export is not None:
                self.export.stats.connections -= 1

    async def _negotiation_phase(self) -> None:
        deadline = self._loop.time() + self.limits.handshake_timeout
        try:
            async with asyncio.timeout_at(deadline):
                while self.reader is None:
                    what = await self._wait_signal()
                    if what == "closed":
                        return
                    if what == "tls":
                        assert self.transport is not None and self.access.tls is not None
                        new = await self._loop.start_tls(
                            self.transport, self, self.access.tls, server_side=True
                        )
                        if new is None:
                            return
                        self.transport = new
                        ssl_object = new.get_extra_info("ssl_object")
                        peercert = ssl_object.getpeercert() if ssl_object is not None else None
                        if not self.access.admits(peercert):
                            # Authenticated by the cluster CA, but not the peer this listener is for.
                            log.warning(
                                "client %s: its certificate does not name an admitted peer", self.peer
                            )
                            return
                        assert self.handshake is not None
                        self.handshake.tls_started()
                        new.resume_reading()
        except TimeoutError:
            raise TimeoutError(f"no negotiation within {self.limits.handshake_timeout:g} s") from None

    def begin_close(self) -> None:
        """Graceful close: take no new requests, finish those in flight, then close."""
        self._closing = True
        if self.transport is None or self.transport.is_closing():
            return
        self._hold("closing")
        # A finished task stays in _slow until its done-callback runs (call_soon): count only live ones.
        if all(task.done() for task in self._slow):
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self._notify("closed")

    # --- negotiation -------------------------------------------------------------------------------------

    def _negotiate(self, data: memoryview) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        hs.receive_data(data)
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if isinstance(event, Negotiated):
                # Switch to transmission before replying, so no request can arrive in between.
                self._start_transmission(event, hs.trailing_data())
                if out:
                    self.transport.write(out)
                self._process()
                return
            if out:
                self.transport.write(out)
            if event is NEED_DATA:
                return
            if isinstance(event, StartTLS):
                self.transport.pause_reading()
                self._notify("tls")
                return
            if isinstance(event, Aborted):
                self.transport.close()
                return

    def _start_transmission(self, event: Negotiated, trailing: bytes) -> None:
        export = self.server.exports.get(event.export.name)
        assert export is not None and self.transport is not None
        self.export = export
        export.stats.connections += 1
        export.stats.connections_total += 1
        flags = event.export.flags
        if not event.structured_replies:
            flags &= ~int(TransmissionFlag.SEND_DF)
        self.rules = SessionRules(
            size=export.device.size,
            export_flags=flags,
            structured=event.structured_replies,
            meta_contexts=event.meta_contexts,
            max_payload=self.limits.max_payload if event.block_size else UNNEGOTIATED_MAX_PAYLOAD,
        )
        self.contexts = sorted(event.meta_contexts.items())
        self.handshake = None
        self._hs_buf = bytearray()
        self.reader = RequestReader(initial=trailing, piece_max=self.limits.connection_memory)
        # Paused as soon as the transport holds a byte it could not send, resumed once it is empty: the
        # moment reply memory can be released (and a client that does not read gets nothing more made).
        # TLS transports pause at "size >= high" (0 would mean always), plain ones at "size > high".
        tls = self.transport.get_extra_info("sslcontext") is not None
        self.transport.set_write_buffer_limits(high=1 if tls else 0, low=0)
        self._last_activity = self._loop.time()
        if self.limits.idle_timeout is not None and not self.unix:
            self._idle_timer = self._loop.call_later(self.limits.idle_timeout, self._check_idle)
        self._notify("transmission")

    # --- idleness ----------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        timeout = self.limits.idle_timeout
        assert timeout is not None
        self._idle_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        idle = self._loop.time() - self._last_activity
        if self._device_waits:
            idle = 0.0  # a request is at the device: the client waits for us, not the other way round
        if idle >= timeout:
            log.info("client %s: idle for %g s; closing it", self.peer, timeout)
            self._abort()
            return
        self._idle_timer = self._loop.call_later(timeout - idle, self._check_idle)

    # --- payload memory ----------------------------------------------------------------------------------

    def _reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of payload memory now, or stop reading until ``_wake`` says to try again."""
        if self.mem.try_reserve(nbytes):
            return True
        self._hold("memory")  # nothing is taken out of the buffer meanwhile: nothing more may come in
        return False

    def _wake_soon(self) -> None:
        # Called from inside another connection's release: look again once that has finished.
        self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        if self.mem.freed:
            return
        self._unhold("memory")
        self._progress.set()
        self._process_safely()

    def _settle_drain(self) -> None:
        """Once the transport has sent everything, the memory of the replies it held is free again."""
        transport = self.transport
        if transport is None or transport.get_write_buffer_size():
            return
        self._progress.set()
        self.mem.drained()
        if self._fast is not None:
            self._fast.reclaim()

    # --- transmission ------------------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete request in the buffer; batch the replies into one write.

        Stops while the transport is paused for writing (the client is not reading its replies), so
        replies cannot pile up in memory; ``resume_writing`` picks up where this stopped. Stops too while
        a request waits for memory or a task has the request stream; they call us again.
        """
        if self._tg is None or self._busy or self.mem.waiting:
            return  # run() has not started yet, or we wait: whoever we wait for calls us again
        if self.transport is None or self.transport.is_closing():
            return  # a call scheduled before the connection ended
        reader = self.reader
        rules = self.rules
        export = self.export
        transport = self.transport
        assert reader is not None and rules is not None and export is not None and transport is not None
        device = export.device
        stats = export.stats
        structured = rules.structured
        out: Out = []
        clock = time.perf_counter_ns
        fast = self._fast
        if fast is None or fast.transport is not transport:
            if fast is not None:
                fast.close()
            fast = self._fast = FastPath(transport, device, self.mem.memory)
        fast.use(device)
        piece_max = self.limits.connection_memory
        pending = 0
        while not self._closing and not self._write_paused:
            if self._write is not None:
                if not self._pump_write(out):
                    break
                continue
            req = self._stash
            if req is not None:
                self._stash = None
            else:
                req = reader.next_request()
                if req is None:
                    break
            flags, command, handle, offset, length, payload = req
            if command == Command.DISC:
                # Replies already made go out first; then finish what is in flight and close.
                if out:
                    transport.writelines(out)
                    out = []
                self.begin_close()
                break
            t0 = clock()
            error = check_request(rules, flags, command, offset, length)
            if error:
                if reader.deciding:
                    reader.skip_payload()
                out += self._error_reply(handle, error, f"request refused ({Errno(error).name})")
                stats.record(command, offset, length, clock() - t0, error)
                continue
            try:
                if command == _READ:
                    if length >= BIG_READ:
                        if length > piece_max:
                            if out:
                                transport.writelines(out)
                                out = []
                            self._stream_read(handle, offset, length, flags, t0)
                            break
                        size = self.limits.piece_size(length)
                        if not self._reserve(size):
                            self._stash = req
                            break
                        self.mem.drain += size
                        if fast.file_fd >= 0:
                            header = (
                                offset_data_header(handle, offset, length)
                                if structured
                                else simple_reply(handle)
                            )
                            if fast.send_read(out, header, offset, length) is not None:
                                self._abort()  # part of a reply may be out: nothing can follow it (logged)
                                return
                            self._settle_drain()
                            stats.record(command, offset, length, clock() - t0, 0)
                            continue
                    data = device.read(offset, length)
                    if isinstance(data, (bytes, bytearray, memoryview)):
                        if structured:
                            out.append(
                                offset_data_header(handle, offset, length)
                                if length
                                else chunk_header(ReplyFlag.DONE, ChunkType.NONE, handle, 0)
                            )
                        else:
                            out.append(simple_reply(handle))
                        if length:
                            out.append(data)
                            if length >= BIG_READ:
                                fast.flush(out)  # the client takes this one while we read the next
                                self._settle_drain()
                            else:
                                pending += length
                                if pending >= _FLUSH_BYTES:
                                    # Hand replies over now: writelines may pause us (pause_writing).
                                    transport.writelines(out)
                                    out.clear()
                                    pending = 0
                        stats.record(command, offset, length, clock() - t0, 0)
                        continue
                    charge = self.limits.piece_size(length) if length >= BIG_READ else 0
                    self.mem.drain -= charge  # the task holds it until its reply is out
                    self._later(handle, command, offset, length, t0, data, charge)
                    continue
                if command == _WRITE:
                    if payload is None:
                        # A long payload, still to come: taken in pieces as it arrives.
                        reader.stream_payload()
                        self._write = StreamedWrite(handle, offset, length, bool(flags & FLAG_FUA), t0)
                        continue
                    result: Any = device.write(offset, payload, bool(flags & FLAG_FUA))
                elif command == Command.FLUSH:
                    result = device.flush()
                elif command == Command.TRIM:
                    result = device.trim(offset, length, bool(flags & CommandFlag.FUA))
                elif command == Command.WRITE_ZEROES:
                    result = device.write_zeroes(
                        offset,
                        length,
                        may_trim=not flags & CommandFlag.NO_HOLE,
                        fast_only=bool(flags & CommandFlag.FAST_ZERO),
                        fua=bool(flags & CommandFlag.FUA),
                    )
                elif command == Command.CACHE:
                    result = device.cache(offset, length)
                elif command == Command.BLOCK_STATUS:
                    result = self._block_status(device, handle, offset, length, flags)
                else:  # pragma: no cover - check_request refuses everything else
                    result = None
            except Exception as exc:
                error = self._device_error(exc, command)
                out += self._error_reply(handle, error, str(exc))
                stats.record(command, offset, length, clock() - t0, error)
                continue
            if result is None:
                out.append(simple_reply(handle))
                stats.record(command, offset, length, clock() - t0, 0)
            elif isinstance(result, list):
                out += result
                stats.record(command, offset, length, clock() - t0, 0)
            else:
                self._later(handle, command, offset, length, t0, result)
        if out:
            transport.writelines(out)
        self._settle_drain()
        fast.settle()

    # --- replies -----------------------------------------------------------------------------------------

    def _send(self, out: Out) -> None:
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)
            self._settle_drain()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._slow.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._slow.discard(task)
        transport = self.transport
        closable = self._closing and transport is not None and not transport.is_closing()
        if closable and all(t.done() for t in self._slow):
            assert transport is not None
            transport.close()

    def _device_error(self, exc: Exception, command: int) -> int:
        error = nbd_errno(exc)
        if not isinstance(exc, OSError):
            log.error(
                "export %s: internal error in %s: %r",
                self.export.name if self.export else "?",
                Command(command).name,
                exc,
            )
        return error

    def _error_reply(self, handle: int, error: int, message: str) -> Out:
        return list(error_reply(handle, error, message, bool(self.rules and self.rules.structured)))

    def _block_status(
        self, device: BlockDevice, handle: int, offset: int, length: int, flags: int
    ) -> Out | Awaitable[Out]:
        assert self.export is not None
        stats = self.export.stats
        results: list[tuple[int, list[tuple[int, int]] | Awaitable[list[tuple[int, int]]]]] = [
            (
                cid,
                stats.heat_extents(offset, length)
                if name == HIKKOSHI_HEAT
                else device.extents(name, offset, length),
            )
            for cid, name in self.contexts
        ]
        if all(isinstance(r, list) for _, r in results):
            return list(block_status_reply(handle, length, flags, results))  # type: ignore[arg-type]

        async def gather() -> Out:
            done = [(cid, r if isinstance(r, list) else await r) for cid, r in results]
            return list(block_status_reply(handle, length, flags, done))

        return gather()

    def _later(
        self, handle: int, command: int, offset: int, length: int, t0: int, pending: Any, charge: int = 0
    ) -> None:
        """Answer a request once its result is ready; ``charge``: reply memory the task holds till then."""
        self._spawn(self._finish(handle, command, offset, length, t0, pending, charge))

    async def _finish(
        self, handle: int, command: int, offset: int, length: int, t0: int, pending: Any, charge: int
    ) -> None:
        """Await one slow request and send its reply."""
        assert self.export is not None and self.rules is not None
        out: Out
        self._device_waits += 1
        try:
            result = await pending
        except Exception as exc:
            error = self._device_error(exc, command)
            out = self._error_reply(handle, error, str(exc))
        else:
            error = 0
            if command == _READ:
                if self.rules.structured:
                    out = [offset_data_header(handle, offset, length), result]
                else:
                    out = [simple_reply(handle), result]
            elif isinstance(result, list):
                out = result
            else:
                out = [simple_reply(handle)]
        finally:
            self._device_waits -= 1
        self.export.stats.record(command, offset, length, time.perf_counter_ns() - t0, error)
        self.mem.drain += charge  # the reply's memory is the transport's now
        self._send(out)
        self._settle_drain()
