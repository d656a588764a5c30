"""`hikkoshi datastore` and `hikkoshi host`: where VMs live, and what this host offers them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hikkoshi.vm.accel import choose_accel
from hikkoshi.vm.datastore import Datastore
from hikkoshi.vm.errors import VmError
from hikkoshi.vm.host import host_facts
from hikkoshi.vm.spec import format_size


def add_parser(top: Any) -> Any:
    """``datastore`` and ``host``; the ``host`` group's subparsers (the cluster adds its commands)."""
    group = top.add_parser("datastore", help="datastores: directories holding VMs").add_subparsers(
        dest="datastore_command", required=True
    )
    p = group.add_parser("init", help="make a new or empty directory a datastore")
    p.add_argument("path", type=Path)
    p.add_argument("--name", help="the datastore's name (default: the directory's)")
    p.set_defaults(func=init_command)
    p = group.add_parser("info", help="capacity, free space and VMs of a datastore")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=info_command)

    hosts = top.add_parser("host", help="this host's facts; the cluster's hosts").add_subparsers(
        dest="host_command", required=True
    )
    p = hosts.add_parser("info", help="memory, CPU, KVM, bridges (and datastore space)")
    p.add_argument("--datastore", type=Path, action="append", default=[], metavar="PATH")
    p.add_argument("--accel", action="store_true", help="also find out whether KVM really runs guests")
    p.set_defaults(func=host_command)
    return hosts


def init_command(args: argparse.Namespace) -> int:
    try:
        store = Datastore.init(args.path, args.name)
    except VmError as exc:
        print(f"hikkoshi datastore init: {exc}", file=sys.stderr)
        return 1
    print(f"datastore {store.name!r} at {store.path} (uuid {store.uuid})")
    return 0


def datastore_report(store: Datastore) -> dict[str, Any]:
    """Capacity and VMs of a datastore, JSON-friendly."""
    cap = store.capacity()
    return {
        "path": str(store.path),
        "name": store.name,
        "uuid": str(store.uuid),
        **asdict(cap),
        "vms": [e.name for e in store.entries()],
    }


def info_command(args: argparse.Namespace) -> int:
    try:
        store = Datastore.open(args.path)
        report = datastore_report(store)
    except VmError as exc:
        print(f"hikkoshi datastore info: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"datastore   {report['name']} ({report['path']})")
    print(f"capacity    {format_size(report['total'])}")
    print(f"free        {format_size(report['free'])}")
    print(f"provisioned {format_size(report['provisioned'])} (VM disks at full size)")
    print(f"allocated   {format_size(report['allocated'])} (VM disks now)")
    print(f"VMs         {', '.join(report['vms']) or '(none)'}")
    return 0


def host_command(args: argparse.Namespace) -> int:
    facts = host_facts().as_dict()
    try:
        if args.accel:
            facts["accel"] = choose_accel("auto")
        facts["datastores"] = [datastore_report(Datastore.open(p)) for p in args.datastore]
    except (VmError, ValueError, RuntimeError) as exc:
        print(f"hikkoshi host info: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(facts, indent=2))
    return 0
