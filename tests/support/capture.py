"""What goes over the loopback interface, as tcpdump would see it: every TCP segment on ``lo`` (an
``AF_PACKET`` socket, root only), put back together per connection so that a string split over two
segments is still found."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_ETH_HEADER = 14

Flow = tuple[str, int, str, int]
"""(source address, port, destination address, port) of one direction of a TCP connection."""


@dataclass
class _Stream:
    base: int | None = None
    data: bytearray = field(default_factory=bytearray)
    segments: int = 0
    gaps: int = 0

    def add(self, seq: int, payload: bytes) -> None:
        if self.base is None:
            self.base = seq
        offset = (seq - self.base) % (1 << 32)
        if offset > len(self.data):
            self.gaps += 1  # a segment not seen: keep the rest apart rather than glue it on
            self.data += b"\0" * (offset - len(self.data))
        end = offset + len(payload)
        if end > len(self.data):
            self.data[offset:end] = payload
        self.segments += 1


class LoopbackCapture:
    """Captures TCP on ``lo`` from ``start()`` until ``stop()`` (a thread reading a raw socket)."""

    def __init__(self, buffer_bytes: int = 256 << 20) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        # Beyond net.core.rmem_max (root may): a burst must not be dropped while the thread is busy.
        self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), buffer_bytes)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.streams: dict[Flow, _Stream] = {}
        self.packets = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] == _PACKET_OUTGOING:
                continue  # on lo every packet is seen twice: going out and coming in
            self._packet(frame)

    def _packet(self, frame: bytes) -> None:
        if len(frame) < _ETH_HEADER + 20 or frame[12:14] != b"\x08\x00":
            return
        ip = frame[_ETH_HEADER:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != socket.IPPROTO_TCP:
            return
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            return
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        self.packets += 1
        if not payload:
            return
        self.bytes += len(payload)
        flow = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport)
        self.streams.setdefault(flow, _Stream()).add(seq, bytes(payload))

    def find(self, needle: bytes) -> list[Flow]:
        """The connections (directions) whose bytes contain ``needle``."""
        return [flow for flow, stream in self.streams.items() if needle in stream.data]

    def flows(self) -> Iterator[tuple[Flow, int]]:
        """Every direction seen, with its byte count."""
        for flow, stream in self.streams.items():
            yield flow, len(stream.data)
