"""`hikkoshi --etcd URL vm ...`: the cluster's VMs. ``vm list`` reads etcd; ``vm create --host HOST``
goes to that host's agent; every other VM command goes to the agent of the host that owns the VM.

Without ``--host``, ``vm create`` asks :data:`placement` for a host: none exists yet (it comes with
the DRS planner), so for now the command says so and stops.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from uuid import uuid4

from hikkoshi.cli import remote
from hikkoshi.cli.cluster_route import host_named, owner_of, through_agent
from hikkoshi.cli.cluster_session import CommandError, print_json, with_store
from hikkoshi.cli.cluster_tables import vm_table
from hikkoshi.cluster.host_view import HostView
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.models import VmRecord
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.cluster.views import vm_rows
from hikkoshi.vm.spec import parse_size

Placement = Callable[[Sequence[HostView], VmRecord], HostView | None]
"""Picks the host for a new VM among the cluster's hosts (None: none fits), e.g.
:func:`hikkoshi.cluster.placement.least_loaded`."""

placement: Placement | None = None
"""How ``vm create`` without ``--host`` chooses (None until placement exists: see the DRS issue)."""


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


def wanted_vm(args: argparse.Namespace) -> VmRecord:
    """What placement needs to know of the VM ``vm create`` describes."""
    disks = sum(parse_size(d.partition(":")[0]) for d in args.disk)
    return VmRecord(
        uuid=uuid4().hex, name=args.name, memory=args.memory << 20, vcpus=args.cpus, disk_bytes=disks
    )


async def chosen_host(store: Store, args: argparse.Namespace) -> HostView:
    """The host ``vm create`` goes to: ``--host``, else the placement's choice."""
    if args.host is not None:
        return await host_named(store, args.host)
    if placement is None:
        raise CommandError(
            "say where: --host HOST (see: hikkoshi host list); "
            "choosing a host by itself comes with placement (the DRS issue)"
        )
    view = placement(await list_hosts(store), wanted_vm(args))
    if view is None:
        raise CommandError(f"no host can take VM {args.name!r} (memory, disk space, state)")
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
