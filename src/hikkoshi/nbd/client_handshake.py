"""Client side of fixed newstyle negotiation, as a sans-I/O state machine.

The negotiation is written as a generator script that asks for a number of bytes and receives them; the
machine feeds it from whatever the shell received. Events: :class:`StartTLS` (upgrade, then call
``tls_started``), :class:`Negotiated`, :class:`ExportList`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    OPTION_REPLY_HEADER_SIZE,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    is_option_error,
)
from hikkoshi.nbd.errors import OptionError, ProtocolError
from hikkoshi.nbd.export_info import ExportInfo
from hikkoshi.nbd.server_handshake import NEED_DATA, NeedData, StartTLS

_MAX_REPLY = 1 << 20


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """What to negotiate."""

    export: str = ""
    tls: bool = False
    structured: bool = True
    meta_contexts: tuple[str, ...] = ()
    #: Only list the server's exports, then end negotiation.
    list_exports: bool = False


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The export is open: transmission begins."""

    export: ExportInfo
    structured: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExportList:
    """Answer of NBD_OPT_LIST (negotiation then ends with NBD_OPT_ABORT)."""

    exports: tuple[wire.ServerEntry, ...]


Event = NeedData | StartTLS | Negotiated | ExportList
_Script = Generator[int, bytes, None]


