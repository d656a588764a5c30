"""Malformed and hostile traffic against a running ``hikkoshi nbd serve``.

One server process serves the whole module. Every test ends (autouse fixture) by checking that the server
is alive, that a fresh well-behaved client reads exactly what is in the image file, and that the server's
stderr holds no traceback. Each case asserts the answer proto.md prescribes. Only 127.0.0.1 is dialled;
every socket has a timeout and is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hikkoshi.nbd import wire
from hikkoshi.nbd.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    NBDMAGIC,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Option,
    OptionReply,
    ReplyFlag,
    TransmissionFlag,
)
from tests.support.images import make_image
from tests.support.rawnbd import Closed, RawNbd, Reply, option_error
from tests.support.servers import Served, hikkoshi_server

SIZE = 64 << 20
MiB = 1 << 20
U64_MAX = (1 << 64) - 1
IHAVEOPT = b"IHAVEOPT"
REQUEST_MAGIC = b"\x25\x60\x95\x13"


# --- the server under test ------------------------------------------------------------------------------


class StderrPump:
    """Collects a child's stderr without ever letting the pipe fill up (which would block the child).

    A background thread pumps every 50 ms; :meth:`text` pumps first, so it holds everything the child wrote
    before the call.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._fd = stream.fileno()
        os.set_blocking(self._fd, False)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.pump()

    def pump(self) -> None:
        with self._lock:
            while True:
                try:
                    part = os.read(self._fd, 1 << 16)
                except (BlockingIOError, OSError):
                    return
                if not part:
                    return
                self._buf += part

    def text(self) -> str:
        self.pump()
        with self._lock:
            return self._buf.decode(errors="replace")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pump()


@dataclass
class Server:
    served: Served
    image: Path
    pump: StderrPump
    #: Where the current test's share of stderr begins.
    mark: int = 0

    @property
    def port(self) -> int:
        assert self.served.port is not None
        return self.served.port

    @property
    def pid(self) -> int:
        return self.served.pid

    @property
    def stderr(self) -> str:
        """What the server logged since the current test began."""
        return self.pump.text()[self.mark :]

    def connect(self, timeout: float = 5.0) -> RawNbd:
        return RawNbd(self.port, timeout)

    def session(self, *, structured: bool = False, meta: bool = False, block_size: bool = False) -> RawNbd:
        """A connection that has negotiated export "disk" with NBD_OPT_GO."""
        c = self.connect()
        try:
            meta_contexts = (BASE_ALLOCATION,) if meta else ()
            return c.handshake("disk", structured=structured, meta=meta_contexts, block_size=block_size)
        except BaseException:
            c.close()
            raise

    def file_bytes(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def file_hash(self) -> str:
        return hashlib.sha256(self.image.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    image = make_image(tmp_path_factory.mktemp("robustness") / "disk.raw", SIZE)
    with hikkoshi_server(str(image), "--export", "disk") as served:
        assert served.proc.stderr is not None
        # The server logs a warning per dropped client: its stderr must be read as we go.
        srv = Server(served, image, StderrPump(served.proc.stderr))
        try:
            yield srv
            srv.mark = len(srv.pump.text())
            qemu_img_compare(srv)
            assert_healthy(srv)
            srv.mark = len(srv.pump.text())
        except BaseException:
            srv.pump.stop()
            raise
    # After all that, SIGTERM still brings a graceful shutdown.
    srv.pump.stop()
    assert served.proc.returncode == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr


SAMPLES = [
    (0, 65536),
    (4 * MiB - 4096, 8192),
    (4 * MiB + 12345, 100000),
    (33 * MiB, 4096),
    (SIZE - 65536, 65536),
]


def assert_healthy(srv: Server) -> None:
    """The server runs, answers a fresh well-behaved client correctly, and logged no traceback."""
    assert srv.served.proc.poll() is None, f"server exited: {srv.stderr}"
    for structured in (False, True):
        with srv.session(structured=structured) as c:
            assert c.size == SIZE
            for offset, length in SAMPLES:
                r = c.read(offset, length)
                assert r.error == 0
                assert r.data == srv.file_bytes(offset, length), (offset, length)
            c.disconnect()
    assert "Traceback" not in srv.stderr, srv.stderr


def qemu_img_compare(srv: Server) -> None:
    """An independent client (qemu) sees exactly the file."""
    uri = srv.served.export_uri("disk")
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(srv.image), uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(autouse=True)
def _healthy_afterwards(server: Server) -> Iterator[None]:
    server.mark = len(server.pump.text())
    yield
    assert_healthy(server)


def assert_closes(c: RawNbd, timeout: float = 3.0) -> None:
    """The server drops the connection without sending anything more."""
    closed, data = c.wait_closed(timeout)
    assert closed, f"server kept the connection open {timeout} s"
    assert data == b"", data[:64]


def option_header(option: int, length: int) -> bytes:
    """A hand-made option header."""
    return IHAVEOPT + struct.pack(">II", option, length)


# --- handshake ------------------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle(server: Server) -> None:
    with server.connect() as c:
        raw = c.recv_exact(18)
        assert raw[:16] == struct.pack(">Q", NBDMAGIC) + IHAVEOPT
        assert struct.unpack(">H", raw[16:])[0] & HandshakeFlag.FIXED_NEWSTYLE


@pytest.mark.parametrize("flags", [0x5, 0x3 | 0x80000000, 0xFFFFFFFF, 0x1 | 0x100])
def test_unknown_client_flags_close(server: Server, flags: int) -> None:
    with server.connect() as c:
        c.greeting()
        c.send(struct.pack(">I", flags))
        assert_closes(c)


@pytest.mark.parametrize("flags", [b"\x00\x00\x00\x00", b"\x00\x00\x00\x02"])
def test_client_without_fixed_newstyle_closes(server: Server, flags: bytes) -> None:
    with server.connect() as c:
        c.greeting()
        c.send(flags)
        assert_closes(c)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE!" + struct.pack(">II", Option.GO, 0),
        bytes(16),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"IHAVEOPS" + struct.pack(">II", Option.LIST, 0),
    ],
)
def test_garbage_instead_of_ihaveopt_closes(server: Server, garbage: bytes) -> None:
    with server.connect() as c:
        c.start()
        c.send(garbage)
        assert_closes(c)


