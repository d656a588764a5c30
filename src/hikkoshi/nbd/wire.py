"""Encoding and decoding of every NBD message, as pure functions over bytes.

Decoders take exactly the bytes of one message (or one payload) and either return a value or raise
:class:`ProtocolError`; they never raise anything else, whatever the input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hikkoshi.nbd.constants import (
    CHUNK_HEADER_SIZE,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Info,
)
from hikkoshi.nbd.errors import ProtocolError

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")
ERROR_HEAD = struct.Struct(">IH")


def _text(data: bytes | memoryview, what: str) -> str:
    if len(data) > MAX_STRING:
        raise ProtocolError(f"{what} longer than {MAX_STRING} bytes")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


def _need(data: bytes | memoryview, size: int, what: str, exact: bool = True) -> None:
    if len(data) < size or (exact and len(data) != size):
        raise ProtocolError(f"{what}: {len(data)} bytes, expected {'' if exact else 'at least '}{size}")


# --- handshake ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's first message in fixed newstyle negotiation."""

    flags: int


def encode_greeting(msg: Greeting) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, msg.flags)


def decode_greeting(data: bytes | memoryview) -> Greeting:
    _need(data, GREETING.size, "greeting")
    magic, opt, flags = GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise ProtocolError(f"bad server magic {magic:#x}")
    if opt != IHAVEOPT:
        raise ProtocolError("server is not newstyle (oldstyle negotiation is not supported)")
    return Greeting(flags)


@dataclass(frozen=True, slots=True)
class OptionRequest:
    """A client option: header plus its raw payload."""

    option: int
    data: bytes = b""


def encode_option(msg: OptionRequest) -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, msg.option, len(msg.data)) + msg.data


def decode_option_header(data: bytes | memoryview) -> tuple[int, int]:
    """Decode the 16-byte option header into (option, payload length)."""
    _need(data, OPTION_HEADER.size, "option header")
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


@dataclass(frozen=True, slots=True)
class OptionReplyMessage:
    """A server reply to an option: header plus its raw payload."""

    option: int
    reply_type: int
    data: bytes = b""


def encode_option_reply(msg: OptionReplyMessage) -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, msg.option, msg.reply_type, len(msg.data)) + msg.data


def decode_option_reply_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """Decode the 20-byte option reply header into (option, reply type, payload length)."""
    _need(data, OPTION_REPLY_HEADER.size, "option reply header")
    magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return option, reply_type, length


@dataclass(frozen=True, slots=True)
class ExportNameReply:
    """The server's answer to NBD_OPT_EXPORT_NAME (no reply header)."""

    size: int
    flags: int
    zeroes: bool = True


def encode_export_name_reply(msg: ExportNameReply) -> bytes:
    return EXPORT_NAME_REPLY.pack(msg.size, msg.flags) + (bytes(124) if msg.zeroes else b"")


def decode_export_name_reply(data: bytes | memoryview) -> ExportNameReply:
    if len(data) not in (10, 134):
        raise ProtocolError(f"export name reply of {len(data)} bytes")
    size, flags = EXPORT_NAME_REPLY.unpack_from(data)
    return ExportNameReply(size, flags, len(data) == 134)


# --- option payloads ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Payload of NBD_OPT_INFO and NBD_OPT_GO."""

    name: str
    infos: tuple[int, ...] = ()


def encode_info_request(msg: InfoRequest) -> bytes:
    name = msg.name.encode()
    return U32.pack(len(name)) + name + U16.pack(len(msg.infos)) + b"".join(U16.pack(i) for i in msg.infos)


