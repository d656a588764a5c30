"""`hikkoshi --etcd URL drs plan|apply|auto|history`: DRS recommendations, carried out through the
cluster's migration jobs (and their limits), the automatic planner's switch and what it did.

``drs plan [--level N] [--json]`` shows what the planner recommends now and why (nothing moves);
``drs apply`` plans the same way and carries the moves out, showing each as it goes; ``drs auto on|off``
turns the automatic planner on or off (``--interval S``, ``--level N``): an agent elected through an
etcd lease plans and applies every ``S`` seconds; ``drs history`` shows its recent runs (the imbalance
each saw, its moves and the schedule each was handed to, or why it did nothing). Exit status: 0 done
(or nothing to do), 1 a move failed, 2 refused, 3 etcd unreachable.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.hosts import needs_etcd

if TYPE_CHECKING:
    from hikkoshi.agent.drs_read import ClusterState
    from hikkoshi.cluster.store import Store


def add_parser(top: Any) -> None:
    group = top.add_parser("drs", help="DRS: recommendations, applying them, automatic mode (needs --etcd)")
    sub = group.add_subparsers(dest="drs_command", required=True)
    p = sub.add_parser("plan", help="what DRS recommends now, and why (nothing moves)")
    p.add_argument(
        "--level", type=int, choices=range(1, 6), help="threshold level 1-5 (default: the cluster's)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=plan_command)
    p = sub.add_parser("apply", help="plan, then carry the moves out (through migration jobs and limits)")
    p.add_argument(
        "--level", type=int, choices=range(1, 6), help="threshold level 1-5 (default: the cluster's)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=apply_command)
    p = sub.add_parser("history", help="what the automatic planner's recent runs saw and handed on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=history_command)
    p = sub.add_parser("auto", help="turn the automatic planner on or off (no argument: show it)")
    p.add_argument("switch", nargs="?", choices=("on", "off"))
    p.add_argument("--interval", type=float, metavar="S", help="seconds between runs (default 300)")
    p.add_argument("--level", type=int, choices=range(1, 6), help="threshold level 1-5 (default 3)")
    p.add_argument("--max-moves", type=int, metavar="N", help="moves per run (default 8)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=auto_command)


async def plan_of(store: Store, level: int | None) -> tuple[ClusterState, Any]:
    from hikkoshi.agent.drs_read import read_state
    from hikkoshi.drs.planner import plan

    state = await read_state(store)
    return state, plan(state.snapshot, state.policy(level))


def plan_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.drs_tables import plan_lines

    async def go(store: Store) -> int:
        _, p = await plan_of(store, args.level)
        if args.json:
            print_json(p.to_json())
        else:
            print("\n".join(plan_lines(p)))
        return 0

    return with_store(args, go)


def apply_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.drs_carry import carry_out
    from hikkoshi.cli.drs_tables import plan_lines

    async def go(store: Store) -> int:
        state, p = await plan_of(store, args.level)
        if not args.json:
            print("\n".join(plan_lines(p)), flush=True)
        carried = await carry_out(state, p.moves, args, quiet=args.json)
        failed = [c for c in carried if not c.ok]
        if args.json:
            print_json({**p.to_json(), "moves": [c.to_json() for c in carried]})
        elif carried:
            print(f"{len(carried) - len(failed)} of {len(carried)} move(s) done")
        return 1 if failed else 0

    return with_store(args, go)


def auto_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cluster.drs_records import DrsRecords

    async def go(store: Store) -> int:
        records = DrsRecords(store)
        settings = await records.settings()
        changes: dict[str, object] = {}
        if args.switch is not None:
            changes["auto"] = args.switch == "on"
        for key in ("interval", "level", "max_moves"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key)
        if changes:
            settings = settings.model_validate({**settings.model_dump(), **changes})
            await records.set_settings(settings)
        leader = await records.leader()
        if args.json:
            print_json({**settings.model_dump(mode="json"), "leader": leader})
            return 0
        state = "on" if settings.auto else "off"
        print(
            f"automatic DRS is {state}: level {settings.level}, every {settings.interval:g} s, "
            f"at most {settings.max_moves} moves a run; leader: {leader or 'none'}"
        )
        return 0

    if args.interval is not None and args.interval <= 0:
        print("hikkoshi drs auto: --interval must be positive", file=sys.stderr)
        return 2
    return with_store(args, go)


def history_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.drs_tables import history_lines
    from hikkoshi.cluster.drs_records import DrsRecords

    async def go(store: Store) -> int:
        runs = await DrsRecords(store).runs()
        if args.json:
            print_json([r.model_dump(mode="json") for r in runs])
        else:
            print("\n".join(history_lines(runs)))
        return 0

    return with_store(args, go)
