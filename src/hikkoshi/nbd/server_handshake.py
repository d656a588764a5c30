"""Server side of fixed newstyle negotiation, as a sans-I/O state machine.

Feed received bytes with :meth:`ServerHandshake.receive_data`, take events from
:meth:`ServerHandshake.next_event`, and send whatever :meth:`ServerHandshake.data_to_send` returns.
Malformed traffic that cannot be answered raises :class:`ProtocolError`; the shell then drops the
connection. Malformed option payloads are answered with NBD_REP_ERR_INVALID and negotiation goes on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    MAX_OPTION_LENGTH,
    OPTION_HEADER_SIZE,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from hikkoshi.nbd.errors import ProtocolError
from hikkoshi.nbd.export_info import Catalogue, ExportInfo, match_contexts


class NeedData:
    """More bytes are needed before anything else can happen."""


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The client asked for TLS and was told yes: upgrade the connection, then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client ended negotiation (NBD_OPT_ABORT); send what is queued, then close."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Negotiation finished: the transmission phase begins on this export."""

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)
    #: The client asked for NBD_INFO_BLOCK_SIZE with the NBD_OPT_GO that ended negotiation: it MUST then
    #: abide by the size constraints it was sent (proto.md, "Size constraints").
    block_size: bool = False


Event = NeedData | StartTLS | Aborted | Negotiated


class TLSMode(enum.Enum):
    NONE = "none"  # STARTTLS refused
    REQUIRED = "required"  # nothing but STARTTLS and ABORT before TLS


class _State(enum.Enum):
    CLIENT_FLAGS = 1
    OPTION_HEADER = 2
    OPTION_DATA = 3
    SKIP_OPTION = 4
    WAIT_TLS = 5
    DONE = 6


