"""The ``tcpservice`` guest workload: a TCP echo and counter service, and a host-side client.

For "connections survive migration" checks: a client keeps one connection open across the
migration and sees that every line is still echoed with the next number, by the same guest boot.

The guest brings up ``eth0`` with a static address (``hikkoshi.ip``, default ``10.0.2.15/24``, the
address QEMU's user-mode network forwards to; with that default also a route via ``10.0.2.2``,
or ``hikkoshi.gw``) and serves port ``hikkoshi.port`` (default 7777) with busybox ``nc``. Each
connection is greeted with ``HELLO boot=<guest boot id> pid=<handler pid>``; then every line sent is
answered with ``ECHO <n> <line>``, ``n`` counting the lines of this connection from 1.

Console lines: ``HIKKOSHI-TCPSERVICE READY port=P ip=A boot=B``, ``STOPPED``, ``FAIL reason=...``.
"""

from __future__ import annotations

import socket
from types import TracebackType

TAG = "HIKKOSHI-TCPSERVICE"
DEFAULT_PORT = 7777
HANDLER_PATH = "tcpservice-conn"
"""The per-connection handler, relative to ``/hikkoshi`` in the guest."""

HANDLER = r"""#!/bin/sh
# One connection of tcpservice (stdin and stdout are the socket): greet, then number every line.
echo "HELLO boot=$HIKKOSHI_BOOT pid=$$"
n=0
while IFS= read -r line; do
    n=$((n + 1))
    echo "ECHO $n $line"
done
"""

SCRIPT = r"""# tcpservice: TCP echo/counter service; see hikkoshi.guest.tcpservice.
# Parameters: hikkoshi.port (7777), hikkoshi.ip (10.0.2.15/24), hikkoshi.gw (10.0.2.2 with the
# default address, none otherwise).
. /hikkoshi/lib.sh
tag=HIKKOSHI-TCPSERVICE
port=${HIKKOSHI_PORT:-7777}
fail() {
    echo "$tag FAIL $*"
    exit 1
}
is_number "$port" || fail "reason=bad-port port=$port"
if [ -n "$HIKKOSHI_IP" ]; then
    ip=$HIKKOSHI_IP
    gw=$HIKKOSHI_GW
else
    ip=10.0.2.15/24
    gw=${HIKKOSHI_GW:-10.0.2.2}
fi
net_up "$ip" "$gw" || fail "reason=network ip=$ip gw=$gw"
chmod 755 /hikkoshi/tcpservice-conn
read -r HIKKOSHI_BOOT < /proc/sys/kernel/random/boot_id
export HIKKOSHI_BOOT
# -ll: keep listening and serve every connection with its own handler process.
nc -ll -p "$port" -e /hikkoshi/tcpservice-conn &
nc=$!
trap 'kill "$nc" 2> /dev/null; echo "$tag STOPPED"; exit 0' TERM INT
tries=0
until netstat -ltn 2> /dev/null | grep -q ":$port "; do
    kill -0 "$nc" 2> /dev/null || fail "reason=nc-exited"
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || fail "reason=not-listening"
    usleep 50000
done
echo "$tag READY port=$port ip=$ip boot=$HIKKOSHI_BOOT"
wait "$nc"
fail "reason=nc-exited status=$?"
"""


class TcpServiceError(Exception):
    """The service answered something other than the protocol says."""


class TcpServiceClient:
    """A blocking client of one tcpservice connection; checks every answer it gets."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rwb", buffering=0)
        self.count = 0
        hello = self._readline()
        parts = dict(p.split("=", 1) for p in hello.split()[1:] if "=" in p)
        if not hello.startswith("HELLO ") or "boot" not in parts:
            raise TcpServiceError(f"expected a HELLO greeting, got {hello!r}")
        self.boot = parts["boot"]
        """The guest's boot id: the same guest, not a rebooted one, keeps it."""

    def _readline(self) -> str:
        line = self._file.readline()
        if not line.endswith(b"\n"):
            raise TcpServiceError(f"connection closed (got {line!r})")
        return line.decode().rstrip("\n")

    def echo(self, text: str) -> int:
        """Send one line; check it comes back with the next number; return that number."""
        if "\n" in text or "\r" in text:
            raise ValueError("one line at a time")
        self._file.write(text.encode() + b"\n")
        answer = self._readline()
        want = f"ECHO {self.count + 1} {text}"
        if answer != want:
            raise TcpServiceError(f"expected {want!r}, got {answer!r}")
        self.count += 1
        return self.count

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()

    def __enter__(self) -> TcpServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
