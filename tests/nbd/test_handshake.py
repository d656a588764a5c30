"""Negotiation without sockets: server and client machines, scripted and property-based."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.nbd import wire
from hikkoshi.nbd.client_handshake import ClientHandshake, ClientOptions, ExportList
from hikkoshi.nbd.client_handshake import Negotiated as ClientNegotiated
from hikkoshi.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from hikkoshi.nbd.errors import OptionError, ProtocolError
from hikkoshi.nbd.export_info import ExportInfo
from hikkoshi.nbd.server_handshake import (
    NEED_DATA,
    Aborted,
    Negotiated,
    ServerHandshake,
    StartTLS,
    TLSMode,
)

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH


class Table:
    def __init__(self, *exports: ExportInfo) -> None:
        self.by_name = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "" and "" not in self.by_name:
            return next(iter(self.by_name.values()), None)
        return self.by_name.get(name)

    def exports(self) -> Iterable[ExportInfo]:
        return list(self.by_name.values())


TABLE = Table(
    ExportInfo(
        "disk", 1 << 20, FLAGS, description="first", meta_contexts=(BASE_ALLOCATION, "hikkoshi:dirty:a")
    ),
    ExportInfo("other", 4096, FLAGS | TransmissionFlag.READ_ONLY),
)


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.encode_option(wire.OptionRequest(opt, data))


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into (option, reply type, payload)."""
    out = []
    while raw:
        opt, kind, length = wire.decode_option_reply_header(raw[:20])
        out.append((opt, kind, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return out


def started(tls: TLSMode = TLSMode.NONE) -> ServerHandshake:
    hs = ServerHandshake(TABLE, tls)
    greeting = hs.data_to_send()
    assert wire.decode_greeting(greeting).flags == 3
    hs.receive_data(b"\x00\x00\x00\x03")
    assert hs.next_event() is NEED_DATA
    return hs


def test_go_with_infos() -> None:
    hs = started()
    hs.receive_data(option(Option.STRUCTURED_REPLY))
    req = wire.InfoRequest("disk", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
    hs.receive_data(option(Option.GO, wire.encode_info_request(req)))
    event = hs.next_event()
    assert isinstance(event, Negotiated)
    assert event.export.name == "disk" and event.structured_replies
    got = replies(hs.data_to_send())
    assert got[0] == (Option.STRUCTURED_REPLY, OptionReply.ACK, b"")
    infos = [wire.decode_info(d) for _, kind, d in got if kind == OptionReply.INFO]
    assert wire.InfoExport(1 << 20, FLAGS) in infos
    assert wire.InfoName("disk") in infos and wire.InfoDescription("first") in infos
    assert any(isinstance(i, wire.InfoBlockSize) for i in infos)
    assert got[-1][1] == OptionReply.ACK


def test_errors_keep_negotiation_going() -> None:
    hs = started()
    hs.receive_data(option(Option.GO, wire.encode_info_request(wire.InfoRequest("nope"))))
    hs.receive_data(option(77))
    hs.receive_data(option(Option.GO, b"\x00\x00\x00\x09ab"))
    hs.receive_data(
        option(Option.SET_META_CONTEXT, wire.encode_meta_context_request(wire.MetaContextRequest("disk")))
    )
    hs.receive_data(option(Option.STARTTLS))
    hs.receive_data(option(Option.LIST, b"x"))
    hs.receive_data(option(Option.EXTENDED_HEADERS))
    assert hs.next_event() is NEED_DATA
    kinds = [kind for _, kind, _ in replies(hs.data_to_send())]
    assert kinds == [
        OptionReply.ERR_UNKNOWN,
        OptionReply.ERR_UNSUP,
        OptionReply.ERR_INVALID,
        OptionReply.ERR_INVALID,  # meta context before structured replies
        OptionReply.ERR_UNSUP,  # no TLS configured
        OptionReply.ERR_INVALID,
        OptionReply.ERR_UNSUP,
    ]


def test_list_and_abort() -> None:
    hs = started()
    hs.receive_data(option(Option.LIST) + option(Option.ABORT))
    assert isinstance(hs.next_event(), Aborted)
    got = replies(hs.data_to_send())
    names = [wire.decode_server_entry(d).name for _, kind, d in got if kind == OptionReply.SERVER]
    assert names == ["disk", "other"]
    assert [k for _, k, _ in got[-2:]] == [OptionReply.ACK, OptionReply.ACK]


def test_meta_contexts() -> None:
    hs = started()
    hs.receive_data(option(Option.STRUCTURED_REPLY))
    list_all = wire.MetaContextRequest("disk", ("hikkoshi:",))
    hs.receive_data(option(Option.LIST_META_CONTEXT, wire.encode_meta_context_request(list_all)))
    select = wire.MetaContextRequest("disk", (BASE_ALLOCATION, "qemu:dirty-bitmap:x", BASE_ALLOCATION))
    hs.receive_data(option(Option.SET_META_CONTEXT, wire.encode_meta_context_request(select)))
    hs.receive_data(option(Option.GO, wire.encode_info_request(wire.InfoRequest("disk"))))
    event = hs.next_event()
    assert isinstance(event, Negotiated)
    assert event.meta_contexts == {1: BASE_ALLOCATION}
    got = replies(hs.data_to_send())
    listed = [wire.decode_meta_context(d) for o, k, d in got if o == Option.LIST_META_CONTEXT and k == 4]
    assert listed == [wire.MetaContext(0, "hikkoshi:dirty:a")]


def test_meta_contexts_bound_to_export_name() -> None:
    hs = started()
    hs.receive_data(option(Option.STRUCTURED_REPLY))
    select = wire.MetaContextRequest("other", (BASE_ALLOCATION,))
    hs.receive_data(option(Option.SET_META_CONTEXT, wire.encode_meta_context_request(select)))
    hs.receive_data(option(Option.GO, wire.encode_info_request(wire.InfoRequest("disk"))))
    event = hs.next_event()
    assert isinstance(event, Negotiated) and event.meta_contexts == {}


def test_export_name_no_zeroes_and_trailing() -> None:
    hs = ServerHandshake(TABLE)
    hs.data_to_send()
    hs.receive_data(b"\x00\x00\x00\x03" + option(Option.EXPORT_NAME, b"other") + b"EXTRA")
    event = hs.next_event()
    assert isinstance(event, Negotiated) and event.export.name == "other"
    reply = wire.decode_export_name_reply(hs.data_to_send())
    assert reply == wire.ExportNameReply(4096, FLAGS | TransmissionFlag.READ_ONLY, zeroes=False)
    assert hs.trailing_data() == b"EXTRA"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(b"\x00\x00\x00\x00", "fixed newstyle"), (b"\x00\x00\x00\x07", "unknown client flags")],
)
def test_bad_client_flags(flags: bytes, message: str) -> None:
    hs = ServerHandshake(TABLE)
    hs.receive_data(flags)
    with pytest.raises(ProtocolError, match=message):
        hs.next_event()


def test_unknown_export_name_closes() -> None:
    hs = started()
    hs.receive_data(option(Option.EXPORT_NAME, b"nope"))
    with pytest.raises(ProtocolError, match="unknown export"):
        hs.next_event()


def test_oversize_option_is_skipped() -> None:
    hs = started()
    big = MAX_OPTION_LENGTH + 10
    hs.receive_data(wire.OPTION_HEADER.pack(IHAVEOPT, Option.GO, big))
    for _ in range(big // 1000):
        hs.receive_data(b"x" * 1000)
        assert hs.next_event() is NEED_DATA
    hs.receive_data(b"x" * (big % 1000) + option(Option.STRUCTURED_REPLY))
    assert hs.next_event() is NEED_DATA
    assert [k for _, k, _ in replies(hs.data_to_send())] == [OptionReply.ERR_TOO_BIG, OptionReply.ACK]


def test_tls_required() -> None:
    hs = started(TLSMode.REQUIRED)
    hs.receive_data(option(Option.GO, wire.encode_info_request(wire.InfoRequest("disk"))))
    hs.receive_data(option(Option.STRUCTURED_REPLY))
    assert hs.next_event() is NEED_DATA
    assert [k for _, k, _ in replies(hs.data_to_send())] == [OptionReply.ERR_TLS_REQD] * 2
    hs.receive_data(option(Option.STARTTLS))
    assert isinstance(hs.next_event(), StartTLS)
    assert replies(hs.data_to_send()) == [(Option.STARTTLS, OptionReply.ACK, b"")]
    hs.tls_started()
    hs.receive_data(option(Option.STARTTLS))
    hs.receive_data(option(Option.GO, wire.encode_info_request(wire.InfoRequest("disk"))))
    assert isinstance(hs.next_event(), Negotiated)
    assert replies(hs.data_to_send())[0][1] == OptionReply.ERR_INVALID  # TLS already active


def test_export_name_before_tls_closes() -> None:
    hs = started(TLSMode.REQUIRED)
    hs.receive_data(option(Option.EXPORT_NAME, b"disk"))
    with pytest.raises(ProtocolError):
        hs.next_event()


def test_plaintext_smuggled_after_starttls_is_refused() -> None:
    hs = started(TLSMode.REQUIRED)
    hs.receive_data(option(Option.STARTTLS) + option(Option.STRUCTURED_REPLY))
    with pytest.raises(ProtocolError, match="after NBD_OPT_STARTTLS"):
        hs.next_event()


# --- client and server machines talking to each other ---------------------------------------------------


def converse(client: ClientHandshake, server: ServerHandshake, chunk: int) -> tuple[object, object]:
    """Shuttle bytes between the two machines, ``chunk`` bytes at a time, until each has a final event."""
    c_event: object = None
    s_event: object = None
    to_client = server.data_to_send()
    for _ in range(10_000):
        for i in range(0, len(to_client), chunk):
            client.receive_data(to_client[i : i + chunk])
        while c_event is None and (c_next := client.next_event()) is not NEED_DATA:
            if isinstance(c_next, StartTLS):
                client.tls_started()
            else:
                c_event = c_next
        to_server = client.data_to_send()
        for i in range(0, len(to_server), chunk):
            server.receive_data(to_server[i : i + chunk])
            while s_event is None and (s_next := server.next_event()) is not NEED_DATA:
                if isinstance(s_next, StartTLS):
                    server.tls_started()
                else:
                    s_event = s_next
        to_client = server.data_to_send()
        if c_event is not None and s_event is not None:
            return c_event, s_event
    raise AssertionError("negotiation did not finish")


@settings(max_examples=60)
@given(
    export=st.sampled_from(["", "disk", "other"]),
    structured=st.booleans(),
    contexts=st.lists(st.sampled_from([BASE_ALLOCATION, "hikkoshi:dirty:a", "nope:x"]), max_size=3),
    tls=st.booleans(),
    chunk=st.integers(1, 64),
)
def test_client_and_server_agree(
    export: str, structured: bool, contexts: list[str], tls: bool, chunk: int
) -> None:
    client = ClientHandshake(
        ClientOptions(export=export, tls=tls, structured=structured, meta_contexts=tuple(contexts))
    )
    server = ServerHandshake(TABLE, TLSMode.REQUIRED if tls else TLSMode.NONE)
    c_event, s_event = converse(client, server, chunk)
    assert isinstance(c_event, ClientNegotiated) and isinstance(s_event, Negotiated)
    expected = TABLE.lookup(export)
    assert expected is not None
    assert c_event.export.size == s_event.export.size == expected.size
    assert c_event.export.flags == expected.flags
    assert c_event.structured == s_event.structured_replies == structured
    assert c_event.meta_contexts == s_event.meta_contexts
    wanted = [c for c in dict.fromkeys(contexts) if structured and c in expected.meta_contexts]
    assert sorted(s_event.meta_contexts.values()) == sorted(wanted)


def sent_options(raw: bytes) -> list[int]:
    """The options in client output that follows its 4-byte flags."""
    out = []
    raw = raw[4:]
    while raw:
        opt, length = wire.decode_option_header(raw[:16])
        out.append(opt)
        raw = raw[16 + length :]
    return out


def test_client_sends_every_option_before_any_reply() -> None:
    """One round trip for the whole negotiation: over a WAN each option waited for costs one more."""
    client = ClientHandshake(ClientOptions(export="disk", meta_contexts=(BASE_ALLOCATION,)))
    client.receive_data(wire.encode_greeting(wire.Greeting(3)))
    assert client.next_event() is NEED_DATA
    assert sent_options(client.data_to_send()) == [
        Option.STRUCTURED_REPLY,
        Option.SET_META_CONTEXT,
        Option.GO,
    ]


def test_client_without_structured_replies_gets_no_contexts() -> None:
    """A server refusing structured replies refuses the contexts sent with them: none, and still open."""
    client = ClientHandshake(ClientOptions(export="disk", meta_contexts=(BASE_ALLOCATION,)))
    client.receive_data(wire.encode_greeting(wire.Greeting(3)))
    assert client.next_event() is NEED_DATA
    client.data_to_send()
    for opt, kind in (
        (Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP),
        (Option.SET_META_CONTEXT, OptionReply.ERR_INVALID),
    ):
        client.receive_data(wire.encode_option_reply(wire.OptionReplyMessage(opt, kind)))
    info = wire.encode_info(wire.InfoExport(1 << 20, FLAGS))
    client.receive_data(wire.encode_option_reply(wire.OptionReplyMessage(Option.GO, OptionReply.INFO, info)))
    client.receive_data(wire.encode_option_reply(wire.OptionReplyMessage(Option.GO, OptionReply.ACK)))
    event = client.next_event()
    assert isinstance(event, ClientNegotiated)
    assert not event.structured and event.meta_contexts == {} and event.export.size == 1 << 20


def test_client_list_exports() -> None:
    client = ClientHandshake(ClientOptions(list_exports=True))
    server = ServerHandshake(TABLE)
    c_event, s_event = converse(client, server, 7)
    assert isinstance(c_event, ExportList) and isinstance(s_event, Aborted)
    assert [e.name for e in c_event.exports] == ["disk", "other"]


def test_client_unknown_export_raises_option_error() -> None:
    client = ClientHandshake(ClientOptions(export="missing"))
    server = ServerHandshake(TABLE)
    with pytest.raises(OptionError) as info:
        converse(client, server, 100)
    assert info.value.reply_type == OptionReply.ERR_UNKNOWN


def test_client_refuses_tls_refusal() -> None:
    client = ClientHandshake(ClientOptions(export="disk", tls=True))
    server = ServerHandshake(TABLE, TLSMode.NONE)
    with pytest.raises(OptionError, match="refused"):
        converse(client, server, 100)


# --- arbitrary input ------------------------------------------------------------------------------------

option_messages = st.one_of(
    st.builds(option, st.sampled_from(list(Option)) | st.integers(0, 0xFFFFFFFF), st.binary(max_size=40)),
    st.binary(max_size=40),
)


@settings(max_examples=300)
@given(st.lists(option_messages, max_size=8), st.integers(1, 50), st.booleans())
def test_server_handshake_any_input(messages: list[bytes], chunk: int, tls: bool) -> None:
    """Any byte stream: events or ProtocolError, never another exception; chunking changes nothing."""
    stream = b"\x00\x00\x00\x03" + b"".join(messages)

    def run(step: int) -> tuple[bytes, list[str], str | None]:
        hs = ServerHandshake(TABLE, TLSMode.REQUIRED if tls else TLSMode.NONE)
        out = hs.data_to_send()
        events: list[str] = []
        try:
            for i in range(0, len(stream), step):
                hs.receive_data(stream[i : i + step])
                while (event := hs.next_event()) is not NEED_DATA:
                    events.append(type(event).__name__)
                    if isinstance(event, StartTLS):
                        hs.tls_started()
                    else:
                        return out + hs.data_to_send(), events, None
                out += hs.data_to_send()
        except ProtocolError as exc:
            return out + hs.data_to_send(), events, type(exc).__name__
        return out, events, None

    if tls:
        # Where STARTTLS falls relative to a chunk boundary decides what is plaintext smuggling, so only
        # "nothing but ProtocolError" holds here.
        run(chunk)
    else:
        assert run(chunk) == run(len(stream) or 1)
