"""An asyncio NBD client: pipelined, replies matched by handle, structured replies, block status, TLS,
reconnect with backoff.

Use as ``async with NbdClient("nbd://host:port/export") as c: data = await c.read(0, 4096)``. Any number of
tasks may issue requests at once; they are pipelined on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hikkoshi.nbd.client_handshake import ClientHandshake, ClientOptions, ExportList, Negotiated
from hikkoshi.nbd.client_transmission import ClientTransmission, Reply
from hikkoshi.nbd.constants import BASE_ALLOCATION, Command, CommandFlag, Errno, TransmissionFlag
from hikkoshi.nbd.errors import CommandError, ProtocolError
from hikkoshi.nbd.export_info import ExportInfo
from hikkoshi.nbd.server_handshake import NEED_DATA, StartTLS
from hikkoshi.nbd.uri import NbdUri
from hikkoshi.nbd.wire import ServerEntry

log = logging.getLogger("hikkoshi.nbd.client")


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How to recover from a lost connection."""

    initial_delay: float = 0.05
    max_delay: float = 5.0
    #: A request that needs the server waits at most this long for a connection, then fails with EIO;
    #: ``None``: it waits as long as it takes (a disk past a migration's commit point has nowhere else
    #: to go, and a guest waiting on one request beats a guest paused on an error).
    deadline: float | None = 30.0


class _Lost(Exception):
    """The connection carrying a request went away before its reply."""