def decode_info_request(data: bytes | memoryview) -> InfoRequest:
    _need(data, 6, "info request", exact=False)
    (name_len,) = U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        raise ProtocolError("info request: name runs past the payload")
    name = _text(data[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise ProtocolError(f"info request: {count} info types do not match the payload")
    infos = tuple(U16.unpack_from(data, pos + 2 * i)[0] for i in range(count))
    return InfoRequest(name, infos)


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...] = ()


def encode_meta_context_request(msg: MetaContextRequest) -> bytes:
    name = msg.name.encode()
    parts = [U32.pack(len(name)), name, U32.pack(len(msg.queries))]
    for q in msg.queries:
        qb = q.encode()
        parts += [U32.pack(len(qb)), qb]
    return b"".join(parts)


def decode_meta_context_request(data: bytes | memoryview) -> MetaContextRequest:
    _need(data, 8, "meta context request", exact=False)
    (name_len,) = U32.unpack_from(data, 0)
    if name_len > len(data) - 8:
        raise ProtocolError("meta context request: name runs past the payload")
    name = _text(data[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if len(data) - pos < 4:
            raise ProtocolError("meta context request: truncated query")
        (qlen,) = U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            raise ProtocolError("meta context request: query runs past the payload")
        queries.append(_text(data[pos : pos + qlen], "meta context query"))
        pos += qlen
    if pos != len(data):
        raise ProtocolError("meta context request: trailing bytes")
    return MetaContextRequest(name, tuple(queries))


@dataclass(frozen=True, slots=True)
class InfoExport:
    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class InfoName:
    name: str


@dataclass(frozen=True, slots=True)
class InfoDescription:
    description: str


@dataclass(frozen=True, slots=True)
class InfoBlockSize:
    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class InfoUnknown:
    """An information type this implementation does not know (clients must ignore it)."""

    info_type: int
    data: bytes


InfoPayload = InfoExport | InfoName | InfoDescription | InfoBlockSize | InfoUnknown


def encode_info(msg: InfoPayload) -> bytes:
    if isinstance(msg, InfoExport):
        return INFO_EXPORT.pack(Info.EXPORT, msg.size, msg.flags)
    if isinstance(msg, InfoName):
        return U16.pack(Info.NAME) + msg.name.encode()
    if isinstance(msg, InfoDescription):
        return U16.pack(Info.DESCRIPTION) + msg.description.encode()
    if isinstance(msg, InfoBlockSize):
        return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, msg.minimum, msg.preferred, msg.maximum)
    return U16.pack(msg.info_type) + msg.data


def decode_info(data: bytes | memoryview) -> InfoPayload:
    _need(data, 2, "info reply", exact=False)
    (kind,) = U16.unpack_from(data, 0)
    if kind == Info.EXPORT:
        _need(data, INFO_EXPORT.size, "NBD_INFO_EXPORT")
        _, size, flags = INFO_EXPORT.unpack(data)
        return InfoExport(size, flags)
    if kind == Info.NAME:
        return InfoName(_text(data[2:], "NBD_INFO_NAME"))
    if kind == Info.DESCRIPTION:
        return InfoDescription(_text(data[2:], "NBD_INFO_DESCRIPTION"))
    if kind == Info.BLOCK_SIZE:
        _need(data, INFO_BLOCK_SIZE.size, "NBD_INFO_BLOCK_SIZE")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
        return InfoBlockSize(minimum, preferred, maximum)
    return InfoUnknown(kind, bytes(data[2:]))


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """Payload of NBD_REP_SERVER (one export in an NBD_OPT_LIST answer)."""

    name: str
    details: str = ""


def encode_server_entry(msg: ServerEntry) -> bytes:
    name = msg.name.encode()
    return U32.pack(len(name)) + name + msg.details.encode()


def decode_server_entry(data: bytes | memoryview) -> ServerEntry:
    _need(data, 4, "NBD_REP_SERVER", exact=False)
    (name_len,) = U32.unpack_from(data, 0)
    if name_len > len(data) - 4:
        raise ProtocolError("NBD_REP_SERVER: name runs past the payload")
    return ServerEntry(_text(data[4 : 4 + name_len], "export name"), _text(data[4 + name_len :], "details"))


@dataclass(frozen=True, slots=True)
class MetaContext:
    """Payload of NBD_REP_META_CONTEXT."""

    context_id: int
    name: str


def encode_meta_context(msg: MetaContext) -> bytes:
    return U32.pack(msg.context_id) + msg.name.encode()


def decode_meta_context(data: bytes | memoryview) -> MetaContext:
    _need(data, 4, "NBD_REP_META_CONTEXT", exact=False)
    (cid,) = U32.unpack_from(data, 0)
    return MetaContext(cid, _text(data[4:], "meta context name"))


# --- transmission ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission request header (a WRITE's payload follows it on the wire)."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int


def encode_request(msg: Request) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, msg.flags, msg.command, msg.handle, msg.offset, msg.length)


def decode_request(data: bytes | memoryview) -> Request:
    _need(data, REQUEST.size, "request")
    magic, flags, command, handle, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, command, handle, offset, length)


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply header (a successful READ's data follows it)."""

    error: int
    handle: int


def encode_simple_reply(msg: SimpleReply) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, msg.error, msg.handle)