@pytest.mark.parametrize("option", [Option.GO, Option.LIST, 0x7FFF0000])
def test_huge_option_length_then_client_closes(server: Server, option: int) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(option, 1 << 31) + b"\xaa" * 8192)
        # Nothing may come back while the server is still owed 2 GiB (it may hang up, though).
        closed, data = c.wait_closed(0.3)
        assert data == b""
        if not closed:
            # Our EOF must end it cleanly.
            c.sock.shutdown(socket.SHUT_WR)
            assert_closes(c)


def test_huge_option_length_then_client_resets(server: Server) -> None:
    c = server.connect()
    c.start()
    c.send(option_header(Option.INFO, 0xFFFFFFFF) + bytes(4096))
    c.reset()


def test_huge_export_name_closes(server: Server) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(Option.EXPORT_NAME, 1 << 31) + b"disk")
        assert_closes(c)


@pytest.mark.parametrize("option", [Option.INFO, Option.GO, Option.LIST, 0xBEEF])
def test_option_of_100k_is_too_big_and_negotiation_goes_on(server: Server, option: int) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(option, 100 * 1024) + b"\x00\x00\x00\x04disk" + bytes(100 * 1024 - 8))
        reply = c.read_option_reply()
        assert (reply.option, reply.reply_type) == (option, OptionReply.ERR_TOO_BIG)
        # In sync: the next option is understood.
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        r = c.read(4 * MiB, 4096)
        assert r.error == 0 and r.data == server.file_bytes(4 * MiB, 4096)


@pytest.mark.parametrize(
    ("option", "payload"),
    [
        (0x1234, b"whatever"),
        (0, b""),
        (0xFFFFFFFF, bytes(100)),
        (Option.PEEK_EXPORT, b""),
        (0x7FFFFFFF, b"x"),
    ],
)
def test_unknown_option_is_unsupported_and_negotiation_goes_on(
    server: Server, option: int, payload: bytes
) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(option, len(payload)) + payload)
        replies = c.read_option_replies()
        assert option_error(replies) == OptionReply.ERR_UNSUP
        assert replies[0].option == option
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        assert c.read(0, 512).data == server.file_bytes(0, 512)


MALFORMED_INFO_REQUESTS = [
    struct.pack(">I", 1000) + b"disk" + b"\x00\x00",  # name length past the end
    struct.pack(">I", 0xFFFFFFFF) + b"\x00\x00",  # name length 2^32-1
    struct.pack(">I", 7) + b"disk",  # name runs into where the info count should be
    b"\x00\x00",  # too short for the name length
    b"",  # no payload at all
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + struct.pack(">H", 1),  # 3 infos, 1 present
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) + b"\x00",  # trailing byte
    struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00",  # name is not UTF-8
]


@pytest.mark.parametrize("option", [Option.GO, Option.INFO])
def test_malformed_go_is_invalid_and_negotiation_goes_on(server: Server, option: int) -> None:
    with server.connect() as c:
        c.start()
        for payload in MALFORMED_INFO_REQUESTS:
            c.send(option_header(option, len(payload)) + payload)
            replies = c.read_option_replies()
            assert option_error(replies) == OptionReply.ERR_INVALID, payload
            assert replies[0].option == option
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        assert c.read(SIZE - 512, 512).data == server.file_bytes(SIZE - 512, 512)


@pytest.mark.parametrize("name", ["nosuch", "disk ", "DISK", "x" * 4096, "\u00e9"])
def test_go_unknown_export_and_negotiation_goes_on(server: Server, name: str) -> None:
    with server.connect() as c:
        c.start()
        for option in (Option.INFO, Option.GO):
            replies = c.option(option, wire.encode_info_request(wire.InfoRequest(name)))
            assert option_error(replies) == OptionReply.ERR_UNKNOWN
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        assert c.read(0, 4096).data == server.file_bytes(0, 4096)


