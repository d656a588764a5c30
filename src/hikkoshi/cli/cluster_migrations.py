"""`hikkoshi --etcd URL migrate VM --to HOST` and `migrations [show ID]` in a cluster.

A migration goes to the agent of the host that owns the VM, with the destination by name (that agent
resolves it through etcd, runs the migration as a cluster job, queues it while a limit is reached,
or refuses with ``--no-wait``); this command follows it as with ``--agent``. The destination is
checked in etcd first: a name no host has is refused here (exit 2), a host that is down too (exit 3).

``migrations`` lists what etcd records, cluster-wide (with the queue); ``migrations show ID`` adds the
coordinating (else the source) agent's full report when that host is up.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from hikkoshi.cli import remote
from hikkoshi.cli.cluster_route import host_named, owner_of, through_agent
from hikkoshi.cli.cluster_session import CommandError, print_json, with_store
from hikkoshi.cli.cluster_tables import age, migration_table, queue_table
from hikkoshi.cluster.errors import NoSuchJob
from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.jobs import Jobs, JobView
from hikkoshi.cluster.limits import Slots
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.cluster.views import migration_rows, queue_rows, vm_names


def dispatch(args: argparse.Namespace) -> int:
    """``migrate``, ``storage-migrate`` and ``migrations`` in a cluster."""
    if args.command == "migrate":
        return migrate_command(args)
    if args.command == "storage-migrate":
        return through_agent(args, lambda store: owner_of(store, args.name), remote.storage_migrate)
    return migrations_command(args)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


async def source_for(store: Store, args: argparse.Namespace) -> HostView:
    """The VM's owner, once the destination is known to be another host of the cluster, and up."""
    source = await owner_of(store, args.name)
    if not _is_url(args.to):
        await host_named(store, args.to, role="destination host")
        if args.to == source.info.name:
            raise CommandError(f"VM {args.name!r} is on host {args.to!r} already")
    return source


def migrate_command(args: argparse.Namespace) -> int:
    """``migrate VM --to HOST``: to the owner's agent, followed there."""
    if not args.to:
        print("hikkoshi migrate: say where to: --to HOST (see: hikkoshi host list)", file=sys.stderr)
        return 2
    if getattr(args, "dry_run", False):
        return with_store(args, lambda store: dry_run(store, args))
    return through_agent(args, lambda store: source_for(store, args), remote.migrate)


async def dry_run(store: Store, args: argparse.Namespace) -> int:
    """``migrate VM --to HOST --dry-run``: the prediction, from the cluster's figures; nothing moves."""
    from hikkoshi.agent.drs_read import read_state

    await source_for(store, args)
    state = await read_state(store)
    got = state.forecast(args.name, args.to, args.storage, max_downtime_ms=args.max_downtime)
    if isinstance(got, str):
        raise CommandError(got)
    if args.json:
        print_json(got.to_json())
        return 0
    p = got.predicted
    print(f"migrate {got.vm}: {got.source} -> {got.target} ({got.storage}), predicted:")
    print(f"  total time   {p.total_time_ms / 1000:.2f} s")
    print(f"  downtime     {p.downtime_ms:.0f} ms")
    mib = 2**20
    parts = f"{p.memory_bytes / mib:.1f} memory, {p.disk_bytes / mib:.1f} disk"
    print(f"  bytes        {p.bytes / mib:.1f} MiB ({parts})")
    print(f"  finish       {p.finish.value}, {p.rounds} memory pass(es)")
    print(f"  because      {p.explanation}")
    return 0


# --- the record ---------------------------------------------------------------------------------------


def migrations_command(args: argparse.Namespace) -> int:
    """``migrations``, ``migrations show ID``."""
    if args.action == "recover":
        print(
            "hikkoshi migrations recover: in a cluster, agents finish or roll back migrations themselves "
            "(one whose coordinator died is taken over)",
            file=sys.stderr,
        )
        return 2
    if args.action == "show":
        if not args.id:
            print("hikkoshi migrations show: which ID?", file=sys.stderr)
            return 2
        return with_store(args, lambda store: _show(store, args))
    return with_store(args, lambda store: _list(store, args))


async def _list(store: Store, args: argparse.Namespace) -> int:
    jobs = await Jobs(store).list()
    places = await Slots(store).queue()
    names = vm_names(await Ownership(store).list_vms())
    now = time.time()
    rows = migration_rows(jobs, names, now, queued=[p.entry.job for p in places])
    queue = queue_rows(places, jobs, names, now)
    if args.json:
        print_json(
            {
                "migrations": [dataclasses.asdict(r) for r in rows],
                "queue": [dataclasses.asdict(q) for q in queue],
            }
        )
        return 0
    print("\n".join(migration_table(rows)) if rows else "no migrations recorded")
    if queue:
        print()
        print("\n".join(queue_table(queue)))
    return 0


def _record_lines(view: JobView, name: str) -> list[str]:
    rec = view.record
    lines = [
        f"migration {rec.id}: VM {name} ({rec.vm}), {rec.source} -> {rec.destination}: {rec.phase.value}",
        f"  coordinator: {view.coordinator or 'none'}",
        f"  recorded {age(time.time() - rec.created_at)} ago; resources: {', '.join(rec.resources) or '-'}",
    ]
    if rec.history:
        t0 = rec.history[0][1]
        lines.append("  phases: " + ", ".join(f"{phase} +{at - t0:.1f}s" for phase, at in rec.history))
    if rec.error:
        lines.append(f"  error: {rec.error}")
    return lines


async def _agent_report(
    host: HostView | None, job_id: str, args: argparse.Namespace
) -> tuple[Any, str | None]:
    """The agent's account of the migration (its full record), or why there is none."""
    from hikkoshi.agent.client import AgentClient, AgentError

    if host is None:
        return None, "its host is not registered"
    if host.state is HostState.DOWN:
        return None, f"host {host.info.name!r} is down"
    try:
        async with AgentClient.from_env(host.info.api_address, args.token_file, args.ca_file) as client:
            return await client.get(f"/v1/migrations/{job_id}"), None
    except AgentError as e:
        return None, f"host {host.info.name!r}: {e.detail}"


async def _show(store: Store, args: argparse.Namespace) -> int:
    try:
        view = await Jobs(store).get(args.id)
    except NoSuchJob:
        raise CommandError(f"no migration {args.id!r} in the cluster (see: hikkoshi migrations)") from None
    rec = view.record
    vm = await Ownership(store).vm(rec.vm)
    name = vm.name if vm is not None else rec.vm
    hosts = {h.info.name: h for h in await list_hosts(store)}
    where = view.coordinator or rec.source
    info, problem = await _agent_report(hosts.get(where), rec.id, args)
    if args.json:
        cluster = {**rec.model_dump(mode="json"), "coordinator": view.coordinator, "vm_name": name}
        print_json({"cluster": cluster, "agent": info, "agent_problem": problem})
        return 0
    print("\n".join(_record_lines(view, name)))
    if info is not None and info.get("record"):
        print()
        print(remote.report_text(info))
    elif problem is not None:
        print(f"  (no report from the agent: {problem})")
    return 0
