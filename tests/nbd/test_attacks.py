"""Attacks on ``hikkoshi nbd serve``, each shown to fail while real clients go on being served.

- WRITE headers declaring 32 MiB, and then nothing, from 64 and 128 connections: the server allocates
  nothing for them (its resident memory stays bounded), and nbdcopy writes and reads back its data.
- 1,024 idle negotiated connections: a TCP client (nbdinfo) and the VM's path (qemu-io over the Unix
  socket) are served; per-address caps and the Unix reserve hold.
- Idle and handshake timeouts close what they should, and nothing else.
- Payloads of 48 MiB from a client that negotiated no size constraints round-trip in bounded memory; one
  that negotiated them gets the protocol's errors and nothing changes.
- A write that must wait for payload memory waits, and others are served meanwhile.
- Export descriptions carry no host path unless asked.

Servers listen on 127.0.0.1 (attackers come from other loopback addresses, 127.0.0.2 and up, so a
per-address cap can be told from the rest) and on a Unix socket; each is stopped by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from hikkoshi.nbd import wire
from hikkoshi.nbd.client import NbdClient
from hikkoshi.nbd.constants import ClientFlag, Command, CommandFlag, Errno, Option, OptionReply
from hikkoshi.nbd.tls import client_context
from tests.support.images import make_image
from tests.support.rawnbd import RawNbd
from tests.support.servers import Served, hikkoshi_server, run_tool

MiB = 1 << 20
SIZE = 64 * MiB
GO = wire.U32.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) + wire.encode_option(
    wire.OptionRequest(Option.GO, wire.encode_info_request(wire.InfoRequest("disk")))
)


# --- the server, its memory, its log ---------------------------------------------------------------------


class Pump:
    """Reads a child's stderr as it comes (a full pipe would block the server)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