@pytest.mark.parametrize("name", [b"nosuch", b"\xff\xfe", b"d" * 5000])
def test_export_name_unknown_closes(server: Server, name: bytes) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(Option.EXPORT_NAME, len(name)) + name)
        assert_closes(c)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_known_enters_transmission(server: Server, no_zeroes: bool) -> None:
    with server.connect() as c:
        c.start(ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0))
        c.send(option_header(Option.EXPORT_NAME, 4) + b"disk")
        reply = wire.decode_export_name_reply(c.recv_exact(10 if no_zeroes else 134))
        assert reply.size == SIZE and reply.zeroes is not no_zeroes
        assert c.read(4 * MiB, 512).data == server.file_bytes(4 * MiB, 512)


def test_meta_context_before_structured_reply_is_invalid(server: Server) -> None:
    request = wire.encode_meta_context_request(wire.MetaContextRequest("disk", (BASE_ALLOCATION,)))
    with server.connect() as c:
        c.start()
        assert option_error(c.option(Option.SET_META_CONTEXT, request)) == OptionReply.ERR_INVALID
        # Negotiation goes on, and done in the right order it works.
        assert c.option(Option.STRUCTURED_REPLY)[-1].reply_type == OptionReply.ACK
        c.structured = True
        replies = c.option(Option.SET_META_CONTEXT, request)
        assert [r.reply_type for r in replies] == [OptionReply.META_CONTEXT, OptionReply.ACK]
        ctx = wire.decode_meta_context(replies[0].data)
        assert ctx.name == BASE_ALLOCATION and ctx.context_id != 0
        c.contexts[ctx.context_id] = ctx.name
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        r = c.block_status(0, 8 * MiB)
        assert r.error == 0 and len(r.chunks) == 1
        payload = r.chunks[0].payload
        assert isinstance(payload, wire.BlockStatusChunk) and payload.context_id == ctx.context_id


def test_starttls_without_tls_is_unsupported(server: Server) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(Option.STARTTLS, 0))
        replies = c.read_option_replies()
        assert option_error(replies) == OptionReply.ERR_UNSUP
        assert replies[0].option == Option.STARTTLS
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        assert c.read(0, 512).data == server.file_bytes(0, 512)


def test_list_with_payload_is_invalid(server: Server) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(Option.LIST, 4) + b"disk")
        assert option_error(c.read_option_replies()) == OptionReply.ERR_INVALID
        replies = c.option(Option.LIST)
        assert replies[-1].reply_type == OptionReply.ACK
        names = [wire.decode_server_entry(r.data).name for r in replies[:-1]]
        assert names == ["disk"]


def test_structured_reply_with_payload_is_invalid(server: Server) -> None:
    with server.connect() as c:
        c.start()
        assert option_error(c.option(Option.STRUCTURED_REPLY, b"\x00")) == OptionReply.ERR_INVALID
        assert c.go("disk")[-1].reply_type == OptionReply.ACK
        # Not negotiated, so a READ gets a simple reply.
        assert c.read(0, 512).structured is False


def test_abort_is_acked_then_closed(server: Server) -> None:
    with server.connect() as c:
        c.start()
        c.send(option_header(Option.ABORT, 0))
        reply = c.read_option_reply()
        assert (reply.option, reply.reply_type, reply.data) == (Option.ABORT, OptionReply.ACK, b"")
        assert_closes(c)


def _valid_client_handshake() -> bytes:
    """Everything a structured-reply client sends up to and including its first request."""
    return (
        wire.U32.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        + wire.encode_option(wire.OptionRequest(Option.STRUCTURED_REPLY))
        + wire.encode_option(
            wire.OptionRequest(
                Option.SET_META_CONTEXT,
                wire.encode_meta_context_request(wire.MetaContextRequest("disk", (BASE_ALLOCATION,))),
            )
        )
        + wire.encode_option(
            wire.OptionRequest(Option.GO, wire.encode_info_request(wire.InfoRequest("disk")))
        )
        + wire.encode_request(wire.Request(0, Command.READ, 1, 4 * MiB, 4096))
    )


def test_client_disconnects_at_every_offset_of_the_handshake(server: Server) -> None:
    script = _valid_client_handshake()
    for cut in range(len(script) + 1):
        c = server.connect()
        try:
            if cut % 3:
                c.greeting()
            c.send(script[:cut])
        finally:
            # Alternate an orderly FIN with an RST, as from a crashed client.
            c.reset() if cut % 2 else c.close()
    # The whole script pipelined in one write also works (requests may follow GO at once).
    with server.connect() as c:
        c.greeting()
        c.expect(1, Command.READ, 4 * MiB, 4096)
        c.structured = True
        c.send(script)
        replies = [c.read_option_reply() for _ in range(2)]
        assert [r.reply_type for r in replies] == [OptionReply.ACK, OptionReply.META_CONTEXT]
        assert c.read_option_replies()[-1].reply_type == OptionReply.ACK  # SET_META_CONTEXT's ACK
        assert c.read_option_replies()[-1].reply_type == OptionReply.ACK  # GO
        r = c.read_reply()
        assert (r.handle, r.error, r.data) == (1, 0, server.file_bytes(4 * MiB, 4096))


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_whole_session_sent_before_the_greeting_is_read(server: Server, structured: bool) -> None:
    """A client may pipeline its requests behind NBD_OPT_GO; here they all arrive with the first packet.

    The FLUSH is a "slow" request (answered from a task), the READ a fast one.
    """
    script = wire.U32.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
    if structured:
        script += wire.encode_option(wire.OptionRequest(Option.STRUCTURED_REPLY))
    script += wire.encode_option(
        wire.OptionRequest(Option.GO, wire.encode_info_request(wire.InfoRequest("disk")))
    )
    script += wire.encode_request(wire.Request(0, Command.FLUSH, 1, 0, 0))
    script += wire.encode_request(wire.Request(0, Command.READ, 2, 4 * MiB, 4096))
    for _ in range(10):
        with server.connect() as c:
            c.send(script)
            c.greeting()
            if structured:
                assert c.read_option_replies()[-1].reply_type == OptionReply.ACK
                c.structured = True
            assert c.read_option_replies()[-1].reply_type == OptionReply.ACK
            c.expect(1, Command.FLUSH, 0, 0)
            c.expect(2, Command.READ, 4 * MiB, 4096)
            try:
                replies = {r.handle: r for r in (c.read_reply(), c.read_reply())}
            except Closed:
                pytest.fail(f"server dropped a well-formed pipelined session: {server.stderr[-1500:]}")
            assert replies[1].error == 0
            assert (replies[2].error, replies[2].data) == (0, server.file_bytes(4 * MiB, 4096))


