"""`hikkoshi --etcd URL rule add|list|delete`: DRS placement rules, kept in etcd.

``rule add NAME --anti-affinity VM1,VM2`` (never on one host), ``--affinity VM1,VM2`` (on one host),
``--vm-host VM[,VM...] --hosts H1,H2 --must|--should [--not]`` (on those hosts, or with ``--not`` off
them). VM-VM rules are ``must`` unless ``--should`` says otherwise. Placement, ``drs plan|apply``,
maintenance and the automatic planner keep them; a broken ``must`` rule is a mandatory move.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.hosts import needs_etcd

if TYPE_CHECKING:
    from hikkoshi.cluster.models import RuleRecord
    from hikkoshi.cluster.store import Store


def add_parser(top: Any) -> None:
    group = top.add_parser(
        "rule", help="DRS placement rules: affinity, anti-affinity, VM-host (needs --etcd)"
    )
    sub = group.add_subparsers(dest="rule_command", required=True)
    p = sub.add_parser("add", help="add a rule")
    p.add_argument("name", metavar="NAME")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--anti-affinity", metavar="VM1,VM2", help="these VMs never share a host")
    kind.add_argument("--affinity", metavar="VM1,VM2", help="these VMs run on one host")
    kind.add_argument("--vm-host", metavar="VM[,VM]", help="these VMs run on the hosts of --hosts")
    p.add_argument("--hosts", metavar="H1,H2", help="the host group of --vm-host")
    p.add_argument("--not", dest="negate", action="store_true", help="--vm-host: keep off those hosts")
    strength = p.add_mutually_exclusive_group()
    strength.add_argument("--must", action="store_true", help="never broken (the default)")
    strength.add_argument("--should", action="store_true", help="kept unless nothing else fits")
    p.set_defaults(func=needs_etcd, via_cluster=add_command)
    p = sub.add_parser("list", help="the rules, and whether each is kept now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=needs_etcd, via_cluster=list_command)
    p = sub.add_parser("delete", help="remove a rule")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=needs_etcd, via_cluster=delete_command)


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def rule_from(args: argparse.Namespace) -> RuleRecord:
    """The rule ``rule add`` describes; ``ValueError`` for a bad one."""
    from hikkoshi.cluster.keys import segment
    from hikkoshi.cluster.models import RuleRecord

    segment(args.name, "rule name")
    strength = "should" if args.should else "must"
    if args.vm_host is not None:
        if not args.hosts:
            raise ValueError("--vm-host needs --hosts H1,H2")
        kind = "not-run-on" if args.negate else "run-on"
        return RuleRecord(
            name=args.name, kind=kind, vms=_names(args.vm_host), hosts=_names(args.hosts), strength=strength
        )
    if args.hosts or args.negate:
        raise ValueError("--hosts and --not go with --vm-host")
    kind, vms = ("anti-affinity", args.anti_affinity) if args.anti_affinity else ("affinity", args.affinity)
    names = _names(vms)
    if len(names) < 2:
        raise ValueError(f"--{kind} names at least two VMs")
    return RuleRecord(name=args.name, kind=kind, vms=names, strength=strength)


def add_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import CommandError, with_store
    from hikkoshi.cluster.drs_records import DrsRecords
    from hikkoshi.cluster.hosts import list_hosts
    from hikkoshi.cluster.ownership import Ownership

    try:
        rule = rule_from(args)
    except ValueError as e:
        print(f"hikkoshi rule add: {e}", file=sys.stderr)
        return 2

    async def go(store: Store) -> int:
        names = {v.vm.name for v in await Ownership(store).list_vms()}
        hosts = {h.info.name for h in await list_hosts(store)}
        unknown = [n for n in rule.vms if n not in names]
        if unknown:
            raise CommandError(f"no VM named {', '.join(unknown)} in the cluster (see: hikkoshi vm list)")
        unknown = [h for h in rule.hosts if h not in hosts]
        if unknown:
            raise CommandError(f"no host named {', '.join(unknown)} in the cluster (see: hikkoshi host list)")
        if not await DrsRecords(store).add_rule(rule):
            raise CommandError(f"a rule named {rule.name!r} exists already (rule delete {rule.name} first)")
        print(f"rule {rule.name!r} added: {rule.strength} {rule.kind} of {', '.join(rule.vms)}", end="")
        print(f" on {', '.join(rule.hosts)}" if rule.hosts else "")
        return 0

    return with_store(args, go)


def list_command(args: argparse.Namespace) -> int:
    from hikkoshi.agent.drs_read import read_state
    from hikkoshi.cli.cluster_session import print_json, with_store
    from hikkoshi.cli.drs_tables import rule_lines
    from hikkoshi.cluster.drs_records import DrsRecords
    from hikkoshi.drs.rules import broken

    async def go(store: Store) -> int:
        rules = await DrsRecords(store).rules()
        state = await read_state(store)
        host_of = {v.name: v.host for v in state.snapshot.vms}
        problems = {r.name: broken(r, host_of) for r in state.snapshot.rules}
        if args.json:
            rows = [{**r.model_dump(mode="json"), "broken": problems.get(r.name, [])} for r in rules]
            print_json(rows)
            return 0
        print("\n".join(rule_lines(rules)))
        for _name, why in sorted(problems.items()):
            for w in why:
                print(f"broken: {w}")
        return 0

    return with_store(args, go)


def delete_command(args: argparse.Namespace) -> int:
    from hikkoshi.cli.cluster_session import CommandError, with_store
    from hikkoshi.cluster.drs_records import DrsRecords

    async def go(store: Store) -> int:
        if not await DrsRecords(store).delete_rule(args.name):
            raise CommandError(f"no rule named {args.name!r} (see: hikkoshi rule list)")
        print(f"rule {args.name!r} deleted")
        return 0

    return with_store(args, go)
