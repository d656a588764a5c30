"""How closely the WAN emulator matches what it is told: round-trip time and throughput.

    .venv/bin/python -m bench.run_wan [--rtt 50ms] [--rate 100Mbit] [--size 32MiB] [--quick] ...

The relay runs as its own process (`hikkoshi wan`, as a lab would run it); the endpoints (an echo
server that is a sink for connections starting with "S", and a source) run in this process on uvloop.
Measured: idle RTT (1-byte ping-pong), goodput of one connection each way and of several sharing the
bottleneck, RTT under load (the queue's delay: bufferbloat), and goodput with loss. Goodput is taken at
the receiver, from its first byte to its last. Results go to bench/results/wan-<UTC timestamp>.json and
a table is printed. Exit status 0 whatever the numbers say: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hikkoshi.cli.wan import parse_duration_ms, parse_loss, parse_rate_bps, parse_size
from hikkoshi.daemons.process import run
from hikkoshi.lab.link_model import WanParams

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "bench" / "results"

# `hikkoshi wan` through its own parser, whether or not cli/main.py registers it yet.
_SHIM = (
    "import argparse, sys\n"
    "from hikkoshi.cli import wan\n"
    "p = argparse.ArgumentParser(prog='hikkoshi')\n"
    "wan.add_parser(p.add_subparsers(dest='command', required=True))\n"
    "args = p.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


@dataclass
class Relay:
    proc: subprocess.Popen[str]
    port: int
    argv: list[str]


@contextlib.contextmanager
def relay(to_port: int, args: list[str]) -> Iterator[Relay]:
    argv = [sys.executable, "-c", _SHIM, "wan", "--to", f"127.0.0.1:{to_port}", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        try:
            line = proc.stdout.readline()
            if not line.startswith("hikkoshi: wan listening on "):
                raise RuntimeError(f"relay did not start: {line!r} {proc.stderr.read()}")
            yield Relay(proc, int(line.rsplit(":", 1)[1]), ["hikkoshi", *argv[3:]])
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --- endpoints -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server(kind: str, size: int = 0) -> AsyncIterator[int]:
    """An endpoint on 127.0.0.1: ``mux`` or ``source`` (sends ``size`` bytes).

    ``mux`` echoes, except that a connection whose first byte is ``S`` is a sink: it reads to the end, then
    replies with what it received and when (bytes, first and last read times, size of the first read).
    """
    tasks: set[asyncio.Task[None]] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            mode = await r.read(1) if kind == "mux" else b""
            if mode and mode != b"S":
                w.write(mode)
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            elif mode == b"S":
                n, first, last, first_len = 0, 0.0, 0.0, 0
                while data := await r.read(1 << 20):
                    last = time.monotonic()
                    if not n:
                        first, first_len = last, len(data)
                    n += len(data)
                w.write(struct.pack("!Qddq", n, first, last, first_len))
                await w.drain()
            elif kind == "source":
                block = os.urandom(1 << 16)
                for off in range(0, size, len(block)):
                    w.write(block[: size - off])
                    await w.drain()
                w.write_eof()
                await r.read()
        except ConnectionError:
            pass
        finally:
            w.transport.abort()

    def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.get_running_loop().create_task(handle(r, w)))

    srv = await asyncio.start_server(accepted, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


async def ping(port: int, count: int, gap: float = 0.01) -> list[float]:
    """RTTs (seconds) of 1-byte ping-pongs through an echo server."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    rtts = []
    try:
        for i in range(count):
            t = time.monotonic()
            w.write(bytes([i % 256]))
            await w.drain()
            await r.readexactly(1)
            rtts.append(time.monotonic() - t)
            await asyncio.sleep(gap)
    finally:
        w.close()
    return rtts


@dataclass
class Received:
    """What a receiver saw: bytes, the times of its first and last read, and the size of the first."""

    n: int
    first: float
    last: float
    first_len: int

    @property
    def goodput_bps(self) -> float:
        return (self.n - self.first_len) * 8 / max(self.last - self.first, 1e-9)


def aggregate_bps(parts: list[Received]) -> float:
    """Goodput of several receivers together, from the first one's first byte to the last one's last."""
    n = sum(p.n for p in parts) - min(parts, key=lambda p: p.first).first_len
    return n * 8 / max(max(p.last for p in parts) - min(p.first for p in parts), 1e-9)


async def upload(port: int, size: int) -> Received:
    """Send ``size`` bytes to a sink; return what it received, and when."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    block = os.urandom(1 << 16)
    w.write(b"S")
    try:
        for off in range(0, size, len(block)):
            w.write(block[: size - off])
            await w.drain()
        w.write_eof()
        n, first, last, first_len = struct.unpack("!Qddq", await r.readexactly(32))
    finally:
        w.close()
    return Received(n, first, last, first_len)


async def download(port: int) -> Received:
    """Read a source to its end."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    n, first, last, first_len = 0, 0.0, 0.0, 0
    try:
        while data := await r.read(1 << 20):
            last = time.monotonic()
            if not n:
                first, first_len = last, len(data)
            n += len(data)
    finally:
        w.close()
    return Received(n, first, last, first_len)


async def loaded_rtt(port: int, count: int) -> list[float]:
    """Ping through a relay while another connection through it fills the queue towards the server."""
    done = asyncio.Event()

    async def bulk() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        block = bytes(1 << 16)
        w.write(b"S")
        try:
            while not done.is_set():
                w.write(block)
                await w.drain()
            w.write_eof()
            await r.readexactly(32)
        finally:
            w.close()

    async def pings() -> list[float]:
        try:
            await asyncio.sleep(1.0)  # let the queues fill
            return await ping(port, count, gap=0.02)
        finally:
            done.set()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(bulk())
        result = tg.create_task(pings())
    return result.result()


