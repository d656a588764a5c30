"""Client side of the transmission phase, sans I/O: encode requests, parse replies, reassemble reads.

Replies are matched to requests by handle, never by order: a server may answer in any order and may
split a structured read into chunks sent in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import wire
from .constants import (
    CHUNK_HEADER_SIZE,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    Errno,
    ReplyFlag,
)
from .errors import ProtocolError

_MAX_CHUNK = (32 << 20) + (1 << 20)


@dataclass(slots=True)
class Pending:
    """A request waiting for its reply."""

    command: int
    offset: int
    length: int
    #: Read reassembly: the destination buffer and which bytes have arrived.
    data: bytearray | None = None
    covered: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0
    message: str = ""
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """A request has its whole reply."""

    handle: int
    error: int
    message: str = ""
    data: bytearray | None = None
    extents: dict[int, list[tuple[int, int]]] | None = None


class ClientTransmission:
    """Tracks requests in flight and turns received bytes into completed replies."""

    def __init__(self, structured: bool) -> None:
        self.structured = structured
        self.pending: dict[int, Pending] = {}
        self._next_handle = 1
        self._buf = bytearray()

    def request(
        self, command: int, offset: int, length: int, flags: int = 0, data: bytes | None = None
    ) -> tuple[int, bytes]:
        """Register a request; return its handle and the bytes to send."""
        handle = self._next_handle
        self._next_handle = (self._next_handle + 1) & 0xFFFFFFFFFFFFFFFF or 1
        pending = Pending(command, offset, length)
        if command == Command.READ:
            pending.data = bytearray(length)
        self.pending[handle] = pending
        header = wire.REQUEST.pack(0x25609513, flags, command, handle, offset, length)
        return handle, header + data if data is not None else header

    def receive_data(self, data: bytes | memoryview) -> None:
        self._buf += data

    def next_reply(self) -> Reply | None:
        """The next request whose reply is complete, or None if more bytes are needed."""
        while True:
            if len(self._buf) < 4:
                return None
            magic = wire.U32.unpack_from(self._buf, 0)[0]
            if magic == SIMPLE_REPLY_MAGIC:
                reply = self._simple()
                if reply is None:
                    return None
                return reply
            if magic == STRUCTURED_REPLY_MAGIC:
                if not self.structured:
                    raise ProtocolError("structured reply without negotiating structured replies")
                got = self._chunk()
                if got is False:
                    return None
                if got is not True:
                    return got
                continue
            raise ProtocolError(f"bad reply magic {magic:#x}")

    def _take(self, handle: int) -> Pending:
        pending = self.pending.get(handle)
        if pending is None:
            raise ProtocolError(f"reply for unknown handle {handle:#x}")
        return pending

    def _simple(self) -> Reply | None:
        if len(self._buf) < SIMPLE_REPLY_SIZE:
            return None
        _, error, handle = wire.SIMPLE_REPLY.unpack_from(self._buf, 0)
        pending = self._take(handle)
        if pending.command == Command.READ:
            if self.structured:
                raise ProtocolError("simple reply to a read after structured replies were negotiated")
            need = SIMPLE_REPLY_SIZE + (0 if error else pending.length)
            if len(self._buf) < need:
                return None
            assert pending.data is not None
            if not error:
                pending.data[:] = self._buf[SIMPLE_REPLY_SIZE:need]
            del self._buf[:need]
        else:
            del self._buf[:SIMPLE_REPLY_SIZE]
        del self.pending[handle]
        return Reply(handle, error, "", pending.data if not error else None)

    def _chunk(self) -> Reply | bool:
        """Consume one chunk: False if incomplete, True if consumed mid-reply, or the finished Reply."""
        if len(self._buf) < CHUNK_HEADER_SIZE:
            return False
        _, flags, chunk_type, handle, length = wire.CHUNK_HEADER.unpack_from(self._buf, 0)
        if length > _MAX_CHUNK:
            raise ProtocolError(f"chunk of {length} bytes")
        if len(self._buf) < CHUNK_HEADER_SIZE + length:
            return False
        pending = self._take(handle)
        body = memoryview(self._buf)[CHUNK_HEADER_SIZE : CHUNK_HEADER_SIZE + length]
        try:
            if chunk_type == ChunkType.OFFSET_DATA and length > 8:
                self._read_data(pending, body)  # the hot path: straight into the destination buffer
            else:
                self._apply(pending, wire.decode_chunk_payload(chunk_type, body))
        finally:
            body.release()
        del self._buf[: CHUNK_HEADER_SIZE + length]
        if not flags & ReplyFlag.DONE:
            return True
        del self.pending[handle]
        if pending.error:
            return Reply(handle, pending.error, pending.message)
        if pending.command == Command.READ:
            _check_coverage(pending)
            return Reply(handle, 0, "", pending.data)
        if pending.command == Command.BLOCK_STATUS:
            return Reply(handle, 0, "", None, pending.extents)
        return Reply(handle, 0)

    @staticmethod
    def _read_data(pending: Pending, body: memoryview) -> None:
        """An OFFSET_DATA chunk, copied once from the receive buffer into the read's buffer."""
        if pending.command != Command.READ or pending.data is None:
            raise ProtocolError("read data in the reply to a command that is not a read")
        start = wire.U64.unpack_from(body, 0)[0] - pending.offset
        n = len(body) - 8
        if start < 0 or start + n > pending.length:
            raise ProtocolError("read chunk outside the requested range")
        pending.data[start : start + n] = body[8:]
        pending.covered.append((start, start + n))

    @staticmethod
    def _apply(pending: Pending, payload: wire.ChunkPayload) -> None:
        if isinstance(payload, wire.ErrorChunk):
            if not pending.error:
                pending.error, pending.message = payload.error, payload.message
            return
        if isinstance(payload, wire.NoneChunk):
            return
        if isinstance(payload, (wire.OffsetData, wire.OffsetHole)):
            if pending.command != Command.READ or pending.data is None:
                raise ProtocolError("read data in the reply to a command that is not a read")
            length = len(payload.data) if isinstance(payload, wire.OffsetData) else payload.length
            start = payload.offset - pending.offset
            if start < 0 or start + length > pending.length:
                raise ProtocolError("read chunk outside the requested range")
            if isinstance(payload, wire.OffsetData):
                pending.data[start : start + length] = payload.data
            else:
                pending.data[start : start + length] = bytes(length)
            pending.covered.append((start, start + length))
            return
        if isinstance(payload, wire.BlockStatusChunk):
            if pending.command != Command.BLOCK_STATUS:
                raise ProtocolError("block status chunk in the reply to another command")
            pending.extents[payload.context_id] = list(payload.extents)
            return
        raise ProtocolError(f"unexpected chunk type {payload!r}")


def _check_coverage(pending: Pending) -> None:
    """A successful structured read must cover the request exactly, without overlap."""
    pos = 0
    for start, end in sorted(pending.covered):
        if start != pos:
            raise ProtocolError(
                "read chunks overlap or leave a gap" if start < pos else "read reply leaves a gap"
            )
        pos = end
    if pos != pending.length:
        raise ProtocolError("read reply does not cover the whole request")


def errno_name(error: int) -> str:
    try:
        return Errno(error).name
    except ValueError:
        return f"error {error}"