@dataclass
class Server:
    served: Served
    image: Path
    sock: Path
    log: Pump

    @property
    def port(self) -> int:
        assert self.served.port is not None
        return self.served.port

    @property
    def tcp_uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/disk"

    @property
    def unix_uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def memory(self, field: str = "VmRSS") -> int:
        """The server's resident memory now (VmRSS) or at its peak so far (VmHWM), in bytes."""
        with open(f"/proc/{self.served.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def file_bytes(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            return os.pread(f.fileno(), length, offset)


@contextlib.contextmanager
def serve(tmp_path: Path, *flags: str, size: int = SIZE) -> Iterator[Server]:
    tmp_path.mkdir(exist_ok=True)
    image = make_image(tmp_path / "disk.raw", size)
    sock = tmp_path / "nbd.sock"
    args = [str(image), "--export", "disk", "--listen", "127.0.0.1:0", "--listen", f"unix:{sock}", *flags]
    with hikkoshi_server(*args) as served:
        assert served.proc.stderr is not None
        server = Server(served, image, sock, Pump(served.proc.stderr))
        yield server
        assert served.proc.poll() is None, server.log.text
    assert "Traceback" not in server.log.text, server.log.text


def enough_descriptors(n: int) -> None:
    """This test process opens ``n`` sockets: raise its own soft limit if it must."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 256:
        if hard != resource.RLIM_INFINITY and hard < n + 256:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, hard))


# --- raw connections from any loopback address ------------------------------------------------------------


def dial(server: Server, source: str | None = "127.0.0.2", timeout: float = 10) -> socket.socket:
    """A TCP connection from ``source`` (a loopback address), or over the Unix socket if None."""
    if source is None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(server.sock))
        return s
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", server.port))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return bytes(buf)


def finish_go(s: socket.socket) -> bool:
    """Read the greeting and the replies to the GO sent with it; False if the server closed instead."""
    try:
        recv_exact(s, 18)
        while True:
            _option, reply_type, length = wire.decode_option_reply_header(recv_exact(s, 20))
            recv_exact(s, length)
            if reply_type != OptionReply.INFO:
                return reply_type == OptionReply.ACK
    except (ConnectionError, TimeoutError):
        return False


def negotiated(server: Server, source: str | None = "127.0.0.2") -> socket.socket | None:
    """A connection that has entered transmission, or None if the server refused it."""
    s = dial(server, source)
    with contextlib.suppress(OSError):
        s.sendall(GO)
    if finish_go(s):
        return s
    s.close()
    return None


def raw_read(s: socket.socket, handle: int, offset: int, length: int) -> tuple[int, bytes]:
    """A READ over a simple-reply connection: (error, data)."""
    s.sendall(wire.encode_request(wire.Request(0, Command.READ, handle, offset, length)))
    reply = wire.decode_simple_reply(recv_exact(s, 16))
    assert reply.handle == handle
    return reply.error, recv_exact(s, length) if not reply.error else b""


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    """True once the server ends the connection; False if it is still open after ``timeout``."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- attack: WRITE headers declaring 32 MiB, then nothing -------------------------------------------------


@pytest.mark.parametrize("then", [b"", b"\x01"], ids=["then-nothing", "then-one-byte"])
@pytest.mark.parametrize("attackers", [64, 128])
def test_big_write_headers_hold_no_memory_and_good_clients_are_served(
    tmp_path: Path, attackers: int, then: bytes
) -> None:
    """The old server allocated a 32 MiB buffer per header once anything more arrived (one byte: 64
    connections held 2 GiB); now a payload's buffer follows what has arrived."""
    enough_descriptors(attackers + 64)
    with serve(tmp_path, "--max-connections-per-address", "0") as server:
        source = tmp_path / "source.raw"
        source.write_bytes(random.Random(attackers).randbytes(SIZE))
        before = server.memory()
        held = []
        try:
            for i in range(attackers):
                s = negotiated(server, f"127.0.0.{2 + i % 8}")
                assert s is not None
                # 28 bytes: a WRITE of 32 MiB at offset 0. The payload never comes (but for a byte).
                s.sendall(wire.encode_request(wire.Request(0, Command.WRITE, i, 0, 32 * MiB)))
                if then:
                    time.sleep(0.002)  # its own packet, after the header was parsed
                    s.sendall(then)
                held.append(s)
            time.sleep(0.5)
            t0 = time.monotonic()
            run_tool("nbdcopy", "--no-extents", str(source), server.tcp_uri, timeout=60)
            assert server.image.read_bytes() == source.read_bytes()
            back = tmp_path / "back.raw"
            run_tool("nbdcopy", "--no-extents", server.unix_uri, str(back), timeout=60)
            assert sha(back.read_bytes()) == sha(source.read_bytes())
            assert time.monotonic() - t0 < 60
            # Every attacker is still there, still owing its payload, and has cost next to nothing.
            assert all(s.fileno() >= 0 for s in held)
            grew = server.memory("VmHWM") - before
            assert grew < 64 * MiB, f"the server grew by {grew >> 20} MiB (was ~{attackers * 32} MiB)"
        finally:
            for s in held:
                s.close()
        # The headers' writes never happened: the image is the good client's data.
        time.sleep(0.2)
        assert server.image.read_bytes() == source.read_bytes()
        run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.tcp_uri)


# --- attack: 1,024 idle negotiated connections ------------------------------------------------------------


def test_a_thousand_idle_connections_lock_nobody_out(tmp_path: Path) -> None:
    enough_descriptors(1100)
    # 16 attacker addresses x the default 64 per address; room for them and a few good clients.
    with serve(tmp_path, "--max-connections", "1100") as server:
        idle: list[socket.socket] = []
        try:
            for batch in range(16):
                socks = [dial(server, f"127.0.0.{2 + batch}") for _ in range(64)]
                for s in socks:
                    s.sendall(GO)
                for s in socks:
                    assert finish_go(s), "an attacker connection within the caps was refused"
                idle += socks
            assert len(idle) == 1024
            # The 65th connection from an attacker's address is refused: closed before the greeting.
            extra = dial(server, "127.0.0.2")
            with contextlib.suppress(OSError):
                extra.sendall(GO)
            assert not finish_go(extra)
            extra.close()
            # Good clients are served meanwhile: over TCP (another address), and the VM's own path.
            info = json.loads(run_tool("nbdinfo", "--json", server.tcp_uri, timeout=30).stdout)
            assert info["exports"][0]["export-size"] == SIZE
            proc = run_tool(
                "qemu-io", "-f", "raw", server.unix_uri,
                "-c", "write -P 0x5a 1M 4M", "-c", "read -P 0x5a 1M 4M", timeout=30,
            )  # fmt: skip
            assert "verification failed" not in proc.stdout, proc.stdout
            assert server.file_bytes(MiB, 4 * MiB) == b"\x5a" * 4 * MiB
            # And the idle connections are alive and well: one of them reads.
            error, data = raw_read(idle[500], 1, 0, 4096)
            assert error == 0 and data == server.file_bytes(0, 4096)
        finally:
            for s in idle:
                s.close()