# --- the measurements ------------------------------------------------------------------------------------


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": ordered[0] * 1000,
        "median": statistics.median(ordered) * 1000,
        "p90": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "max": ordered[-1] * 1000,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    link_args = ["--rtt", f"{args.rtt}ms", "--rate", f"{args.rate}bit"]
    if args.jitter:
        link_args += ["--jitter", f"{args.jitter}ms"]
    out: dict[str, Any] = {}
    size = args.size

    async with server("mux") as mux_port, server("source", size) as src_port:
        with relay(mux_port, link_args) as wan:
            out["command"] = wan.argv
            out["idle_rtt_ms"] = _ms(await ping(wan.port, args.pings))

            got = await upload(wan.port, size)
            out["upload_1"] = {"bytes": got.n, "goodput_bps": got.goodput_bps}

            conns = args.conns
            parts = await asyncio.gather(*(upload(wan.port, size // conns) for _ in range(conns)))
            out[f"upload_{conns}"] = {
                "bytes": sum(p.n for p in parts),
                "per_connection_bps": [p.goodput_bps for p in parts],
                "aggregate_bps": aggregate_bps(parts),
            }

            # RTT while an upload fills the bottleneck queue: a ping waits behind it (bufferbloat).
            out["loaded_rtt_ms"] = _ms(await loaded_rtt(wan.port, args.pings // 2))

        with relay(src_port, link_args) as src_wan:
            got = await download(src_wan.port)
            out["download_1"] = {"bytes": got.n, "goodput_bps": got.goodput_bps}

        if args.loss:
            lossy = [*link_args, "--loss", str(args.loss), "--seed", "1"]
            with relay(mux_port, lossy) as lossy_wan:
                got = await upload(lossy_wan.port, size)
                out["upload_1_lossy"] = {"bytes": got.n, "goodput_bps": got.goodput_bps, "loss": args.loss}
    return out


def machine_facts() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run_wan", description=__doc__.split("\n\n")[0])
    p.add_argument("--rtt", type=parse_duration_ms, default=50.0, help="configured RTT (default 50ms)")
    p.add_argument("--rate", type=parse_rate_bps, default=100e6, help="configured rate (default 100Mbit)")
    p.add_argument("--jitter", type=parse_duration_ms, default=0.0, help="configured jitter (default 0)")
    p.add_argument("--loss", type=parse_loss, default=0.001, help="loss for the lossy run (0: skip it)")
    p.add_argument("--size", type=parse_size, default=32 << 20, help="bytes per transfer (default 32MiB)")
    p.add_argument("--conns", type=int, default=4, help="connections sharing the bottleneck (default 4)")
    p.add_argument("--pings", type=int, default=50, help="pings per RTT measurement (default 50)")
    p.add_argument("--quick", action="store_true", help="8 MiB transfers, 20 pings")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.size, args.pings = min(args.size, 8 << 20), min(args.pings, 20)
    started = dt.datetime.now(dt.UTC)
    results = run(measure(args))
    configured = {"rtt_ms": args.rtt, "rate_bps": args.rate, "jitter_ms": args.jitter, "loss": args.loss}
    doc = {
        "schema": 1,
        "kind": "wan",
        "started_utc": started.isoformat(),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(),
        "configured": configured,
        "settings": {"size": args.size, "conns": args.conns, "pings": args.pings},
        "machine": machine_facts(),
        "results": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"wan-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")

    rate = args.rate
    idle, loaded = results["idle_rtt_ms"], results["loaded_rtt_ms"]
    one_up = results["upload_1"]["goodput_bps"]
    many = results[f"upload_{args.conns}"]["aggregate_bps"]
    one_down = results["download_1"]["goodput_bps"]
    full = f"{args.rtt + _queue_ms(args):.1f} ms (+ full queue)"
    rows = [
        ("idle RTT median", f"{idle['median']:.2f} ms", f"{args.rtt:g} ms"),
        ("idle RTT min / max", f"{idle['min']:.2f} / {idle['max']:.2f} ms", ""),
        ("RTT, upload running", f"{loaded['median']:.2f} ms", full),
        ("upload, 1 conn", _mbit(one_up), _ratio(one_up, rate)),
        (f"upload, {args.conns} conns", _mbit(many), _ratio(many, rate)),
        ("download, 1 conn", _mbit(one_down), _ratio(one_down, rate)),
    ]
    if "upload_1_lossy" in results:
        g = results["upload_1_lossy"]["goodput_bps"]
        rows.append((f"upload, loss {args.loss:g}", _mbit(g), _ratio(g, rate)))
    print(f"WAN emulator: configured RTT {args.rtt:g} ms, rate {rate / 1e6:g} Mbit/s; {args.size} bytes")
    print("| measure | measured | configured / ratio |\n|---|---|---|")
    for name, got, want in rows:
        print(f"| {name} | {got} | {want} |")
    print(f"results: {path}")
    return 0


def _queue_ms(args: argparse.Namespace) -> float:
    """The default queue's delay when full, in ms."""
    limit = WanParams.from_rtt(args.rtt, args.rate).queue_limit or 0
    return float(limit * 8 / args.rate * 1000)


def _mbit(bps: float) -> str:
    return f"{bps / 1e6:.2f} Mbit/s"


def _ratio(bps: float, rate: float) -> str:
    return f"{bps / rate:.3f} of {rate / 1e6:g} Mbit/s"


if __name__ == "__main__":
    sys.exit(main())
