"""A user-space WAN between two TCP endpoints: a relay with delay, bandwidth, jitter and loss.

``async with WanLink(WanParams(25, 100e6), "127.0.0.1:10809") as link:`` listens on ``link.port``
(127.0.0.1, a free port, unless told otherwise) and forwards every connection it accepts to the
target, through the link model of :mod:`hikkoshi.lab.link_model`: one model per direction, shared by
all connections like a real bottleneck. This file is the asyncio shell around it: it reads from a socket
only while the model's queue has room (so a fast sender is paused, not buffered without end), writes
each byte when the model says it is due, and carries half-closes and resets across after the data
sent before them.

Every task belongs to a task group: the link's, or a connection's inside it. Leaving the context stops
listening and closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from hikkoshi.lab.link_model import Flow, LinkDirection, WanParams
from hikkoshi.nbd.address import parse_address

log = logging.getLogger("hikkoshi.lab.wan")

#: StreamReader buffer limit (it stops reading the socket at twice this).
_READ_LIMIT = 64 << 10
#: Most bytes taken from a socket at once.
_MAX_READ = 256 << 10
#: A reader waits for this much queue room before it reads: what the link carries in this time (one
#: segment at least, 64 KiB or a quarter of the queue at most). A small write (a ping behind a full
#: queue) therefore waits at most about this long more than it would in a real drop-tail queue.
_READ_QUANTUM = 0.001
_MIN_READ = 64 << 10
#: After a reset, the other side is reset at the latest this long after the reset would arrive, even if
#: it has not read everything sent before it.
_RESET_GRACE = 1.0
#: How long a finished connection may take to flush and close before it is aborted.
_CLOSE_TIMEOUT = 5.0
#: Default delivery granularity (seconds): segments due within it are written together.
DEFAULT_GRANULARITY = 0.001

_clock = time.monotonic


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 0
    unix: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``HOST:PORT``, ``[V6]:PORT``, ``PORT`` or ``unix:PATH``."""
        host, port, unix = parse_address(text)
        return cls(unix=unix) if unix is not None else cls(host=host, port=port)

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DirectionStats:
    """One direction of the link, at one moment."""

    bytes_in: int  # accepted from senders
    bytes_out: int  # written to receivers
    queue_bytes: int  # waiting in the bottleneck queue (all connections)
    held_bytes: int  # inside the link: queued, in flight, or waiting for a slow reader
    lost_segments: int  # segments that paid a retransmission timeout


@dataclass(frozen=True, slots=True)
class WanStats:
    """Counters of a :class:`WanLink`. ``up`` is client to target, ``down`` target to client."""

    connections: int  # accepted so far
    active: int  # open now
    failed: int  # the target could not be reached
    up: DirectionStats
    down: DirectionStats

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a socket with a TCP reset (RST), not a FIN: what the peer sees when the other end died."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Side:
    """One end of a relayed connection: the client's socket, or the target's."""

    __slots__ = ("dead", "name", "reader", "writer")

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.dead = False  # reset, failed, or reset by us: nothing more is read or written


class _Pipe:
    """One direction of one connection: its flow in the link model, and the wake-ups of its two tasks."""

    __slots__ = ("changed", "delivered", "flow", "link", "sink_dead", "space")

    def __init__(self, link: LinkDirection) -> None:
        self.link = link
        self.flow = Flow()
        self.changed = asyncio.Event()  # the writer task has something new to look at
        self.space = asyncio.Event()  # the reader task may read again
        self.sink_dead = False  # the receiver is gone: what comes is dropped
        self.delivered = False  # the writer task has written everything and the end of the stream

    def wake(self) -> None:
        self.changed.set()
        self.space.set()