class ClientHandshake:
    """Negotiation of one connection, from the client's side."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._buf = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._script = self._run()
        self._want = next(self._script)
        self._waiting_tls = False
        self.structured = False
        self.finished = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | memoryview) -> None:
        self._buf += data

    def tls_started(self) -> None:
        if not self._waiting_tls:
            raise RuntimeError("tls_started() without a StartTLS event")
        self._waiting_tls = False

    def next_event(self) -> Event:
        while not self._events:
            if self.finished or self._waiting_tls or len(self._buf) < self._want:
                return NEED_DATA
            data = bytes(self._buf[: self._want])
            del self._buf[: self._want]
            try:
                self._want = self._script.send(data)
            except StopIteration:
                self.finished = True
        return self._events.pop(0)

    # --- the script --------------------------------------------------------------------------------------

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out += wire.encode_option(wire.OptionRequest(option, data))

    def _reply(self, option: int) -> Generator[int, bytes, tuple[int, bytes]]:
        header = yield OPTION_REPLY_HEADER_SIZE
        got_option, reply_type, length = wire.decode_option_reply_header(header)
        if got_option != option:
            raise ProtocolError(f"reply to option {got_option} while waiting for option {option}")
        if length > _MAX_REPLY:
            raise ProtocolError(f"option reply of {length} bytes")
        data = (yield length) if length else b""
        return reply_type, data

    def _simple_option(self, option: int) -> Generator[int, bytes, tuple[int, bytes]]:
        """Send an option without payload and return its single reply."""
        self._send_option(option)
        reply_type, data = yield from self._reply(option)
        return reply_type, data

    def _structured_reply(self) -> Generator[int, bytes, None]:
        """Read the reply to NBD_OPT_STRUCTURED_REPLY (the caller sent it)."""
        reply_type, _data = yield from self._reply(Option.STRUCTURED_REPLY)
        if reply_type == OptionReply.ACK:
            self.structured = True
        elif not is_option_error(reply_type):
            raise ProtocolError(f"unexpected reply {reply_type} to NBD_OPT_STRUCTURED_REPLY")

    def _run(self) -> _Script:
        opts = self.options
        greeting = wire.decode_greeting((yield 18))
        if not greeting.flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError("server does not speak fixed newstyle negotiation")
        no_zeroes = bool(greeting.flags & HandshakeFlag.NO_ZEROES)
        flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
        self._out += wire.U32.pack(flags)

        if opts.tls:
            reply_type, data = yield from self._simple_option(Option.STARTTLS)
            if reply_type != OptionReply.ACK:
                raise OptionError(Option.STARTTLS, reply_type, _message(data) or "server refused TLS")
            self._waiting_tls = True
            self._events.append(StartTLS())
            yield 0  # nothing more may be queued until the shell has upgraded the connection

        if opts.list_exports:
            if opts.structured:
                self._send_option(Option.STRUCTURED_REPLY)
                yield from self._structured_reply()
            self._send_option(Option.LIST)
            entries: list[wire.ServerEntry] = []
            while True:
                reply_type, data = yield from self._reply(Option.LIST)
                if reply_type == OptionReply.SERVER:
                    entries.append(wire.decode_server_entry(data))
                elif reply_type == OptionReply.ACK:
                    break
                else:
                    raise OptionError(Option.LIST, reply_type, _message(data))
            self._send_option(Option.ABORT)
            self._events.append(ExportList(tuple(entries)))
            return

        # Every option up to GO is sent at once, then the replies are read in order (a server handles
        # options one after another): one round trip instead of one per option, which over a WAN is
        # most of the time a connection takes. Nothing here depends on an earlier answer to be sent: a
        # server that refuses structured replies refuses the meta contexts too (no contexts then).
        ask_contexts = bool(opts.structured and opts.meta_contexts)
        if opts.structured:
            self._send_option(Option.STRUCTURED_REPLY)
        if ask_contexts:
            request = wire.MetaContextRequest(opts.export, opts.meta_contexts)
            self._send_option(Option.SET_META_CONTEXT, wire.encode_meta_context_request(request))
        go = wire.InfoRequest(opts.export, (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
        self._send_option(Option.GO, wire.encode_info_request(go))

        if opts.structured:
            yield from self._structured_reply()

        contexts: dict[int, str] = {}
        if ask_contexts:
            while True:
                reply_type, data = yield from self._reply(Option.SET_META_CONTEXT)
                if reply_type == OptionReply.META_CONTEXT:
                    ctx = wire.decode_meta_context(data)
                    contexts[ctx.context_id] = ctx.name
                elif reply_type == OptionReply.ACK or is_option_error(reply_type):
                    break  # an error just means no contexts
                else:
                    raise ProtocolError(f"unexpected reply {reply_type} to NBD_OPT_SET_META_CONTEXT")
            if not self.structured:
                contexts = {}  # block status needs structured replies: contexts are useless without them

        size: int | None = None
        export_flags = 0
        description = ""
        block = (1, 4096, 32 << 20)
        while True:
            reply_type, data = yield from self._reply(Option.GO)
            if reply_type == OptionReply.INFO:
                info = wire.decode_info(data)
                if isinstance(info, wire.InfoExport):
                    size, export_flags = info.size, info.flags
                elif isinstance(info, wire.InfoDescription):
                    description = info.description
                elif isinstance(info, wire.InfoBlockSize):
                    block = (info.minimum, info.preferred, info.maximum)
            elif reply_type == OptionReply.ACK:
                break
            elif reply_type == OptionReply.ERR_UNSUP:
                # A server without NBD_OPT_GO: fall back to the old way (no error reply possible there).
                self._send_option(Option.EXPORT_NAME, opts.export.encode())
                reply = wire.decode_export_name_reply((yield 10 if no_zeroes else 134))
                size, export_flags = reply.size, reply.flags
                break
            elif is_option_error(reply_type):
                raise OptionError(Option.GO, reply_type, _message(data))
            else:
                raise ProtocolError(f"unexpected reply {reply_type} to NBD_OPT_GO")
        if size is None:
            raise ProtocolError("server finished NBD_OPT_GO without NBD_INFO_EXPORT")
        export = ExportInfo(
            name=opts.export,
            size=size,
            flags=export_flags,
            description=description,
            min_block=block[0],
            preferred_block=block[1],
            max_block=block[2],
            meta_contexts=tuple(contexts.values()),
        )
        self._events.append(Negotiated(export, self.structured, contexts))


def _message(data: bytes) -> str:
    return data.decode("utf-8", "replace")