class _Connection(asyncio.BufferedProtocol):
    """One negotiated connection in the transmission phase.

    A buffered protocol: the transport receives straight into the buffer the reply parser names, which
    for a large read is the read's own result buffer (no copies in Python).
    """

    def __init__(self, client: NbdClient, machine: ClientTransmission, transport: asyncio.Transport) -> None:
        self.client = client
        self.machine = machine
        self.transport = transport
        self.futures: dict[int, asyncio.Future[Reply]] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False
        self.writer: asyncio.StreamWriter | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.machine.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.machine.buffer_updated(nbytes)
            while (reply := self.machine.next_reply()) is not None:
                fut = self.futures.pop(reply.handle, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except ProtocolError as exc:
            log.warning("server %s broke the protocol: %s", self.client.uri, exc)
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(_Lost())
        self.futures.clear()
        self.client._connection_lost(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class NbdClient:
    """A client of one export."""

    def __init__(
        self,
        uri: NbdUri | str,
        *,
        tls: ssl.SSLContext | None = None,
        meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
        reconnect: Reconnect | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        self.uri = NbdUri.parse(uri) if isinstance(uri, str) else uri
        if self.uri.tls and tls is None:
            tls = ssl.create_default_context()
        self.tls = tls
        self.meta_contexts = tuple(meta_contexts)
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        self.info: ExportInfo | None = None
        self.structured = False
        self.contexts: dict[str, int] = {}
        self.reconnects = 0
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._closed = False
        self._tg: asyncio.TaskGroup | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._write_gen = 0
        self._flushed_gen = 0
        self._in_doubt = False

    # --- lifetime ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> NbdClient:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        try:
            await self._open()
        except BaseException:
            # No task runs yet; leaving the group cleanly lets the caller see the error itself,
            # not wrapped in an exception group.
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
        assert self._tg is not None
        # close() cancelled the reconnector, the group's only task; the caller's own exception (if any)
        # propagates unwrapped.
        await self._tg.__aexit__(None, None, None)

    async def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) and stop reconnecting."""
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
        conn = self._conn
        if conn is not None and not conn.lost:
            _, data = conn.machine.request(Command.DISC, 0, 0)
            conn.machine.pending.clear()
            conn.transport.write(data)
            conn.transport.close()
        self._connected.set()  # wake waiters so they see we are closed

    # --- connecting --------------------------------------------------------------------------------------

    async def _open(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            conn = await self._negotiate()
        self._conn = conn
        self._connected.set()

    async def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.uri.socket is not None:
            return await asyncio.open_unix_connection(str(self.uri.socket))
        return await asyncio.open_connection(self.uri.host, self.uri.port)

    async def _negotiate(self) -> _Connection:
        reader, writer = await self._streams()
        try:
            hs = ClientHandshake(
                ClientOptions(
                    export=self.uri.export, tls=self.tls is not None, meta_contexts=self.meta_contexts
                )
            )
            while True:
                event = hs.next_event()
                if out := hs.data_to_send():
                    writer.write(out)
                if event is NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError(f"{self.uri}: server closed the connection during negotiation")
                    hs.receive_data(data)
                elif isinstance(event, StartTLS):
                    assert self.tls is not None
                    await writer.drain()
                    await writer.start_tls(self.tls, server_hostname=self.uri.server_name)
                    hs.tls_started()
                elif isinstance(event, Negotiated):
                    break
                elif isinstance(event, ExportList):  # pragma: no cover - not requested here
                    raise ProtocolError("unexpected export list")
            self.info = event.export
            self.structured = event.structured
            self.contexts = {name: cid for cid, name in event.meta_contexts.items()}
            transport = writer.transport
            conn = _Connection(self, ClientTransmission(event.structured), transport)  # type: ignore[arg-type]
            # The stream writer closes its transport when collected: keep it alive with the connection.
            conn.writer = writer
            transport.set_protocol(conn)
            return conn
        except BaseException:
            writer.transport.abort()
            raise

    def _connection_lost(self, conn: _Connection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._connected.clear()
        if self._write_gen > self._flushed_gen:
            # Writes were acknowledged but not flushed: if the server died they may be gone.
            self._in_doubt = True
        if self._closed:
            self._connected.set()
            return
        if self.reconnect is not None and self._tg is not None and self._reconnector is None:
            self._reconnector = self._tg.create_task(self._reconnect_loop(self.reconnect))
        elif self.reconnect is None:
            self._connected.set()  # waiters wake and fail

    async def _reconnect_loop(self, policy: Reconnect) -> None:
        delay = policy.initial_delay
        # Back off, but never so long that a waiting request times out while the server is back.
        max_delay = (
            policy.max_delay if policy.deadline is None else min(policy.max_delay, policy.deadline / 4)
        )
        try:
            while not self._closed:
                try:
                    await self._open()
                except (OSError, TimeoutError, ProtocolError) as exc:
                    log.info("reconnect to %s failed: %s; next try in %.2fs", self.uri, exc, delay)
                    self._wake.clear()
                    # A request that needs the server cuts the back-off short (but not below the first delay).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await asyncio.sleep(policy.initial_delay)
                            await self._wake.wait()
                    delay = min(delay * 2, max_delay)
                else:
                    self.reconnects += 1
                    log.info("reconnected to %s", self.uri)
                    return
        finally:
            self._reconnector = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.lost:
            return self._conn
        if self._closed:
            raise ConnectionError(f"{self.uri}: client is closed")
        if self.reconnect is None:
            raise ConnectionError(f"{self.uri}: connection lost")
        self._wake.set()
        try:
            async with asyncio.timeout(self.reconnect.deadline):
                while self._conn is None or self._conn.lost:
                    if self._closed:
                        raise ConnectionError(f"{self.uri}: client is closed")
                    await self._connected.wait()
        except TimeoutError:
            raise CommandError(Errno.EIO, f"{self.uri} unreachable for {self.reconnect.deadline}s") from None
        return self._conn

    # --- requests ----------------------------------------------------------------------------------------

    async def _submit(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int = 0,
        data: bytes | None = None,
        into: bytearray | None = None,
    ) -> Reply:
        while True:
            conn = await self._connection()
            if not conn.writable.is_set():
                await conn.writable.wait()
                if conn.lost:
                    continue
            handle, wire_bytes = conn.machine.request(command, offset, length, flags, data, into)
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            conn.futures[handle] = fut
            conn.transport.write(wire_bytes)
            try:
                reply = await fut
            except _Lost:
                if self.reconnect is None or self._closed:
                    raise ConnectionError(f"{self.uri}: connection lost") from None
                continue  # resend on the next connection
            if reply.error:
                raise CommandError(reply.error, reply.message)
            return reply

    def _flag(self, flag: TransmissionFlag) -> bool:
        return self.info is not None and bool(self.info.flags & flag)

    @property
    def size(self) -> int:
        assert self.info is not None
        return self.info.size

    @property
    def read_only(self) -> bool:
        return self._flag(TransmissionFlag.READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(TransmissionFlag.CAN_MULTI_CONN)

    @property
    def max_request(self) -> int:
        return self.info.max_block if self.info else 32 << 20

    async def read(self, offset: int, length: int) -> bytes:
        """Read a range; ranges larger than the server's maximum are split and pipelined."""
        return bytes(await self.read_buffer(offset, length))

    async def read_buffer(self, offset: int, length: int) -> bytearray:
        """Like :meth:`read`, returning the receive buffer itself (one copy fewer, for bulk movers)."""
        step = self.max_request
        if length <= step:
            reply = await self._submit(Command.READ, offset, length)
            assert reply.data is not None
            return reply.data
        parts = await asyncio.gather(
            *(self.read_buffer(offset + pos, min(step, length - pos)) for pos in range(0, length, step))
        )
        return bytearray().join(parts)

    async def read_into(self, offset: int, buffer: bytearray) -> bytearray:
        """Read ``len(buffer)`` bytes at ``offset`` into ``buffer`` (at most :attr:`max_request`); return it.

        The buffer's contents are undefined if the read fails; on success every byte was received.
        """
        if len(buffer) > self.max_request:
            raise ValueError(f"a read into a buffer of {len(buffer)} bytes exceeds the server's maximum")
        reply = await self._submit(Command.READ, offset, len(buffer), into=buffer)
        assert reply.data is buffer
        return buffer

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write a range (split when larger than the server's maximum)."""
        step = self.max_request
        if len(data) > step:
            await asyncio.gather(
                *(self.write(offset + p, data[p : p + step], fua) for p in range(0, len(data), step))
            )
            return
        await self._submit(Command.WRITE, offset, len(data), CommandFlag.FUA if fua else 0, bytes(data))
        self._write_gen += 1

    async def flush(self) -> None:
        """Make every acknowledged write durable.

        Fails with EIO if a connection was lost while acknowledged writes were not yet flushed: a new
        connection cannot vouch for them.
        """
        gen = self._write_gen
        if self._in_doubt:
            self._in_doubt = False
            raise CommandError(Errno.EIO, "connection was lost with unflushed writes; they may be lost")
        await self._submit(Command.FLUSH, 0, 0)
        if self._in_doubt:
            self._in_doubt = False
            raise CommandError(Errno.EIO, "connection was lost with unflushed writes; they may be lost")
        self._flushed_gen = max(self._flushed_gen, gen)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._submit(Command.TRIM, offset, length, CommandFlag.FUA if fua else 0)
        self._write_gen += 1

    async def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        flags = (CommandFlag.NO_HOLE if no_hole else 0) | (CommandFlag.FAST_ZERO if fast else 0)
        flags |= CommandFlag.FUA if fua else 0
        await self._submit(Command.WRITE_ZEROES, offset, length, flags)
        self._write_gen += 1

    async def cache(self, offset: int, length: int) -> None:
        await self._submit(Command.CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, context: str = BASE_ALLOCATION, req_one: bool = False
    ) -> list[tuple[int, int]]:
        """Extents (length, flags) of one meta context from ``offset``; may cover less or more than asked."""
        cid = self.contexts.get(context)
        if cid is None:
            raise CommandError(Errno.EINVAL, f"meta context {context!r} was not negotiated")
        reply = await self._submit(
            Command.BLOCK_STATUS, offset, length, CommandFlag.REQ_ONE if req_one else 0
        )
        extents = (reply.extents or {}).get(cid)
        if not extents:
            raise ProtocolError(f"block status reply without context {context!r}")
        return extents


async def list_exports(uri: NbdUri | str, tls: ssl.SSLContext | None = None) -> list[ServerEntry]:
    """The exports a server offers (NBD_OPT_LIST)."""
    target = NbdUri.parse(uri) if isinstance(uri, str) else uri
    client = NbdClient(target, tls=tls)
    reader, writer = await client._streams()
    try:
        hs = ClientHandshake(ClientOptions(tls=client.tls is not None, list_exports=True))
        while True:
            event = hs.next_event()
            if out := hs.data_to_send():
                writer.write(out)
            if isinstance(event, ExportList):
                await writer.drain()
                return list(event.exports)
            if isinstance(event, StartTLS):
                assert client.tls is not None
                await writer.drain()
                await writer.start_tls(client.tls, server_hostname=target.server_name)
                hs.tls_started()
                continue
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection during negotiation")
            hs.receive_data(data)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