class _Connection:
    """A client connection and its connection to the target, relayed through the link both ways."""

    def __init__(self, wan: WanLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.wan = wan
        self.client = _Side("client", reader, writer)
        self.target: _Side | None = None
        self.up = _Pipe(wan._up)
        self.down = _Pipe(wan._down)
        self.timers: list[asyncio.TimerHandle] = []
        peer = writer.get_extra_info("peername")
        self.label = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "?")

    def sides(self) -> Iterator[_Side]:
        yield self.client
        if self.target is not None:
            yield self.target

    def pipe_from(self, side: _Side) -> _Pipe:
        return self.up if side is self.client else self.down

    def pipe_to(self, side: _Side) -> _Pipe:
        return self.down if side is self.client else self.up

    # -- the life of a connection ----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._ingress(self.client, self.up))
                # The target accepts when the client's handshake reaches it, one way later.
                await asyncio.sleep(self.up.link.params.delay)
                try:
                    reader, writer = await self.wan._open_target()
                except OSError as exc:
                    log.info("%s: cannot reach %s: %s", self.label, self.wan.target, exc)
                    self.wan._failed += 1
                    self._kill(self.client)  # the nearest thing to "connection refused" we can give
                    return
                self.target = target = _Side("target", reader, writer)
                _nodelay(writer)
                if self.client.dead:
                    self._died_later(self.client)  # it died while we connected
                tg.create_task(self._egress(self.up, target))
                tg.create_task(self._ingress(target, self.down))
                tg.create_task(self._egress(self.down, self.client))
            for side in self.sides():
                if not side.dead:
                    side.writer.close()
            for side in self.sides():
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(side.writer.wait_closed(), _CLOSE_TIMEOUT)
        finally:
            for timer in self.timers:
                timer.cancel()
            for side in self.sides():
                side.writer.transport.abort()  # no-op if already closed

    async def _ingress(self, src: _Side, pipe: _Pipe) -> None:
        """Read from ``src`` into the link, as fast as the queue and the connection's window allow."""
        link, flow = pipe.link, pipe.flow
        params = link.params
        window = params.window
        limit = params.queue_limit
        min_read = _MIN_READ
        if limit is not None and params.rate is not None:
            quantum = math.ceil(params.rate * _READ_QUANTUM)
            min_read = max(1, min(max(quantum, params.segment_bytes), _MIN_READ, limit // 4))
        try:
            while not src.dead:
                n = _MAX_READ
                if not pipe.sink_dead:
                    if flow.held >= window:
                        pipe.space.clear()
                        await pipe.space.wait()
                        continue
                    wait = link.wait_for_room(_clock(), min_read)
                    if wait > 0:
                        await asyncio.sleep(wait)
                        continue
                    room = link.room(_clock())
                    n = min(n, window - flow.held, _MAX_READ if room is None else max(room, min_read))
                data = await src.reader.read(n)
                if not data:
                    break
                if not pipe.sink_dead:
                    link.send(flow, data, _clock())
                    pipe.changed.set()
        except OSError as exc:
            log.debug("%s: %s side read: %s", self.label, src.name, exc)
            self._died(src)
            return
        if src.dead:
            return
        link.finish(flow, _clock())  # a FIN: the half-close follows the data
        pipe.changed.set()

    async def _egress(self, pipe: _Pipe, dst: _Side) -> None:
        """Write to ``dst`` what the link says is due, then the end of the stream."""
        flow = pipe.flow
        writer = dst.writer
        window = pipe.link.params.window
        wan = self.wan
        try:
            while not (dst.dead or pipe.sink_dead):
                now = _clock()
                data = flow.pop_due(now)
                if data:
                    writer.write(data)
                    if pipe is self.up:
                        wan._up_out += len(data)
                    else:
                        wan._down_out += len(data)
                    if flow.held < window:
                        pipe.space.set()
                    await writer.drain()
                    continue
                if flow.eof_due(now):
                    if flow.abort:
                        await _flushed(writer)
                        self._kill(dst)
                    elif writer.can_write_eof():
                        writer.write_eof()
                    pipe.delivered = True
                    return
                t = flow.next_time()
                if t is None:
                    pipe.changed.clear()
                    await pipe.changed.wait()
                else:
                    await asyncio.sleep(t - now)
        except OSError as exc:
            log.debug("%s: %s side write: %s", self.label, dst.name, exc)
            self._died(dst)

    # -- resets ----------------------------------------------------------------------------------------

    def _kill(self, side: _Side) -> None:
        """Reset ``side`` ourselves (its peer died, or the target was unreachable)."""
        if not side.dead:
            side.dead = True
            _reset(side.writer)
        self.up.wake()
        self.down.wake()

    def _died(self, side: _Side) -> None:
        """``side`` reset or failed: reset the other side after what ``side`` sent before has arrived."""
        if side.dead:
            return
        side.dead = True
        _reset(side.writer)
        towards = self.pipe_to(side)
        towards.sink_dead = True
        towards.flow.discard()
        self._died_later(side)

    def _died_later(self, side: _Side) -> None:
        pipe = self.pipe_from(side)
        pipe.link.finish(pipe.flow, _clock(), abort=True)
        eof_at = pipe.flow.eof_at
        assert eof_at is not None
        loop = asyncio.get_running_loop()
        # The writer task resets the other side once it has written what came before; if it is done
        # already (a FIN went first), or the other side does not read, this timer does.
        delay = max(0.0, eof_at - _clock()) + (0.0 if pipe.delivered else _RESET_GRACE)
        self.timers.append(loop.call_later(delay, self._kill_peer, side))
        self.up.wake()
        self.down.wake()

    def _kill_peer(self, side: _Side) -> None:
        peer = self.target if side is self.client else self.client
        if peer is not None:
            self._kill(peer)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _flushed(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport has handed everything to the kernel (bounded by the reset timer)."""
    writer.transport.set_write_buffer_limits(high=0, low=0)
    await writer.drain()


class WanLink:
    """A relay from ``listen`` to ``target`` through an emulated WAN (an async context manager).

    ``params`` shape the client-to-target direction, ``reverse`` (default: the same) the other one.
    ``seed`` makes jitter and loss reproducible. ``granularity`` is how close in time (seconds) bytes
    due at different moments may be written together; they are never written early.
    """

    def __init__(
        self,
        params: WanParams,
        target: str | Endpoint,
        listen: str | Endpoint = "127.0.0.1:0",
        *,
        reverse: WanParams | None = None,
        seed: int | None = None,
        granularity: float = DEFAULT_GRANULARITY,
        directions: tuple[LinkDirection, LinkDirection] | None = None,
    ) -> None:
        """``directions``: (client-to-target, target-to-client) bottlenecks shared with other relays
        (one WAN path carrying several services); default: this relay's own."""
        self.params = params
        self.reverse = reverse if reverse is not None else params
        self.target = target if isinstance(target, Endpoint) else Endpoint.parse(target)
        self.listen = listen if isinstance(listen, Endpoint) else Endpoint.parse(listen)
        up_rng = random.Random(f"{seed}/up") if seed is not None else random.Random()
        down_rng = random.Random(f"{seed}/down") if seed is not None else random.Random()
        if directions is not None:
            self._up, self._down = directions
        else:
            self._up = LinkDirection(self.params, up_rng, granularity)
            self._down = LinkDirection(self.reverse, down_rng, granularity)
        self._up_out = 0
        self._down_out = 0
        self._connections = 0
        self._failed = 0
        self._active: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (what ``async with`` does)."""
        if self._stack is not None:
            raise RuntimeError("already started")
        stack = contextlib.AsyncExitStack()
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        try:
            if self.listen.unix is not None:
                self._server = await asyncio.start_unix_server(
                    self._accepted, self.listen.unix, limit=_READ_LIMIT
                )
            else:
                self._server = await asyncio.start_server(
                    self._accepted, self.listen.host, self.listen.port, limit=_READ_LIMIT
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info("wan %s -> %s: %s", self.address, self.target, self.params)

    async def aclose(self) -> None:
        """Stop listening and close every connection."""
        if self._stack is None or self._closing:
            return
        self._closing = True
        server = self._server
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await self._stack.aclose()
        if server is not None:
            await server.wait_closed()
        if self.listen.unix is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.listen.unix)

    async def __aenter__(self) -> WanLink:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- where it listens ------------------------------------------------------------------------------

    @property
    def sockets(self) -> list[Any]:
        if self._server is None:
            raise RuntimeError("not started")
        return list(self._server.sockets)

    @property
    def port(self) -> int:
        """The TCP port listened on (the one picked when asked for port 0)."""
        for sock in self.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                port: int = sock.getsockname()[1]
                return port
        raise RuntimeError("not listening on TCP")

    @property
    def address(self) -> Endpoint:
        """Where it listens, with the actual port."""
        if self.listen.unix is not None:
            return self.listen
        return Endpoint(self.listen.host, self.port)

    # -- statistics ------------------------------------------------------------------------------------

    def stats(self) -> WanStats:
        now = _clock()
        held_up = sum(c.up.flow.held for c in self._active)
        held_down = sum(c.down.flow.held for c in self._active)
        up, down = self._up, self._down
        return WanStats(
            connections=self._connections,
            active=len(self._active),
            failed=self._failed,
            up=DirectionStats(up.bytes_in, self._up_out, up.backlog(now), held_up, up.lost_segments),
            down=DirectionStats(
                down.bytes_in, self._down_out, down.backlog(now), held_down, down.lost_segments
            ),
        )

    # -- connections -----------------------------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self._tg is None:
            writer.transport.abort()
            return
        _nodelay(writer)
        conn = _Connection(self, reader, writer)
        self._connections += 1
        task = self._tg.create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Connection) -> None:
        self._active.add(conn)
        log.debug("%s: connected", conn.label)
        try:
            await conn.run()
        except Exception:  # one broken connection must not take the link down
            log.exception("%s: relay failed", conn.label)
        finally:
            self._active.discard(conn)
            log.debug("%s: closed", conn.label)

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.target.unix is not None:
            return await asyncio.open_unix_connection(self.target.unix, limit=_READ_LIMIT)
        return await asyncio.open_connection(self.target.host, self.target.port, limit=_READ_LIMIT)


class WanPath:
    """One emulated WAN between two sites, carrying any number of relayed services.

    Every relay made here shares the path's two bottlenecks (site A to B, B to A), as services between
    two real sites share their uplinks: a relay whose clients are at site A (``from_a=True``) sends
    its client-to-target bytes A to B, and one whose clients are at B the other way round.
    """

    def __init__(
        self, a_to_b: WanParams, b_to_a: WanParams | None = None, *, seed: int | None = None
    ) -> None:
        self.a_to_b_params = a_to_b
        self.b_to_a_params = b_to_a if b_to_a is not None else a_to_b
        rng_ab = random.Random(f"{seed}/ab") if seed is not None else random.Random()
        rng_ba = random.Random(f"{seed}/ba") if seed is not None else random.Random()
        self.a_to_b = LinkDirection(self.a_to_b_params, rng_ab, DEFAULT_GRANULARITY)
        self.b_to_a = LinkDirection(self.b_to_a_params, rng_ba, DEFAULT_GRANULARITY)

    def relay(
        self, target: str | Endpoint, *, from_a: bool, listen: str | Endpoint = "127.0.0.1:0"
    ) -> WanLink:
        """A relay (not started) to ``target`` whose clients sit at site A (``from_a``) or B."""
        up, down = (self.a_to_b, self.b_to_a) if from_a else (self.b_to_a, self.a_to_b)
        return WanLink(up.params, target, listen, reverse=down.params, directions=(up, down))
