"""Transmission phase without sockets: request reader, request rules, client reply parser."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hikkoshi.nbd import wire
from hikkoshi.nbd.client_transmission import ClientTransmission
from hikkoshi.nbd.constants import (
    BASE_ALLOCATION,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from hikkoshi.nbd.errors import ProtocolError
from hikkoshi.nbd.server_transmission import RequestReader, SessionRules, check_request

# --- request reader --------------------------------------------------------------------------------------

request_specs = st.lists(
    st.tuples(
        st.sampled_from([Command.READ, Command.WRITE, Command.FLUSH, Command.TRIM, 42]),
        st.integers(0, 0xFFFF),
        st.integers(0, 1 << 40),
        st.integers(0, 70_000),
    ),
    max_size=12,
)


def encode_stream(
    specs: list[tuple[int, int, int, int]], max_payload: int
) -> tuple[bytes, list[tuple[object, ...]]]:
    stream = b""
    expected: list[tuple[object, ...]] = []
    for handle, (command, flags, offset, length) in enumerate(specs):
        stream += wire.encode_request(wire.Request(flags, command, handle, offset, length))
        payload = None
        if command == Command.WRITE:
            payload = random.Random(handle).randbytes(length)
            stream += payload
            if length > max_payload:
                payload = None
        expected.append((flags, command, handle, offset, length, payload))
    return stream, expected


@settings(max_examples=150)
@given(
    request_specs, st.lists(st.integers(1, 100_000), min_size=1, max_size=20), st.sampled_from([1024, 65536])
)
def test_reader_any_chunking(
    specs: list[tuple[int, int, int, int]], cuts: list[int], max_payload: int
) -> None:
    """However the stream is cut into receives, the same requests come out, oversize payloads skipped."""
    stream, expected = encode_stream(specs, max_payload)
    reader = RequestReader(max_payload=max_payload)
    got: list[tuple[object, ...]] = []
    pos = i = 0
    while pos < len(stream):
        view = reader.get_buffer(-1)
        n = min(len(view), cuts[i % len(cuts)], len(stream) - pos)
        i += 1
        view[:n] = stream[pos : pos + n]
        reader.buffer_updated(n)
        pos += n
        while (req := reader.next_request()) is not None:
            *head, payload = req
            got.append((*head, None if payload is None else bytes(payload)))
    assert reader.next_request() is None
    assert got == expected


def test_reader_bad_magic_and_initial_bytes() -> None:
    good = wire.encode_request(wire.Request(0, Command.FLUSH, 9, 0, 0))
    reader = RequestReader(initial=good + b"\x00" * 28)
    req = reader.next_request()
    assert req is not None and req[2] == 9
    with pytest.raises(ProtocolError, match="magic"):
        reader.next_request()


# --- request rules --------------------------------------------------------------------------------------

ALL = int(
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.SEND_FAST_ZERO
)
RULES = SessionRules(size=1 << 20, export_flags=ALL, structured=True, meta_contexts={1: BASE_ALLOCATION})
RO = SessionRules(
    size=1 << 20, export_flags=ALL | TransmissionFlag.READ_ONLY, structured=False, meta_contexts={}
)

CASES = [
    (RULES, 0, Command.READ, 0, 4096, 0),
    (RULES, 0, Command.READ, (1 << 20) - 1, 2, Errno.EINVAL),
    (RULES, 0, Command.WRITE, (1 << 20) - 1, 2, Errno.ENOSPC),
    (RULES, 0, Command.WRITE_ZEROES, 1 << 20, 1, Errno.ENOSPC),
    (RULES, 0, Command.TRIM, 1 << 20, 1, Errno.EINVAL),
    (RULES, 0, 99, 0, 0, Errno.EINVAL),
    (RULES, 1 << 7, Command.READ, 0, 1, Errno.EINVAL),  # unknown flag bit
    (RULES, int(CommandFlag.FUA), Command.READ, 0, 1, Errno.EINVAL),  # flag not for this command
    (RULES, int(CommandFlag.DF), Command.READ, 0, 1, 0),
    (RULES, int(CommandFlag.DF), Command.READ, 0, 33 << 20, Errno.EOVERFLOW),
    (RULES, 0, Command.READ, 0, 33 << 20, Errno.EINVAL),
    (RULES, 0, Command.BLOCK_STATUS, 0, 0, Errno.EINVAL),
    (RULES, int(CommandFlag.REQ_ONE), Command.BLOCK_STATUS, 0, 512, 0),
    (RULES, int(CommandFlag.FAST_ZERO | CommandFlag.NO_HOLE), Command.WRITE_ZEROES, 0, 512, 0),
    (RULES, 0, Command.READ, 0, 0, 0),
    (RO, 0, Command.WRITE, 0, 1, Errno.EPERM),
    (RO, 0, Command.TRIM, 0, 1, Errno.EPERM),
    (RO, 0, Command.WRITE_ZEROES, 0, 1, Errno.EPERM),
    (RO, int(CommandFlag.DF), Command.READ, 0, 1, Errno.EINVAL),  # DF needs structured replies
    (RO, 0, Command.BLOCK_STATUS, 0, 512, Errno.EINVAL),  # no meta context negotiated
    (RO, 0, Command.FLUSH, 0, 0, 0),
]


@pytest.mark.parametrize(("rules", "flags", "command", "offset", "length", "error"), CASES)
def test_check_request(
    rules: SessionRules, flags: int, command: int, offset: int, length: int, error: int
) -> None:
    assert check_request(rules, flags, command, offset, length) == error


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 1 << 64), st.integers(0, 1 << 32))
def test_check_request_total(flags: int, command: int, offset: int, length: int) -> None:
    """Every request gets an answer: 0 or a defined error, never an exception."""
    assert check_request(RULES, flags, command, offset, length) in {0, *Errno}


# --- client reply parser as a state machine -------------------------------------------------------------


class ClientReplies(RuleBasedStateMachine):
    """Issue requests, answer them in any order and any split; completed replies must match the model."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = ClientTransmission(structured=True)
        self.disk = random.Random(7).randbytes(1 << 16)
        self.outstanding: dict[int, tuple[int, int, int]] = {}
        self.wire = bytearray()
        self.done: set[int] = set()
        self.expect: dict[int, tuple[int, int, int, bool]] = {}

    @rule(
        offset=st.integers(0, (1 << 16) - 1),
        length=st.integers(0, 4096),
        command=st.sampled_from([0, 1, 3, 7]),
    )
    def issue(self, offset: int, length: int, command: int) -> None:
        length = min(length, (1 << 16) - offset)
        if command == Command.BLOCK_STATUS and length == 0:
            length = 1
        handle, _ = self.machine.request(command, offset, length)
        assert handle not in self.outstanding and handle not in self.done
        self.outstanding[handle] = (command, offset, length)

    @precondition(lambda self: bool(self.outstanding))
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(sorted(self.outstanding)))
        command, offset, length = self.outstanding.pop(handle)
        fail = command not in (Command.READ, Command.BLOCK_STATUS) and data.draw(st.booleans())
        if command == Command.READ:
            # Split the range into data and hole chunks, sent in a random order, DONE on a final NONE.
            cuts = sorted(data.draw(st.sets(st.integers(1, max(length - 1, 1)), max_size=4)) - {length})
            bounds = [0, *[c for c in cuts if 0 < c < length], length] if length else [0, 0]
            pieces: list[wire.ChunkPayload] = []
            for a, b in itertools.pairwise(bounds):
                if b <= a:
                    continue
                chunk = self.disk[offset + a : offset + b]
                if chunk == bytes(b - a) and data.draw(st.booleans()):
                    pieces.append(wire.OffsetHole(offset + a, b - a))
                else:
                    pieces.append(wire.OffsetData(offset + a, chunk))
            order = data.draw(st.permutations(pieces))
            for p in order:
                self.wire += wire.encode_chunk(0, handle, p)
            self.wire += wire.encode_chunk(ReplyFlag.DONE, handle, wire.NoneChunk())
        elif command == Command.BLOCK_STATUS:
            self.wire += wire.encode_chunk(ReplyFlag.DONE, handle, wire.BlockStatusChunk(1, ((length, 3),)))
        elif fail:
            self.wire += wire.encode_chunk(ReplyFlag.DONE, handle, wire.ErrorChunk(Errno.EIO, "boom"))
        else:
            self.wire += wire.encode_simple_reply(wire.SimpleReply(0, handle))
        self.expect[handle] = (command, offset, length, fail)

    @rule(n=st.integers(1, 300))
    def deliver(self, n: int) -> None:
        part = bytes(self.wire[:n])
        del self.wire[:n]
        self.machine.receive_data(part)
        while (reply := self.machine.next_reply()) is not None:
            command, offset, length, fail = self.expect.pop(reply.handle)
            self.done.add(reply.handle)
            if fail:
                assert reply.error == Errno.EIO and reply.message == "boom"
                continue
            assert reply.error == 0
            if command == Command.READ:
                assert reply.data is not None and bytes(reply.data) == self.disk[offset : offset + length]
            if command == Command.BLOCK_STATUS:
                assert reply.extents == {1: [(length, 3)]}

    @invariant()
    def pending_matches(self) -> None:
        assert set(self.machine.pending) == set(self.outstanding) | set(self.expect)


