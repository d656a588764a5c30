"""The NBD server: a thin asyncio shell around the sans-I/O handshake and request reader.

One ``BufferedProtocol`` per connection receives straight into the request reader's buffer. Requests a
device answers at once (page-cache reads and writes) are handled inside the data callback and their
replies leave in one ``writelines`` per batch: no task per request. Requests whose answer must be
awaited (flush, later: fetches from an upstream) run as tasks owned by the connection's task group.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import ssl
import stat
import time
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hikkoshi.nbd.address import parse_address
from hikkoshi.nbd.constants import (
    HIKKOSHI_HEAT,
    MAX_PAYLOAD,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from hikkoshi.nbd.device import BlockDevice, Capabilities
from hikkoshi.nbd.errors import ProtocolError
from hikkoshi.nbd.export_info import ExportInfo
from hikkoshi.nbd.fastpath import BIG_READ, FastPath
from hikkoshi.nbd.server_handshake import NEED_DATA, Aborted, Negotiated, ServerHandshake, StartTLS, TLSMode
from hikkoshi.nbd.server_transmission import (
    FLAG_FUA,
    RequestReader,
    SessionRules,
    check_request,
    chunk_header,
    offset_data_header,
    simple_reply,
)
from hikkoshi.nbd.stats import ExportStats
from hikkoshi.nbd.wire import ERROR_HEAD, EXTENT, U32

log = logging.getLogger("hikkoshi.nbd.server")

_HANDSHAKE_BUFFER = 64 * 1024
#: Batched small replies go out once they add up to this much.
_FLUSH_BYTES = 1 << 20
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


def export_flags(caps: Capabilities) -> int:
    """Transmission flags advertising exactly what a device can do."""
    f = TransmissionFlag
    flags = f.HAS_FLAGS | f.SEND_FLUSH | f.SEND_DF
    if caps.read_only:
        flags |= f.READ_ONLY
    else:
        flags |= f.SEND_FUA if caps.fua else 0
        flags |= f.SEND_TRIM if caps.trim else 0
        flags |= f.SEND_WRITE_ZEROES if caps.write_zeroes else 0
        flags |= f.SEND_FAST_ZERO if caps.write_zeroes and caps.fast_zero else 0
    flags |= f.SEND_CACHE if caps.cache else 0
    flags |= f.CAN_MULTI_CONN if caps.multi_conn else 0
    flags |= f.ROTATIONAL if caps.rotational else 0
    return int(flags)


@dataclass(eq=False)
class Export:
    """One named export: a device, its statistics, and its connections."""

    name: str
    device: BlockDevice
    description: str = ""
    stats: ExportStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ExportStats(self.device.size)

    def info(self) -> ExportInfo:
        return ExportInfo(
            name=self.name,
            size=self.device.size,
            flags=export_flags(self.device.capabilities),
            description=self.description,
            max_block=MAX_PAYLOAD,
            meta_contexts=(*self.device.meta_contexts, HIKKOSHI_HEAT),
        )


class ExportTable:
    """The exports of one server; the first added is also the default (empty name)."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"duplicate export name {export.name!r}")
        self._exports[export.name] = export

    def get(self, name: str) -> Export | None:
        if name == "" and "" not in self._exports and self._exports:
            return next(iter(self._exports.values()))
        return self._exports.get(name)

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        return None if export is None else export.info()

    def exports(self) -> Iterable[ExportInfo]:
        return [e.info() for e in self._exports.values()]

    def __iter__(self) -> Iterator[Export]:
        return iter(self._exports.values())


