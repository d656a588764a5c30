"""What one NBD server lets its clients hold: connections, time and memory. Pure.

The defaults are for a VM's disk service: QEMU connects over a Unix socket (one connection per disk, a few
more with multi-conn) and may leave a disk alone for hours; over TCP come a migration's peers (a relocation
proxy's pipelined connections, a mirror job, a remote QEMU on a shared disk) and, on a network, whoever
else can reach the port.

A client's *address* is what the per-address cap counts. Over TCP it is the peer's IP address (an IPv6
client by its /64: one host or site gets a whole /64, and could take a new address per connection; an
IPv4-mapped peer counts as its IPv4 address). A Unix socket peer has no address: every process that can
open the socket passed its file permissions, and all of a VM's disks come from one QEMU, so Unix-socket
clients are not capped by address at all; they count against ``max_connections`` only, and a reserve of
it (``unix_reserved``) stays theirs whatever the network does, so a flood over TCP never locks the VM out
of its own disks.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

MiB = 1 << 20
#: The largest payload a client that negotiated no size constraints may send or ask for: anything the
#: request's 32-bit length can say. Such payloads are streamed, so they cost no more memory than others.
UNNEGOTIATED_MAX_PAYLOAD = 0xFFFFFFFF
#: Payload buffers are never smaller than this (a size class of the memory pool).
MIN_PIECE = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Knobs of an NBD server's admission, timeouts and payload memory."""

    #: Seconds a client may take from connecting to entering transmission (TLS included).
    handshake_timeout: float = 30.0
    #: Seconds a negotiated TCP client may stay idle (nothing received, nothing sent, no request at the
    #: device) before it is closed; None: never. Off by default: QEMU has no keepalive at the NBD level and
    #: a VM's disk may be idle for hours, and a closed connection stops the guest (``werror=stop``).
    #: Unix-socket clients (the VM's own QEMU) are never closed for being idle.
    idle_timeout: float | None = None
    #: Connections at once, all clients together.
    max_connections: int = 1024
    #: Connections at once from one TCP address (see the module's docstring); 0: no cap.
    max_connections_per_address: int = 64
    #: Of ``max_connections``, how many only Unix-socket clients may take (at most half of them).
    unix_reserved: int = 64
    #: Payload bytes one connection may hold at once (write payloads being received, read replies not yet
    #: sent); a power of two. Larger requests are streamed in pieces of this size.
    connection_memory: int = 4 * MiB
    #: Payload bytes all connections may hold at once; requests wait for it first come, first served.
    memory_budget: int = 128 * MiB
    #: The maximum payload advertised in NBD_INFO_BLOCK_SIZE, and enforced on clients that asked for it.
    max_payload: int = 32 * MiB

    def __post_init__(self) -> None:
        if self.handshake_timeout <= 0:
            raise ValueError("the handshake timeout must be positive")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("the idle timeout must be positive (or None: never)")
        if self.max_connections < 1 or self.max_connections_per_address < 0:
            raise ValueError("connection caps must be at least 1 (0 per address: no cap)")
        if self.unix_reserved < 0:
            raise ValueError("unix_reserved must not be negative")
        if self.connection_memory < MIN_PIECE or self.connection_memory & (self.connection_memory - 1):
            raise ValueError(f"connection memory must be a power of two, at least {MIN_PIECE} bytes")
        if self.memory_budget < self.connection_memory:
            raise ValueError("the memory budget must hold at least one connection's memory")
        if not 4096 <= self.max_payload <= UNNEGOTIATED_MAX_PAYLOAD:
            raise ValueError("the maximum payload must be between 4096 and 2^32-1")

    @property
    def reserved_for_unix(self) -> int:
        """Connections only Unix-socket clients may take: TCP clients always keep at least half."""
        return min(self.unix_reserved, self.max_connections // 2)

    def piece_size(self, length: int) -> int:
        """The buffer a payload of ``length`` bytes is held in: a power of two from 64 KiB, at most the
        connection's memory (payloads longer than that are streamed in pieces of it)."""
        size = MIN_PIECE
        while size < length:
            size <<= 1
        return min(size, self.connection_memory)


def client_key(peer: object) -> str | None:
    """What the per-address cap counts for a peer (``get_extra_info("peername")``); None: not capped.

    Unix sockets name their peer with a path or nothing, never an address: None.
    """
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Admission:
    """Counts connections by address and decides whether a new one may come in. Pure."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.total = 0
        self.tcp = 0
        self.by_address: Counter[str] = Counter()

    def refusal(self, key: str | None, unix: bool) -> str | None:
        """Why a connection from ``key`` may not come in now, or None (then call :meth:`enter`)."""
        limits = self.limits
        if self.total >= limits.max_connections:
            return "server full"
        if unix:
            return None
        if self.tcp >= limits.max_connections - limits.reserved_for_unix:
            return "server full for TCP clients"
        cap = limits.max_connections_per_address
        if key is not None and cap and self.by_address[key] >= cap:
            return f"{cap} connections from {key} already"
        return None

    def enter(self, key: str | None, unix: bool) -> None:
        self.total += 1
        if not unix:
            self.tcp += 1
        if key is not None:
            self.by_address[key] += 1

    def leave(self, key: str | None, unix: bool) -> None:
        self.total -= 1
        if not unix:
            self.tcp -= 1
        if key is not None:
            self.by_address[key] -= 1
            if self.by_address[key] <= 0:
                del self.by_address[key]