# --- transmission ---------------------------------------------------------------------------------------

STRUCTURED = pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])


def assert_error(r: Reply, error: int, structured: bool) -> None:
    assert r.error == error, r
    if structured:
        assert_error_chunk(r)


def assert_error_chunk(r: Reply) -> None:
    """A structured error: one error chunk, flagged DONE, with a human-readable message."""
    assert r.structured, "simple reply on a structured connection"
    assert len(r.chunks) == 1, r.chunks
    chunk = r.chunks[0]
    assert chunk.chunk_type == ChunkType.ERROR
    assert chunk.flags & ReplyFlag.DONE
    assert isinstance(chunk.payload, wire.ErrorChunk)
    assert chunk.payload.message, "error chunk without a message"
    assert r.message == chunk.payload.message


def assert_reads_ok(srv: Server, c: RawNbd, offset: int = 4 * MiB - 100, length: int = 4096) -> None:
    r = c.read(offset, length)
    assert r.error == 0 and r.data == srv.file_bytes(offset, length)


@STRUCTURED
@pytest.mark.parametrize(
    "bad",
    [
        b"\x25\x60\x95\x14" + bytes(24),  # off by one
        struct.pack(">IIQ", 0x67446698, 0, 1) + bytes(12),  # a simple reply's magic
        bytes(28),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n",
    ],
)
def test_bad_request_magic_closes_only_that_connection(server: Server, structured: bool, bad: bytes) -> None:
    with server.session(structured=structured) as healthy, server.session(structured=structured) as victim:
        assert_reads_ok(server, victim)
        # A request of the healthy connection is in flight while the other one misbehaves.
        handle = healthy.send_request(Command.READ, 4 * MiB, 65536)
        victim.send(bad)
        assert_closes(victim)
        r = healthy.read_reply()
        assert (r.handle, r.error, r.data) == (handle, 0, server.file_bytes(4 * MiB, 65536))
        assert_reads_ok(server, healthy)


@STRUCTURED
def test_unknown_command_is_einval_and_connection_goes_on(server: Server, structured: bool) -> None:
    with server.session(structured=structured) as c:
        for command in (99, Command.RESIZE, 9, 0xFFFF, 0x8000):
            assert_error(c.call(command, 0, 4096), Errno.EINVAL, structured)
            assert_reads_ok(server, c)
        # The same, hand-made: command 99, handle 0xfeedface..., offset 0, length 512.
        c.expect(0xFEEDFACECAFEBEEF, 99, 0, 512)
        c.send(REQUEST_MAGIC + bytes.fromhex("0000 0063 feedfacecafebeef 0000000000000000 00000200"))
        r = c.read_reply()
        assert r.handle == 0xFEEDFACECAFEBEEF
        assert_error(r, Errno.EINVAL, structured)
        assert_reads_ok(server, c)


@STRUCTURED
@pytest.mark.parametrize("flag", [1 << 6, 1 << 7, 1 << 15, 0xFFC0])
def test_unknown_flag_bits_are_einval(server: Server, structured: bool, flag: int) -> None:
    offset = 8 * MiB + 4096
    before = server.file_bytes(offset, 4096)
    with server.session(structured=structured) as c:
        assert_error(c.read(0, 4096, flags=flag), Errno.EINVAL, structured)
        # A refused WRITE's payload is still consumed and not written.
        assert_error(c.write(offset, b"\x5a" * 4096, flags=flag), Errno.EINVAL, structured)
        assert_error(c.call(Command.FLUSH, flags=flag), Errno.EINVAL, structured)
        assert_reads_ok(server, c)
    assert server.file_bytes(offset, 4096) == before


@STRUCTURED
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (SIZE - 512, 1024),
        (SIZE, 1),
        (SIZE + 4096, 4096),
        (U64_MAX - 4095, 4096),
        (U64_MAX, 1),
        (1 << 63, 512),
    ],
)
def test_read_past_the_end_is_einval(server: Server, structured: bool, offset: int, length: int) -> None:
    with server.session(structured=structured) as c:
        assert_error(c.read(offset, length), Errno.EINVAL, structured)
        assert_reads_ok(server, c)


