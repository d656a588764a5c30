"""`hikkoshi nbd move`: move a served image to another file while clients keep using it.

Blocks until the move ends. Exit status: 0 moved (the source is deleted), 1 the move failed or was
cancelled (the source is still the disk, the partial copy is gone), 2 it could not be asked for, 130
interrupted (the move is cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from hikkoshi.cli.progress import ProgressReport, progress
from hikkoshi.nbd.control import ControlError, control_request

_END = ("done", "failed", "cancelled")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("move", help="move a served image to another file, live (storage vMotion)")
    p.add_argument("--control", required=True, metavar="unix:PATH", help="the server's control socket")
    p.add_argument("--to", required=True, type=Path, metavar="NEWPATH", help="the new file (must not exist)")
    p.add_argument("--export", metavar="NAME", help="which export (needed if the server has several)")
    p.add_argument(
        "--mode",
        choices=("mirror", "dbt"),
        default="mirror",
        help="mirror: one pass, writes go to both sides (default); dbt: passes of dirty blocks, "
        "falling back to mirror if they stop converging",
    )
    p.add_argument("--bandwidth", metavar="RATE", help="limit the copy, e.g. 200M, 1G, 500Mbit")
    p.add_argument("--thick", action="store_true", help="preallocate the new file (default: sparse)")
    p.add_argument("--json", action="store_true", help="print the final status as JSON, no progress")
    p.set_defaults(func=move_command)


def summary(s: dict[str, Any]) -> str:
    """One line about a finished move."""
    passes = len(s["passes"])
    how = f"{s['mode']}{' -> mirror' if s['fallback_to_mirror'] else ''}, {passes} pass{'es' * (passes != 1)}"
    if s["phase"] == "done":
        text = (
            f"moved {s['source']} -> {s['dest']} in {s['elapsed']:.2f}s ({how}): "
            f"{s['copied_bytes']:,} bytes copied, {s['zero_bytes']:,} left as holes, "
            f"writes held {s['hold_ms']:.1f} ms at the switch"
        )
        return text + (f"; warning: {s['error']}" if s["error"] else "")
    return (
        f"move {s['phase']} after {s['elapsed']:.2f}s ({how}): {s['error']}; {s['source']} is still the disk"
    )


async def _follow(path: Path, export: dict[str, Any], report: ProgressReport | None) -> dict[str, Any]:
    while True:
        status: dict[str, Any] = await control_request(path, "move-status", **export)
        if report is not None:
            done = status["copied_bytes"] + status["zero_bytes"]
            report.update(
                status["phase"],
                done,
                done + status["pending_bytes"],
                rate=status["rate"],
                detail=f"pass {len(status['passes']) + 1}",
            )
        if status["phase"] in _END:
            return status
        await asyncio.sleep(0.2)


async def _move(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    export = {"export": args.export} if args.export else {}
    request: dict[str, Any] = {
        "to": str(args.to.absolute()),
        "mode": args.mode,
        "thick": args.thick,
        **export,
    }
    if args.bandwidth:
        request["bandwidth"] = args.bandwidth
    await control_request(path, "move", **request)
    try:
        if args.json:
            return await _follow(path, export, None)
        with progress("nbd move") as report:
            return await _follow(path, export, report)
    except asyncio.CancelledError:
        await control_request(path, "move-cancel", **export)
        raise


def move_command(args: argparse.Namespace) -> int:
    from hikkoshi.daemons.process import run

    path = Path(args.control.removeprefix("unix:"))
    try:
        status = run(_move(args, path))
    except (OSError, ControlError) as exc:
        print(f"hikkoshi nbd move: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hikkoshi nbd move: interrupted; the move is cancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(summary(status))
    return 0 if status["phase"] == "done" else 1
