"""`hikkoshi --etcd URL limits set KEY=N ...` and `limits show`: how many migrations may run at once.

Keys: ``host-out``, ``host-in``, ``datastore``, ``link``, ``cluster`` (every resource of that kind),
or one resource (``host-out:HOST``, ``host-in:HOST``, ``datastore:NAME|UUID``, ``link:SITE~SITE``);
``N`` at least 1, or ``default``. A lower limit stops nobody: the migrations holding slots finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.hosts import needs_etcd

if TYPE_CHECKING:
    from hikkoshi.cluster.models import Limits
    from hikkoshi.cluster.store import Store


def add_parser(top: Any) -> None:
    group = top.add_parser("limits", help="concurrency limits of the cluster's migrations (needs --etcd)")
    sub = group.add_subparsers(dest="limits_command", required=True)
    p = sub.add_parser("set", help="change limits: host-out=N host-in=N datastore=N link=N cluster=N ...")
    p.add_argument(
        "settings",
        nargs="+",
        metavar="KEY=N",
        help="KEY: host-out, host-in, datastore, link, cluster, or one resource (host-out:HOST, "
        "host-in:HOST, datastore:NAME, link:SITE~SITE); N: at least 1, or 'default'",
    )
    p.set_defaults(func=needs_etcd, via_cluster=set_command)
    p = sub.add_parser("show", help="the limits, who holds slots of what, and the queue")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=show_command)


def set_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import with_store
    from hikkoshi.cluster.hosts import list_hosts
    from hikkoshi.cluster.limit_settings import apply_settings, datastore_uuids
    from hikkoshi.cluster.limits import Slots
    from hikkoshi.cluster.models import Limits

    try:
        apply_settings(Limits(), args.settings)  # bad input is refused before etcd is asked anything
    except ValueError as e:
        print(f"hikkoshi limits set: {e}", file=sys.stderr)
        return 2

    async def go(store: Store) -> int:
        slots = Slots(store)
        hosts = await list_hosts(store)
        names = datastore_uuids((d.name, d.uuid) for h in hosts for d in h.info.datastores)
        limits = apply_settings(await slots.limits(), args.settings, names)
        await slots.set_limits(limits)
        _print_limits(limits)
        return 0

    return with_store(args, go)


def _print_limits(limits: Limits) -> None:
    from hikkoshi.cluster.limit_settings import kind_limits

    print("limits     " + ", ".join(f"{k} {n}" for k, n in kind_limits(limits).items()))
    if limits.overrides:
        print("overrides  " + ", ".join(f"{r} {n}" for r, n in sorted(limits.overrides.items())))


def show_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.cluster_tables import queue_table, resource_table
    from hikkoshi.cluster.jobs import Jobs
    from hikkoshi.cluster.limit_settings import kind_limits, resource_rows
    from hikkoshi.cluster.limits import Slots
    from hikkoshi.cluster.ownership import Ownership
    from hikkoshi.cluster.views import queue_rows, vm_names

    async def go(store: Store) -> int:
        slots = Slots(store)
        table, _rev = await slots.table()
        places = await slots.queue()
        jobs = await Jobs(store).list()
        names = vm_names(await Ownership(store).list_vms())
        resources = resource_rows(table)
        queue = queue_rows(places, jobs, names, time.time())
        if args.json:
            print_json(
                {
                    "limits": kind_limits(table.limits),
                    "overrides": dict(table.limits.overrides),
                    "resources": [dataclasses.asdict(r) for r in resources],
                    "queue": [dataclasses.asdict(q) for q in queue],
                }
            )
            return 0
        _print_limits(table.limits)
        if resources:
            print()
            print("\n".join(resource_table(resources)))
        print()
        print("\n".join(queue_table(queue)) if queue else "queue      empty")
        return 0

    return with_store(args, go)