@STRUCTURED
@pytest.mark.parametrize(("offset", "length"), [(SIZE - 512, 1024), (SIZE, 4096), (U64_MAX - 511, 512)])
def test_write_past_the_end_is_enospc(server: Server, structured: bool, offset: int, length: int) -> None:
    tail = server.file_bytes(SIZE - 512, 512)
    with server.session(structured=structured) as c:
        assert_error(c.write(offset, b"\xe7" * length), Errno.ENOSPC, structured)
        # The payload was consumed: the next request is parsed from the right place.
        assert_reads_ok(server, c, SIZE - 4096, 4096)
    assert server.file_bytes(SIZE - 512, 512) == tail


@STRUCTURED
def test_other_commands_past_the_end(server: Server, structured: bool) -> None:
    """proto.md: TRIM past the end SHOULD get EINVAL; WRITE_ZEROES is a write, so ENOSPC."""
    tail = server.file_bytes(SIZE - 8192, 8192)
    with server.session(structured=structured) as c:
        assert_error(c.call(Command.TRIM, SIZE - 4096, 8192), Errno.EINVAL, structured)
        assert_error(c.call(Command.WRITE_ZEROES, SIZE - 4096, 8192), Errno.ENOSPC, structured)
        assert_error(c.call(Command.WRITE_ZEROES, U64_MAX, 1), Errno.ENOSPC, structured)
        assert c.call(Command.CACHE, SIZE - 4096, 8192).error != 0
        assert_reads_ok(server, c)
    assert server.file_bytes(SIZE - 8192, 8192) == tail


@STRUCTURED
def test_zero_length_read_and_write_succeed(server: Server, structured: bool) -> None:
    with server.session(structured=structured) as c:
        for offset in (0, 4096, SIZE - 1):
            r = c.read(offset, 0)
            assert (r.error, r.data) == (0, b"")
            if structured:
                assert not any(isinstance(ch.payload, wire.OffsetData) for ch in r.chunks)
            assert c.write(offset, b"").error == 0
        assert_reads_ok(server, c)


@STRUCTURED
def test_read_longer_than_32mib_is_refused(server: Server, structured: bool) -> None:
    # A client that asked for the size constraints is bound by them (one that did not is served).
    with server.session(structured=structured, block_size=True) as c:
        for length in (MAX_PAYLOAD + 1, MAX_PAYLOAD + 4096, 0xFFFFFFFF):
            assert_error(c.read(0, length), Errno.EINVAL, structured)
            assert_reads_ok(server, c)
            if structured:
                assert_error(c.read(0, length, flags=CommandFlag.DF), Errno.EOVERFLOW, structured)
                assert_reads_ok(server, c)
        # 32 MiB itself is not an attack (proto.md: 2^25 SHOULD be accepted).
        r = c.read(SIZE - MAX_PAYLOAD, MAX_PAYLOAD)
        assert r.error == 0 and r.data == server.file_bytes(SIZE - MAX_PAYLOAD, MAX_PAYLOAD)


@STRUCTURED
def test_write_of_64mib_is_refused_after_its_payload(server: Server, structured: bool) -> None:
    before = server.file_hash()
    with server.session(structured=structured, block_size=True) as c:
        big = c.send_request(Command.WRITE, 0, 64 * MiB)
        block = b"\xa5" * MiB
        for _ in range(64):
            c.send(block)
        # Pipelined right behind the payload: must be parsed as the next request.
        after = c.send_request(Command.READ, 4 * MiB, 4096)
        r = c.read_reply()
        assert r.handle == big
        assert r.error in (Errno.EINVAL, Errno.EOVERFLOW, Errno.ENOSPC), r
        if structured:
            assert_error_chunk(r)
        r = c.read_reply()
        assert (r.handle, r.error, r.data) == (after, 0, server.file_bytes(4 * MiB, 4096))
        assert_reads_ok(server, c)
    assert server.file_hash() == before


@STRUCTURED
def test_block_status_without_meta_context_is_einval(server: Server, structured: bool) -> None:
    with server.session(structured=structured) as c:
        assert_error(c.block_status(0, 4096), Errno.EINVAL, structured)
        assert_error(c.block_status(0, 4096, flags=CommandFlag.REQ_ONE), Errno.EINVAL, structured)
        assert_reads_ok(server, c)


def test_block_status_with_meta_context_works(server: Server) -> None:
    with server.session(structured=True, meta=True) as c:
        (cid,) = c.contexts
        for flags in (0, CommandFlag.REQ_ONE):
            r = c.block_status(0, 16 * MiB, flags=flags)
            assert r.error == 0
            assert len(r.chunks) == 1 and r.chunks[0].flags & ReplyFlag.DONE
            payload = r.chunks[0].payload
            assert isinstance(payload, wire.BlockStatusChunk) and payload.context_id == cid
            assert payload.extents and all(n > 0 for n, _ in payload.extents)
            # proto.md: only the final extent may run past the requested length.
            assert sum(n for n, _ in payload.extents[:-1]) < 16 * MiB
            assert payload.extents[0][1] == 0  # the image has data at offset 0
            if flags:
                assert len(payload.extents) == 1 and payload.extents[0][0] <= 16 * MiB
        assert_error(c.block_status(SIZE - 512, 1024), Errno.EINVAL, True)
        assert_reads_ok(server, c)


