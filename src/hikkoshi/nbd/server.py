"""The NBD server: listeners, admission of connections, graceful shutdown.

Each connection is a :class:`~hikkoshi.nbd.connection.ServerConnection`; what they may hold (connections
per address, time, payload memory) is :class:`~hikkoshi.nbd.limits.ServerLimits`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import ssl
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from hikkoshi.nbd.access import Access
from hikkoshi.nbd.address import parse_address
from hikkoshi.nbd.connection import ServerConnection
from hikkoshi.nbd.connection import nbd_errno as nbd_errno
from hikkoshi.nbd.exports import Export as Export
from hikkoshi.nbd.exports import ExportTable as ExportTable
from hikkoshi.nbd.exports import export_flags as export_flags
from hikkoshi.nbd.limits import Admission, ServerLimits
from hikkoshi.nbd.memory import PayloadMemory

log = logging.getLogger("hikkoshi.nbd.server")

#: File descriptors a connection may use: its socket, and the fast path's own descriptor of it.
_FDS_PER_CONNECTION = 2
_SPARE_FDS = 256
#: Connections the kernel may complete before we accept them (asyncio's default, 100, drops a burst of
#: clients' handshakes: they retry a second later); the kernel caps it at net.core.somaxconn.
_BACKLOG = 1024


@dataclass(frozen=True)
class ListenAddress:
    """A TCP host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 10809
    unix: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``HOST:PORT``, ``[V6]:PORT``, ``PORT`` or ``unix:PATH``."""
        try:
            host, port, unix = parse_address(text)
        except ValueError as exc:
            raise ValueError(f"bad listen address: {exc}") from None
        return cls(unix=Path(unix)) if unix is not None else cls(host=host, port=port)


class NbdServer:
    """Serves exports on one or more addresses until stopped.

    Each listener has its :class:`~hikkoshi.nbd.access.Access` (TLS, the peers it admits, read-only);
    the addresses given at start get ``tls`` and ``peers``, listeners added later their own."""

    def __init__(
        self,
        exports: ExportTable,
        listen: list[ListenAddress],
        tls: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
        peers: frozenset[str] | None = None,
    ) -> None:
        self.exports = exports
        self.listen = listen
        self.tls = tls
        #: What the addresses given at start allow (``peers``: host names a client certificate must name).
        self.access = Access(tls=tls, peers=peers)
        self.limits = limits or ServerLimits()
        self.memory = PayloadMemory(self.limits.memory_budget)
        self.admission = Admission(self.limits)
        self.connections: set[ServerConnection] = set()
        self.bound: list[str] = []
        self._listeners: list[tuple[ListenAddress, asyncio.Server, list[str], Access]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._drained = asyncio.Event()
        self.ready = asyncio.Event()
        self._refused_since_log = 0
        self._refusal_logged = 0.0

    def adopt(self, conn: ServerConnection) -> bool:
        """Give a new connection an owner task, or refuse it (closed at once) if it is over a limit."""
        reason = "stopping" if self._tg is None or self._stop.is_set() else None
        reason = reason or self.admission.refusal(conn.key, conn.unix)
        if reason is not None:
            self._log_refusal(conn.peer, reason)
            if conn.transport is not None:
                conn.transport.abort()
            return False
        assert self._tg is not None
        self.admission.enter(conn.key, conn.unix)
        self.connections.add(conn)
        task = self._tg.create_task(conn.run())
        task.add_done_callback(lambda _t: self._forget(conn))
        return True

    def _forget(self, conn: ServerConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.admission.leave(conn.key, conn.unix)
        self._drained.set()

    def _log_refusal(self, peer: str, reason: str) -> None:
        # A flood of refusals must not become a flood of log lines: one a second, with a count.
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            more = self._refused_since_log - 1
            extra = f" (and {more} more refused in the last second)" if more else ""
            log.warning("refusing connection from %s: %s%s", peer, reason, extra)
            self._refusal_logged = now
            self._refused_since_log = 0

    def stop(self) -> None:
        """Ask serve() to finish: stop accepting, let requests in flight complete, flush, return."""
        self._stop.set()

    async def serve(self, drain_timeout: float = 10.0) -> None:
        """Listen, serve until stop(), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        _ensure_descriptors(_FDS_PER_CONNECTION * self.limits.max_connections + _SPARE_FDS)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for addr in self.listen:
                    await self._bind(loop, addr, self.access)
                self.ready.set()
                await self._stop.wait()
                for _addr, listener, _names, _access in self._listeners:
                    listener.close()
                for conn in list(self.connections):
                    conn.begin_close()
                try:
                    async with asyncio.timeout(drain_timeout):
                        while self.connections:
                            await self._drained.wait()
                            self._drained.clear()
                except TimeoutError:
                    log.warning("%d connections did not finish in time; closing them", len(self.connections))
                    for conn in list(self.connections):
                        conn._abort()
        finally:
            for addr, listener, _names, _access in self._listeners:
                listener.close()
                if addr.unix is not None:
                    addr.unix.unlink(missing_ok=True)
            self._listeners.clear()
            await self._flush_all()

    async def add_listener(self, addr: ListenAddress, access: Access | None = None) -> list[str]:
        """Listen on one more address while serving (a migration opens the disks to a peer), with its own
        ``access`` (default: the server's); bound names."""
        if self._tg is None or self._stop.is_set():
            raise OSError(errno.ESHUTDOWN, "the server is not serving")
        return await self._bind(asyncio.get_running_loop(), addr, access or self.access)

    def remove_listener(self, name: str, *, disconnect: bool = False) -> bool:
        """Stop listening on a bound address (as listed in ``bound``); with ``disconnect``, the
        connections made through it end too (a migration's peer loses what it was given)."""
        for entry in self._listeners:
            addr, listener, names, access = entry
            if name in names:
                listener.close()
                if addr.unix is not None:
                    addr.unix.unlink(missing_ok=True)
                self._listeners.remove(entry)
                self.bound = [b for b in self.bound if b not in names]
                if disconnect:
                    for conn in list(self.connections):
                        if conn.access is access:
                            conn.begin_close()
                return True
        return False

    def listeners(self) -> list[tuple[list[str], Access]]:
        """Every listener: its bound names and its access."""
        return [(names, access) for _addr, _listener, names, access in self._listeners]

    async def _flush_all(self) -> None:
        for export in self.exports:
            if export.device.capabilities.read_only:
                continue
            try:
                await export.device.flush()
            except OSError as exc:
                log.error("export %s: final flush failed: %s", export.name, exc)

    async def _bind(self, loop: asyncio.AbstractEventLoop, addr: ListenAddress, access: Access) -> list[str]:
        if addr.unix is not None:
            _remove_stale_socket(addr.unix)
            server = await loop.create_unix_server(
                lambda: ServerConnection(self, access), path=str(addr.unix), backlog=_BACKLOG
            )
            names = [f"unix:{addr.unix}"]
        else:
            server = await loop.create_server(
                lambda: ServerConnection(self, access),
                host=addr.host,
                port=addr.port,
                reuse_address=True,
                backlog=_BACKLOG,
            )
            names = []
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self._listeners.append((addr, server, names, access))
        self.bound += names
        return names


def _ensure_descriptors(needed: int) -> None:
    """Raise the soft limit on open files towards ``needed`` (within the hard limit): a server out of
    descriptors cannot even accept the connection it would refuse, so everyone is locked out."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open file limit: %s", exc)


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket left by a dead server; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    import socket

    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
    else:
        raise FileExistsError(f"{path}: another server is listening there")
    finally:
        probe.close()
