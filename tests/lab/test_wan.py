"""The WAN emulator: the pure link model (hypothesis, fake clock, seeded RNG), then the relay on real
sockets on 127.0.0.1 (lower bounds on time only: upper bounds are for benchmarks), then NBD through it
and the command line."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.cli.wan import parse_duration_ms, parse_loss, parse_rate_bps, parse_size
from hikkoshi.daemons.process import run as run_uvloop
from hikkoshi.lab.link_model import QUEUE_SLACK, Flow, LinkDirection, WanParams
from hikkoshi.lab.wan import Endpoint, WanLink
from hikkoshi.nbd.client import NbdClient
from tests.support.servers import hikkoshi_server, stop

T = TypeVar("T")
EPS = 1e-9

# ---------------------------------------------------------------------------------------------------------
# The pure model
# ---------------------------------------------------------------------------------------------------------


@st.composite
def params_st(draw: st.DrawFn, lossy: bool = True) -> WanParams:
    return WanParams(
        delay_ms=draw(st.floats(0, 100)),
        rate_bps=draw(st.one_of(st.none(), st.floats(1e5, 1e10))),
        loss=draw(st.sampled_from([0.0, 0.001, 0.05, 0.5])) if lossy else 0.0,
        jitter_ms=draw(st.sampled_from([0.0, 0.5, 5.0])) if lossy else 0.0,
        segment_bytes=draw(st.sampled_from([13, 100, 1448, 9000])),
    )


# (time step in seconds, flow, size)
arrivals_st = st.lists(
    st.tuples(st.floats(0, 0.05), st.integers(0, 3), st.integers(1, 40_000)), min_size=1, max_size=40
)


def run_model(
    params: WanParams, arrivals: list[tuple[float, int, int]], seed: int, granularity: float
) -> tuple[LinkDirection, list[Flow], list[list[tuple[float, int, int]]], list[bytes]]:
    """Feed arrivals; return the link, flows, per-flow (arrival time, start offset, end offset), data."""
    link = LinkDirection(params, random.Random(seed), granularity)
    flows = [Flow() for _ in range(4)]
    spans: list[list[tuple[float, int, int]]] = [[] for _ in flows]
    sent = [bytearray() for _ in flows]
    rng = random.Random(seed + 1)
    now = 0.0
    for dt, i, size in arrivals:
        now += dt
        data = rng.randbytes(size)
        spans[i].append((now, len(sent[i]), len(sent[i]) + size))
        sent[i] += data
        link.send(flows[i], data, now)
    return link, flows, spans, [bytes(b) for b in sent]


def byte_times(flow: Flow) -> list[tuple[float, int, int]]:
    """(delivery time, start offset, end offset) of each pending piece."""
    out, off = [], 0
    for t, n in flow.schedule():
        out.append((t, off, off + n))
        off += n
    return out


def arrival_of(spans: list[tuple[float, int, int]], offset: int) -> float:
    for t, a, b in spans:
        if a <= offset < b:
            return t
    raise AssertionError(offset)


@settings(max_examples=300, deadline=None)
@given(params_st(), arrivals_st, st.integers(0, 2**32), st.sampled_from([0.0, 0.0005, 0.002]))
def test_model_order_bounds_and_integrity(
    params: WanParams, arrivals: list[tuple[float, int, int]], seed: int, granularity: float
) -> None:
    _, flows, spans, sent = run_model(params, arrivals, seed, granularity)
    t0 = arrivals[0][0]
    everything: list[tuple[float, int]] = []
    for flow, span, data in zip(flows, spans, sent, strict=True):
        pieces = byte_times(flow)
        times = [t for t, _, _ in pieces]
        assert times == sorted(times), "in order within a connection"
        assert sum(b - a for _, a, b in pieces) == len(data) == flow.held, "nothing lost or invented"
        for t, a, b in pieces:
            # No byte of a piece is delivered before its arrival plus the one-way delay (the first byte
            # of a piece arrived first, so checking every arrival span the piece covers is enough).
            for ta, sa, sb in span:
                if sa < b and a < sb:
                    assert t >= ta + params.delay - EPS
        everything += [(t, b - a) for t, a, b in pieces]
        # Delivering by the clock gives back exactly what was sent, in order.
        got = bytearray()
        if times:
            assert flow.pop_due(times[0] - 1e-9) == b""
        for t in sorted(set(times)):
            got += flow.pop_due(t)
        assert bytes(got) == data and flow.held == 0
    # Long-run throughput: by any time T, at most rate x (T - first arrival - delay) bytes (+ a segment).
    if params.rate is not None:
        everything.sort()
        total = 0
        for t, n in everything:
            total += n
            assert total <= params.rate * (t - t0 - params.delay) + params.segment_bytes + 1e-6 * params.rate


@settings(max_examples=200, deadline=None)
@given(params_st(lossy=False), arrivals_st, st.sampled_from([0.0005, 0.001, 0.004]))
def test_model_granularity_never_early_never_much_late(
    params: WanParams, arrivals: list[tuple[float, int, int]], granularity: float
) -> None:
    """Coalescing delivers bytes at most ``granularity`` after their exact time, and never before it."""
    _, exact_flows, _, _ = run_model(params, arrivals, 1, 0.0)
    _, coarse_flows, _, _ = run_model(params, arrivals, 1, granularity)
    for exact, coarse in zip(exact_flows, coarse_flows, strict=True):
        e, c = byte_times(exact), byte_times(coarse)
        assert len(c) <= len(e)
        if not e:
            assert not c
            continue
        # Compare at the start of every piece of either schedule.
        starts = sorted({a for _, a, _ in e} | {a for _, a, _ in c})
        e_starts, c_starts = [a for _, a, _ in e], [a for _, a, _ in c]
        for off in starts:
            te = e[bisect.bisect_right(e_starts, off) - 1][0]
            tc = c[bisect.bisect_right(c_starts, off) - 1][0]
            assert te - EPS <= tc <= te + granularity + EPS, (off, te, tc)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1e5, 1e9),
    st.floats(0, 60),
    st.integers(1_448, 1 << 20),
    st.integers(1, 64 << 10),
    st.integers(0, 2**32),
)
def test_model_queue_bounded_and_rate_reached(
    rate: float, delay_ms: float, queue: int, chunk: int, seed: int
) -> None:
    """A greedy sender that asks for room keeps the queue within its limit and the link busy."""
    params = WanParams(delay_ms, rate, queue_bytes=queue)
    assert params.rate is not None
    link = LinkDirection(params, random.Random(seed))
    flow = Flow()
    now, sent, sends = 0.0, 0, 0
    while sends < 500:
        room = link.room(now)
        assert room is not None
        if room >= min(chunk, queue):
            n = min(room, chunk)
            link.send(flow, bytes(n), now)
            sent, sends = sent + n, sends + 1
            assert link.backlog(now) <= queue
        else:
            now += link.wait_for_room(now, min(chunk, queue))
        flow.pop_due(now)
    # The bottleneck never idled: from the first byte on, it was always serialising.
    assert link.busy_until == pytest.approx(sent / params.rate, rel=1e-9)


class Scripted(random.Random):
    """random() answers from a script (then 0.99): a loss exactly where a test wants one."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if self.values else 0.99