class ServerHandshake:
    """Negotiation of one connection, from the server's side."""

    def __init__(
        self, catalogue: Catalogue, tls: TLSMode = TLSMode.NONE, max_payload: int | None = None
    ) -> None:
        self._catalogue = catalogue
        #: The maximum payload to advertise instead of each export's own.
        self._max_payload = max_payload
        self._block_size = False
        self._tls = tls
        self._tls_active = False
        self._state = _State.CLIENT_FLAGS
        self._buf = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._option = 0
        self._option_len = 0
        self._skip = 0
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self._out += wire.encode_greeting(
            wire.Greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        )

    # --- interface ---------------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes queued for the client (and forget them)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | memoryview) -> None:
        """Take bytes from the client."""
        if self._state is _State.DONE:
            raise ProtocolError("data after negotiation ended")
        self._buf += data

    def trailing_data(self) -> bytes:
        """Bytes received after negotiation ended (the first transmission requests, if pipelined)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def tls_started(self) -> None:
        """The shell finished the TLS upgrade; negotiation goes on inside TLS."""
        if self._state is not _State.WAIT_TLS:
            raise RuntimeError("tls_started() without a StartTLS event")
        self._tls_active = True
        # State from before TLS must not survive it (an attacker could have injected it).
        self.structured = False
        self._meta_export = None
        self._meta = {}
        self._buf.clear()
        self._state = _State.OPTION_HEADER

    def next_event(self) -> Event:
        """The next event, or NEED_DATA."""
        while not self._events:
            if not self._step():
                return NEED_DATA
        return self._events.pop(0)

    # --- machinery ---------------------------------------------------------------------------------------

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _step(self) -> bool:
        state = self._state
        if state is _State.CLIENT_FLAGS:
            data = self._take(4)
            if data is None:
                return False
            flags = wire.U32.unpack(data)[0]
            if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                raise ProtocolError(f"unknown client flags {flags:#x}")
            if not flags & ClientFlag.FIXED_NEWSTYLE:
                raise ProtocolError("client does not speak fixed newstyle negotiation")
            self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._state = _State.OPTION_HEADER
            return True
        if state is _State.OPTION_HEADER:
            data = self._take(OPTION_HEADER_SIZE)
            if data is None:
                return False
            self._option, self._option_len = wire.decode_option_header(data)
            if self._option_len > MAX_OPTION_LENGTH:
                if self._option == Option.EXPORT_NAME:
                    raise ProtocolError("NBD_OPT_EXPORT_NAME too long")
                self._skip = self._option_len
                self._state = _State.SKIP_OPTION
            else:
                self._state = _State.OPTION_DATA
            return True
        if state is _State.SKIP_OPTION:
            n = min(self._skip, len(self._buf))
            del self._buf[:n]
            self._skip -= n
            if self._skip:
                return False
            self._reply(OptionReply.ERR_TOO_BIG, b"option payload too large")
            self._state = _State.OPTION_HEADER
            return True
        if state is _State.OPTION_DATA:
            data = self._take(self._option_len)
            if data is None:
                return False
            self._state = _State.OPTION_HEADER
            self._handle_option(self._option, data)
            return True
        return False  # WAIT_TLS, DONE: nothing to do until the shell acts

    def _reply(self, reply_type: int, data: bytes = b"", option: int | None = None) -> None:
        opt = self._option if option is None else option
        self._out += wire.encode_option_reply(wire.OptionReplyMessage(opt, reply_type, data))

    def _handle_option(self, option: int, data: bytes) -> None:
        tls_pending = self._tls is TLSMode.REQUIRED and not self._tls_active
        if option == Option.ABORT:
            self._reply(OptionReply.ACK)
            self._state = _State.DONE
            self._events.append(Aborted())
            return
        if option == Option.EXPORT_NAME:
            if tls_pending:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
            self._export_name(data)
            return
        if option == Option.STARTTLS:
            self._starttls(data)
            return
        if tls_pending:
            self._reply(OptionReply.ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
            return
        if option == Option.LIST:
            if data:
                self._reply(OptionReply.ERR_INVALID, b"NBD_OPT_LIST takes no payload")
                return
            for export in self._catalogue.exports():
                entry = wire.ServerEntry(export.name, export.description)
                self._reply(OptionReply.SERVER, wire.encode_server_entry(entry))
            self._reply(OptionReply.ACK)
        elif option in (Option.INFO, Option.GO):
            self._info_or_go(option, data)
        elif option == Option.STRUCTURED_REPLY:
            if data:
                self._reply(OptionReply.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no payload")
                return
            self.structured = True
            self._reply(OptionReply.ACK)
        elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            self._reply(OptionReply.ERR_UNSUP, f"option {option} is not supported".encode())

    def _starttls(self, data: bytes) -> None:
        if data:
            self._reply(OptionReply.ERR_INVALID, b"NBD_OPT_STARTTLS takes no payload")
        elif self._tls is TLSMode.NONE:
            self._reply(OptionReply.ERR_UNSUP, b"this server has no TLS configured")
        elif self._tls_active:
            self._reply(OptionReply.ERR_INVALID, b"TLS is already active")
        else:
            self._reply(OptionReply.ACK)
            if self._buf:
                # Bytes pipelined behind STARTTLS would be plaintext smuggled into the TLS session.
                raise ProtocolError("client sent data after NBD_OPT_STARTTLS before the TLS handshake")
            self._state = _State.WAIT_TLS
            self._events.append(StartTLS())

    def _export_name(self, data: bytes) -> None:
        try:
            name = wire._text(data, "export name")
        except ProtocolError:
            raise
        export = self._catalogue.lookup(name)
        if export is None:
            # This option has no error reply: the only answer is to close.
            raise ProtocolError(f"unknown export {name!r}")
        self._out += wire.encode_export_name_reply(
            wire.ExportNameReply(export.size, self._flags(export), zeroes=not self.no_zeroes)
        )
        self._finish(export, name)

    def _flags(self, export: ExportInfo) -> int:
        # proto.md: SEND_DF must be clear unless structured replies were negotiated.
        return export.flags if self.structured else export.flags & ~int(TransmissionFlag.SEND_DF)

    def _finish(self, export: ExportInfo, name: str) -> None:
        contexts = dict(self._meta) if self._meta_export == name else {}
        self._state = _State.DONE
        self._events.append(Negotiated(export, self.structured, contexts, self._block_size))

    def _info_or_go(self, option: int, data: bytes) -> None:
        try:
            request = wire.decode_info_request(data)
        except ProtocolError as exc:
            self._reply(OptionReply.ERR_INVALID, str(exc).encode())
            return
        export = self._catalogue.lookup(request.name)
        if export is None:
            self._reply(OptionReply.ERR_UNKNOWN, f"no export named {request.name!r}".encode())
            return
        infos: list[wire.InfoPayload] = [wire.InfoExport(export.size, self._flags(export))]
        if Info.NAME in request.infos:
            infos.append(wire.InfoName(export.name))
        if Info.DESCRIPTION in request.infos and export.description:
            infos.append(wire.InfoDescription(export.description))
        # Sent even when not asked for: our minimum is 1, so clients that ignore it lose nothing; and a
        # client that did not ask may exceed the maximum (it is then served, streamed).
        max_block = export.max_block if self._max_payload is None else self._max_payload
        infos.append(wire.InfoBlockSize(export.min_block, export.preferred_block, max_block))
        for info in infos:
            self._reply(OptionReply.INFO, wire.encode_info(info))
        self._reply(OptionReply.ACK)
        if option == Option.GO:
            # Only a GO that asked binds the client to the constraints (an earlier INFO does not).
            self._block_size = Info.BLOCK_SIZE in request.infos
            self._finish(export, request.name)

    def _meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            self._reply(OptionReply.ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            request = wire.decode_meta_context_request(data)
        except ProtocolError as exc:
            self._reply(OptionReply.ERR_INVALID, str(exc).encode())
            return
        export = self._catalogue.lookup(request.name)
        if export is None:
            self._reply(OptionReply.ERR_UNKNOWN, f"no export named {request.name!r}".encode())
            return
        setting = option == Option.SET_META_CONTEXT
        if setting:
            selected: list[str] = []
            for query in request.queries:
                selected += [
                    n
                    for n in match_contexts(export.meta_contexts, query, allow_prefix=False)
                    if n not in selected
                ]
            self._meta = {i + 1: n for i, n in enumerate(selected)}
            self._meta_export = request.name
            for cid, name in self._meta.items():
                self._reply(OptionReply.META_CONTEXT, wire.encode_meta_context(wire.MetaContext(cid, name)))
        else:
            names: list[str] = []
            if not request.queries:
                names = list(export.meta_contexts)
            for query in request.queries:
                names += [
                    n
                    for n in match_contexts(export.meta_contexts, query, allow_prefix=True)
                    if n not in names
                ]
            for name in names:
                # Listing does not select, so ids are meaningless here; the spec says send 0.
                self._reply(OptionReply.META_CONTEXT, wire.encode_meta_context(wire.MetaContext(0, name)))
        self._reply(OptionReply.ACK)
