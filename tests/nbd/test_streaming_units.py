"""Payloads without sockets: the request reader's streamed WRITE payloads (taken in pieces, allocated only
as bytes arrive), how long READ replies are framed, which requests a client that did or did not negotiate
size constraints may send, and what negotiation tells the server about that."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    BASE_ALLOCATION,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    ReplyFlag,
    TransmissionFlag,
)
from hikkoshi.nbd.export_info import ExportInfo
from hikkoshi.nbd.limits import UNNEGOTIATED_MAX_PAYLOAD
from hikkoshi.nbd.request_reader import GROWTH, INLINE_MAX, RequestReader
from hikkoshi.nbd.server_handshake import Negotiated, ServerHandshake
from hikkoshi.nbd.server_transmission import MAX_CHUNK_DATA, SessionRules, check_request, read_reply_pieces

MiB = 1 << 20
PIECE = 256 * 1024

# --- streamed WRITE payloads -------------------------------------------------------------------------------

#: (command, length, refuse?) per request; lengths cross the inline limit and the piece size.
specs = st.lists(
    st.tuples(
        st.sampled_from([Command.READ, Command.WRITE, Command.WRITE, Command.FLUSH]),
        st.sampled_from([0, 1, 4096, INLINE_MAX, INLINE_MAX + 1, 300_000, PIECE, 3 * PIECE + 17]),
        st.booleans(),
    ),
    max_size=8,
)


def encode(reqs: list[tuple[int, int, bool]]) -> tuple[bytes, dict[int, bytes]]:
    stream = b""
    payloads: dict[int, bytes] = {}
    for handle, (command, length, _refuse) in enumerate(reqs):
        stream += wire.encode_request(wire.Request(0, command, handle, 0, length))
        if command == Command.WRITE:
            payloads[handle] = random.Random(handle).randbytes(length)
            stream += payloads[handle]
    return stream, payloads


@settings(max_examples=200, deadline=None)
@given(specs, st.lists(st.integers(1, 400_000), min_size=1, max_size=12))
def test_streamed_payloads_come_out_whole_in_bounded_pieces(
    reqs: list[tuple[int, int, bool]], cuts: list[int]
) -> None:
    """However the stream is cut into receives: every payload comes out exactly (inline, or in pieces no
    longer than the piece size), a refused one is skipped, and the requests after it stay in sync."""
    stream, payloads = encode(reqs)
    reader = RequestReader(piece_max=PIECE)
    got: dict[int, bytes] = {}
    seen: list[int] = []
    streaming: tuple[int, bytearray] | None = None
    pos = i = 0
    attached = 0
    while True:
        while True:
            if streaming is not None:
                handle, acc = streaming
                piece = reader.next_piece()
                if piece is None:
                    want = reader.piece_wanted()
                    if not want:
                        break
                    reader.attach_piece(bytearray(min(PIECE, max(4096, 1 << (want - 1).bit_length()))))
                    attached += 1
                    continue
                assert 0 < len(piece) <= PIECE
                acc += piece
                if not reader.streaming:
                    got[handle] = bytes(acc)
                    reader.detach_piece()
                    streaming = None
                continue
            req = reader.next_request()
            if req is None:
                break
            _flags, command, handle, _offset, length, payload = req
            seen.append(handle)
            if command != Command.WRITE:
                continue
            if payload is not None:
                assert len(payload) == length
                got[handle] = bytes(payload)
                continue
            assert length > INLINE_MAX and reader.deciding
            if reqs[handle][2]:
                reader.skip_payload()
            else:
                reader.stream_payload()
                streaming = (handle, bytearray())
        if pos == len(stream):
            break
        view = reader.get_buffer(-1)
        n = min(len(view), cuts[i % len(cuts)], len(stream) - pos)
        i += 1
        view[:n] = stream[pos : pos + n]
        reader.buffer_updated(n)
        pos += n
    assert seen == list(range(len(reqs)))
    assert streaming is None and not reader.streaming and not reader.deciding
    for handle, data in payloads.items():
        if len(data) > INLINE_MAX and reqs[handle][2] and handle in got:
            pytest.fail("a refused payload came out")
        if not (len(data) > INLINE_MAX and reqs[handle][2]):
            assert got.get(handle) == data, handle
    assert reader.capacity <= 256 * 1024  # the reader's own buffer stayed small


def test_a_payload_is_not_allocated_on_its_headers_say_so() -> None:
    """28 bytes declaring 32 MiB cost nothing; a piece buffer is wanted only once payload bytes are here,
    at most GROWTH times as long as what came, and grows (its bytes moved over) as more comes."""
    reader = RequestReader(piece_max=4 * MiB)
    reader.feed(wire.encode_request(wire.Request(0, Command.WRITE, 1, 0, 32 * MiB)))
    req = reader.next_request()
    assert req is not None and req[5] is None and reader.deciding
    reader.stream_payload()
    assert reader.piece_wanted() == 0 and reader.next_piece() is None
    assert reader.capacity <= 64 * 1024
    reader.feed(b"\x01")
    assert reader.piece_wanted() == GROWTH
    assert reader.attach_piece(bytearray(64 * 1024)) is None
    payload = bytearray(b"\x01")
    while True:
        view = reader.get_buffer(-1)
        assert len(view) <= 4 * MiB  # received in place, never past the piece
        chunk = random.Random(len(payload)).randbytes(len(view))
        view[:] = chunk
        reader.buffer_updated(len(chunk))
        payload += chunk
        piece = reader.next_piece()
        if piece is not None:
            break
        want = reader.piece_wanted()
        assert 0 < want <= GROWTH * len(payload)
        old = reader.attach_piece(bytearray(min(4 * MiB, 1 << (want - 1).bit_length())))
        assert old is not None
    assert len(piece) == 4 * MiB and bytes(piece) == bytes(payload)
    reader.skip_rest()
    assert not reader.streaming
    assert reader.detach_piece() is not None


def test_a_whole_piece_already_received_needs_no_piece_buffer() -> None:
    reader = RequestReader(piece_max=PIECE)
    payload = bytes(range(256)) * 400  # 100 KiB: longer than inline, shorter than a piece
    header = wire.encode_request(wire.Request(0, Command.WRITE, 1, 0, len(payload)))
    reader.feed(header + payload[:10])
    req = reader.next_request()
    assert req is not None and req[5] is None
    reader.stream_payload()
    reader.feed(payload[10:])  # arrives before the first piece was asked for
    assert reader.piece_wanted() == 0
    piece = reader.next_piece()
    assert piece is not None and bytes(piece) == payload and not reader.streaming
    assert reader.detach_piece() is None


def test_payload_complete_with_its_header_comes_inline_whatever_its_length() -> None:
    payload = b"\x07" * 100_000
    reader = RequestReader(
        initial=wire.encode_request(wire.Request(0, Command.WRITE, 1, 0, 100_000)) + payload
    )
    req = reader.next_request()
    assert req is not None and req[5] is not None and bytes(req[5]) == payload


# --- READ replies in pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("df", [False, True])
def test_read_reply_pieces(structured: bool, df: bool) -> None:
    offset, length = 12345, 10 * MiB + 3
    pieces = list(read_reply_pieces(7, offset, length, structured, df, 4 * MiB))
    assert [n for _h, _o, n in pieces] == [4 * MiB, 4 * MiB, 2 * MiB + 3]
    assert [o for _h, o, _n in pieces] == [offset, offset + 4 * MiB, offset + 8 * MiB]
    headers = [h for h, _o, _n in pieces]
    if structured and not df:
        # A chunk per piece, DONE on the last only: a failure part-way can still be an error chunk.
        chunks = [wire.decode_chunk_header(h[:20]) for h in headers]
        assert [c.length for c in chunks] == [n + 8 for _h, _o, n in pieces]
        assert [bool(c.flags & ReplyFlag.DONE) for c in chunks] == [False, False, True]
    else:
        # One header for all of it (DF forbids more chunks; a simple reply has one header).
        assert headers[1:] == [b"", b""]
        if structured:
            assert wire.decode_chunk_header(headers[0][:20]).length == length + 8
        else:
            assert wire.decode_simple_reply(headers[0]) == wire.SimpleReply(0, 7)


# --- size constraints, negotiated or not ------------------------------------------------------------------

FLAGS = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF | TransmissionFlag.SEND_FLUSH)
NEGOTIATED = SessionRules(size=1 << 40, export_flags=FLAGS, structured=True, meta_contexts={})
UNNEGOTIATED = SessionRules(
    size=1 << 40, export_flags=FLAGS, structured=True, meta_contexts={}, max_payload=UNNEGOTIATED_MAX_PAYLOAD
)


@pytest.mark.parametrize(
    ("rules", "flags", "command", "length", "error"),
    [
        (NEGOTIATED, 0, Command.WRITE, 48 * MiB, Errno.EINVAL),
        (NEGOTIATED, 0, Command.READ, 48 * MiB, Errno.EINVAL),
        (NEGOTIATED, CommandFlag.DF, Command.READ, 48 * MiB, Errno.EOVERFLOW),
        (NEGOTIATED, 0, Command.READ, 32 * MiB, 0),
        (UNNEGOTIATED, 0, Command.WRITE, 48 * MiB, 0),
        (UNNEGOTIATED, 0, Command.READ, 0xFFFFFFFF, 0),
        (UNNEGOTIATED, CommandFlag.DF, Command.READ, 48 * MiB, 0),
        (UNNEGOTIATED, CommandFlag.DF, Command.READ, MAX_CHUNK_DATA, 0),
        (UNNEGOTIATED, CommandFlag.DF, Command.READ, MAX_CHUNK_DATA + 1, Errno.EOVERFLOW),
    ],
)
def test_payload_limits(rules: SessionRules, flags: int, command: int, length: int, error: int) -> None:
    assert check_request(rules, int(flags), command, 0, length) == error


class Catalogue:
    def __init__(self) -> None:
        self.info = ExportInfo("disk", 1 << 30, FLAGS, meta_contexts=(BASE_ALLOCATION,))

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name in ("", "disk") else None

    def exports(self) -> list[ExportInfo]:
        return [self.info]


def _negotiate(*options: tuple[int, tuple[int, ...]]) -> tuple[Negotiated, list[wire.InfoPayload]]:
    hs = ServerHandshake(Catalogue(), max_payload=8 * MiB)
    hs.receive_data(wire.U32.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    for option, infos in options:
        hs.receive_data(
            wire.encode_option(
                wire.OptionRequest(option, wire.encode_info_request(wire.InfoRequest("disk", infos)))
            )
        )
    event = hs.next_event()
    while not isinstance(event, Negotiated):
        event = hs.next_event()
    out = hs.data_to_send()[18:]  # after the greeting
    sent: list[wire.InfoPayload] = []
    while out:
        _opt, reply_type, length = wire.decode_option_reply_header(out[:20])
        if reply_type == 3:  # NBD_REP_INFO
            sent.append(wire.decode_info(out[20 : 20 + length]))
        out = out[20 + length :]
    return event, sent


def test_only_a_go_that_asks_binds_the_client_to_the_size_constraints() -> None:
    event, sent = _negotiate((Option.GO, (Info.BLOCK_SIZE,)))
    assert event.block_size
    sizes = [i for i in sent if isinstance(i, wire.InfoBlockSize)]
    assert sizes and sizes[0].maximum == 8 * MiB  # the server's limit, not the export's default
    event, sent = _negotiate((Option.GO, ()))
    assert not event.block_size
    assert any(isinstance(i, wire.InfoBlockSize) for i in sent)  # sent anyway, but binds nobody
    event, _ = _negotiate((Option.INFO, (Info.BLOCK_SIZE,)), (Option.GO, ()))
    assert not event.block_size  # proto.md: an NBD_OPT_INFO that asked does not count
