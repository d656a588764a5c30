"""A process's TCP connections, and cutting one of them at the kernel.

Why: QEMU 7.2 writes the last of an outgoing migration (the switchover's RAM and device state) with
its main lock held. When the link to the destination goes silent at that moment (blackholed, not
reset), the write blocks for as long as TCP retransmits, many minutes, and with it QMP: nobody can
cancel the migration, and the guest stays stopped on the source. Destroying that one socket
(``ss -K``, the kernel's SOCK_DESTROY) makes the write fail at once; QEMU then fails the migration and,
the migration not committed, the guest runs on at the source.

Connections come from ``/proc/<pid>/fd`` (socket inodes) matched against ``/proc/<pid>/net/tcp`` and
``tcp6`` (the process's own network namespace).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: /proc/net/tcp's state of a listening socket (never cut: only connections are).
_LISTEN = "0A"


@dataclass(frozen=True)
class Connection:
    """One TCP connection of a process."""

    local: str
    local_port: int
    remote: str
    remote_port: int

    def endpoint(self) -> str:
        """The remote end as ``host:port`` (``[v6]:port``)."""
        return _join(self.remote, self.remote_port)


def _join(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 host in brackets (as ``ss`` and :class:`Connection` write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(text: str) -> tuple[str, int]:
    """``/proc/net/tcp``'s ``HEX:PORT`` (IPv4 or IPv6, host byte order per 32-bit word)."""
    hexaddr, hexport = text.split(":")
    raw = bytes.fromhex(hexaddr)
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(swapped)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(hexport, 16)


def parse_table(text: str, inodes: set[int]) -> list[Connection]:
    """The connections of ``/proc/net/tcp``-format ``text`` whose socket inode is in ``inodes``."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] == _LISTEN:
            continue
        try:
            inode = int(fields[9])
            if inode not in inodes:
                continue
            (local, lport), (remote, rport) = _address(fields[1]), _address(fields[2])
        except ValueError:
            continue
        out.append(Connection(local, lport, remote, rport))
    return out


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open."""
    out: set[int] = set()
    fds = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fds.iterdir())
    except OSError:
        return out
    for fd in entries:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def connections(pid: int) -> list[Connection]:
    """Process ``pid``'s TCP connections (none if it is gone)."""
    inodes = socket_inodes(pid)
    out: list[Connection] = []
    for table in ("tcp", "tcp6"):
        try:
            out += parse_table(Path(f"/proc/{pid}/net/{table}").read_text(), inodes)
        except OSError:
            continue
    return out


def cut(connection: Connection) -> bool:
    """Destroy ``connection`` at the kernel (``ss -K``); whether ``ss`` said it did."""
    argv = ["ss", "-K", "-t", "-n", "src", _join(connection.local, connection.local_port)]
    argv += ["dst", connection.endpoint()]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # ss lists what it destroyed after its header line: nothing listed, nothing destroyed.
    return done.returncode == 0 and len(done.stdout.strip().splitlines()) > 1


def cut_to(pid: int, endpoint: str) -> int:
    """Destroy every connection of process ``pid`` to ``endpoint`` (``host:port``); how many."""
    return sum(cut(c) for c in connections(pid) if c.endpoint() == _normal(endpoint))


def _normal(endpoint: str) -> str:
    """``host:port`` with the host as :class:`Connection` writes it (``[v6]``, IPv4-mapped as IPv4)."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        host = str(ip)
    except ValueError:
        pass
    return _join(host, port)
