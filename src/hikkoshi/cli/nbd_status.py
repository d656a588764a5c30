"""`hikkoshi nbd status`: progress of a relocation proxy, as JSON or a live progress bar."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from hikkoshi.cli.progress import progress
from hikkoshi.nbd.control import ControlError, control_request


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show a relocation proxy's progress")
    p.add_argument("--control", required=True, metavar="unix:PATH", help="the proxy's control socket")
    p.add_argument("--json", action="store_true", help="print the figures once, as JSON")
    p.add_argument("--once", action="store_true", help="print one line and exit instead of a live bar")
    p.set_defaults(func=status_command)


def _line(s: dict[str, Any]) -> str:
    eta = "?" if s["eta_s"] is None else f"{s['eta_s']:.0f}s"
    hit = "-" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
    return (
        f"{s['percent']:.1f}% of {s['size']:,} bytes local · upstream {s['upstream']} · {s['phase']}"
        f"{' (paused)' if s['paused'] else ''} · on demand {s['fetched_demand_bytes']:,} B, background "
        f"{s['fetched_background_bytes']:,} B · hit rate {hit} · {s['rate_bytes_s'] / 1e6:.1f} MB/s"
        f" · ETA {eta}"
    )


async def _watch(path: Path) -> dict[str, Any]:
    with progress("nbd status") as report:
        while True:
            status: dict[str, Any] = await control_request(path, "status")
            detail = f"upstream {status['upstream']}{' · paused' if status['paused'] else ''}"
            report.update(
                status["phase"],
                status["present_bytes"],
                status["size"],
                rate=status["rate_bytes_s"],
                detail=detail,
            )
            if status["upstream"] == "detached":
                return status
            await asyncio.sleep(0.5)


def status_command(args: argparse.Namespace) -> int:
    from hikkoshi.daemons.process import run

    path = Path(args.control.removeprefix("unix:"))
    try:
        if args.json:
            print(json.dumps(run(control_request(path, "status")), indent=2))
        elif args.once or not sys.stdout.isatty():
            print(_line(run(control_request(path, "status"))))
        else:
            print(_line(run(_watch(path))))
    except (OSError, ControlError) as exc:
        print(f"hikkoshi nbd status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
