"""The options of `hikkoshi nbd serve` and `hikkoshi nbd proxy` that set the server's limits."""

from __future__ import annotations

import argparse
from typing import Any

from hikkoshi.nbd.limits import ServerLimits

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        return int(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4M, 131072)") from None


def add_limit_arguments(p: Any) -> None:
    """Add the limit options (and ``--describe-paths``) to a server command's parser."""
    d = ServerLimits()
    g = p.add_argument_group("limits")
    g.add_argument(
        "--handshake-timeout",
        type=float,
        default=d.handshake_timeout,
        metavar="S",
        help=f"seconds a client may take to negotiate (default {d.handshake_timeout:g})",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="close a negotiated TCP client idle that long (nothing sent or received, no request in "
        "flight); Unix-socket clients (a VM's own QEMU) are never closed for that (default: never)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        metavar="N",
        help=f"connections at once, all clients (default {d.max_connections}; up to {d.unix_reserved}, "
        "at most half, are kept for Unix-socket clients)",
    )
    g.add_argument(
        "--max-connections-per-address",
        type=int,
        default=d.max_connections_per_address,
        metavar="N",
        help="connections at once from one TCP client address, an IPv6 client's /64 "
        f"(default {d.max_connections_per_address}; 0: no cap; Unix-socket clients are not capped)",
    )
    g.add_argument(
        "--connection-memory",
        type=_size,
        default=d.connection_memory,
        metavar="SIZE",
        help="payload memory one connection may hold, a power of two; longer requests are streamed "
        f"(default {d.connection_memory >> 20}M)",
    )
    g.add_argument(
        "--memory-budget",
        type=_size,
        default=d.memory_budget,
        metavar="SIZE",
        help="payload memory all connections may hold; requests wait for it, first come first served "
        f"(default {d.memory_budget >> 20}M)",
    )
    p.add_argument(
        "--describe-paths",
        action="store_true",
        help="describe exports with the host paths they serve (NBD_INFO_DESCRIPTION, NBD_OPT_LIST); "
        "without it clients learn nothing of this host's file system",
    )


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The limits the options say (ValueError for a combination that cannot work)."""
    return ServerLimits(
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        connection_memory=args.connection_memory,
        memory_budget=args.memory_budget,
    )