def test_df_without_structured_replies_is_einval(server: Server) -> None:
    with server.session(structured=False) as c:
        assert c.read(0, 4096, flags=CommandFlag.DF).error == Errno.EINVAL
        assert_reads_ok(server, c)
    with server.session(structured=True) as c:
        assert c.export_flags & TransmissionFlag.SEND_DF
        r = c.read(4 * MiB, 4096, flags=CommandFlag.DF)
        assert r.error == 0 and r.data == server.file_bytes(4 * MiB, 4096)
        assert sum(isinstance(ch.payload, wire.OffsetData) for ch in r.chunks) == 1


@pytest.mark.parametrize("via", ["go", "export_name"])
def test_send_df_is_not_advertised_without_structured_replies(server: Server, via: str) -> None:
    """proto.md: the server "MUST leave this flag clear if structured replies have not been negotiated"."""
    with server.connect() as c:
        c.start()
        if via == "go":
            assert c.go("disk")[-1].reply_type == OptionReply.ACK
            flags = c.export_flags
        else:
            c.send(option_header(Option.EXPORT_NAME, 4) + b"disk")
            flags = wire.decode_export_name_reply(c.recv_exact(10)).flags
        assert flags & TransmissionFlag.HAS_FLAGS
        assert not flags & TransmissionFlag.SEND_DF, f"transmission flags {flags:#x} advertise SEND_DF"
        assert_reads_ok(server, c)


def _vanish_half_header(c: RawNbd) -> None:
    c.send(wire.encode_request(wire.Request(0, Command.READ, 7, 0, 4096))[:14])


def _vanish_during_write_payload(c: RawNbd) -> None:
    c.send(wire.encode_request(wire.Request(0, Command.WRITE, 7, 0, MiB)) + b"\x11" * 1000)


def _vanish_during_huge_write_payload(c: RawNbd) -> None:
    c.send(wire.encode_request(wire.Request(0, Command.WRITE, 7, 0, 0xFFFFFFFF)) + b"\x22" * 100000)


def _vanish_with_reads_in_flight(c: RawNbd) -> None:
    c.send(b"".join(wire.encode_request(wire.Request(0, Command.READ, h, h * MiB, MiB)) for h in range(32)))


def _vanish_after_flush(c: RawNbd) -> None:
    # A slow request (fdatasync off the event loop) is still running when the client goes.
    c.send(wire.encode_request(wire.Request(0, Command.FLUSH, 1, 0, 0)))
    c.send(wire.encode_request(wire.Request(0, Command.READ, 2, 0, MiB)))


@STRUCTURED
@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize(
    "vanish",
    [
        _vanish_half_header,
        _vanish_during_write_payload,
        _vanish_during_huge_write_payload,
        _vanish_with_reads_in_flight,
        _vanish_after_flush,
    ],
)
def test_client_vanishes_mid_request(
    server: Server, structured: bool, rst: bool, vanish: Callable[[RawNbd], None]
) -> None:
    before = server.file_bytes(0, MiB)
    c = server.session(structured=structured)
    try:
        vanish(c)
    finally:
        c.reset() if rst else c.close()
    assert server.file_bytes(0, MiB) == before  # an incomplete write must not be applied


def test_many_concurrent_connections(server: Server) -> None:
    n = 50
    barrier = threading.Barrier(n, timeout=20)

    def client(i: int) -> int:
        rng = random.Random(i)
        with server.session(structured=bool(i % 2)) as c:
            barrier.wait()
            spans = [(rng.randrange(0, SIZE - 300000), rng.randrange(1, 300000)) for _ in range(8)]
            handles = {c.send_request(Command.READ, off, n): (off, n) for off, n in spans}
            for _ in spans:
                r = c.read_reply()
                off, length = handles.pop(r.handle)
                assert r.error == 0 and r.data == server.file_bytes(off, length), (i, off, length)
            for off, length in spans:
                assert_reads_ok(server, c, off, length)
            c.disconnect()
        return i

    with ThreadPoolExecutor(max_workers=n) as pool:
        done = sorted(pool.map(client, range(n)))
    assert done == list(range(n))


