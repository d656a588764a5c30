"""`hikkoshi --etcd URL schedule add|list|cancel`: migrations at a time or in a recurring window,
kept in etcd.

``schedule add VM --to HOST --at TIME`` (TIME: ``+30s``, ``+5m``, a Unix time or ISO 8601, UTC unless
it says otherwise), or ``--window HH:MM-HH:MM [--days mon,fri|weekdays|weekends] [--tz ZONE]`` (the
wall clock of ZONE, UTC by default): each time the window opens (a VM on that host already has
nothing to do). The agent that owns the VM when the time comes starts it, once (a transaction claims
each run, so several agents never both do); ``schedule list`` shows each with what became of it;
``schedule cancel ID`` cancels one that has not started (or a recurring one).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.hosts import needs_etcd

if TYPE_CHECKING:
    from hikkoshi.cluster.store import Store


def add_parser(top: Any) -> None:
    group = top.add_parser("schedule", help="scheduled migrations (needs --etcd)")
    sub = group.add_subparsers(dest="schedule_command", required=True)
    p = sub.add_parser("add", help="migrate a VM to a host at a time")
    p.add_argument("name", metavar="VM")
    p.add_argument("--to", required=True, metavar="HOST")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="once: +30s, +5m, +2h, a Unix time or ISO 8601")
    when.add_argument("--window", metavar="HH:MM-HH:MM", help="each time this window opens (in --tz)")
    p.add_argument(
        "--days", default="all", metavar="DAYS", help="--window's days: mon,tue,..., weekdays, weekends"
    )
    p.add_argument("--tz", default="UTC", metavar="ZONE", help="--window's time zone: UTC, Asia/Tokyo, ...")
    p.add_argument("--storage", choices=("shared", "precopy", "postcopy", "hybrid"), default="hybrid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=add_command)
    p = sub.add_parser("list", help="scheduled migrations and what became of them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=list_command)
    p = sub.add_parser("cancel", help="cancel a scheduled migration that has not started")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=needs_etcd, via_cluster=cancel_command)


def add_command(args: argparse.Namespace) -> int:
    from hikkoshi.agent.drs_due import parse_days, parse_window, parse_zone
    from hikkoshi.cli.cluster_route import host_named, owner_of
    from hikkoshi.cli.cluster_session import CommandError, print_json, with_store
    from hikkoshi.cli.drs_tables import parse_time, when
    from hikkoshi.cluster.drs_records import DrsRecords

    try:
        at = parse_time(args.at, time.time()) if args.at is not None else time.time()
        days = parse_days(args.days)
        if args.window is not None:
            parse_window(args.window)
        parse_zone(args.tz)
    except ValueError as e:
        print(f"hikkoshi schedule add: {e}", file=sys.stderr)
        return 2

    async def go(store: Store) -> int:
        source = await owner_of(store, args.name)
        await host_named(store, args.to, role="destination host")
        if source.info.name == args.to:
            raise CommandError(f"VM {args.name!r} is on host {args.to!r} already")
        rec = await DrsRecords(store).add_schedule(
            args.name, args.to, at, args.storage, window=args.window, days=days, tz=args.tz
        )
        if args.json:
            print_json(rec.model_dump(mode="json"))
        elif rec.window is not None:
            opens = f"each time {rec.window} {rec.tz} opens"
            print(f"scheduled {rec.id}: VM {args.name!r} to {args.to!r} {opens}")
        else:
            print(f"scheduled {rec.id}: VM {args.name!r} to {args.to!r} at {when(at)}")
        return 0

    return with_store(args, go)


def list_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.drs_tables import schedule_lines
    from hikkoshi.cluster.drs_records import DrsRecords

    async def go(store: Store) -> int:
        rows = await DrsRecords(store).schedules()
        if args.json:
            print_json([r.model_dump(mode="json") for r in rows])
        else:
            print("\n".join(schedule_lines(rows)))
        return 0

    return with_store(args, go)


def cancel_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import CommandError, with_store
    from hikkoshi.cluster.drs_records import DrsRecords

    async def go(store: Store) -> int:
        got = await DrsRecords(store).cancel_schedule(args.id)
        if isinstance(got, str):
            raise CommandError(got)
        print(f"schedule {got.id} cancelled")
        return 0

    return with_store(args, go)