@dataclass(frozen=True)
class ListenAddress:
    """A TCP host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 10809
    unix: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``HOST:PORT``, ``[V6]:PORT``, ``PORT`` or ``unix:PATH``."""
        try:
            host, port, unix = parse_address(text)
        except ValueError as exc:
            raise ValueError(f"bad listen address: {exc}") from None
        return cls(unix=Path(unix)) if unix is not None else cls(host=host, port=port)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: negotiation, then requests."""

    #: Reused buffers for large reads of a plain file, made by ``_process`` for each transport.
    _fast: FastPath | None = None

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.handshake: ServerHandshake | None = ServerHandshake(
            server.exports, TLSMode.REQUIRED if server.tls else TLSMode.NONE
        )
        self._hs_buf = bytearray(_HANDSHAKE_BUFFER)
        self.reader: RequestReader | None = None
        self.export: Export | None = None
        self.rules: SessionRules | None = None
        self.contexts: list[tuple[int, str]] = []
        self._signal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tg: asyncio.TaskGroup | None = None
        self._slow: set[asyncio.Task[None]] = set()
        self._closing = False
        self._write_paused = False

    # --- asyncio protocol callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        if self.server.adopt(self) and self.handshake is not None:
            self.transport.write(self.handshake.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fast is not None:
            self._fast.close()  # its copy of the socket's descriptor would keep the connection open
        self._notify("closed")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.reader is not None:
            return self.reader.get_buffer(sizehint)
        return memoryview(self._hs_buf)

    def buffer_updated(self, nbytes: int) -> None:
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
        # The client is not reading its replies: stop taking new requests until it does.
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()
            if self.reader is not None and self.reader.buffered:
                # Requests left in the buffer when writing paused: no new data may come to wake us.
                self._process_safely()

    def _process_safely(self) -> None:
        try:
            self._process()
        except ProtocolError as exc:
            log.warning("client %s: %s; disconnecting it", self.peer, exc)
            self._abort()

    # --- lifetime (owned by the server's task group) -----------------------------------------------------

    def _notify(self, what: str) -> None:
        if not self._signal.done():
            self._signal.set_result(what)

    async def _wait_signal(self) -> str:
        what = await self._signal
        self._signal = asyncio.get_running_loop().create_future()
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
            if self.export is not None:
                self.export.stats.connections -= 1

    async def _negotiation_phase(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.server.handshake_timeout
        async with asyncio.timeout_at(deadline):
            while self.reader is None:
                what = await self._wait_signal()
                if what == "closed":
                    return
                if what == "tls":
                    assert self.transport is not None and self.server.tls is not None
                    new = await loop.start_tls(self.transport, self, self.server.tls, server_side=True)
                    if new is None:
                        return
                    self.transport = new
                    assert self.handshake is not None
                    self.handshake.tls_started()
                    new.resume_reading()

    def begin_close(self) -> None:
        """Graceful close: take no new requests, finish those in flight, then close."""
        self._closing = True
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.pause_reading()
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
        assert export is not None
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
        )
        self.contexts = sorted(event.meta_contexts.items())
        self.handshake = None
        self._hs_buf = bytearray()
        self.reader = RequestReader(initial=trailing)
        self._notify("transmission")

    # --- transmission ------------------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle every complete request in the buffer; batch the replies into one write.

        Stops while the transport is paused for writing (the client is not reading its replies), so
        replies cannot pile up in memory; ``resume_writing`` picks up where this stopped.
        """
        if self._tg is None:
            return  # run() has not started yet: it calls us once it owns the connection
        reader = self.reader
        rules = self.rules
        export = self.export
        transport = self.transport
        assert reader is not None and rules is not None and export is not None and transport is not None
        device = export.device
        stats = export.stats
        structured = rules.structured
        out: list[bytes | bytearray | memoryview] = []
        clock = time.perf_counter_ns
        fast = self._fast
        if fast is None or fast.transport is not transport:
            if fast is not None:
                fast.close()
            fast = self._fast = FastPath(transport, device)
        fast.use(device)
        pending = 0
        while not self._closing and not self._write_paused:
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
                out += self._error_reply(handle, error, f"request refused ({Errno(error).name})")
                stats.record(command, offset, length, clock() - t0, error)
                continue
            try:
                if command == Command.READ:
                    if length >= BIG_READ and fast.file_fd >= 0:
                        header = (
                            offset_data_header(handle, offset, length) if structured else simple_reply(handle)
                        )
                        if fast.send_read(out, header, offset, length) is not None:
                            self._abort()  # part of a reply may be out: nothing can follow it (logged)
                            return
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
                            else:
                                pending += length
                                if pending >= _FLUSH_BYTES:
                                    # Hand replies over now: writelines may pause us (pause_writing).
                                    transport.writelines(out)
                                    out.clear()
                                    pending = 0
                        stats.record(command, offset, length, clock() - t0, 0)
                        continue
                    self._later(handle, command, offset, length, t0, data)
                    continue
                if command == Command.WRITE:
                    assert payload is not None
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
        fast.settle()

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

    def _error_reply(self, handle: int, error: int, message: str) -> list[bytes | bytearray | memoryview]:
        if not self.rules or not self.rules.structured:
            return [simple_reply(handle, error)]
        msg = message.encode()[:4096]
        body = ERROR_HEAD.pack(error, len(msg)) + msg
        return [chunk_header(ReplyFlag.DONE, ChunkType.ERROR, handle, len(body)), body]

    def _block_status(
        self, device: BlockDevice, handle: int, offset: int, length: int, flags: int
    ) -> list[bytes | bytearray | memoryview] | Awaitable[list[bytes | bytearray | memoryview]]:
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
            return self._encode_status(handle, length, flags, results)  # type: ignore[arg-type]

        async def gather() -> list[bytes | bytearray | memoryview]:
            done = [(cid, r if isinstance(r, list) else await r) for cid, r in results]
            return self._encode_status(handle, length, flags, done)

        return gather()

    @staticmethod
    def _encode_status(
        handle: int, length: int, flags: int, results: list[tuple[int, list[tuple[int, int]]]]
    ) -> list[bytes | bytearray | memoryview]:
        out: list[bytes | bytearray | memoryview] = []
        for i, (cid, extents) in enumerate(results):
            if not extents:
                extents = [(length, 0)]
            if flags & CommandFlag.REQ_ONE:
                extents = [(min(extents[0][0], length), extents[0][1])]
            body = U32.pack(cid) + b"".join(EXTENT.pack(n, f) for n, f in extents)
            done = ReplyFlag.DONE if i == len(results) - 1 else 0
            out += [chunk_header(done, ChunkType.BLOCK_STATUS, handle, len(body)), body]
        return out

    def _later(self, handle: int, command: int, offset: int, length: int, t0: int, pending: Any) -> None:
        assert self._tg is not None
        task = self._tg.create_task(self._finish(handle, command, offset, length, t0, pending))
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    async def _finish(
        self, handle: int, command: int, offset: int, length: int, t0: int, pending: Any
    ) -> None:
        """Await one slow request and send its reply."""
        assert self.export is not None and self.rules is not None
        out: list[bytes | bytearray | memoryview]
        try:
            result = await pending
        except Exception as exc:
            error = self._device_error(exc, command)
            out = self._error_reply(handle, error, str(exc))
        else:
            error = 0
            if command == Command.READ:
                if self.rules.structured:
                    out = [offset_data_header(handle, offset, length), result]
                else:
                    out = [simple_reply(handle), result]
            elif isinstance(result, list):
                out = result
            else:
                out = [simple_reply(handle)]
        self.export.stats.record(command, offset, length, time.perf_counter_ns() - t0, error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)
            current = asyncio.current_task()
            if self._closing and all(t.done() or t is current for t in self._slow):
                self.transport.close()


