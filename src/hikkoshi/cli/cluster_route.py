"""Which agent a cluster command goes to: the owner of a VM, or a host named on the command line.

etcd is asked first (the VM's owner key, the host's registration), so that an unknown VM or host and
a host that is down are told apart clearly before any agent is; then the command runs as it does with
``--agent`` (:mod:`hikkoshi.cli.remote`), against the API address that host registered, with the
usual token (``--token-file``/``$HIKKOSHI_TOKEN_FILE``) and ``--ca-file``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from hikkoshi.cli.cluster_session import UNREACHABLE, CommandError, guarded, open_store
from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store


async def host_named(store: Store, name: str, *, role: str = "host") -> HostView:
    """The host called ``name``: :class:`CommandError` 2 if there is none, 3 if it is down."""
    for view in await list_hosts(store):
        if view.info.name == name:
            if view.state is HostState.DOWN:
                raise CommandError(f"{role} {name!r} is down (it stopped renewing its lease)", UNREACHABLE)
            return view
    raise CommandError(f"no host named {name!r} in the cluster (see: hikkoshi host list)")


async def owner_of(store: Store, vm: str) -> HostView:
    """The host that owns VM ``vm``: :class:`CommandError` 2 for an unknown VM, 3 if its host is down."""
    own = Ownership(store)
    uuid = await own.uuid_of(vm)
    if uuid is None:
        raise CommandError(f"no VM named {vm!r} in the cluster (see: hikkoshi vm list)")
    claim = await own.owner(uuid)
    if claim is None:
        raise CommandError(f"VM {vm!r} has no owner in the cluster (being created or removed?)")
    for view in await list_hosts(store):
        if view.info.name == claim.host:
            if view.state is HostState.DOWN:
                raise CommandError(
                    f"VM {vm!r} is on host {claim.host!r}, which is down (it stopped renewing its lease)",
                    UNREACHABLE,
                )
            return view
    raise CommandError(f"VM {vm!r} is owned by host {claim.host!r}, which is not registered", UNREACHABLE)


def through_agent(
    args: argparse.Namespace,
    find: Callable[[Store], Awaitable[HostView]],
    command: Callable[[argparse.Namespace], int],
) -> int:
    """Find the host with ``find(store)``, then run ``command`` against its agent as ``--agent`` would."""

    async def locate() -> int:
        store = await open_store(args)
        try:
            view = await find(store)
        finally:
            await store.close()
        args.agent = view.info.api_address
        args.etcd = None  # from here on, the command is the agent's
        args.routed = True
        return 0

    code = guarded(args, locate)
    if code != 0:
        return code
    return command(args)
