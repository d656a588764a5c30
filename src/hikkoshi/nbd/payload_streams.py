"""Payloads longer than a connection's memory, in pieces: a WRITE's received and written piece by piece,
a READ's reply read and sent piece by piece as the client takes the previous one.

A mixin of :class:`~hikkoshi.nbd.connection.ServerConnection`, which owns the state named below and the
helpers these methods call; while a streamed payload is under way it has the connection's request stream
(no other request is taken before it is over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from hikkoshi.nbd.constants import Command, CommandFlag
from hikkoshi.nbd.exports import Export
from hikkoshi.nbd.fastpath import FastPath
from hikkoshi.nbd.limits import ServerLimits
from hikkoshi.nbd.memory import ConnectionMemory
from hikkoshi.nbd.request_reader import RequestReader
from hikkoshi.nbd.server_transmission import SessionRules, read_reply_pieces, simple_reply

log = logging.getLogger("hikkoshi.nbd.server")

Out = list[bytes | bytearray | memoryview]
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DF = int(CommandFlag.DF)


@dataclass(slots=True)
class StreamedWrite:
    """A WRITE whose payload is being received in pieces."""

    handle: int
    offset: int
    length: int
    fua: bool
    t0: int
    done: int = 0  # payload bytes written to the device
    piece: int = 0  # bytes reserved for the piece buffer


class PayloadStreams:
    """Streamed WRITE payloads and READ replies, for a connection that provides what is declared here."""

    # Owned by the connection.
    limits: ServerLimits
    mem: ConnectionMemory
    peer: str
    transport: asyncio.Transport | None
    reader: RequestReader | None
    export: Export | None
    rules: SessionRules | None
    _fast: FastPath | None
    _loop: asyncio.AbstractEventLoop
    _write: StreamedWrite | None
    _busy: bool
    _device_waits: int
    _progress: asyncio.Event

    # Helpers of the connection.
    def _hold(self, reason: str) -> None:
        raise NotImplementedError

    def _unhold(self, reason: str) -> None:
        raise NotImplementedError

    def _reserve(self, nbytes: int) -> bool:
        raise NotImplementedError

    def _settle_drain(self) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    def _send(self, out: Out) -> None:
        raise NotImplementedError

    def _error_reply(self, handle: int, error: int, message: str) -> Out:
        raise NotImplementedError

    def _device_error(self, exc: Exception, command: int) -> int:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _process_safely(self) -> None:
        raise NotImplementedError

    # --- a WRITE payload streamed in pieces --------------------------------------------------------------

    def _pump_write(self, out: Out) -> bool:
        """Write the streamed payload's pieces that are complete; True once the WRITE is answered."""
        w = self._write
        reader = self.reader
        assert w is not None and reader is not None and self.export is not None
        device = self.export.device
        while True:
            view = reader.next_piece()
            if view is None:
                want = reader.piece_wanted()
                if not want:
                    return False  # the next bytes are not here yet
                size = self.limits.piece_size(want)
                # A longer buffer replaces an outgrown one (whose bytes it takes over): only the difference
                # is new memory.
                if not self._reserve(size - w.piece):
                    return False
                old = reader.attach_piece(self.mem.memory.take(size))
                if old is not None:
                    self.mem.memory.give(old)
                w.piece = size
                continue
            n = len(view)
            try:
                # The view is valid until the next bytes arrive (the piece buffer is reused): a device that
                # finishes later copies it first (BlockDevice.write).
                result = device.write(w.offset + w.done, view, w.fua)
            except Exception as exc:
                out += self._end_write(self._device_error(exc, _WRITE), str(exc))
                return True
            w.done += n
            if result is not None:
                # The device finishes later (it has copied the piece): take no more of the payload until it
                # has, so one connection never has more than one piece at a device.
                self._busy = True
                self._hold("device")
                self._spawn(self._await_piece(result))
                return False
            if w.done == w.length:
                out += self._end_write(0, "")
                return True

    async def _await_piece(self, result: Awaitable[None]) -> None:
        w = self._write
        assert w is not None
        reply: Out = []
        self._device_waits += 1
        try:
            await result
        except Exception as exc:
            reply = self._end_write(self._device_error(exc, _WRITE), str(exc))
        else:
            if w.done == w.length:
                reply = self._end_write(0, "")
        finally:
            self._device_waits -= 1
            self._busy = False
            self._unhold("device")
        self._send(reply)
        self._loop.call_soon(self._process_safely)

    def _end_write(self, error: int, message: str) -> Out:
        """The streamed WRITE is over: give back its piece, discard what is still to come; its reply."""
        w = self._write
        reader = self.reader
        assert w is not None and reader is not None and self.export is not None
        self._write = None
        if reader.streaming:
            reader.skip_rest()
        piece = reader.detach_piece()
        self.mem.release(w.piece)
        if piece is not None:
            self.mem.memory.give(piece)
        self.export.stats.record(_WRITE, w.offset, w.length, time.perf_counter_ns() - w.t0, error)
        return self._error_reply(w.handle, error, message) if error else [simple_reply(w.handle)]

    # --- a READ reply streamed in pieces -----------------------------------------------------------------

    def _stream_read(self, handle: int, offset: int, length: int, flags: int, t0: int) -> None:
        """Answer a READ longer than the connection's memory, piece by piece, in a task that has the
        request stream until the reply is out."""
        self._busy = True
        self._hold("stream")
        self._spawn(self._stream_read_task(handle, offset, length, flags, t0))

    async def _stream_read_task(self, handle: int, offset: int, length: int, flags: int, t0: int) -> None:
        assert self.rules is not None and self.export is not None
        export = self.export
        structured = self.rules.structured
        error = 0
        try:
            pieces = read_reply_pieces(
                handle, offset, length, structured, bool(flags & _DF), self.limits.connection_memory
            )
            for header, start, n in pieces:
                continued = not header  # the data continues a header already sent: no error reply possible
                size = self.limits.piece_size(n)
                while not self.mem.try_reserve(size):
                    if self.transport is None or self.transport.is_closing():
                        return
                    self._progress.clear()
                    await self._progress.wait()
                self.mem.drain += size
                try:
                    if not await self._send_piece(header, start, n):
                        return  # the connection broke off part-way
                except Exception as exc:
                    error = self._device_error(exc, _READ)
                    if continued:
                        log.error("client %s: a read failed part-way through its reply (%s)", self.peer, exc)
                        self._abort()
                        return
                    self._send(self._error_reply(handle, error, str(exc)))
                    return
                self._settle_drain()
                while self.transport is not None and self.transport.get_write_buffer_size():
                    # The client has not taken this piece yet: the next one waits for it.
                    if self.transport.is_closing():
                        return
                    self._progress.clear()
                    await self._progress.wait()
        finally:
            export.stats.record(_READ, offset, length, time.perf_counter_ns() - t0, error)
            self._busy = False
            self._unhold("stream")
            self._loop.call_soon(self._process_safely)

    async def _send_piece(self, header: bytes, offset: int, length: int) -> bool:
        """Send ``header`` and the export's bytes at [offset, offset+length); False if the connection broke
        off part-way. Raises if the bytes cannot be read, before anything of this piece went out."""
        assert self.export is not None and self.transport is not None
        device = self.export.device
        fast = self._fast
        if fast is not None and fast.transport is self.transport:
            fast.use(device)
            if fast.file_fd >= 0:
                if fast.send_read([], header, offset, length) is not None:
                    self._abort()
                    return False
                fast.settle()
                return True
        data = device.read(offset, length)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self._device_waits += 1
            try:
                data = await data
            finally:
                self._device_waits -= 1
        self._send([header, data] if header else [data])
        return True
