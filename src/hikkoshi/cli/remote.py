"""The command line against an agent (``--agent URL`` or ``HIKKOSHI_AGENT``): the same commands as on
a host, carried out by the agent. Datastores are named (``--datastore NAME``), not paths; migrations
run in the agent and this command follows them (interrupting it does not stop them).

Exit status: 0 done; 1 failed (for a migration: rolled back, or failed after its commit point); 2
refused or bad request; 3 the agent cannot be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hikkoshi.cli.params import parse_params
from hikkoshi.cli.progress import progress
from hikkoshi.cli.report import human_report
from hikkoshi.daemons.process import run
from hikkoshi.migrate.record import MigrationRecord

if TYPE_CHECKING:  # httpx loads only when a command goes to an agent
    from hikkoshi.agent.client import AgentClient

_MIB = 1 << 20


def wanted(args: argparse.Namespace) -> bool:
    """Whether this command goes to an agent."""
    return bool(getattr(args, "agent", None) or os.environ.get("HIKKOSHI_AGENT"))


def _prog(args: argparse.Namespace) -> str:
    words = [args.command] + [w for w in (getattr(args, "vm_command", None),) if w]
    return "hikkoshi " + " ".join(words)


def call(args: argparse.Namespace, body: Callable[[AgentClient], Awaitable[int]]) -> int:
    """Run ``body`` with a client of the agent; agent errors become one line and an exit status."""
    from hikkoshi.agent.client import AgentClient, AgentError

    async def main() -> int:
        client = AgentClient.from_env(args.agent, args.token_file, args.ca_file)
        async with client:
            return await body(client)

    try:
        return run(main())
    except AgentError as exc:
        print(f"{_prog(args)}: {exc.detail}", file=sys.stderr)
        return 3 if exc.status == 0 else 2 if 400 <= exc.status < 500 and exc.status != 424 else 1
    except KeyboardInterrupt:
        return 130


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# --- VMs ------------------------------------------------------------------------------------------------


def _vm_line(vm: dict[str, Any]) -> str:
    disks = ", ".join(f"{d['name']} {d['size'] / _MIB:.0f}M" for d in vm.get("disks", [])) or "-"
    pid = f"  QEMU pid {vm['qemu_pid']}" if vm.get("qemu_pid") else ""
    memory = f"{vm.get('memory_mib') or '?':>6} MiB"
    return f"{vm['name']:20} {vm['state']:10} {memory}  {vm['datastore']:10} {disks}{pid}"


def vm_create(args: argparse.Namespace) -> int:
    if getattr(args, "host", None) is not None and not getattr(args, "routed", False):
        print("hikkoshi vm create: --host needs a cluster (--etcd URL), not --agent", file=sys.stderr)
        return 2
    if args.no_nic and (args.nic or args.mac):
        print("hikkoshi vm create: --no-nic contradicts --nic and --mac", file=sys.stderr)
        return 2
    body: dict[str, Any] = {
        "name": args.name,
        "memory_mib": args.memory,
        "cpus": args.cpus,
        "disks": args.disk,
        "nics": ["none"] if args.no_nic else (args.nic or ["user"]),
        "macs": args.mac,
        "accel": args.accel,
        "params": parse_params(args.param),
    }
    if args.datastore is not None:
        body["datastore"] = str(args.datastore)
    for key in ("image", "kernel", "initrd"):
        if getattr(args, key) is not None:
            body[key] = str(getattr(args, key).expanduser().absolute())
    if args.append is not None:
        body["append"] = args.append
    if args.guest:
        body["guest"] = args.guest

    async def go(client: AgentClient) -> int:
        vm = await client.post("/v1/vms", body, limit=900)
        print(f"created VM {vm['name']!r} (uuid {vm['uuid']}) in datastore {vm['datastore']}")
        return 0

    return call(args, go)


def vm_simple(args: argparse.Namespace) -> int:
    """start, stop, status/show."""

    async def go(client: AgentClient) -> int:
        name = args.name
        if args.vm_command == "start":
            vm = await client.post(f"/v1/vms/{name}/start", limit=900)
        elif args.vm_command == "stop":
            body = {"hard": args.hard, "force": args.force, "timeout": args.timeout}
            vm = await client.post(f"/v1/vms/{name}/stop", body, limit=args.timeout + 120)
        else:
            vm = await client.get(f"/v1/vms/{name}")
        if getattr(args, "json", False):
            _print_json(vm)
        else:
            print(_vm_line(vm))
            if vm.get("error"):
                print(f"  problem: {vm['error']}")
        return 0

    return call(args, go)


def vm_list(args: argparse.Namespace) -> int:
    async def go(client: AgentClient) -> int:
        vms = await client.get("/v1/vms")
        if args.json:
            _print_json(vms)
        else:
            for vm in vms:
                print(_vm_line(vm))
        return 0

    return call(args, go)


def vm_console(args: argparse.Namespace) -> int:
    async def go(client: AgentClient) -> int:
        offset = 0
        out = sys.stdout.buffer
        while True:
            response = await client.request("GET", f"/v1/vms/{args.name}/console", params={"offset": offset})
            if response.content:
                out.write(response.content)
                out.flush()
                offset += len(response.content)
                continue
            if not args.follow or response.headers.get("x-vm-running") != "1":
                return 0
            await asyncio.sleep(0.3)

    return call(args, go)


def vm_destroy(args: argparse.Namespace) -> int:
    if not args.yes:
        print(f"{_prog(args)}: this deletes the VM's disks; add --yes if you mean it", file=sys.stderr)
        return 2

    async def go(client: AgentClient) -> int:
        await client.delete(f"/v1/vms/{args.name}")
        print(f"{'deleted' if args.vm_command == 'delete' else 'destroyed'} VM {args.name!r}")
        return 0

    return call(args, go)


def guest_build(args: argparse.Namespace) -> int:
    async def go(client: AgentClient) -> int:
        guest = await client.post("/v1/guest/build", limit=1800)
        if args.json:
            _print_json(guest)
        else:
            print(f"kernel {guest['kernel']}\ninitrd {guest['initrd']}")
        return 0

    return call(args, go)


# --- migrations -----------------------------------------------------------------------------------------


def migrate(args: argparse.Namespace) -> int:
    if not args.to:
        print("hikkoshi migrate: with an agent, say where to: --to URL", file=sys.stderr)
        return 2
    body: dict[str, Any] = {
        "to": args.to,
        "storage": args.storage,
        "mode": "offline" if args.offline else "quick" if args.quick else "live",
        "max_downtime_ms": args.max_downtime,
        "auto_converge": not args.no_auto_converge,
        "allow_postcopy": args.allow_postcopy,
    }
    if args.datastore is not None:
        body["datastore"] = str(args.datastore)
    if getattr(args, "no_wait", False):
        body["no_wait"] = True
    for key in ("bandwidth", "disk_bandwidth"):
        if getattr(args, key):
            body[key] = getattr(args, key)

    async def go(client: AgentClient) -> int:
        accepted = await client.post(f"/v1/vms/{args.name}/migrate", body)
        return await follow(client, accepted["id"], args.json, "migrate")

    return call(args, go)


def storage_migrate(args: argparse.Namespace) -> int:
    if args.datastore is None:
        print("hikkoshi storage-migrate: which datastore? --datastore NAME", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"datastore": str(args.datastore), "mode": args.mode, "thick": args.thick}
    if args.bandwidth:
        body["bandwidth"] = args.bandwidth

    async def go(client: AgentClient) -> int:
        accepted = await client.post(f"/v1/vms/{args.name}/storage-migrate", body)
        return await follow(client, accepted["id"], args.json, "storage-migrate")

    return call(args, go)


def outcome(info: dict[str, Any]) -> int:
    """A finished migration's exit status."""
    if info["phase"] == "done":
        return 0
    return 2 if str(info.get("error") or "").startswith("refused") else 1