def test_a_tcp_flood_leaves_the_unix_reserve_to_the_vm(tmp_path: Path) -> None:
    # 20 connections at most, of which 10 are kept for Unix-socket clients; no per-address cap.
    with serve(tmp_path, "--max-connections", "20", "--max-connections-per-address", "0") as server:
        tcp = [negotiated(server, f"127.0.0.{2 + i}") for i in range(12)]
        try:
            assert sum(s is not None for s in tcp) == 10  # TCP got its share, no more
            assert not any(tcp[10:])
            with contextlib.ExitStack() as stack:
                unix = [negotiated(server, None) for _ in range(10)]
                for s in unix:
                    assert s is not None
                    stack.callback(s.close)
                # The server is full now: an 11th Unix client is refused too.
                assert negotiated(server, None) is None
            # The Unix clients left: the VM's QEMU gets in, whatever TCP does.
            proc = run_tool("qemu-io", "-f", "raw", server.unix_uri, "-c", "read -P 0 61M 1M", timeout=30)
            assert "verification failed" not in proc.stdout
        finally:
            for s in tcp:
                if s is not None:
                    s.close()


def test_the_per_address_cap_counts_tcp_addresses_not_unix_clients(tmp_path: Path) -> None:
    with serve(tmp_path, "--max-connections-per-address", "8") as server, contextlib.ExitStack() as stack:
        from_one = [negotiated(server, "127.0.0.2") for _ in range(12)]
        for s in from_one:
            if s is not None:
                stack.callback(s.close)
        assert [s is not None for s in from_one] == [True] * 8 + [False] * 4
        # Another address is not affected, nor is the Unix socket (all of a VM's disks come over it).
        run_tool("nbdinfo", server.tcp_uri, timeout=30)
        unix = [negotiated(server, None) for _ in range(20)]
        for s in unix:
            assert s is not None
            stack.callback(s.close)
        # One of the eight leaves: the address may connect once more.
        first = from_one[0]
        assert first is not None
        first.close()
        time.sleep(0.3)
        again = negotiated(server, "127.0.0.2")
        assert again is not None
        stack.callback(again.close)
        assert raw_read(again, 1, 4 * MiB, 512) == (0, server.file_bytes(4 * MiB, 512))


# --- idle and handshake timeouts --------------------------------------------------------------------------


def test_idle_and_handshake_timeouts(tmp_path: Path) -> None:
    with serve(tmp_path, "--idle-timeout", "1", "--handshake-timeout", "1.5") as server:
        before = server.file_bytes(0, MiB)
        quiet = negotiated(server)
        half_header = negotiated(server)
        stalled_payload = negotiated(server)
        busy = negotiated(server)
        unix = negotiated(server, None)
        silent = dial(server)  # never negotiates
        half_option = dial(server)
        socks = [quiet, half_header, stalled_payload, busy, unix, silent, half_option]
        try:
            assert None not in socks
            assert half_header is not None and stalled_payload is not None and half_option is not None
            half_header.sendall(wire.encode_request(wire.Request(0, Command.READ, 1, 0, 512))[:10])
            stalled_payload.sendall(
                wire.encode_request(wire.Request(0, Command.WRITE, 1, 0, MiB)) + b"\x77" * 300_000
            )
            half_option.sendall(GO[:12])
            assert busy is not None and unix is not None
            # A client that keeps asking is never idle (it is served for 2.8 s of a 1 s timeout)...
            for h in range(1, 8):
                assert raw_read(busy, h, h * 4096, 4096) == (0, server.file_bytes(h * 4096, 4096))
                time.sleep(0.4)
            # ...while the others were closed: idle after negotiating, or stuck in a request or in
            # negotiation.
            for s in (quiet, half_header, stalled_payload, silent, half_option):
                assert s is not None
                assert closed_by_server(s, timeout=10)
            # The VM's own client over the Unix socket is never closed for being idle.
            assert raw_read(unix, 9, 0, 4096) == (0, server.file_bytes(0, 4096))
            assert closed_by_server(busy, timeout=10)  # once it stopped asking, it was idle
            assert server.file_bytes(0, MiB) == before  # the stalled write never landed
        finally:
            for s in socks:
                if s is not None:
                    s.close()
        run_tool("nbdinfo", server.tcp_uri, timeout=30)