def decode_simple_reply(data: bytes | memoryview) -> SimpleReply:
    _need(data, SIMPLE_REPLY.size, "simple reply")
    magic, error, handle = SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"bad simple reply magic {magic:#x}")
    return SimpleReply(error, handle)


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The header of one structured reply chunk."""

    flags: int
    chunk_type: int
    handle: int
    length: int


def encode_chunk_header(msg: ChunkHeader) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, msg.flags, msg.chunk_type, msg.handle, msg.length)


def decode_chunk_header(data: bytes | memoryview) -> ChunkHeader:
    _need(data, CHUNK_HEADER_SIZE, "chunk header")
    magic, flags, chunk_type, handle, length = CHUNK_HEADER.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic {magic:#x}")
    return ChunkHeader(flags, chunk_type, handle, length)


@dataclass(frozen=True, slots=True)
class OffsetData:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OffsetHole:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatusChunk:
    context_id: int
    extents: tuple[tuple[int, int], ...]  # (length, status flags)


@dataclass(frozen=True, slots=True)
class ErrorChunk:
    error: int
    message: str = ""
    offset: int | None = None  # set for NBD_REPLY_TYPE_ERROR_OFFSET


@dataclass(frozen=True, slots=True)
class NoneChunk:
    pass


@dataclass(frozen=True, slots=True)
class UnknownChunk:
    chunk_type: int
    data: bytes


ChunkPayload = OffsetData | OffsetHole | BlockStatusChunk | ErrorChunk | NoneChunk | UnknownChunk


def chunk_type_of(payload: ChunkPayload) -> int:
    """The chunk type that carries a payload."""
    if isinstance(payload, OffsetData):
        return ChunkType.OFFSET_DATA
    if isinstance(payload, OffsetHole):
        return ChunkType.OFFSET_HOLE
    if isinstance(payload, BlockStatusChunk):
        return ChunkType.BLOCK_STATUS
    if isinstance(payload, ErrorChunk):
        return ChunkType.ERROR if payload.offset is None else ChunkType.ERROR_OFFSET
    if isinstance(payload, NoneChunk):
        return ChunkType.NONE
    return payload.chunk_type


def encode_chunk_payload(payload: ChunkPayload) -> bytes:
    if isinstance(payload, OffsetData):
        return U64.pack(payload.offset) + payload.data
    if isinstance(payload, OffsetHole):
        return U64.pack(payload.offset) + U32.pack(payload.length)
    if isinstance(payload, BlockStatusChunk):
        return U32.pack(payload.context_id) + b"".join(EXTENT.pack(n, f) for n, f in payload.extents)
    if isinstance(payload, ErrorChunk):
        msg = payload.message.encode()
        tail = b"" if payload.offset is None else U64.pack(payload.offset)
        return ERROR_HEAD.pack(payload.error, len(msg)) + msg + tail
    if isinstance(payload, NoneChunk):
        return b""
    return payload.data


def encode_chunk(flags: int, handle: int, payload: ChunkPayload) -> bytes:
    """Encode one whole structured reply chunk."""
    body = encode_chunk_payload(payload)
    return encode_chunk_header(ChunkHeader(flags, chunk_type_of(payload), handle, len(body))) + body


def decode_chunk_payload(chunk_type: int, data: bytes | memoryview) -> ChunkPayload:
    """Decode the payload of one chunk given its type; unknown non-error types are kept raw."""
    if chunk_type == ChunkType.NONE:
        _need(data, 0, "NBD_REPLY_TYPE_NONE")
        return NoneChunk()
    if chunk_type == ChunkType.OFFSET_DATA:
        _need(data, 9, "NBD_REPLY_TYPE_OFFSET_DATA", exact=False)
        return OffsetData(U64.unpack_from(data, 0)[0], bytes(data[8:]))
    if chunk_type == ChunkType.OFFSET_HOLE:
        _need(data, 12, "NBD_REPLY_TYPE_OFFSET_HOLE")
        length = U32.unpack_from(data, 8)[0]
        if length == 0:
            raise ProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of length 0")
        return OffsetHole(U64.unpack_from(data, 0)[0], length)
    if chunk_type == ChunkType.BLOCK_STATUS:
        if len(data) < 12 or (len(data) - 4) % 8:
            raise ProtocolError(f"NBD_REPLY_TYPE_BLOCK_STATUS of {len(data)} bytes")
        cid = U32.unpack_from(data, 0)[0]
        extents = tuple(EXTENT.unpack_from(data, pos) for pos in range(4, len(data), 8))
        if any(n == 0 for n, _ in extents):
            raise ProtocolError("block status extent of length 0")
        return BlockStatusChunk(cid, extents)
    if chunk_type in (ChunkType.ERROR, ChunkType.ERROR_OFFSET):
        _need(data, 6, "error chunk", exact=False)
        error, msg_len = ERROR_HEAD.unpack_from(data, 0)
        tail = 8 if chunk_type == ChunkType.ERROR_OFFSET else 0
        if len(data) != 6 + msg_len + tail:
            raise ProtocolError("error chunk: message length does not match the payload")
        if error == 0:
            raise ProtocolError("error chunk with error value 0")
        message = _text(data[6 : 6 + msg_len], "error message")
        offset = U64.unpack_from(data, 6 + msg_len)[0] if tail else None
        return ErrorChunk(error, message, offset)
    if chunk_type & (1 << 15):
        # Unknown error types still carry the common error header; the spec asks clients to treat
        # them as errors.
        _need(data, 6, "error chunk", exact=False)
        error, msg_len = ERROR_HEAD.unpack_from(data, 0)
        if msg_len > len(data) - 6:
            raise ProtocolError("error chunk: message runs past the payload")
        return ErrorChunk(error or 22, _text(data[6 : 6 + msg_len], "error message"))
    return UnknownChunk(chunk_type, bytes(data))


@dataclass(frozen=True, slots=True)
class Extent:
    """One block status descriptor."""

    length: int
    flags: int


@dataclass(slots=True)
class ExtentList:
    """Extents of one meta context, in order from the request offset."""

    context_id: int
    extents: list[Extent] = field(default_factory=list)
