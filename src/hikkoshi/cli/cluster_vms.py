"""`hikkoshi --etcd URL vm ...`: the cluster's VMs. ``vm list`` reads etcd; ``vm create --host HOST``
goes to that host's agent; every other VM command goes to the agent of the host that owns the VM.

Without ``--host``, ``vm create`` asks DRS's placement (:func:`hikkoshi.drs.placement.place`) for the
host: up, not in maintenance, with the memory, CPU and datastore room, keeping the rules, least loaded
once the VM runs there; it says which host and why.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from hikkoshi.cli import remote
from hikkoshi.cli.cluster_route import host_named, owner_of, through_agent
from hikkoshi.cli.cluster_session import CommandError, print_json, with_store
from hikkoshi.cli.cluster_tables import vm_table
from hikkoshi.cluster.host_view import HostView
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.cluster.views import vm_rows
from hikkoshi.drs.placement import NewDisk, NewVm
from hikkoshi.vm.spec import parse_size


def list_command(args: argparse.Namespace) -> int:
    """``vm list``: every VM of the cluster, its host and state."""

    async def go(store: Store) -> int:
        vms = await Ownership(store).list_vms()
        rows = vm_rows(vms, await list_hosts(store))
        if args.json:
            print_json([dataclasses.asdict(r) for r in rows])
        else:
            print("\n".join(vm_table(rows)))
        return 0

    return with_store(args, go)


def wanted_vm(args: argparse.Namespace) -> NewVm:
    """What placement needs to know of the VM ``vm create`` describes."""
    disks = tuple(NewDisk(f"disk{i}", parse_size(d.partition(":")[0]), 0) for i, d in enumerate(args.disk))
    return NewVm(name=args.name, memory=args.memory << 20, cpus=args.cpus, disks=disks)


async def chosen_host(store: Store, args: argparse.Namespace) -> HostView:
    """The host ``vm create`` goes to: ``--host``, else DRS placement's choice (said, with why)."""
    from hikkoshi.agent.drs_read import read_state
    from hikkoshi.drs.placement import place

    if args.host is not None:
        return await host_named(store, args.host)
    state = await read_state(store)
    got = place(state.snapshot, wanted_vm(args), state.policy())
    view = state.host(got.host) if got.host is not None else None
    if view is None:
        raise CommandError(f"no host can take VM {args.name!r}: {got.reason}")
    if not getattr(args, "json", False):
        print(f"placed on {got.host}: {got.reason}", flush=True)
    return view


def create_command(args: argparse.Namespace) -> int:
    """``vm create NAME --host HOST ...``: created by that host's agent, owned by that host."""
    return through_agent(args, lambda store: chosen_host(store, args), remote.vm_create)


def routed(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` (as with ``--agent``) sent to the agent of the host that owns VM ``args.name``."""

    def go(args: argparse.Namespace) -> int:
        return through_agent(args, lambda store: owner_of(store, args.name), command)

    return go


ROUTED: dict[str, Callable[[argparse.Namespace], int]] = {
    "start": remote.vm_simple,
    "stop": remote.vm_simple,
    "show": remote.vm_simple,
    "status": remote.vm_simple,
    "console": remote.vm_console,
    "destroy": remote.vm_destroy,
    "delete": remote.vm_destroy,
}
"""The VM commands that go to the owner's agent, and what they do there."""


def dispatch(args: argparse.Namespace) -> int:
    """``vm COMMAND`` in a cluster."""
    if args.vm_command == "list":
        return list_command(args)
    if args.vm_command == "create":
        return create_command(args)
    return routed(ROUTED[args.vm_command])(args)
