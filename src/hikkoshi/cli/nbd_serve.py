"""`hikkoshi nbd serve`: serve raw images over NBD, with a control socket."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.nbd_limits import add_limit_arguments, limits_from_args

if TYPE_CHECKING:
    from hikkoshi.daemons.served_disk import ServedDisk


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
    p.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="a host's TLS files in QEMU's layout (ca-cert.pem, server-cert.pem, server-key.pem): TLS, and "
        "clients need a certificate of that CA",
    )
    p.add_argument(
        "--tls-peer",
        metavar="HOST",
        help="with --tls-dir: admit only a client whose certificate names this host (a hikkoshi host)",
    )
    add_limit_arguments(p)
    p.set_defaults(func=serve_command)


def image_disks(
    images: list[str], names: list[str], read_only: bool, describe_paths: bool = False
) -> list[ServedDisk]:
    """Every image as a file disk, named by ``names`` in order (else by its file name); clients see an
    image's host path (as the export's description) only with ``describe_paths``."""
    from hikkoshi.daemons.served_disk import ServedDisk
    from hikkoshi.vm.disk_serving import DiskServing

    if len(names) > len(images):
        raise ValueError(f"{len(names)} export names for {len(images)} images")
    return [
        ServedDisk(
            names[i] if i < len(names) else Path(image).name,
            Path(image),
            None,
            DiskServing(),
            read_only=read_only,
            planned=False,
            describe_path=describe_paths,
        )
        for i, image in enumerate(images)
    ]


async def serve(args: argparse.Namespace) -> int:
    from hikkoshi.daemons.disk_service import DiskService
    from hikkoshi.identity.names import check_host_name
    from hikkoshi.identity.tls_dir import TlsDir
    from hikkoshi.nbd.server import ListenAddress
    from hikkoshi.nbd.tls import server_context

    tls = None
    peers = None
    if args.tls_dir:
        if args.tls_cert or args.tls_key or args.tls_ca:
            raise ValueError("--tls-dir or --tls-cert/--tls-key/--tls-ca, not both")
        tls = TlsDir(args.tls_dir.absolute()).check().server_context(client_certificate="required")
        peers = frozenset({check_host_name(args.tls_peer)}) if args.tls_peer else None
    elif args.tls_peer:
        raise ValueError("--tls-peer goes with --tls-dir")
    elif args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = server_context(args.tls_cert, args.tls_key, args.tls_ca)
    elif args.tls_ca:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key")
    listen = [ListenAddress.parse(a) for a in (args.listen or ["127.0.0.1:10809"])]
    control = None
    if args.control:
        if not args.control.startswith("unix:"):
            raise ValueError("--control takes unix:PATH")
        control = Path(args.control[5:])
    disks = image_disks(args.images, args.export, args.read_only, args.describe_paths)
    service = DiskService(disks, listen, control, tls=tls, peers=peers, limits=limits_from_args(args))
    return await service.serve()


def serve_command(args: argparse.Namespace) -> int:
    from hikkoshi.block.move_journal import MoveJournalError
    from hikkoshi.daemons.process import run_reporting

    return run_reporting(serve(args), "hikkoshi nbd serve", (OSError, ValueError, MoveJournalError))