# --- payloads longer than 32 MiB --------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_48mib_write_and_read_round_trip_in_bounded_memory(tmp_path: Path, structured: bool) -> None:
    """proto.md lets a client that did not ask for NBD_INFO_BLOCK_SIZE send more than 32 MiB (the reference
    server serves it); ours streams it: the payload is never held whole."""
    with serve(tmp_path, size=128 * MiB) as server:
        data = random.Random(48).randbytes(48 * MiB)
        offset = 5 * MiB + 512  # not aligned to the pieces
        before = server.memory()
        with RawNbd(server.port, timeout=60).handshake("disk", structured=structured) as c:
            assert c.write(offset, data).error == 0
            assert server.file_bytes(offset, len(data)) == data
            r = c.read(offset, len(data))
            assert r.error == 0 and r.data == data
            if structured:
                assert len(r.chunks) > 1  # a chunk per piece
                r = c.read(offset, len(data), flags=CommandFlag.DF)
                assert r.error == 0 and r.data == data and len(r.chunks) == 1  # DF: one chunk, streamed
            c.disconnect()
        grew = server.memory("VmHWM") - before
        assert grew < 24 * MiB, f"the server grew by {grew >> 20} MiB for a 48 MiB payload"


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_48mib_from_a_client_bound_to_32mib_gets_the_protocols_errors(
    tmp_path: Path, structured: bool
) -> None:
    with serve(tmp_path, size=128 * MiB) as server:
        before = hashlib.sha256(server.image.read_bytes()).hexdigest()
        with RawNbd(server.port, timeout=60).handshake("disk", structured=structured, block_size=True) as c:
            assert c.write(0, b"\xee" * 48 * MiB).error == Errno.EINVAL
            assert c.read(0, 48 * MiB).error == Errno.EINVAL
            if structured:
                assert c.read(0, 48 * MiB, flags=CommandFlag.DF).error == Errno.EOVERFLOW
            r = c.read(0, 32 * MiB)  # its maximum is served
            assert r.error == 0 and r.data == server.file_bytes(0, 32 * MiB)
        assert hashlib.sha256(server.image.read_bytes()).hexdigest() == before


# --- waiting for payload memory ---------------------------------------------------------------------------


def test_a_write_waits_for_memory_while_others_are_served(tmp_path: Path) -> None:
    # The whole budget is one connection's worth: 256 KiB.
    with serve(tmp_path, "--memory-budget", "256K", "--connection-memory", "256K") as server:
        size = 256 * 1024
        a_data = random.Random(1).randbytes(size)
        b_data = random.Random(2).randbytes(size)
        with RawNbd(server.port) as a, RawNbd(server.port) as b, RawNbd(server.port) as c:
            for x in (a, b, c):
                x.handshake("disk")
            # A takes the budget: its payload starts arriving, then stalls.
            ha = a.send_request(Command.WRITE, 8 * MiB, size, payload=a_data[:100_000])
            time.sleep(0.3)
            # B's whole write is sent but must wait for memory (the server stops reading B meanwhile, so
            # the sending may block: a thread sends it).
            hb = b.new_handle()
            b.expect(hb, Command.WRITE, 16 * MiB, size)
            request = wire.encode_request(wire.Request(0, Command.WRITE, hb, 16 * MiB, size)) + b_data
            sender = threading.Thread(target=b.send, args=(request,), daemon=True)
            sender.start()
            b.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                b.sock.recv(1)
            b.sock.settimeout(10)
            # Others are served meanwhile: small writes and reads need no payload memory.
            assert c.write(24 * MiB, b"\x33" * 4096).error == 0
            assert c.read(0, 8192).data == server.file_bytes(0, 8192)
            # A finishes: its memory goes back, B gets it.
            a.send(a_data[100_000:])
            r = a.read_reply()
            assert (r.handle, r.error) == (ha, 0)
            assert server.file_bytes(8 * MiB, size) == a_data
            r = b.read_reply()
            assert (r.handle, r.error) == (hb, 0)
            sender.join(10)
            assert server.file_bytes(16 * MiB, size) == b_data