TestClientReplies = ClientReplies.TestCase
TestClientReplies.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_reply_for_unknown_handle() -> None:
    m = ClientTransmission(structured=False)
    m.receive_data(wire.encode_simple_reply(wire.SimpleReply(0, 77)))
    with pytest.raises(ProtocolError, match="unknown handle"):
        m.next_reply()


def test_overlapping_read_chunks_rejected() -> None:
    m = ClientTransmission(structured=True)
    h, _ = m.request(Command.READ, 0, 8)
    m.receive_data(wire.encode_chunk(0, h, wire.OffsetData(0, b"a" * 6)))
    m.receive_data(wire.encode_chunk(ReplyFlag.DONE, h, wire.OffsetData(4, b"b" * 4)))
    with pytest.raises(ProtocolError, match="overlap"):
        m.next_reply()


def test_short_read_rejected() -> None:
    m = ClientTransmission(structured=True)
    h, _ = m.request(Command.READ, 0, 8)
    m.receive_data(wire.encode_chunk(ReplyFlag.DONE, h, wire.OffsetData(0, b"a" * 6)))
    with pytest.raises(ProtocolError, match="cover"):
        m.next_reply()


def test_simple_reply_to_structured_read_rejected() -> None:
    m = ClientTransmission(structured=True)
    h, _ = m.request(Command.READ, 0, 8)
    m.receive_data(wire.encode_simple_reply(wire.SimpleReply(0, h)) + bytes(8))
    with pytest.raises(ProtocolError):
        m.next_reply()


def test_error_chunk_type_is_error() -> None:
    assert ChunkType.ERROR & 0x8000


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans())
def test_client_parser_any_bytes(raw: bytes, structured: bool) -> None:
    m = ClientTransmission(structured=structured)
    for i in range(4):
        m.request(i % 2 * 7, 0, 16)  # reads and block status in flight
    m.receive_data(raw)
    try:
        while m.next_reply() is not None:
            pass
    except ProtocolError:
        pass