@STRUCTURED
def test_pipelined_1000_requests_each_answered_once(server: Server, structured: bool) -> None:
    rng = random.Random(1000 + structured)
    handles = {0, U64_MAX, 1 << 63}
    while len(handles) < 1000:
        handles.add(rng.getrandbits(64))
    order = list(handles)
    rng.shuffle(order)
    expected: dict[int, tuple[int, int, int]] = {}  # handle -> (error, offset, length)
    stream = bytearray()
    with server.session(structured=structured) as c:
        for handle in order:
            kind = rng.random()
            if kind < 0.8:
                off, length = rng.randrange(0, SIZE - 16384), rng.choice([0, 1, 512, 4096, 16384])
                c.expect(handle, Command.READ, off, length)
                stream += wire.encode_request(wire.Request(0, Command.READ, handle, off, length))
                expected[handle] = (0, off, length)
            elif kind < 0.88:
                c.expect(handle, Command.READ, SIZE, 512)
                stream += wire.encode_request(wire.Request(0, Command.READ, handle, SIZE, 512))
                expected[handle] = (Errno.EINVAL, 0, 0)
            elif kind < 0.94:
                c.expect(handle, 99, 0, 0)
                stream += wire.encode_request(wire.Request(0, 99, handle, 0, 0))
                expected[handle] = (Errno.EINVAL, 0, 0)
            else:
                # A write of what is already there, so concurrent reads are deterministic.
                off = rng.randrange(0, SIZE - 512)
                c.expect(handle, Command.WRITE, off, 512)
                stream += wire.encode_request(wire.Request(0, Command.WRITE, handle, off, 512))
                stream += server.file_bytes(off, 512)
                expected[handle] = (0, 0, 0)
        assert len(stream) < 100_000  # fits in the socket buffers: sending cannot block on the server
        c.send(stream)
        seen: Counter[int] = Counter()
        for _ in order:
            r = c.read_reply()  # raises on a reply to a handle not (or no longer) in flight
            seen[r.handle] += 1
            error, off, length = expected[r.handle]
            assert r.error == error, (r.handle, r)
            if error:
                if structured:
                    assert_error_chunk(r)
            else:
                assert r.data == server.file_bytes(off, length)
        assert set(seen) == handles and set(seen.values()) == {1}
        assert not c.inflight
        assert_reads_ok(server, c)
        # Nothing more arrives: every handle was answered exactly once.
        c.disconnect()
        closed, extra = c.wait_closed(3)
        assert closed and extra == b""


def _rss(pid: int) -> int:
    """Resident memory of a process, in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@STRUCTURED
def test_unread_replies_do_not_pile_up_in_server_memory(server: Server, structured: bool) -> None:
    """28 bytes of request ask for 32 MiB of reply: backpressure must stop a client that does not read.

    8 such reads fit in one 224-byte packet. If the server answered every request it has buffered
    regardless of pause_writing(), it would hold 256 MiB for this client (and a 64 KiB packet of
    requests would ask for 73 GiB). Afterwards every reply must still arrive, intact and in full.
    """
    n = 8
    limit = 128 * MiB
    halves = {0: server.file_bytes(0, MAX_PAYLOAD), MAX_PAYLOAD: server.file_bytes(MAX_PAYLOAD, MAX_PAYLOAD)}
    with server.session(structured=structured) as c:
        base = _rss(server.pid)
        offsets = {i: (i % 2) * MAX_PAYLOAD for i in range(1, n + 1)}
        for handle, offset in offsets.items():
            c.expect(handle, Command.READ, offset, MAX_PAYLOAD)
        # One packet, so that the server receives every request in one read.
        c.send(
            b"".join(
                wire.encode_request(wire.Request(0, Command.READ, h, o, MAX_PAYLOAD))
                for h, o in offsets.items()
            )
        )
        peak = base
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            peak = max(peak, _rss(server.pid))
            time.sleep(0.02)
        for _ in range(n):
            r = c.read_reply()
            assert r.error == 0 and r.data == halves[offsets.pop(r.handle)]
        assert not offsets
        assert_reads_ok(server, c)
    assert peak - base < limit, f"server grew by {(peak - base) >> 20} MiB for one client not reading"


def test_structured_error_chunk_carries_a_message(server: Server) -> None:
    with server.session(structured=True) as c:
        for r in (
            c.read(SIZE, 512),
            c.call(99),
            c.read(0, 512, flags=1 << 9),
            c.write(SIZE - 1, b"ab"),
            c.block_status(0, 512),
        ):
            assert r.error != 0
            assert_error_chunk(r)
            r.message.encode("utf-8")
            assert len(r.message.encode()) <= 4096


@STRUCTURED
def test_disc_closes_after_answering_what_came_before(server: Server, structured: bool) -> None:
    """Requests before NBD_CMD_DISC are answered (a FLUSH too, which finishes in a task); then close."""
    with server.session(structured=structured) as c:
        c.expect(1, Command.READ, 4 * MiB, 8192)
        c.expect(2, Command.FLUSH, 0, 0)
        c.send(
            wire.encode_request(wire.Request(0, Command.READ, 1, 4 * MiB, 8192))
            + wire.encode_request(wire.Request(0, Command.FLUSH, 2, 0, 0))
            + wire.encode_request(wire.Request(0, Command.DISC, 3, 0, 0))
            # After DISC the client MUST NOT send more; whatever it sends must not be answered.
            + wire.encode_request(wire.Request(0, Command.READ, 4, 0, 512))
        )
        replies = {r.handle: r for r in (c.read_reply(), c.read_reply())}
        assert (replies[1].error, replies[1].data) == (0, server.file_bytes(4 * MiB, 8192))
        assert replies[2].error == 0
        closed, extra = c.wait_closed(3)
        assert closed and extra == b""


# --- fuzz -----------------------------------------------------------------------------------------------


def _handshake(structured: bool, meta: bool) -> bytes:
    """A well-formed negotiation, client side, ending in NBD_OPT_GO."""
    out = bytearray(wire.U32.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    if structured:
        out += wire.encode_option(wire.OptionRequest(Option.STRUCTURED_REPLY))
        if meta:
            q = wire.MetaContextRequest("disk", (BASE_ALLOCATION,))
            out += wire.encode_option(
                wire.OptionRequest(Option.SET_META_CONTEXT, wire.encode_meta_context_request(q))
            )
    out += wire.encode_option(wire.OptionRequest(Option.LIST))
    out += wire.encode_option(
        wire.OptionRequest(Option.GO, wire.encode_info_request(wire.InfoRequest("disk", (1,))))
    )
    return bytes(out)


def _requests(meta: bool) -> bytes:
    """A mix of well-formed requests ending in NBD_CMD_DISC."""
    region = 48 * MiB  # where the template writes
    out = wire.encode_request(wire.Request(0, Command.READ, 1, 4 * MiB, 4096))
    out += wire.encode_request(wire.Request(0, Command.WRITE, 2, region, 16)) + b"\x3c" * 16
    out += wire.encode_request(wire.Request(0, Command.FLUSH, 3, 0, 0))
    if meta:
        out += wire.encode_request(wire.Request(0, Command.BLOCK_STATUS, 4, 0, MiB))
    out += wire.encode_request(wire.Request(0, Command.WRITE_ZEROES, 5, region + 4096, 4096))
    out += wire.encode_request(wire.Request(0, Command.TRIM, 6, region + 8192, 4096))
    out += wire.encode_request(wire.Request(0, Command.CACHE, 7, 0, MiB))
    out += wire.encode_request(wire.Request(0, Command.READ, 8, region, 8192))
    out += wire.encode_request(wire.Request(0, Command.DISC, 9, 0, 0))
    return out


HANDSHAKES = [_handshake(False, False), _handshake(True, False), _handshake(True, True)]
TEMPLATES = [
    HANDSHAKES[0] + _requests(False),
    HANDSHAKES[1] + _requests(False),
    HANDSHAKES[2] + _requests(True),
]
OFFSETS = [0, 1, 511, 4 * MiB, 48 * MiB, SIZE - 4096, SIZE - 1, SIZE, SIZE + 1, 1 << 63, U64_MAX]
LENGTHS = [0, 1, 512, 4096, 65536, MAX_PAYLOAD, MAX_PAYLOAD + 1, 1 << 31, 0xFFFFFFFF]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One request with boundary-value fields, and a payload that may or may not match its length."""
    command = draw(st.one_of(st.sampled_from(list(Command)), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.sampled_from([0, *CommandFlag]), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.sampled_from(OFFSETS), st.integers(0, SIZE)))
    length = draw(st.one_of(st.sampled_from(LENGTHS), st.integers(0, 65536)))
    handle = draw(st.sampled_from([0, 1, U64_MAX]))
    out = wire.encode_request(wire.Request(flags, command, handle, offset, length))
    if command == Command.WRITE:
        n = draw(st.sampled_from([length, max(length - 1, 0), length + 28]))
        out += b"\x5e" * min(n, 70000)
    return out