# --- what export descriptions say ------------------------------------------------------------------------


def test_descriptions_show_no_host_path_unless_asked(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        listing = json.loads(run_tool("nbdinfo", "--list", "--json", server.tcp_uri, timeout=30).stdout)
        info = json.loads(run_tool("nbdinfo", "--json", server.tcp_uri, timeout=30).stdout)
        for text in (json.dumps(listing), json.dumps(info)):
            assert str(tmp_path) not in text
            assert "disk.raw" not in text
    with serve(tmp_path / "asked", "--describe-paths") as server:
        info = json.loads(run_tool("nbdinfo", "--json", server.tcp_uri, timeout=30).stdout)
        assert info["exports"][0]["description"] == str(server.image.resolve())


def test_limit_flags_are_checked(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", MiB)
    proc = subprocess.run(
        [sys.executable, "-m", "hikkoshi", "nbd", "serve", str(image), "--listen", "127.0.0.1:0",
         "--connection-memory", "3M"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode != 0 and "power of two" in proc.stderr


def test_the_proxy_names_no_upstream_socket_and_takes_the_limits(tmp_path: Path) -> None:
    with serve(tmp_path / "source") as source:
        args = ["--upstream", source.unix_uri, "--cache", str(tmp_path / "cache.raw"), "--no-background"]
        args += ["--max-connections-per-address", "2", "--connection-memory", "1M"]
        with hikkoshi_server(*args, command="proxy") as proxy:
            assert proxy.port is not None
            uri = f"nbd://127.0.0.1:{proxy.port}/disk"
            info = run_tool("nbdinfo", "--json", uri, timeout=30).stdout
            assert str(source.sock) not in info and str(tmp_path) not in info
            # Its limits apply: a third connection from one address is refused.
            held = [negotiated_port(proxy.port) for _ in range(3)]
            try:
                assert [s is not None for s in held] == [True, True, False]
            finally:
                for s in held:
                    if s is not None:
                        s.close()
            # A read longer than its connection memory is streamed, and right.
            with RawNbd(proxy.port, timeout=60).handshake("disk", structured=True) as c:
                r = c.read(0, 3 * MiB)
                assert r.error == 0 and r.data == source.file_bytes(0, 3 * MiB) and len(r.chunks) == 3


def negotiated_port(port: int, source: str = "127.0.0.2") -> socket.socket | None:
    """A negotiated connection to export "disk" on ``port`` from ``source``, or None if refused."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    with contextlib.suppress(OSError):
        s.sendall(GO)
    if finish_go(s):
        return s
    s.close()
    return None


def test_long_payloads_are_streamed_over_tls_too(tmp_path: Path) -> None:
    """Over TLS every reply goes through the transport (no sendfile): pieces wait for it to drain."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with serve(
        tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--connection-memory", "1M"
    ) as server:
        data = random.Random(24).randbytes(24 * MiB)

        async def go() -> None:
            uri = f"nbds://127.0.0.1:{server.port}/disk"
            async with NbdClient(uri, tls=client_context(ca=cert)) as c:
                await c.write(MiB + 512, data)
                assert await c.read(MiB + 512, len(data)) == data
                # Several at once: each connection streams one at a time, in order of arrival.
                reads = [c.read(i * 8 * MiB, 8 * MiB) for i in range(4)]
                got = await asyncio.gather(*reads)
                assert b"".join(got) == server.file_bytes(0, 32 * MiB)

        asyncio.run(go())
        assert server.file_bytes(MiB + 512, len(data)) == data
