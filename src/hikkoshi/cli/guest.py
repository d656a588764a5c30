"""`hikkoshi guest`: the test guest image (Debian kernel + busybox initramfs with workloads)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hikkoshi.cli import remote
from hikkoshi.cli.params import parse_params
from hikkoshi.guest.guest_image import GuestImageError, build_guest, kernel_cmdline
from hikkoshi.guest.workloads import WORKLOADS


def add_parser(top: Any) -> None:
    group = top.add_parser("guest", help="the test guest image").add_subparsers(
        dest="guest_command", required=True
    )
    p = group.add_parser("build", help="build (or find in the cache) the guest image; print its paths")
    p.add_argument(
        "--cache", type=Path, metavar="DIR", help="cache directory (default: $HIKKOSHI_CACHE or ~/.cache)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=build_command, remote=remote.guest_build)
    p = group.add_parser("cmdline", help="print the kernel command line running a workload")
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("params", nargs="*", metavar="KEY=VALUE", help="workload parameters (hikkoshi.KEY=VALUE)")
    p.set_defaults(func=cmdline_command)
    p = group.add_parser("workloads", help="list the workloads the guest carries")
    p.set_defaults(func=workloads_command)


def build_command(args: argparse.Namespace) -> int:
    try:
        guest = build_guest(args.cache)
    except GuestImageError as exc:
        print(f"hikkoshi guest build: {exc}", file=sys.stderr)
        return 1
    info = {
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "kernel_release": guest.kernel_release,
        "key": guest.key,
        "packages": dict(guest.packages),
        "modules": list(guest.modules),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"kernel  {info['kernel']}")
        print(f"initrd  {info['initrd']}")
        print(f"release {guest.kernel_release}  key {guest.key}")
    return 0


def cmdline_command(args: argparse.Namespace) -> int:
    try:
        print(kernel_cmdline(args.workload, parse_params(args.params)))
    except ValueError as exc:
        print(f"hikkoshi guest cmdline: {exc}", file=sys.stderr)
        return 2
    return 0


def workloads_command(args: argparse.Namespace) -> int:
    for name, workload in sorted(WORKLOADS.items()):
        print(f"{name:12} {workload.description}")
    return 0