class NbdServer:
    """Serves exports on one or more addresses until stopped."""

    def __init__(
        self,
        exports: ExportTable,
        listen: list[ListenAddress],
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 30.0,
        max_connections: int = 1024,
    ) -> None:
        self.exports = exports
        self.listen = listen
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.bound: list[str] = []
        self._listeners: list[tuple[ListenAddress, asyncio.Server, list[str]]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._drained = asyncio.Event()
        self.ready = asyncio.Event()

    def adopt(self, conn: _Connection) -> bool:
        """Give a new connection an owner task, or refuse it if we are full or stopping."""
        if self._tg is None or self._stop.is_set() or len(self.connections) >= self.max_connections:
            log.warning("refusing connection from %s (server full or stopping)", conn.peer)
            if conn.transport is not None:
                conn.transport.abort()
            return False
        self.connections.add(conn)
        task = self._tg.create_task(conn.run())
        task.add_done_callback(lambda _t: self._forget(conn))
        return True

    def _forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        self._drained.set()

    def stop(self) -> None:
        """Ask serve() to finish: stop accepting, let requests in flight complete, flush, return."""
        self._stop.set()

    async def serve(self, drain_timeout: float = 10.0) -> None:
        """Listen, serve until stop(), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for addr in self.listen:
                    await self._bind(loop, addr)
                self.ready.set()
                await self._stop.wait()
                for _addr, listener, _names in self._listeners:
                    listener.close()
                for conn in list(self.connections):
                    conn.begin_close()
                try:
                    async with asyncio.timeout(drain_timeout):
                        while self.connections:
                            await self._drained.wait()
                            self._drained.clear()
                except TimeoutError:
                    log.warning("%d connections did not finish in time; closing them", len(self.connections))
                    for conn in list(self.connections):
                        conn._abort()
        finally:
            for addr, listener, _names in self._listeners:
                listener.close()
                if addr.unix is not None:
                    addr.unix.unlink(missing_ok=True)
            self._listeners.clear()
            await self._flush_all()

    async def add_listener(self, addr: ListenAddress) -> list[str]:
        """Listen on one more address while serving (a migration opens the disks to a peer); bound names."""
        if self._tg is None or self._stop.is_set():
            raise OSError(errno.ESHUTDOWN, "the server is not serving")
        return await self._bind(asyncio.get_running_loop(), addr)

    def remove_listener(self, name: str) -> bool:
        """Stop listening on a bound address (as listed in ``bound``); connections made through it stay."""
        for entry in self._listeners:
            addr, listener, names = entry
            if name in names:
                listener.close()
                if addr.unix is not None:
                    addr.unix.unlink(missing_ok=True)
                self._listeners.remove(entry)
                self.bound = [b for b in self.bound if b not in names]
                return True
        return False

    async def _flush_all(self) -> None:
        for export in self.exports:
            if export.device.capabilities.read_only:
                continue
            try:
                await export.device.flush()
            except OSError as exc:
                log.error("export %s: final flush failed: %s", export.name, exc)

    async def _bind(self, loop: asyncio.AbstractEventLoop, addr: ListenAddress) -> list[str]:
        if addr.unix is not None:
            _remove_stale_socket(addr.unix)
            server = await loop.create_unix_server(lambda: _Connection(self), path=str(addr.unix))
            names = [f"unix:{addr.unix}"]
        else:
            server = await loop.create_server(
                lambda: _Connection(self), host=addr.host, port=addr.port, reuse_address=True
            )
            names = []
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self._listeners.append((addr, server, names))
        self.bound += names
        return names


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket left by a dead server; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    import socket

    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
    else:
        raise FileExistsError(f"{path}: another server is listening there")
    finally:
        probe.close()
