"""A tiny blocking-socket NBD speaker for tests that need to send exactly the bytes they choose.

It is built on :mod:`hikkoshi.nbd.wire` for the well-formed messages, and exposes :meth:`RawNbd.send`
so a test can put any byte string on the wire. It never validates what it sends, and it decodes what it
receives strictly (a malformed reply from the server raises :class:`ProtocolError`).
Only 127.0.0.1 is ever dialled.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from types import TracebackType

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    CHUNK_HEADER_SIZE,
    OPTION_REPLY_HEADER_SIZE,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    is_option_error,
)
from hikkoshi.nbd.errors import ProtocolError

HOST = "127.0.0.1"
#: Option replies that are followed by more replies to the same option.
_PARTIAL_REPLIES = (OptionReply.SERVER, OptionReply.INFO, OptionReply.META_CONTEXT)
_MAX_REPLY_PAYLOAD = 64 << 20


class Closed(Exception):
    """The server closed (or reset) the connection."""


@dataclass
class Chunk:
    """One structured reply chunk."""

    flags: int
    chunk_type: int
    payload: wire.ChunkPayload


@dataclass
class Reply:
    """The whole reply to one request."""

    handle: int
    error: int
    #: For a READ: the reassembled data (holes as zeroes); empty otherwise or on error.
    data: bytes = b""
    #: For structured replies: every chunk, in arrival order.
    chunks: list[Chunk] = field(default_factory=list)
    #: The message of the first error chunk, if any.
    message: str = ""
    structured: bool = False


@dataclass
class _InFlight:
    command: int
    offset: int
    length: int
    chunks: list[Chunk] = field(default_factory=list)


class RawNbd:
    """One blocking connection to an NBD server on 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.no_zeroes = True
        self.size = -1
        self.export_flags = 0
        self.contexts: dict[int, str] = {}
        self.inflight: dict[int, _InFlight] = {}
        self._next_handle = 1

    # --- lifetime ----------------------------------------------------------------------------------------

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0), like a client that crashed."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    # --- bytes -------------------------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except ConnectionResetError as exc:
                raise Closed(f"reset after {got} of {n} bytes") from exc
            if not k:
                raise Closed(f"EOF after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def wait_closed(self, timeout: float = 5.0, limit: int = 128 << 20) -> tuple[bool, bytes]:
        """Read until the server closes; return (closed, what arrived before that).

        ``closed`` is False if the server kept the connection open for ``timeout`` seconds.
        At most ``limit`` bytes are kept (the rest is read and dropped).
        """
        deadline = time.monotonic() + timeout
        got = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, bytes(got)
            self.sock.settimeout(left)
            try:
                part = self.sock.recv(1 << 20)
            except TimeoutError:
                return False, bytes(got)
            except (ConnectionResetError, BrokenPipeError):
                return True, bytes(got)
            if not part:
                return True, bytes(got)
            if len(got) < limit:
                got += part[: limit - len(got)]

    # --- handshake ---------------------------------------------------------------------------------------

    def greeting(self) -> wire.Greeting:
        return wire.decode_greeting(self.recv_exact(wire.GREETING.size))

    def send_client_flags(self, flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) -> None:
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.send(wire.U32.pack(flags))

    def start(self, flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) -> wire.Greeting:
        """Read the greeting and answer with client flags."""
        greeting = self.greeting()
        self.send_client_flags(flags)
        return greeting

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(wire.encode_option(wire.OptionRequest(option, data)))

    def read_option_reply(self) -> wire.OptionReplyMessage:
        option, reply_type, length = wire.decode_option_reply_header(
            self.recv_exact(OPTION_REPLY_HEADER_SIZE)
        )
        if length > _MAX_REPLY_PAYLOAD:
            raise ProtocolError(f"option reply of {length} bytes")
        return wire.OptionReplyMessage(option, reply_type, self.recv_exact(length))

    def read_option_replies(self) -> list[wire.OptionReplyMessage]:
        """Replies to one option, up to and including its final one (ACK or an error)."""
        replies = [self.read_option_reply()]
        while replies[-1].reply_type in _PARTIAL_REPLIES:
            replies.append(self.read_option_reply())
        return replies

    def option(self, option: int, data: bytes = b"") -> list[wire.OptionReplyMessage]:
        self.send_option(option, data)
        return self.read_option_replies()

    def go(self, name: str = "disk", infos: tuple[int, ...] = ()) -> list[wire.OptionReplyMessage]:
        """NBD_OPT_GO; on success the connection is in transmission."""
        replies = self.option(Option.GO, wire.encode_info_request(wire.InfoRequest(name, infos)))
        final = replies[-1]
        if final.reply_type != OptionReply.ACK:
            return replies
        for r in replies:
            if r.reply_type == OptionReply.INFO:
                info = wire.decode_info(r.data)
                if isinstance(info, wire.InfoExport):
                    self.size, self.export_flags = info.size, info.flags
        return replies

    def handshake(
        self,
        name: str = "disk",
        *,
        structured: bool = False,
        meta: tuple[str, ...] = (),
        block_size: bool = False,
    ) -> RawNbd:
        """A complete, well-behaved negotiation ending in NBD_OPT_GO (asking for NBD_INFO_BLOCK_SIZE, which
        binds the client to the server's size constraints, if ``block_size``)."""
        self.start()
        if structured:
            replies = self.option(Option.STRUCTURED_REPLY)
            assert replies[-1].reply_type == OptionReply.ACK, replies
            self.structured = True
        if meta:
            request = wire.MetaContextRequest(name, meta)
            replies = self.option(Option.SET_META_CONTEXT, wire.encode_meta_context_request(request))
            assert replies[-1].reply_type == OptionReply.ACK, replies
            for r in replies[:-1]:
                ctx = wire.decode_meta_context(r.data)
                self.contexts[ctx.context_id] = ctx.name
        replies = self.go(name, (Info.BLOCK_SIZE,) if block_size else ())
        if replies[-1].reply_type != OptionReply.ACK:
            raise ProtocolError(f"NBD_OPT_GO refused: {replies[-1]}")
        return self

    # --- transmission ------------------------------------------------------------------------------------

    def new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def send_request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes | None = None,
        handle: int | None = None,
        track: bool = True,
    ) -> int:
        """Send one request (and its payload, if given); remember it so its reply can be parsed."""
        if handle is None:
            handle = self.new_handle()
        data = wire.encode_request(wire.Request(flags, command, handle, offset, length))
        if payload is not None:
            data += payload
        if track:
            self.expect(handle, command, offset, length)
        self.send(data)
        return handle

    def expect(self, handle: int, command: int, offset: int, length: int) -> None:
        """Remember a request sent by hand, so that read_reply can parse its reply."""
        if handle in self.inflight:
            raise ValueError(f"handle {handle:#x} already in flight")
        self.inflight[handle] = _InFlight(command, offset, length)

    def read_reply(self) -> Reply:
        """The next complete reply, whichever request it answers."""
        while True:
            magic = wire.U32.unpack(peek := self.recv_exact(4))[0]
            if magic == SIMPLE_REPLY_MAGIC:
                simple = wire.decode_simple_reply(peek + self.recv_exact(SIMPLE_REPLY_SIZE - 4))
                req = self.inflight.pop(simple.handle, None)
                if req is None:
                    raise ProtocolError(f"simple reply to unknown handle {simple.handle:#x}")
                if self.structured and req.command == Command.READ:
                    # proto.md: with structured replies a READ MUST get a structured reply, even an
                    # early EINVAL.
                    raise ProtocolError(f"simple reply to READ {simple.handle:#x} with structured replies")
                data = b""
                if req.command == Command.READ and simple.error == 0:
                    data = self.recv_exact(req.length)
                return Reply(simple.handle, simple.error, data)
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolError(f"bad reply magic {magic:#x}")
            header = wire.decode_chunk_header(peek + self.recv_exact(CHUNK_HEADER_SIZE - 4))
            if header.length > _MAX_REPLY_PAYLOAD:
                raise ProtocolError(f"chunk of {header.length} bytes")
            payload = wire.decode_chunk_payload(header.chunk_type, self.recv_exact(header.length))
            pending = self.inflight.get(header.handle)
            if pending is None:
                raise ProtocolError(f"chunk for unknown handle {header.handle:#x}")
            pending.chunks.append(Chunk(header.flags, header.chunk_type, payload))
            if header.flags & ReplyFlag.DONE:
                del self.inflight[header.handle]
                return _assemble(header.handle, pending)

    def call(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0, payload: bytes | None = None
    ) -> Reply:
        """One request and its reply (nothing else may be in flight)."""
        handle = self.send_request(command, offset, length, flags=flags, payload=payload)
        reply = self.read_reply()
        if reply.handle != handle:
            raise ProtocolError(f"reply to {reply.handle:#x}, expected {handle:#x}")
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.call(Command.READ, offset, length, flags=flags)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.call(Command.WRITE, offset, len(data), flags=flags, payload=data)

    def block_status(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.call(Command.BLOCK_STATUS, offset, length, flags=flags)

    def disconnect(self) -> None:
        self.send_request(Command.DISC, track=False)


def _assemble(handle: int, req: _InFlight) -> Reply:
    """Turn the chunks of one structured reply into a Reply, checking they make sense."""
    error = 0
    message = ""
    for chunk in req.chunks:
        if isinstance(chunk.payload, wire.ErrorChunk) and not error:
            error, message = chunk.payload.error, chunk.payload.message
    data = b""
    if req.command == Command.READ and not error:
        buf = bytearray(req.length)
        covered = 0
        for chunk in req.chunks:
            p = chunk.payload
            if isinstance(p, wire.OffsetData):
                start, n = p.offset - req.offset, len(p.data)
                buf[start : start + n] = p.data
            elif isinstance(p, wire.OffsetHole):
                start, n = p.offset - req.offset, p.length
            elif isinstance(p, wire.NoneChunk):
                continue
            else:
                raise ProtocolError(f"unexpected chunk {p!r} in a read reply")
            if start < 0 or start + n > req.length:
                raise ProtocolError(f"chunk at {p.offset} outside the read")
            covered += n
        if covered != req.length:
            raise ProtocolError(f"read of {req.length} bytes covered by {covered} bytes of chunks")
        data = bytes(buf)
    return Reply(handle, error, data, req.chunks, message, structured=True)


def option_error(replies: list[wire.OptionReplyMessage]) -> int:
    """The final reply type of an option, asserting it is the only reply when it is an error."""
    final = replies[-1].reply_type
    if is_option_error(final):
        assert len(replies) == 1, replies
    return final
