"""The codec: every valid message round-trips; any byte string is parsed or rejected with ProtocolError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import ChunkType, Info
from hikkoshi.nbd.errors import ProtocolError

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
name = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 4096)
small_bytes = st.binary(max_size=64)

requests = st.builds(wire.Request, u16, u16, u64, u64, u32)
simple_replies = st.builds(wire.SimpleReply, u32, u64)
chunk_headers = st.builds(wire.ChunkHeader, u16, u16, u64, u32)
info_requests = st.builds(wire.InfoRequest, name, st.lists(u16, max_size=5).map(tuple))
meta_requests = st.builds(wire.MetaContextRequest, name, st.lists(name, max_size=5).map(tuple))
infos = st.one_of(
    st.builds(wire.InfoExport, u64, u16),
    st.builds(wire.InfoName, name),
    st.builds(wire.InfoDescription, name),
    st.builds(wire.InfoBlockSize, u32, u32, u32),
    st.builds(wire.InfoUnknown, st.integers(4, 0xFFFF), small_bytes),
)
payloads = st.one_of(
    st.builds(wire.OffsetData, u64, st.binary(min_size=1, max_size=64)),
    st.builds(wire.OffsetHole, u64, st.integers(1, 0xFFFFFFFF)),
    st.builds(
        wire.BlockStatusChunk,
        u32,
        st.lists(st.tuples(st.integers(1, 0xFFFFFFFF), u32), min_size=1, max_size=8).map(tuple),
    ),
    st.builds(wire.ErrorChunk, st.integers(1, 0xFFFFFFFF), name, st.none() | u64),
    st.just(wire.NoneChunk()),
    st.builds(wire.UnknownChunk, st.integers(6, 0x7FFF), small_bytes),
)

ROUND_TRIPS: list[tuple[Any, Callable[[Any], bytes], Callable[[bytes], Any]]] = [
    (st.builds(wire.Greeting, u16), wire.encode_greeting, wire.decode_greeting),
    (requests, wire.encode_request, wire.decode_request),
    (simple_replies, wire.encode_simple_reply, wire.decode_simple_reply),
    (chunk_headers, wire.encode_chunk_header, wire.decode_chunk_header),
    (info_requests, wire.encode_info_request, wire.decode_info_request),
    (meta_requests, wire.encode_meta_context_request, wire.decode_meta_context_request),
    (infos, wire.encode_info, wire.decode_info),
    (st.builds(wire.ServerEntry, name, name), wire.encode_server_entry, wire.decode_server_entry),
    (st.builds(wire.MetaContext, u32, name), wire.encode_meta_context, wire.decode_meta_context),
    (
        st.builds(wire.ExportNameReply, u64, u16, st.booleans()),
        wire.encode_export_name_reply,
        wire.decode_export_name_reply,
    ),
]


@pytest.mark.parametrize(
    ("strategy", "encode", "decode"), ROUND_TRIPS, ids=lambda x: getattr(x, "__name__", "")
)
@given(data=st.data())
def test_round_trip(
    strategy: Any, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any], data: Any
) -> None:
    msg = data.draw(strategy)
    assert decode(encode(msg)) == msg


@given(payloads, u16, u64)
def test_chunk_round_trip(payload: wire.ChunkPayload, flags: int, handle: int) -> None:
    raw = wire.encode_chunk(flags, handle, payload)
    header = wire.decode_chunk_header(raw[:20])
    assert header.handle == handle and header.flags == flags and header.length == len(raw) - 20
    assert wire.decode_chunk_payload(header.chunk_type, raw[20:]) == payload


@given(st.builds(wire.OptionRequest, u32, small_bytes))
def test_option_round_trip(msg: wire.OptionRequest) -> None:
    raw = wire.encode_option(msg)
    option, length = wire.decode_option_header(raw[:16])
    assert wire.OptionRequest(option, raw[16 : 16 + length]) == msg


@given(st.builds(wire.OptionReplyMessage, u32, u32, small_bytes))
def test_option_reply_round_trip(msg: wire.OptionReplyMessage) -> None:
    raw = wire.encode_option_reply(msg)
    option, reply_type, length = wire.decode_option_reply_header(raw[:20])
    assert wire.OptionReplyMessage(option, reply_type, raw[20 : 20 + length]) == msg


DECODERS: list[Callable[[bytes], Any]] = [
    wire.decode_greeting,
    wire.decode_option_header,
    wire.decode_option_reply_header,
    wire.decode_export_name_reply,
    wire.decode_info_request,
    wire.decode_meta_context_request,
    wire.decode_info,
    wire.decode_server_entry,
    wire.decode_meta_context,
    wire.decode_request,
    wire.decode_simple_reply,
    wire.decode_chunk_header,
]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
@given(raw=st.binary(max_size=200))
def test_any_bytes_parse_or_protocol_error(decode: Callable[[bytes], Any], raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(raw)


@given(st.sampled_from([0, 1, 2, 5, 0x8001, 0x8002, 0x8003, 7]), st.binary(max_size=100))
def test_any_chunk_payload_parse_or_protocol_error(chunk_type: int, raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        wire.decode_chunk_payload(chunk_type, raw)


def test_specific_rejections() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        wire.decode_request(b"\x00" * 28)
    with pytest.raises(ProtocolError, match="UTF-8"):
        wire.decode_info_request(b"\x00\x00\x00\x02\xff\xfe\x00\x00")
    with pytest.raises(ProtocolError, match="length 0"):
        wire.decode_chunk_payload(ChunkType.BLOCK_STATUS, b"\x00\x00\x00\x01" + b"\x00" * 8)
    with pytest.raises(ProtocolError, match="error value 0"):
        wire.decode_chunk_payload(ChunkType.ERROR, b"\x00" * 6)
    with pytest.raises(ProtocolError):
        wire.decode_info(wire.encode_info(wire.InfoExport(1, 2))[:-1])
    # An unknown info type is kept, not rejected: clients must ignore what they do not know.
    assert wire.decode_info(b"\x00\x09abc") == wire.InfoUnknown(9, b"abc")
    assert int(Info.BLOCK_SIZE) == 3


def test_known_wire_bytes() -> None:
    """Spot checks against byte layouts written out from the specification."""
    assert wire.encode_greeting(wire.Greeting(3)) == b"NBDMAGICIHAVEOPT\x00\x03"
    assert wire.encode_request(wire.Request(1, 0, 7, 512, 4096)) == (
        b"\x25\x60\x95\x13\x00\x01\x00\x00"
        + (7).to_bytes(8, "big")
        + (512).to_bytes(8, "big")
        + b"\x00\x00\x10\x00"
    )
    assert wire.encode_simple_reply(wire.SimpleReply(22, 5)) == b"\x67\x44\x66\x98\x00\x00\x00\x16" + (
        5
    ).to_bytes(8, "big")
