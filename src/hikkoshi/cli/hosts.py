"""`hikkoshi --etcd URL host list|show|maintenance`: the cluster's hosts, read from etcd.

The etcd client loads only when one of these commands runs (building the parser stays quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hikkoshi.cluster.store import Store

NEEDS_ETCD = "needs a cluster: give --etcd URL or set HIKKOSHI_ETCD"


def add_subcommands(group: Any) -> None:
    """``list``, ``show`` and ``maintenance`` in the ``host`` group."""
    p = group.add_parser("list", help="the cluster's hosts: state, VMs, memory, load (needs --etcd)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=list_command)
    p = group.add_parser("show", help="one host of the cluster (needs --etcd)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=show_command)
    p = group.add_parser(
        "maintenance", help="put a host in maintenance (nothing is placed on it), or take it out (--off)"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reason", default="", help="why (shown by host show)")
    p.add_argument("--off", action="store_true", help="take the host out of maintenance")
    p.set_defaults(func=needs_etcd, via_cluster=maintenance_command)


def needs_etcd(args: argparse.Namespace) -> int:
    """What a cluster-only command does without a cluster."""
    words = " ".join(w for w in (args.command, getattr(args, "host_command", None)) if w)
    print(f"hikkoshi {words}: {NEEDS_ETCD}", file=sys.stderr)
    return 2


def list_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.cluster_tables import host_table
    from hikkoshi.cluster.hosts import list_hosts
    from hikkoshi.cluster.views import host_rows

    async def go(store: Store) -> int:
        rows = host_rows(await list_hosts(store))
        if args.json:
            print_json([dataclasses.asdict(r) for r in rows])
        else:
            print("\n".join(host_table(rows)))
        return 0

    return with_store(args, go)


def show_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import CommandError, print_json, with_store
    from hikkoshi.cli.cluster_tables import host_details
    from hikkoshi.cluster.hosts import list_hosts
    from hikkoshi.cluster.views import host_row

    async def go(store: Store) -> int:
        view = next((h for h in await list_hosts(store) if h.info.name == args.name), None)
        if view is None:
            raise CommandError(f"no host named {args.name!r} in the cluster (see: hikkoshi host list)")
        row = host_row(view)
        if args.json:
            print_json(dataclasses.asdict(row))
        else:
            print("\n".join(host_details(row)))
        return 0

    return with_store(args, go)


def maintenance_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import CommandError, with_store
    from hikkoshi.cluster.hosts import clear_maintenance, list_hosts, set_maintenance

    async def go(store: Store) -> int:
        if not any(h.info.name == args.name for h in await list_hosts(store)):
            raise CommandError(f"no host named {args.name!r} in the cluster (see: hikkoshi host list)")
        if args.off:
            await clear_maintenance(store, args.name)
            print(f"host {args.name!r} is out of maintenance")
        else:
            await set_maintenance(store, args.name, args.reason)
            print(f"host {args.name!r} is in maintenance")
        return 0

    return with_store(args, go)