async def follow(client: AgentClient, migration_id: str, as_json: bool, title: str) -> int:
    """Show a migration's progress until it ends (as ``title``); then its report."""
    path = f"/v1/migrations/{migration_id}"
    if as_json:
        info = await client.get(path)
        while info["running"]:  # polled: the job runs in another process
            await asyncio.sleep(0.25)
            info = await client.get(path)
        _print_json(info)
        return outcome(info)
    with progress(title) as report:
        while True:
            info = await client.get(path)
            p = info.get("progress") or {}
            phase = info["phase"]
            if p.get("phase") == "queued":
                report.update(queued(p))
            elif "memory_done" in p and phase in ("memory-precopy", "switchover"):
                dirty = (p.get("dirty_pages_rate") or 0) * 4096 / _MIB
                total = p["memory_done"] + p.get("memory_remaining", 0)
                detail = f"memory, iteration {p.get('iteration', 0)} · dirty {dirty:.1f} MiB/s"
                report.update(phase, p["memory_done"], total, detail=detail)
            elif p.get("disk_total"):
                done, total = p["disk_done"], p["disk_total"]
                report.update(phase, done, total, detail=f"disks · {100 * done / total:.1f} % local")
            else:
                report.update(phase)
            if not info["running"]:
                break
            await asyncio.sleep(0.25)
    print(report_text(info))
    return outcome(info)


def queued(progress: dict[str, Any]) -> str:
    """A migration waiting for slots, as its progress says: ``queued (place 2: host-out:a: ...)``."""
    reasons = "; ".join(str(r) for r in progress.get("reasons") or ())
    place = progress.get("place", "?")
    return f"queued (place {place}: {reasons})" if reasons else f"queued (place {place})"


def report_text(info: dict[str, Any]) -> str:
    """A migration's report for people, from an agent's answer."""
    return human_report(MigrationRecord.model_validate(info["record"]))


def migrations(args: argparse.Namespace) -> int:
    async def go(client: AgentClient) -> int:
        if args.action == "recover":
            print(
                "hikkoshi migrations: an agent recovers its migrations itself when it starts", file=sys.stderr
            )
            return 2
        if args.action == "show":
            if not args.id:
                print("hikkoshi migrations show: which ID?", file=sys.stderr)
                return 2
            info = await client.get(f"/v1/migrations/{args.id}")
            if args.json:
                _print_json(info)
            else:
                print(report_text(info))
            return 0
        rows = await client.get("/v1/migrations")
        if args.json:
            _print_json(rows)
            return 0
        for r in rows:
            down = (r.get("report") or {}).get("downtime_ms")
            print(
                f"{r['id']}  {r['vm']:<16} {r['kind']:<8} {r['storage']:<9} {r['phase']:<12} "
                f"downtime {down if down is not None else '-'} ms  {r.get('error') or ''}"
            )
        return 0

    return call(args, go)
