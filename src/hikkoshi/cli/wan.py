"""`hikkoshi wan`: relay TCP connections through an emulated WAN (delay, bandwidth, jitter, loss)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from typing import Any

from hikkoshi.lab.link_model import WanParams
from hikkoshi.lab.wan import Endpoint, WanLink

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_DURATION_RE = re.compile(rf"^\s*{_NUMBER}\s*(us|µs|ms|s)?\s*$")
_DURATION_MS = {None: 1.0, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0}
_RATE_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-zA-Z/]*)\s*$")
_BITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_BYTES = {
    "B/s": 1, "kB/s": 10**3, "KB/s": 10**3, "MB/s": 10**6, "GB/s": 10**9,
    "KiB/s": 1 << 10, "MiB/s": 1 << 20, "GiB/s": 1 << 30,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([a-zA-Z]*)\s*$")
_SIZES = {
    "": 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
}  # fmt: skip


def parse_duration_ms(text: str) -> float:
    """``25ms``, ``0.5s``, ``800us``; a bare number is milliseconds."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 25ms, 0.1s)")
    return float(m.group(1)) * _DURATION_MS[m.group(2)]


def parse_rate_bps(text: str) -> float:
    """Bits per second: ``100Mbit``, ``1gbit``, ``500kbit``, ``12.5MB/s`` (bytes); a bare number is bit/s."""
    m = _RATE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 100Mbit, 1Gbit, 12.5MB/s)")
    value, unit = float(m.group(1)), m.group(2)
    if unit.lower() in _BITS:
        rate = value * _BITS[unit.lower()]
    elif unit in _BYTES:
        rate = value * _BYTES[unit] * 8
    elif unit.lower().endswith("bps"):
        raise argparse.ArgumentTypeError(
            f"ambiguous rate {text!r}: write bits as Mbit or bytes as MB/s (tc reads mbps as bytes)"
        )
    else:
        raise argparse.ArgumentTypeError(f"unknown rate unit in {text!r} (bit, kbit, Mbit, Gbit, MB/s, ...)")
    if rate <= 0:
        raise argparse.ArgumentTypeError("rate must be positive (leave --rate out for no limit)")
    return rate


def parse_size(text: str) -> int:
    """Bytes: ``65536``, ``64K``/``64KiB``, ``1M``/``1MiB``, ``1MB`` (10^6)."""
    m = _SIZE_RE.match(text)
    if m is None or m.group(2) not in _SIZES:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256KiB, 1MiB, 1000000)")
    return int(m.group(1)) * _SIZES[m.group(2)]


def parse_loss(text: str) -> float:
    """A probability per segment: ``0.001`` or ``0.1%``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a loss rate: {text!r} (e.g. 0.001 or 0.1%)") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("loss must be in [0, 1)")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "wan",
        help="relay TCP through an emulated WAN",
        description="Listen on one address and forward every connection to another through an emulated "
        "WAN: per-direction delay, a shared bottleneck rate with a bounded queue, jitter, and loss "
        "(a lost segment arrives one retransmission timeout late, holding back the rest).",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="ADDR",
        help="HOST:PORT or unix:PATH to listen on, exactly (default 127.0.0.1:0, a free port)",
    )
    p.add_argument("--to", required=True, metavar="ADDR", help="HOST:PORT or unix:PATH to forward to")
    delay = p.add_mutually_exclusive_group()
    delay.add_argument(
        "--delay", type=parse_duration_ms, default=0.0, metavar="T", help="one-way delay (e.g. 25ms)"
    )
    delay.add_argument("--rtt", type=parse_duration_ms, metavar="T", help="round-trip time, half each way")
    p.add_argument(
        "--rate",
        type=parse_rate_bps,
        metavar="R",
        help="bottleneck rate each way (e.g. 100Mbit; default none)",
    )
    p.add_argument(
        "--reverse-rate", type=parse_rate_bps, metavar="R", help="rate from target to client (default --rate)"
    )
    p.add_argument("--loss", type=parse_loss, default=0.0, metavar="P", help="loss per 1448-byte segment")
    p.add_argument(
        "--jitter", type=parse_duration_ms, default=0.0, metavar="T", help="extra one-way delay, 0..T"
    )
    p.add_argument(
        "--queue", type=parse_size, metavar="SIZE", help="bottleneck buffer (default: rate x RTT + 64KiB)"
    )
    p.add_argument(
        "--rto", type=parse_duration_ms, metavar="T", help="cost of a loss (default max(200ms, RTT+4*jitter))"
    )
    p.add_argument(
        "--window",
        type=parse_size,
        metavar="SIZE",
        help="most bytes one connection may have inside the link each way (default: enough for the rate)",
    )
    p.add_argument("--seed", type=int, help="seed for jitter and loss (reproducible runs)")
    p.add_argument(
        "--stats", type=float, default=0.0, metavar="S", help="print a JSON statistics line every S seconds"
    )
    p.set_defaults(func=wan_command)


def params_from_args(args: argparse.Namespace) -> tuple[WanParams, WanParams]:
    """The two directions' parameters (client to target, target to client)."""
    delay_ms = args.rtt / 2 if args.rtt is not None else args.delay
    common: dict[str, Any] = {"queue_bytes": args.queue, "rto_ms": args.rto, "window_bytes": args.window}
    up = WanParams(delay_ms, args.rate, args.loss, args.jitter, **common)
    rate_down = args.reverse_rate if args.reverse_rate is not None else args.rate
    down = WanParams(delay_ms, rate_down, args.loss, args.jitter, **common)
    return up, down


async def run_wan(args: argparse.Namespace) -> int:
    up, down = params_from_args(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with WanLink(up, args.to, args.listen, reverse=down, seed=args.seed) as link:
            print(f"hikkoshi: wan listening on {link.address}", flush=True)
            async with asyncio.TaskGroup() as tg:
                reporter = tg.create_task(_report(link, args.stats)) if args.stats > 0 else None
                await stop.wait()
                if reporter is not None:
                    reporter.cancel()
            final = link.stats()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    print(
        f"hikkoshi: wan stopped after {final.connections} connections, "
        f"{final.up.bytes_out} bytes up, {final.down.bytes_out} bytes down",
        file=sys.stderr,
    )
    return 0


async def _report(link: WanLink, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        print(json.dumps(link.stats().as_dict()), flush=True)


def wan_command(args: argparse.Namespace) -> int:
    from hikkoshi.daemons.process import run

    try:
        Endpoint.parse(args.to)
        Endpoint.parse(args.listen)
        params_from_args(args)
        return run(run_wan(args))
    except (OSError, ValueError) as exc:
        print(f"hikkoshi wan: {exc}", file=sys.stderr)
        return 2
