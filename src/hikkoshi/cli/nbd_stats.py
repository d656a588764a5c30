"""`hikkoshi nbd stats`: per-export statistics from a server's control socket."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hikkoshi.nbd.control import ControlError, control_request


def add_parser(sub: Any) -> None:
    p = sub.add_parser("stats", help="show statistics of a running server")
    p.add_argument("--control", required=True, metavar="unix:PATH", help="the server's control socket")
    p.add_argument("--export", metavar="NAME", help="only this export")
    p.add_argument("--regions", action="store_true", help="include per-region access counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=stats_command)


def stats_command(args: argparse.Namespace) -> int:
    from hikkoshi.daemons.process import run

    path = Path(args.control.removeprefix("unix:"))
    extra: dict[str, Any] = {"regions": args.regions}
    if args.export is not None:
        extra["export"] = args.export
    try:
        result = run(control_request(path, "stats", **extra))
    except (OSError, ControlError) as exc:
        print(f"hikkoshi nbd stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("export", "size", "conns", "requests", "read", "written", "errors", "lat p50/p99 µs")
    for name, s in result.items():
        table.add_row(
            name or '""',
            f"{s['size']:,}",
            str(s["connections"]),
            str(sum(s["requests"].values())),
            f"{s['bytes_read']:,}",
            f"{s['bytes_written']:,}",
            str(s["errors"]),
            f"{s['latency_us']['p50']:.0f}/{s['latency_us']['p99']:.0f}",
        )
    Console().print(table)
    return 0
