"""The fast path for large reads: replies sent straight to the socket (sendmsg + sendfile) or buffered.

Unit tests drive :class:`FastPath` against a scripted socket (each send takes what a budget allows, or
finds the socket full, or fails) and a transport that keeps references to what it is given, as uvloop
does: the bytes that reach the client, the socket's and then the transport's, must be exactly the replies
in order, whatever the socket does. Then the real server over TCP: big and small reads pipelined while the
client is slow to read, a file that shrinks under the server, and connections that close when they should
(the fast path holds its own descriptor of the socket).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.nbd import fastpath, wire
from hikkoshi.nbd.constants import Command
from hikkoshi.nbd.device import BlockDevice
from hikkoshi.nbd.fastpath import FastPath
from tests.support.images import make_image
from tests.support.rawnbd import RawNbd
from tests.support.servers import Served, hikkoshi_server, stop

MiB = 1 << 20
SIZE = 16 * MiB

# --- FastPath against a scripted socket --------------------------------------------------------------------

#: One step of the socket's script: bytes it takes at most, 0 for "full" (EAGAIN), None for "reset".
Step = int | None


class ScriptedSocket:
    """Takes what its script allows; everything after the script is taken whole."""

    def __init__(self, script: list[Step]) -> None:
        self.script = list(script)
        self.wire = bytearray()  # what went into the socket, in order: what the client receives

    def _allow(self, want: int) -> int:
        step = self.script.pop(0) if self.script else want
        if step is None:
            raise ConnectionResetError("scripted reset")
        if step == 0:
            raise BlockingIOError("scripted full socket")
        return min(step, want)

    def sendmsg(self, bufs: list[Any], ancdata: Any, flags: int) -> int:
        assert flags == socket.MSG_MORE
        data = b"".join(bytes(b) for b in bufs)
        n = self._allow(len(data))
        self.wire += data[:n]
        return n

    def sendfile(self, out_fd: int, in_fd: int, offset: int, count: int) -> int:
        assert out_fd == -2
        data = os.pread(in_fd, self._allow(count), offset)
        self.wire += data
        return len(data)

    def fileno(self) -> int:
        return -2


class KeepingTransport:
    """Keeps what it is given by reference, as uvloop does, until the test says it was sent."""

    def __init__(self) -> None:
        self.queue: list[Any] = []

    def get_write_buffer_size(self) -> int:
        return sum(len(b) for b in self.queue)

    def is_closing(self) -> bool:
        return False

    def writelines(self, bufs: list[Any]) -> None:
        self.queue += [b for b in bufs if len(b)]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def drain(self, into: bytearray) -> None:
        for b in self.queue:
            into += bytes(b)
        self.queue.clear()


class FileDevice:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read_fd(self) -> int:
        return self.fd


@pytest.fixture(scope="module")
def image_fd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    path = tmp_path_factory.mktemp("fastpath") / "disk.raw"
    path.write_bytes(random.Random(7).randbytes(4 * MiB))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


#: (small replies batched before it, offset, length) per read; lengths cross the end of the 4 MiB file.
reads = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 4 * MiB),
        st.sampled_from([64 * 1024, 100_000, MiB, 2 * MiB]),
    ),
    min_size=1,
    max_size=8,
)
scripts = st.lists(st.one_of(st.integers(0, 3 * MiB), st.integers(0, 40), st.none()), max_size=12)


@settings(max_examples=300, deadline=None)
@given(reads=reads, script=scripts, drains=st.lists(st.booleans(), min_size=8, max_size=8))
def test_replies_arrive_whole_and_in_order(
    image_fd: int, reads: list[tuple[int, int, int]], script: list[Step], drains: list[bool]
) -> None:
    sock = ScriptedSocket(script)
    transport = KeepingTransport()
    fast = FastPath(cast(asyncio.Transport, transport), cast(BlockDevice, FileDevice(image_fd)))
    fast._sock, fast._sock_tried = cast(socket.socket, sock), True
    expected = bytearray()
    broken = False
    with mock.patch.object(os, "sendfile", sock.sendfile):
        for i, (smalls, offset, length) in enumerate(reads):
            fast.use(cast(BlockDevice, FileDevice(image_fd)))
            out: list[bytes | bytearray | memoryview] = [b"small%d-%d;" % (i, k) for k in range(smalls)]
            header = b"<header %d %d %d>" % (i, offset, length)
            expected += b"".join(out) + header
            data = os.pread(image_fd, length, offset)
            expected += data + bytes(length - len(data))  # past the end of the file: zeroes
            if fast.send_read(out, header, offset, length) is not None:
                broken = True
                break
            assert not out
            fast.settle()
            if drains[i]:
                transport.drain(sock.wire)  # the socket had room again: the transport wrote its queue
    transport.drain(sock.wire)
    if broken:
        assert expected.startswith(sock.wire)
    else:
        assert sock.wire == expected


def test_unreadable_file_is_reported_before_anything_is_sent() -> None:
    """A read error with nothing of the reply out yet leaves ``out`` as it was and raises."""
    transport = KeepingTransport()
    r, w = os.pipe()  # pread on a pipe fails (ESPIPE)
    try:
        fast = FastPath(cast(asyncio.Transport, transport), cast(BlockDevice, FileDevice(r)))
        fast._sock, fast._sock_tried = (
            cast(socket.socket, ScriptedSocket([0])),
            True,
        )  # the socket is full: the buffered way
        out: list[bytes | bytearray | memoryview] = [b"earlier"]
        with pytest.raises(OSError):
            fast.send_read(out, b"header", 0, 65536)
        assert out == [b"earlier"]
    finally:
        os.close(r)
        os.close(w)


def test_tls_transport_gets_no_socket_of_ours() -> None:
    class Tls(KeepingTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"ssl_object": object(), "socket": socket.socket()}.get(name, default)

    assert fastpath._own_socket(cast(asyncio.Transport, Tls())) is None


def test_own_socket_is_a_descriptor_of_our_own() -> None:
    a, b = socket.socketpair()
    with a, b:

        class Plain(KeepingTransport):
            def get_extra_info(self, name: str, default: Any = None) -> Any:
                return a if name == "socket" else default

        fast = FastPath(cast(asyncio.Transport, Plain()), cast(BlockDevice, FileDevice(-1)))
        own = fast._direct()
        assert own is not None and own.fileno() != a.fileno()
        own.sendall(b"hi")
        assert b.recv(2) == b"hi"
        fast.close()
        assert own.fileno() == -1 and fast._direct() is None
        a.sendall(b"still open")  # closing ours left the transport's descriptor alone
        assert b.recv(10) == b"still open"


# --- the real server ---------------------------------------------------------------------------------------


@pytest.fixture
def big(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    image = make_image(tmp_path / "disk.raw", SIZE, seed=3, data_every=2 * MiB)
    with hikkoshi_server(str(image), "--export", "disk") as served:
        yield served, image


def _session(served: Served, structured: bool) -> RawNbd:
    assert served.port is not None
    return RawNbd(served.port, timeout=20).handshake("disk", structured=structured)


def _file(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        data = os.pread(f.fileno(), length, offset)
    return data + bytes(length - len(data))


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_big_and_small_reads_with_a_slow_reader(big: tuple[Served, Path], structured: bool) -> None:
    served, image = big
    rng = random.Random(11 + structured)
    with _session(served, structured) as c:
        expected: dict[int, tuple[int, int]] = {}
        stream = bytearray()
        for handle in range(1, 121):
            length = rng.choice([512, 4096, 65535, 65536, 300_000, MiB, 4 * MiB])
            offset = rng.randrange(0, SIZE - length)
            c.expect(handle, Command.READ, offset, length)
            stream += wire.encode_request(wire.Request(0, Command.READ, handle, offset, length))
            expected[handle] = (offset, length)
        c.send(stream)
        time.sleep(0.5)  # the server fills the socket and must queue the rest behind it
        while expected:
            r = c.read_reply()
            offset, length = expected.pop(r.handle)
            assert r.error == 0 and r.data == _file(image, offset, length), (r.handle, offset, length)
        c.disconnect()
        closed, extra = c.wait_closed(5)
        assert closed and extra == b""


def test_a_file_that_shrinks_reads_as_zeroes_past_its_end(big: tuple[Served, Path]) -> None:
    served, image = big
    with _session(served, structured=True) as c:
        os.truncate(image, 3 * MiB + 12345)
        for offset, length in ((3 * MiB, MiB), (3 * MiB + 12345, 65536), (8 * MiB, 2 * MiB)):
            r = c.read(offset, length)
            assert r.error == 0 and r.data == _file(image, offset, length)
            assert len(r.data) == length


def test_server_closes_connections_that_used_the_fast_path(big: tuple[Served, Path]) -> None:
    served, image = big
    # A client that breaks the protocol after big reads is dropped (abort path).
    with _session(served, structured=False) as c:
        assert c.read(0, MiB).data == _file(image, 0, MiB)
        c.send(b"\xff" * 28)
        closed, _ = c.wait_closed(5)
        assert closed
    # A client that vanishes in the middle of big replies leaves the server healthy.
    with _session(served, structured=True) as c:
        for h in range(8):
            c.send_request(Command.READ, h * MiB, 4 * MiB)
        c.reset()
    # SIGTERM: the graceful close reaches a client that has read big replies.
    with _session(served, structured=True) as c:
        assert c.read(MiB, 2 * MiB).data == _file(image, MiB, 2 * MiB)
        served.proc.send_signal(signal.SIGINT)
        closed, _ = c.wait_closed(10)
        assert closed
    assert stop(served.proc) == 0
    assert served.proc.stderr is not None
    err = served.proc.stderr.read()
    assert "Traceback" not in err, err


# --- congestion control on loopback -----------------------------------------------------------------------


class SocketTransport(KeepingTransport):
    def __init__(self, sock: Any) -> None:
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


def test_loopback_connections_get_reno() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            fastpath.loopback_congestion_control(cast(asyncio.Transport, SocketTransport(accepted)))
            cc = accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
            assert cc.rstrip(b"\0") == b"reno"


def test_remote_and_unix_connections_keep_the_system_choice() -> None:
    remote = mock.Mock(family=socket.AF_INET, type=socket.SOCK_STREAM)
    remote.getpeername.return_value = ("192.0.2.7", 10809)
    fastpath.loopback_congestion_control(cast(asyncio.Transport, SocketTransport(remote)))
    remote.setsockopt.assert_not_called()
    mapped = mock.Mock(family=socket.AF_INET6, type=socket.SOCK_STREAM)
    mapped.getpeername.return_value = ("::ffff:127.0.0.1", 10809, 0, 0)
    fastpath.loopback_congestion_control(cast(asyncio.Transport, SocketTransport(mapped)))
    mapped.setsockopt.assert_called_once_with(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    a, b = socket.socketpair()
    with a, b:
        fastpath.loopback_congestion_control(cast(asyncio.Transport, SocketTransport(a)))  # no error