def test_model_loss_blocks_its_connection_only() -> None:
    params = WanParams(10, 8e6, loss=0.01, segment_bytes=1000)  # 1 MB/s: 1 ms per segment
    link = LinkDirection(params, Scripted([0.0]))  # the very first segment is lost
    a, b = Flow(), Flow()
    link.send(a, b"a" * 3000, 0.0)
    link.send(b, b"b" * 2000, 0.0)
    assert a.lost_segments == 1 and link.lost_segments == 1
    rto = params.rto
    assert rto == 0.2  # max(200 ms, 20 ms RTT)
    # Flow a: its first segment arrives 1 ms + 10 ms + RTO; the next two could have come at 12 and 13 ms
    # but wait behind it (head-of-line blocking).
    assert [n for _, n in a.schedule()] == [3000]
    assert a.schedule()[0][0] == pytest.approx(0.011 + rto)
    # Flow b is not held up: it queued behind a's 3 segments at the bottleneck, that is all.
    assert [n for _, n in b.schedule()] == [1000, 1000]
    assert [t for t, _ in b.schedule()] == pytest.approx([0.014, 0.015])
    # In order, complete.
    assert b.pop_due(0.0145) == b"b" * 1000
    assert a.pop_due(0.1) == b""
    assert a.pop_due(0.3) == b"a" * 3000


