"""`hikkoshi nbd serve`: serve raw images over NBD, with a control socket."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from hikkoshi.block.file import RawFile
from hikkoshi.block.move_journal import MoveJournalError, recover
from hikkoshi.block.tracking import TrackedDevice
from hikkoshi.cli.nbd_limits import add_limit_arguments, limits_from_args
from hikkoshi.cli.serve_control import MoveService, register_commands
from hikkoshi.nbd.control import ControlServer
from hikkoshi.nbd.server import Export, ExportTable, ListenAddress, NbdServer
from hikkoshi.nbd.tls import server_context


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve raw image files over NBD")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="raw image file (or block device)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="HOST:PORT or unix:PATH (repeatable; default 127.0.0.1:10809; port 0 picks one)",
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME",
        help="export name for each IMAGE in order (default: the file name); the first is the default",
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    p.add_argument("--control", metavar="unix:PATH", help="JSON control socket (statistics, later layers)")
    p.add_argument(
        "--tls-cert", type=Path, metavar="F", help="server certificate (PEM); enables TLS, required"
    )
    p.add_argument("--tls-key", type=Path, metavar="F", help="server private key (PEM)")
    p.add_argument("--tls-ca", type=Path, metavar="F", help="CA that client certificates must be signed by")
    add_limit_arguments(p)
    p.set_defaults(func=serve_command)


def build_exports(
    images: list[str], names: list[str], read_only: bool, describe_paths: bool = False
) -> ExportTable:
    """Open every image as an export, on a dirty-tracking layer; first finish or undo interrupted moves.

    Clients see an image's host path (as the export's description) only with ``describe_paths``.
    """
    if len(names) > len(images):
        raise ValueError(f"{len(names)} export names for {len(images)} images")
    table = ExportTable()
    for i, image in enumerate(images):
        name = names[i] if i < len(names) else Path(image).name
        path = recover(Path(image))
        device = TrackedDevice(RawFile(path, read_only=read_only))
        table.add(Export(name, device, description=str(path.resolve()) if describe_paths else ""))
    return table


def announce(server: NbdServer) -> None:
    """Print where the server listens, as URIs (tests and scripts wait for these lines)."""
    scheme = "nbds" if server.tls else "nbd"
    for addr in server.bound:
        if addr.startswith("unix:"):
            print(f"hikkoshi: serving {scheme}+unix:///?socket={addr[5:]}", flush=True)
        else:
            print(f"hikkoshi: serving {scheme}://{addr}/", flush=True)


async def serve(args: argparse.Namespace) -> int:
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = server_context(args.tls_cert, args.tls_key, args.tls_ca)
    elif args.tls_ca:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key")
    listen = [ListenAddress.parse(a) for a in (args.listen or ["127.0.0.1:10809"])]
    control_path = None
    if args.control:
        if not args.control.startswith("unix:"):
            raise ValueError("--control takes unix:PATH")
        control_path = Path(args.control[5:])
    limits = limits_from_args(args)
    exports = build_exports(args.images, args.export, args.read_only, args.describe_paths)
    server = NbdServer(exports, listen, tls=tls, limits=limits)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    control = ControlServer(control_path) if control_path else None
    moves = MoveService()
    try:
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve())
            tg.create_task(moves.run())
            # Moves end (each undoing itself unless already switched) when the server stops.
            serving.add_done_callback(lambda _t: moves.close())
            ready = tg.create_task(server.ready.wait())
            await asyncio.wait([serving, ready], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                ready.cancel()
                return 1
            if control is not None:
                register_commands(control, exports, server, moves)
                await control.start()
            announce(server)
    finally:
        if control is not None:
            await control.close()
        for export in exports:
            export.device.close()
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.runtime import run_reporting

    return run_reporting(serve(args), "hikkoshi nbd serve", (OSError, ValueError, MoveJournalError))