@st.composite
def hostile_sessions(draw: st.DrawFn) -> tuple[bool, bytes]:
    """(read the greeting first?, bytes the client sends)."""
    kind = draw(st.sampled_from(["random", "after_flags", "mutated", "spliced", "requests"]))
    if kind == "random":
        return draw(st.booleans()), draw(st.binary(max_size=512))
    if kind == "after_flags":
        prefix = draw(st.sampled_from([HANDSHAKES[0][:4], HANDSHAKES[2][: 4 + 16]]))
        return True, prefix + draw(st.binary(max_size=512))
    if kind == "requests":
        # Past a proper negotiation: a short stream of requests with extreme fields.
        stream = b"".join(draw(st.lists(requests(), min_size=1, max_size=6)))
        return draw(st.booleans()), draw(st.sampled_from(HANDSHAKES)) + stream
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 6))):
            if not data:
                break
            op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
            pos = draw(st.integers(0, len(data) - 1))
            if op == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            else:
                del data[pos : pos + draw(st.integers(1, 8))]
    else:
        # A valid prefix followed by random bytes (a request stream that goes off the rails).
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + bytearray(draw(st.binary(max_size=256)))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]  # the client also gives up half-way
    return True, bytes(data)


@settings(
    max_examples=int(os.environ.get("ROBUSTNESS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(session=hostile_sessions())
def test_fuzz_hostile_clients(server: Server, session: tuple[bool, bytes]) -> None:
    read_greeting, payload = session
    with server.connect(timeout=3) as c:
        if read_greeting:
            c.greeting()
        with contextlib.suppress(OSError, Closed):
            c.send(payload)
            c.sock.shutdown(socket.SHUT_WR)
        # Whatever it made of that, the server ends the connection once the client is done sending.
        closed, _ = c.wait_closed(3)
        assert closed, payload
    assert server.served.proc.poll() is None, server.stderr
    assert "Traceback" not in server.stderr, server.stderr


def test_fuzz_leaves_a_server_qemu_agrees_with(server: Server) -> None:
    qemu_img_compare(server)