@settings(max_examples=200, deadline=None)
@given(arrivals_st, st.integers(0, 2**32), st.floats(0.01, 0.5))
def test_model_lossy_complete_in_order(
    arrivals: list[tuple[float, int, int]], seed: int, loss: float
) -> None:
    params = WanParams(20, 50e6, loss=loss, jitter_ms=3)
    link, flows, spans, sent = run_model(params, arrivals, seed, 0.001)
    lost = 0
    for flow, span, data in zip(flows, spans, sent, strict=True):
        pieces = byte_times(flow)
        assert [t for t, _, _ in pieces] == sorted(t for t, _, _ in pieces)
        if flow.lost_segments:
            # Something paid a retransmission timeout.
            assert max(t - arrival_of(span, a) for t, a, _ in pieces) >= params.delay + params.rto - EPS
        lost += flow.lost_segments
        link.finish(flow, arrivals[-1][0] * len(arrivals))
        got = bytearray()
        now = 0.0
        while not flow.eof_due(now):
            nt = flow.next_time()
            assert nt is not None
            now = max(now, nt)
            got += flow.pop_due(now)
        assert bytes(got) == data
    assert lost == link.lost_segments


@pytest.mark.parametrize("loss", [0.001, 0.01, 0.2])
@pytest.mark.parametrize("jitter_ms", [0.0, 1.0])
def test_model_loss_rate(loss: float, jitter_ms: float) -> None:
    """Segments are lost at the configured rate, counted over every flow of the link."""
    params = WanParams(10, 1e9, loss=loss, jitter_ms=jitter_ms)
    link = LinkDirection(params, random.Random(4), granularity=0.001)
    flows = [Flow() for _ in range(3)]
    rng = random.Random(5)
    segments, now = 0, 0.0
    while segments < 200_000:
        n = rng.randrange(1, 200_000)
        link.send(flows[rng.randrange(3)], bytes(n), now)
        segments += -(-n // params.segment_bytes)
        now += 0.001
    expected = loss * segments
    assert abs(link.lost_segments - expected) < 5 * (expected * (1 - loss)) ** 0.5
    assert link.lost_segments == sum(f.lost_segments for f in flows)


def test_model_fin_follows_data_and_queue() -> None:
    params = WanParams(25, 8e6)  # 1 MB/s
    link = LinkDirection(params, random.Random(1))
    a, b = Flow(), Flow()
    link.send(a, bytes(100_000), 0.0)  # serialised by 0.1 s
    link.finish(b, 0.0)  # b's FIN waits behind a's bytes in the queue
    assert b.eof_at == pytest.approx(0.125)
    link.finish(a, 0.05)
    assert a.eof_at is not None and a.eof_at >= a.schedule()[-1][0]
    assert not a.eof_due(0.2) or a.held == 0
    a.pop_due(1.0)
    assert a.eof_due(1.0) and not a.abort
    link.finish(a, 2.0, abort=True)  # a reset after the FIN still resets, at the FIN's time
    assert a.abort and a.eof_at == pytest.approx(0.125)
    with pytest.raises(ValueError):
        link.send(a, b"late", 3.0)


def test_params() -> None:
    p = WanParams.from_rtt(50, 100e6)
    assert p.delay_ms == 25 and p.rate == 12.5e6
    assert p.bdp == 625_000 and p.queue_limit == 625_000 + QUEUE_SLACK
    assert p.rto == 0.2
    assert WanParams(150, None, jitter_ms=10).rto == pytest.approx(0.34)
    assert WanParams(10).queue_limit is None
    assert WanParams(10, 1e6, queue_bytes=5000, rto_ms=50).rto == 0.05
    assert p.window >= 4 << 20
    for bad in (
        dict(delay_ms=-1),
        dict(rate_bps=0),
        dict(loss=1.0),
        dict(jitter_ms=-1),
        dict(queue_bytes=10),
        dict(rate_bps=float("inf")),
    ):
        with pytest.raises(ValueError):
            WanParams(**bad)


def test_unit_parsing() -> None:
    assert parse_duration_ms("25ms") == 25 and parse_duration_ms("0.1s") == 100
    assert parse_duration_ms("500us") == 0.5 and parse_duration_ms("7") == 7
    assert parse_rate_bps("100Mbit") == 100e6 and parse_rate_bps("1gbit") == 1e9
    assert parse_rate_bps("12.5MB/s") == 100e6 and parse_rate_bps("64000") == 64000
    assert parse_size("64KiB") == 65536 and parse_size("1M") == 1 << 20 and parse_size("1MB") == 10**6
    assert parse_loss("0.1%") == pytest.approx(0.001) and parse_loss("0.01") == 0.01
    for f, bad in ((parse_rate_bps, "100Mbps"), (parse_rate_bps, "fast"), (parse_duration_ms, "1h")):
        with pytest.raises(Exception, match=r"rate|duration"):
            f(bad)
    assert str(Endpoint.parse("[::1]:80")) == "[::1]:80" and Endpoint.parse("unix:/x").unix == "/x"
    assert Endpoint.parse("9000") == Endpoint("127.0.0.1", 9000)
    with pytest.raises(ValueError):
        Endpoint.parse("::1:80")


# ---------------------------------------------------------------------------------------------------------
# The relay on real sockets
# ---------------------------------------------------------------------------------------------------------

LOOPS = ["asyncio", "uvloop"]


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio", timeout: float = 20) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await main

    return run_uvloop(bounded()) if loop == "uvloop" else asyncio.run(bounded())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler) -> Any:
    """A server on 127.0.0.1 whose handler tasks are all finished or cancelled on exit."""
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.transport.abort()

    def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.get_running_loop().create_task(wrapped(r, w)))

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(1 << 16):
        w.write(data)
        await w.drain()
    w.write_eof()
    await w.drain()
    await r.read()


