"""Server side of the transmission phase, sans I/O: parse requests, validate them, encode replies.

:class:`RequestReader` owns a preallocated receive buffer that an asyncio ``BufferedProtocol`` fills
directly (``recv_into``), so request headers and write payloads are never copied on the way in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hikkoshi.nbd.constants import (
    ALLOWED_FLAGS,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from hikkoshi.nbd.errors import ProtocolError
from hikkoshi.nbd.wire import CHUNK_HEADER, REQUEST, SIMPLE_REPLY, U64

_INITIAL_BUFFER = 256 * 1024
_MIN_FREE = 64 * 1024


class RequestReader:
    """Incremental parser of requests from a zero-copy receive buffer.

    ``next_request`` returns ``(flags, command, handle, offset, length, payload)``; ``payload`` is a view
    into the buffer, valid only until the next call to ``get_buffer``. A WRITE whose payload exceeds
    ``max_payload`` is returned with ``payload=None`` and its bytes are discarded, so the connection stays
    in sync and the request can be answered with an error.
    """

    __slots__ = ("_buf", "_end", "_pending", "_skip", "_start", "max_payload")

    def __init__(self, max_payload: int = MAX_PAYLOAD, initial: bytes = b"") -> None:
        self.max_payload = max_payload
        self._buf = bytearray(max(_INITIAL_BUFFER, len(initial)))
        self._buf[: len(initial)] = initial
        self._start = 0
        self._end = len(initial)
        self._skip = 0
        self._pending: tuple[int, int, int, int, int] | None = None

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view where received bytes go."""
        need = _MIN_FREE
        if self._pending is not None:
            need = max(need, self._pending[4] - (self._end - self._start))
        if self._start == self._end:
            self._start = self._end = 0
        if len(self._buf) - self._end < need:
            used = self._end - self._start
            if len(self._buf) - used >= need and used < len(self._buf) // 2:
                self._buf[:used] = self._buf[self._start : self._end]
            else:
                # A fresh array: the old one may still be exported to a payload view.
                new = bytearray(max(2 * len(self._buf), used + need))
                new[:used] = self._buf[self._start : self._end]
                self._buf = new
            self._start, self._end = 0, used
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the view from ``get_buffer``."""
        self._end += nbytes

    def feed(self, data: bytes | memoryview) -> None:
        """Copy bytes in (for tests and for bytes left over from negotiation)."""
        view = self.get_buffer(len(data))
        while len(view) < len(data):
            self._pending = None
            self._buf += bytes(len(data))
            view = memoryview(self._buf)[self._end :]
        view[: len(data)] = data
        self.buffer_updated(len(data))

    def next_request(self) -> tuple[int, int, int, int, int, memoryview | None] | None:
        """The next complete request, or None if more bytes are needed."""
        if self._skip:
            n = min(self._skip, self._end - self._start)
            self._start += n
            self._skip -= n
            if self._skip:
                return None
        header = self._pending
        if header is None:
            if self._end - self._start < REQUEST_SIZE:
                return None
            magic, flags, command, handle, offset, length = REQUEST.unpack_from(self._buf, self._start)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            self._start += REQUEST_SIZE
            if command != Command.WRITE:
                return flags, command, handle, offset, length, None
            if length > self.max_payload:
                self._skip = length
                self.next_request_skip()
                return flags, command, handle, offset, length, None
            header = (flags, command, handle, offset, length)
        length = header[4]
        if self._end - self._start < length:
            self._pending = header
            return None
        self._pending = None
        start = self._start
        self._start += length
        return (
            header[0],
            header[1],
            header[2],
            header[3],
            length,
            memoryview(self._buf)[start : start + length],
        )

    def next_request_skip(self) -> None:
        """Discard as much of an oversize payload as is already buffered."""
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return self._end - self._start


@dataclass(frozen=True, slots=True)
class SessionRules:
    """What one negotiated connection allows (pure data)."""

    size: int
    export_flags: int
    structured: bool
    meta_contexts: dict[int, str]
    max_payload: int = MAX_PAYLOAD
    min_block: int = 1

    @property
    def read_only(self) -> bool:
        return bool(self.export_flags & TransmissionFlag.READ_ONLY)


_NEEDS_FLAG: dict[int, int] = {
    Command.FLUSH: int(TransmissionFlag.SEND_FLUSH),
    Command.TRIM: int(TransmissionFlag.SEND_TRIM),
    Command.WRITE_ZEROES: int(TransmissionFlag.SEND_WRITE_ZEROES),
    Command.CACHE: int(TransmissionFlag.SEND_CACHE),
}
# Plain ints: on the hot path, ``x & SomeIntFlag`` would build an enum member per request.
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_DATA = frozenset({_READ, _WRITE})
_WRITES = frozenset({_WRITE, int(Command.TRIM), int(Command.WRITE_ZEROES)})
_ENOSPC_ON_OVERRUN = frozenset({_WRITE, int(Command.WRITE_ZEROES)})
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_SEND_DF = int(TransmissionFlag.SEND_DF)
_SEND_FUA = int(TransmissionFlag.SEND_FUA)
_SEND_FAST_ZERO = int(TransmissionFlag.SEND_FAST_ZERO)
_DF = int(CommandFlag.DF)
#: NBD_CMD_FLAG_FUA as a plain int, also for the server's hot path.
FLAG_FUA = int(CommandFlag.FUA)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_EINVAL = Errno.EINVAL


def check_request(rules: SessionRules, flags: int, command: int, offset: int, length: int) -> int:
    """The error a request must get before it reaches the device, or 0 if it may proceed."""
    if not flags and command in _DATA:
        # The common case, checked in the same order as below.
        if command == _WRITE and rules.export_flags & _READ_ONLY:
            return Errno.EPERM
        if length > rules.max_payload:
            return _EINVAL
        if offset + length > rules.size:
            return Errno.ENOSPC if command == _WRITE else _EINVAL
        if rules.min_block > 1 and (offset % rules.min_block or length % rules.min_block):
            return _EINVAL
        return 0
    allowed = ALLOWED_FLAGS.get(command)
    if allowed is None or command == _DISC:
        return _EINVAL
    if flags & ~allowed:
        return _EINVAL
    export_flags = rules.export_flags
    if command in _WRITES and export_flags & _READ_ONLY:
        return Errno.EPERM
    if flags & _DF and not (rules.structured and export_flags & _SEND_DF):
        return _EINVAL
    if flags & FLAG_FUA and not export_flags & _SEND_FUA:
        return _EINVAL
    if flags & _FAST_ZERO and not export_flags & _SEND_FAST_ZERO:
        return _EINVAL
    needed = _NEEDS_FLAG.get(command)
    if needed is not None and not export_flags & needed:
        return _EINVAL
    if command == _BLOCK_STATUS:
        if not rules.structured or not rules.meta_contexts:
            return _EINVAL
        if length == 0:
            return _EINVAL
    if command in _DATA and length > rules.max_payload:
        return Errno.EOVERFLOW if flags & _DF else _EINVAL
    if offset + length > rules.size:
        return Errno.ENOSPC if command in _ENOSPC_ON_OVERRUN else _EINVAL
    if rules.min_block > 1 and (offset % rules.min_block or length % rules.min_block):
        return _EINVAL
    return 0


# --- replies (hot path: plain functions over precompiled structs) ---------------------------------------


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header."""
    return SIMPLE_REPLY.pack(0x67446698, error, handle)


def chunk_header(flags: int, chunk_type: int, handle: int, length: int) -> bytes:
    """A structured reply chunk header."""
    return CHUNK_HEADER.pack(0x668E33EF, flags, chunk_type, handle, length)


_OFFSET_DATA_HEADER = struct.Struct(CHUNK_HEADER.format + U64.format.lstrip(">"))
_DONE = int(ReplyFlag.DONE)


def offset_data_header(handle: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; ``length`` data bytes must follow."""
    return _OFFSET_DATA_HEADER.pack(0x668E33EF, _DONE if done else 0, 1, handle, length + 8, offset)
