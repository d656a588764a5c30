"""Server side of the transmission phase, sans I/O: validate requests, frame and encode replies.

Requests and their payloads are parsed by :class:`~hikkoshi.nbd.request_reader.RequestReader`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from hikkoshi.nbd.constants import (
    ALLOWED_FLAGS,
    MAX_PAYLOAD,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from hikkoshi.nbd.request_reader import RequestReader as RequestReader
from hikkoshi.nbd.wire import CHUNK_HEADER, ERROR_HEAD, EXTENT, SIMPLE_REPLY, U32, U64

#: The most data one OFFSET_DATA chunk can carry (its 32-bit length also counts the 8-byte offset).
MAX_CHUNK_DATA = 0xFFFFFFFF - 8


@dataclass(frozen=True, slots=True)
class SessionRules:
    """What one negotiated connection allows (pure data)."""

    size: int
    export_flags: int
    structured: bool
    meta_contexts: dict[int, str]
    #: The longest READ or WRITE this client may ask for: the maximum payload we advertised, if it asked for
    #: our size constraints (proto.md: it then MUST abide by them); anything otherwise (it may assume the
    #: 32 MiB default, and older clients send more: we stream such payloads).
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
    if flags & _DF and length > MAX_CHUNK_DATA:
        return Errno.EOVERFLOW  # one chunk cannot carry it, and DF forbids more than one
    if offset + length > rules.size:
        return Errno.ENOSPC if command in _ENOSPC_ON_OVERRUN else _EINVAL
    if rules.min_block > 1 and (offset % rules.min_block or length % rules.min_block):
        return _EINVAL
    return 0


# --- replies (hot path: plain functions over precompiled structs) ---------------------------------------


_DONE = int(ReplyFlag.DONE)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_BLOCK_STATUS_CHUNK = int(ChunkType.BLOCK_STATUS)


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header."""
    return SIMPLE_REPLY.pack(0x67446698, error, handle)


def chunk_header(flags: int, chunk_type: int, handle: int, length: int) -> bytes:
    """A structured reply chunk header."""
    return CHUNK_HEADER.pack(0x668E33EF, flags, chunk_type, handle, length)


def error_reply(handle: int, error: int, message: str, structured: bool) -> list[bytes]:
    """The reply reporting ``error``: an error chunk with a message if structured replies are on."""
    if not structured:
        return [simple_reply(handle, error)]
    msg = message.encode()[:4096]
    body = ERROR_HEAD.pack(error, len(msg)) + msg
    return [chunk_header(_DONE, ChunkType.ERROR, handle, len(body)), body]


def block_status_reply(
    handle: int, length: int, flags: int, results: list[tuple[int, list[tuple[int, int]]]]
) -> list[bytes]:
    """A BLOCK_STATUS reply: one chunk per meta context, from its id and extents ``(length, flags)``."""
    out: list[bytes] = []
    for i, (cid, extents) in enumerate(results):
        if not extents:
            extents = [(length, 0)]
        if flags & _REQ_ONE:
            extents = [(min(extents[0][0], length), extents[0][1])]
        body = U32.pack(cid) + b"".join(EXTENT.pack(n, f) for n, f in extents)
        done = _DONE if i == len(results) - 1 else 0
        out += [chunk_header(done, _BLOCK_STATUS_CHUNK, handle, len(body)), body]
    return out


_OFFSET_DATA_HEADER = struct.Struct(CHUNK_HEADER.format + U64.format.lstrip(">"))


def offset_data_header(handle: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; ``length`` data bytes must follow."""
    return _OFFSET_DATA_HEADER.pack(0x668E33EF, _DONE if done else 0, 1, handle, length + 8, offset)


def read_reply_pieces(
    handle: int, offset: int, length: int, structured: bool, df: bool, piece: int
) -> Iterator[tuple[bytes, int, int]]:
    """How the reply to a READ longer than one buffer goes out, piece by piece.

    Yields ``(header, offset, length)``: a header to send, then that piece of the export's data. With
    structured replies each piece is a chunk of its own, so a failure part-way can still be reported in an
    error chunk; under DF, or with simple replies, one header announces all the data and later pieces
    continue it (header ``b""``), so a failure part-way can only end the connection.
    """
    end = offset + length
    if structured and not df:
        for start in range(offset, end, piece):
            n = min(piece, end - start)
            yield offset_data_header(handle, start, n, done=start + n == end), start, n
        return
    first = offset_data_header(handle, offset, length) if structured else simple_reply(handle)
    for start in range(offset, end, piece):
        yield first if start == offset else b"", start, min(piece, end - start)