async def count_sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    n = 0
    while data := await r.read(1 << 20):
        n += len(data)
    w.write(struct.pack("!Q", n))
    await w.drain()


def rst_close(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


@pytest.mark.parametrize("loop", LOOPS)
def test_rtt_at_least_twice_the_delay(loop: str) -> None:
    delay = 0.02

    async def main() -> list[float]:
        async with (
            tcp_server(echo) as port,
            WanLink(WanParams(delay * 1000, 50e6), f"127.0.0.1:{port}") as link,
        ):
            assert all(s.getsockname()[0] == "127.0.0.1" for s in link.sockets)
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            rtts = []
            for i in range(10):
                t = time.monotonic()
                w.write(bytes([i]))
                await w.drain()
                assert await r.readexactly(1) == bytes([i])
                rtts.append(time.monotonic() - t)
            w.close()
            return rtts

    rtts = run(main(), loop)
    assert min(rtts) >= 2 * delay, rtts


@pytest.mark.parametrize("loop", LOOPS)
def test_bulk_transfer_no_faster_than_the_rate(loop: str) -> None:
    size, rate = 4 << 20, 40e6  # 0.84 s at least
    queue = 256 << 10

    async def main() -> tuple[float, int, int]:
        async with (
            tcp_server(count_sink) as port,
            WanLink(WanParams(10, rate, queue_bytes=queue), f"127.0.0.1:{port}") as link,
        ):
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            block = os.urandom(1 << 16)
            peak = 0
            t = time.monotonic()
            for _ in range(size // len(block)):
                w.write(block)
                await w.drain()
                peak = max(peak, link.stats().up.queue_bytes)
            w.write_eof()
            (n,) = struct.unpack("!Q", await r.readexactly(8))
            elapsed = time.monotonic() - t
            w.close()
            return elapsed, n, peak

    elapsed, n, peak = run(main(), loop)
    assert n == size
    assert elapsed >= size * 8 / rate
    # Bounded queue: within its limit plus at most one read of overshoot.
    assert peak <= queue + (256 << 10)


async def _echo_integrity(params: WanParams, size: int, seed: int = 7) -> tuple[bytes, bytes, int, int]:
    async with (
        tcp_server(echo) as port,
        WanLink(params, f"127.0.0.1:{port}", seed=seed) as link,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", link.port)
        data = random.Random(seed).randbytes(size)

        async def send() -> None:
            for off in range(0, size, 100_000):
                w.write(data[off : off + 100_000])
                await w.drain()
            w.write_eof()

        async def receive() -> bytes:
            return await r.read()  # to EOF: the half-close came back after all the data

        _, back = await asyncio.gather(send(), receive())
        w.close()
        stats = link.stats()
        return (
            hashlib.sha256(data).digest(),
            hashlib.sha256(back).digest(),
            stats.up.lost_segments + stats.down.lost_segments,
            stats.up.bytes_out + stats.down.bytes_out,
        )


@pytest.mark.parametrize("loop", LOOPS)
def test_integrity_with_loss_and_jitter(loop: str) -> None:
    size = 3 << 20
    params = WanParams(5, 200e6, loss=0.01, jitter_ms=2, rto_ms=100)
    sent, back, lost, carried = run(_echo_integrity(params, size), loop)
    assert sent == back
    assert lost > 0  # ~4300 segments at 1%: P(no loss) ~ 1e-19
    assert carried == 2 * size


def test_eof_propagates_after_the_data() -> None:
    delay = 0.02

    async def main() -> None:
        seen: dict[str, float] = {}

        async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read()  # until the client's FIN
            seen["eof"] = time.monotonic()
            w.write(b"got %d" % len(data))  # the other direction is still open
            await w.drain()
            w.write_eof()
            await r.read()

        async with tcp_server(server) as port, WanLink(WanParams(delay * 1000), f"127.0.0.1:{port}") as link:
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            w.write(b"x" * 100_000)
            await w.drain()
            w.write_eof()
            sent_eof = time.monotonic()
            assert await r.read() == b"got 100000"  # then EOF: read() returned
            assert seen["eof"] - sent_eof >= delay
            assert time.monotonic() - sent_eof >= 2 * delay
            w.close()
            await asyncio.sleep(0.1)
            assert link.stats().active == 0

    run(main())


def test_many_concurrent_connections() -> None:
    n, size = 60, 64 << 10

    async def main() -> None:
        async with (
            tcp_server(echo) as port,
            WanLink(WanParams(10, 100e6, jitter_ms=1), f"127.0.0.1:{port}") as link,
        ):

            async def one(i: int) -> None:
                data = random.Random(i).randbytes(size)
                r, w = await asyncio.open_connection("127.0.0.1", link.port)
                w.write(data)
                w.write_eof()
                assert await r.read() == data
                w.close()
                await w.wait_closed()

            async with asyncio.TaskGroup() as tg:
                for i in range(n):
                    tg.create_task(one(i))
            stats = link.stats()
            assert stats.connections == n
            assert stats.up.bytes_out == stats.down.bytes_out == n * size
            for _ in range(100):
                if link.stats().active == 0:
                    break
                await asyncio.sleep(0.05)
            assert link.stats().active == 0

    run(main())


def test_survives_resets_on_either_side() -> None:
    delay = 0.01

    async def main() -> None:
        events: asyncio.Queue[str] = asyncio.Queue()

        async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            first = await r.read(100)
            if first == b"reset me":
                rst_close(w)
                return
            try:
                while await r.read(1 << 16):
                    pass
                await events.put("eof")
            except ConnectionResetError:
                await events.put("reset")

        async with tcp_server(server) as port, WanLink(WanParams(delay * 1000), f"127.0.0.1:{port}") as link:
            # The client resets: the server sees a reset too, after the data sent before it.
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            w.write(b"hello")
            await w.drain()
            await asyncio.sleep(0.05)
            rst_close(w)
            assert await events.get() == "reset"
            # The server resets: the client sees its connection reset.
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            w.write(b"reset me")
            await w.drain()
            with pytest.raises(ConnectionResetError):
                while await r.read(1 << 16):
                    pass
            w.close()
            # And the link still relays.
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            w.write(b"after")
            w.write_eof()
            assert await events.get() == "eof"
            w.close()
            for _ in range(50):
                if link.stats().active == 0:
                    break
                await asyncio.sleep(0.05)
            assert link.stats().active == 0

    run(main())


def test_reset_after_half_close_still_resets_the_other_side() -> None:
    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert await r.read() == b"bye"  # the client half-closed; keep talking to it
            try:
                for _ in range(200):
                    w.write(b"still there?")
                    await w.drain()
                    await asyncio.sleep(0.01)
                outcome.set_result("never reset")
            except ConnectionError:
                outcome.set_result("reset")

        async with tcp_server(server) as port, WanLink(WanParams(5), f"127.0.0.1:{port}") as link:
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            w.write(b"bye")
            w.write_eof()
            assert (await r.read(100)).startswith(b"still there?")
            rst_close(w)
            assert await outcome == "reset"

    run(main())


def test_unreachable_target_resets_the_client() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]  # bound, not listening: connections are refused
            async with WanLink(WanParams(1), f"127.0.0.1:{dead_port}") as link:
                r, w = await asyncio.open_connection("127.0.0.1", link.port)
                with contextlib.suppress(ConnectionResetError):
                    assert await r.read() == b""
                w.close()
                assert link.stats().failed == 1

    run(main())


def test_slow_reader_backpressures_the_sender() -> None:
    window = 1 << 20

    async def main() -> None:
        release = asyncio.Event()

        async def lazy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await release.wait()
            await count_sink(r, w)

        async with (
            tcp_server(lazy) as port,
            WanLink(WanParams(5, None, window_bytes=window), f"127.0.0.1:{port}") as link,
        ):
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            block = bytes(1 << 20)
            sent = 0

            async def push() -> None:
                nonlocal sent
                while sent < 256 << 20:
                    w.write(block)
                    await w.drain()
                    sent += len(block)

            async with asyncio.TaskGroup() as tg:
                pusher = tg.create_task(push())
                await asyncio.sleep(1.0)
                # The receiver reads nothing: the sender is stopped, the relay holds about a window.
                assert not pusher.done() and sent < 256 << 20
                assert link.stats().up.held_bytes <= window + (256 << 10)
                pusher.cancel()
            release.set()
            w.write_eof()
            (n,) = struct.unpack("!Q", await r.readexactly(8))
            assert n == link.stats().up.bytes_in
            w.close()

    run(main())


def test_close_shuts_every_connection() -> None:
    async def main() -> None:
        ends: list[bytes | str] = []

        async def idle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ends.append(await r.read())
            except ConnectionResetError:
                ends.append("reset")

        async with tcp_server(idle) as port:
            link = WanLink(WanParams(5), f"127.0.0.1:{port}")
            async with link:
                wan_port = link.port
                conns = [await asyncio.open_connection("127.0.0.1", wan_port) for _ in range(5)]
                await asyncio.sleep(0.1)
                assert link.stats().active == 5
            assert link.stats().active == 0
            for r, w in conns:
                with contextlib.suppress(ConnectionResetError):
                    assert await r.read() == b""
                w.close()
            for _ in range(50):
                if len(ends) == 5:
                    break
                await asyncio.sleep(0.02)
            assert len(ends) == 5
            # Nothing listens any more.
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", wan_port)

    run(main())


def test_unix_socket_target(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "echo.sock")

        async def closing_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await echo(r, w)
            finally:
                w.close()

        server = await asyncio.start_unix_server(closing_echo, path)
        try:
            async with WanLink(WanParams(5, 10e6), f"unix:{path}") as link:
                r, w = await asyncio.open_connection("127.0.0.1", link.port)
                w.write(b"over unix")
                w.write_eof()
                assert await r.read() == b"over unix"
                w.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


# ---------------------------------------------------------------------------------------------------------
# NBD through the link, and the command line
# ---------------------------------------------------------------------------------------------------------


def test_nbd_reads_across_the_wan(image: Path) -> None:
    file = image.read_bytes()
    delay = 0.01

    async def main() -> None:
        with hikkoshi_server(str(image), "--export", "disk") as served:
            pipes.extend(f for f in (served.proc.stdout, served.proc.stderr) if f is not None)
            params = WanParams(delay * 1000, 200e6, loss=0.001, jitter_ms=1)
            async with WanLink(params, f"127.0.0.1:{served.port}", seed=3) as link:
                async with NbdClient(f"nbd://127.0.0.1:{link.port}/disk") as c:
                    assert c.size == len(file)
                    t = time.monotonic()
                    assert await c.read(0, 4096) == file[:4096]
                    assert time.monotonic() - t >= 2 * delay
                    rng = random.Random(5)
                    spans = [
                        (rng.randrange(0, len(file) - 300_000), rng.randrange(1, 300_000)) for _ in range(40)
                    ]
                    got = await asyncio.gather(*(c.read(o, n) for o, n in spans))
                    for (o, n), data in zip(spans, got, strict=True):
                        assert data == file[o : o + n]
                    big = await c.read(1 << 20, 4 << 20)
                    assert hashlib.sha256(big).digest() == hashlib.sha256(file[1 << 20 : 5 << 20]).digest()
                assert link.stats().down.bytes_out > 8 << 20

    pipes: list[IO[str]] = []
    try:
        run(main(), "uvloop", timeout=30)
    finally:
        for f in pipes:
            f.close()


CLI = (
    "import argparse, sys\n"
    "from hikkoshi.cli import wan\n"
    "p = argparse.ArgumentParser(prog='hikkoshi')\n"
    "wan.add_parser(p.add_subparsers(dest='command', required=True))\n"
    "args = p.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


@contextlib.contextmanager
def cli_wan(*argv: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "wan", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        try:
            line = proc.stdout.readline()
            assert line.startswith("hikkoshi: wan listening on 127.0.0.1:"), line + proc.stderr.read()
            yield proc, int(line.rsplit(":", 1)[1])
        finally:
            stop(proc)


def test_cli_relays_and_stops_on_sigterm() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with cli_wan("--to", f"127.0.0.1:{port}", "--rtt", "40ms", "--rate", "50Mbit", "--jitter", "1ms") as (
            proc,
            wan_port,
        ):
            with socket.create_connection(("127.0.0.1", wan_port), timeout=10) as c:
                s, _ = listener.accept()
                with s:
                    t = time.monotonic()
                    c.sendall(b"ping")
                    assert s.recv(10) == b"ping"
                    s.sendall(b"pong")
                    assert c.recv(10) == b"pong"
                    assert time.monotonic() - t >= 0.040
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert proc.stderr is not None
            assert "1 connections" in proc.stderr.read()


def test_cli_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CLI, "wan", "--to", "127.0.0.1:1", "--rate", "100Mbps"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "ambiguous rate" in out.stderr
