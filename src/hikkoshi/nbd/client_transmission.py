"""Client side of the transmission phase, sans I/O: encode requests, parse replies, reassemble reads.

Replies are matched to requests by handle, never by order: a server may answer in any order and may
split a structured read into chunks sent in any order.

Bytes come in either through :meth:`ClientTransmission.receive_data` (copied) or, for a buffered
protocol, through :meth:`ClientTransmission.get_buffer` / :meth:`ClientTransmission.buffer_updated`: once
the header of a read's payload has arrived, the rest of the payload is received straight into the read's
own buffer, so bulk data is copied once (by the kernel) instead of three times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    CHUNK_HEADER_SIZE,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    Errno,
    ReplyFlag,
)
from hikkoshi.nbd.errors import ProtocolError

_MAX_CHUNK = (32 << 20) + (1 << 20)
#: Where bytes land while no read payload is being streamed: headers, small replies, the start of a
#: payload. Small, so that a large payload is mostly received in place rather than copied from here.
_SCRATCH = 64 * 1024


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


@dataclass(slots=True)
class _Stream:
    """A read payload arriving straight into its destination buffer."""

    handle: int
    pending: Pending
    #: The chunk's reply flags; -1 for the payload of a simple reply.
    flags: int
    start: int
    end: int
    #: The next byte to arrive goes to ``pending.data[pos]``.
    pos: int


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
        self._stream: _Stream | None = None
        self._scratch = bytearray(_SCRATCH)
        #: Replies completed while streaming, handed out by :meth:`next_reply` in order.
        self._ready: deque[Reply] = deque()

    def request(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int = 0,
        data: bytes | None = None,
        into: bytearray | None = None,
    ) -> tuple[int, bytes]:
        """Register a request; return its handle and the bytes to send.

        A read's data goes to ``into`` if given (exactly ``length`` bytes: a reused buffer saves zeroing
        and faulting in a fresh one), else to a new buffer.
        """
        handle = self._next_handle
        self._next_handle = (self._next_handle + 1) & 0xFFFFFFFFFFFFFFFF or 1
        pending = Pending(command, offset, length)
        if command == Command.READ:
            if into is not None and len(into) != length:
                raise ValueError(f"a read of {length} bytes into a buffer of {len(into)}")
            pending.data = bytearray(length) if into is None else into
        self.pending[handle] = pending
        header = wire.REQUEST.pack(0x25609513, flags, command, handle, offset, length)
        return handle, header + data if data is not None else header

    def receive_data(self, data: bytes | memoryview) -> None:
        if self._stream is not None:
            view = memoryview(data)
            taken = self._feed(view)
            if taken == len(view):
                return
            data = view[taken:]
        self._buf += data

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (then call :meth:`buffer_updated`)."""
        stream = self._stream
        if stream is not None:
            assert stream.pending.data is not None
            return memoryview(stream.pending.data)[stream.pos : stream.end]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the buffer :meth:`get_buffer` returned."""
        stream = self._stream
        if stream is not None:
            stream.pos += nbytes
            if stream.pos == stream.end:
                self._end_stream(stream)
            return
        self._buf += memoryview(self._scratch)[:nbytes]

    def _feed(self, data: memoryview) -> int:
        """Copy the start of ``data`` into the payload being streamed; return how much it took."""
        stream = self._stream
        assert stream is not None and stream.pending.data is not None
        n = min(len(data), stream.end - stream.pos)
        stream.pending.data[stream.pos : stream.pos + n] = data[:n]
        stream.pos += n
        if stream.pos == stream.end:
            self._end_stream(stream)
        return n

    def _end_stream(self, stream: _Stream) -> None:
        self._stream = None
        pending = stream.pending
        if stream.flags < 0:  # a simple reply's payload: the reply is complete
            del self.pending[stream.handle]
            self._ready.append(Reply(stream.handle, 0, "", pending.data))
            return
        pending.covered.append((stream.start, stream.end))
        if stream.flags & ReplyFlag.DONE:
            self._ready.append(self._done(stream.handle, pending))

    def next_reply(self) -> Reply | None:
        """The next request whose reply is complete, or None if more bytes are needed."""
        if self._ready:
            return self._ready.popleft()
        while True:
            if self._stream is not None:
                return None
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
                if not error and pending.length:
                    # Receive the rest of the payload in place.
                    self._start_stream(_Stream(handle, pending, -1, 0, pending.length, 0), SIMPLE_REPLY_SIZE)
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
            if chunk_type == ChunkType.OFFSET_DATA and length > 8 and len(self._buf) >= CHUNK_HEADER_SIZE + 8:
                # The header and the offset are here: receive the rest of the payload in place.
                pending = self._take(handle)
                offset = wire.U64.unpack_from(self._buf, CHUNK_HEADER_SIZE)[0]
                start, end = self._data_range(pending, offset, length - 8)
                self._start_stream(_Stream(handle, pending, flags, start, end, start), CHUNK_HEADER_SIZE + 8)
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
        return self._done(handle, pending)

    def _start_stream(self, stream: _Stream, header: int) -> None:
        """Move the payload bytes already buffered (everything after ``header``) and stream the rest."""
        assert stream.pending.data is not None
        have = len(self._buf) - header
        stream.pending.data[stream.pos : stream.pos + have] = memoryview(self._buf)[header:]
        stream.pos += have
        self._buf.clear()
        self._stream = stream

    def _done(self, handle: int, pending: Pending) -> Reply:
        """The last chunk of a structured reply has arrived."""
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
    def _data_range(pending: Pending, offset: int, n: int) -> tuple[int, int]:
        """Where ``n`` bytes of read data at ``offset`` go in the read's buffer."""
        if pending.command != Command.READ or pending.data is None:
            raise ProtocolError("read data in the reply to a command that is not a read")
        start = offset - pending.offset
        if start < 0 or start + n > pending.length:
            raise ProtocolError("read chunk outside the requested range")
        return start, start + n

    @classmethod
    def _read_data(cls, pending: Pending, body: memoryview) -> None:
        """An OFFSET_DATA chunk, copied once from the receive buffer into the read's buffer."""
        start, end = cls._data_range(pending, wire.U64.unpack_from(body, 0)[0], len(body) - 8)
        assert pending.data is not None
        pending.data[start:end] = body[8:]
        pending.covered.append((start, end))

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
