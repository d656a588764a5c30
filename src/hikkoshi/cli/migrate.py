"""`hikkoshi migrate`: live-migrate a running VM to another datastore and runtime (another "host" on
this machine), with its memory, disks and MAC; `hikkoshi migrations`: the history, with reports.

Exit status: 0 migrated; 1 failed (rolled back: the VM runs on the source; or, after the commit
point, failed forward: the record says what to look at); 2 refused by the prechecks; 130 interrupted
(rolled back when still possible).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from hikkoshi.block.throttle import parse_rate
from hikkoshi.cli import remote
from hikkoshi.cli.progress import progress
from hikkoshi.cli.report import human_report
from hikkoshi.cli.wan import parse_duration_ms, parse_rate_bps
from hikkoshi.daemons.process import run
from hikkoshi.lab.link_model import WanParams
from hikkoshi.lab.wan import WanPath
from hikkoshi.migrate.cold import ColdMigration
from hikkoshi.migrate.destination import LocalDestination
from hikkoshi.migrate.job import Job, MigrationError, MigrationPending, MigrationRefused
from hikkoshi.migrate.live import LiveMigration, LiveRequest
from hikkoshi.migrate.phases import recovery
from hikkoshi.migrate.record import MigrationKind, MigrationStore
from hikkoshi.migrate.storage import Route
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.migrate.storage_move import StorageMigration


def default_state_dir(datastore: Path) -> Path:
    """Where a datastore's host keeps its migration records."""
    return datastore / ".hikkoshi" / "migrations"


def add_parser(top: Any) -> None:
    p = top.add_parser("migrate", help="live-migrate a running VM (memory, disks, MAC) to another host")
    p.add_argument("name", metavar="VM")
    p.add_argument(
        "--datastore",
        type=Path,
        metavar="PATH",
        help="where the VM is now (with --agent: the destination datastore's NAME, default its first)",
    )
    p.add_argument("--to-datastore", type=Path, metavar="PATH", help="where it goes")
    p.add_argument(
        "--to",
        metavar="HOST|URL",
        help="with --etcd: the destination host's name; with --agent: its agent's URL",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="in a cluster: refuse instead of queueing when a limit is reached",
    )
    p.add_argument(
        "--to-runtime-dir", type=Path, metavar="DIR", help="the destination host's HIKKOSHI_RUNTIME_DIR"
    )
    p.add_argument("--address", default="127.0.0.1", help="source address the destination reaches")
    p.add_argument("--to-address", default="127.0.0.1", help="destination address for the streams")
    p.add_argument(
        "--storage",
        choices=[m.value for m in StorageMode],
        default=StorageMode.HYBRID.value,
        help="how the disks move (default hybrid)",
    )
    p.add_argument("--max-downtime", type=int, default=300, metavar="MS", help="downtime limit ceiling")
    p.add_argument("--bandwidth", metavar="RATE", help="memory stream limit, e.g. 100Mbit, 50M")
    p.add_argument("--disk-bandwidth", metavar="RATE", help="background disk copy limit (proxy modes)")
    p.add_argument("--no-auto-converge", action="store_true", help="never throttle the guest's vCPUs")
    p.add_argument("--allow-postcopy", action="store_true", help="switch to post-copy RAM if all else fails")
    p.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="migration records (default: DATASTORE/.hikkoshi)"
    )
    p.add_argument(
        "--wan",
        metavar="RTT,RATE",
        help="carry every stream between the two hosts through one emulated WAN path, e.g. 150ms,100Mbit "
        "(lab use: the relays live in this process)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="encrypt the memory stream with these x509 files (QEMU layout: ca-cert.pem, server-cert.pem, "
        "server-key.pem, client-cert.pem, client-key.pem)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--offline", action="store_true", help="cold migration of a powered-off VM")
    how.add_argument("--quick", action="store_true", help="suspend, move memory state and disks, resume")
    p.add_argument("--json", action="store_true", help="print the record as JSON, no progress")
    p.set_defaults(
        func=migrate_command,
        local_requires=("datastore", "to_datastore"),
        remote=remote.migrate,
        via_cluster=in_cluster,
    )

    sm = top.add_parser(
        "storage-migrate", help="move a running VM's home and disks to another datastore, live"
    )
    sm.add_argument("name", metavar="VM")
    sm.add_argument(
        "--datastore",
        type=Path,
        metavar="PATH",
        help="where the VM is now (with --agent: the NAME it goes to)",
    )
    sm.add_argument("--to-datastore", type=Path, metavar="PATH", help="where it goes")
    sm.add_argument(
        "--mode",
        choices=("mirror", "dbt"),
        default="mirror",
        help="mirror: one pass, writes go to both sides (default); dbt: dirty-block passes, falling back "
        "to mirror if they stop converging",
    )
    sm.add_argument("--bandwidth", metavar="RATE", help="limit the copy, e.g. 200M")
    sm.add_argument("--thick", action="store_true", help="preallocate the new disks (default: sparse)")
    sm.add_argument("--state-dir", type=Path, metavar="DIR", help="records (default: in DATASTORE)")
    sm.add_argument("--json", action="store_true", help="print the record as JSON, no progress")
    sm.set_defaults(
        func=storage_migrate_command,
        local_requires=("datastore", "to_datastore"),
        remote=remote.storage_migrate,
        via_cluster=in_cluster,
    )

    h = top.add_parser("migrations", help="migration history and reports")
    h.add_argument(
        "action",
        nargs="?",
        choices=["show", "recover"],
        help="show one migration; recover: finish or roll back migrations whose coordinator died",
    )
    h.add_argument("id", nargs="?", metavar="ID")
    h.add_argument("--datastore", type=Path, metavar="PATH", help="whose records (not with --agent)")
    h.add_argument("--state-dir", type=Path, metavar="DIR")
    h.add_argument("--json", action="store_true")
    h.set_defaults(
        func=migrations_command,
        local_requires=("datastore",),
        remote=remote.migrations,
        via_cluster=in_cluster,
    )


def in_cluster(args: argparse.Namespace) -> int:
    """``migrate``, ``storage-migrate`` and ``migrations`` through the cluster (``--etcd``)."""
    from hikkoshi.cli import cluster_migrations

    return cluster_migrations.dispatch(args)


def parse_wan(text: str) -> WanParams:
    """``RTT[,RATE]``: ``150ms,100Mbit`` is 75 ms each way at 100 Mbit/s."""
    rtt, _, rate = text.partition(",")
    try:
        return WanParams(parse_duration_ms(rtt) / 2, parse_rate_bps(rate) if rate else None)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ValueError(f"--wan {text!r}: {exc}") from None


@contextlib.asynccontextmanager
async def wan_routes(params: WanParams | None, listen_host: str = "127.0.0.1") -> AsyncIterator[Route | None]:
    """A route function putting every service behind relays of one WAN path (site A: the source); the
    relays listen on ``listen_host``, which both hosts must reach."""
    if params is None:
        yield None
        return
    path = WanPath(params)
    host = f"[{listen_host}]" if ":" in listen_host else listen_host
    async with contextlib.AsyncExitStack() as stack:

        async def route(purpose: str, address: str) -> str:
            # The export's clients are at the destination; the stream's and mirror's at the source.
            relay = path.relay(address, from_a=purpose != "export", listen=f"{host}:0")
            await stack.enter_async_context(relay)
            return f"{host}:{relay.port}"

        yield route


async def _migrate(args: argparse.Namespace) -> int:
    wan = parse_wan(args.wan) if args.wan else None
    if wan is not None and args.storage == StorageMode.SHARED.value:
        raise ValueError(
            "--wan with shared storage: the destination would read its disk through a relay "
            "that ends with this command"
        )
    async with wan_routes(wan) as route:
        return await _migrate_via(args, route)


async def _migrate_via(args: argparse.Namespace, route: Route | None) -> int:
    kind = "cold" if args.offline else "quick" if args.quick else "live"
    request = LiveRequest(
        vm=args.name,
        source_datastore=args.datastore.absolute(),
        storage=StorageMode(args.storage),
        source_address=args.address,
        max_downtime_ms=args.max_downtime,
        bandwidth=int(parse_rate(args.bandwidth)) if args.bandwidth else None,
        disk_bandwidth=args.disk_bandwidth,
        auto_converge=not args.no_auto_converge,
        allow_postcopy=args.allow_postcopy,
        route=route,
        paused=kind == "quick",
        tls_dir=args.tls_dir,
    )
    destination = LocalDestination(
        args.name,
        args.to_datastore.absolute(),
        args.to_runtime_dir,
        address=args.to_address,
        tls_dir=args.tls_dir,
    )
    store = MigrationStore(args.state_dir or default_state_dir(args.datastore.absolute()))
    if args.json:
        coordinator = _job(kind, request, destination, store, None)
        code = await _run(coordinator)
        print(json.dumps(json.loads(coordinator.record.model_dump_json()), indent=2))
        return code
    with progress("migrate") as report:

        def show(info: dict[str, Any]) -> None:
            phase = info["phase"]
            if info.get("disk_total", 0) is None:  # a cold copy: the size is known at the end
                report.update(phase, info["disk_done"], None, detail="disks")
            elif "memory_done" in info:
                mbps = info.get("mbps")
                report.update(
                    phase,
                    info["memory_done"],
                    info["memory_done"] + info["memory_remaining"],
                    rate=mbps * 1e6 / 8 if mbps else None,  # QEMU's measure of the stream
                    detail=f"memory, iteration {info['iteration']}",
                )
            elif "disk_done" in info:
                report.update(phase, info["disk_done"], info["disk_total"], detail="disks")
            else:
                report.update(phase)

        coordinator = _job(kind, request, destination, store, show)
        code = await _run(coordinator)
    print(human_report(coordinator.record))
    return code


async def _storage_migrate(args: argparse.Namespace) -> int:
    store = MigrationStore(args.state_dir or default_state_dir(args.datastore.absolute()))
    kwargs: dict[str, Any] = {"mode": args.mode, "bandwidth": args.bandwidth, "thick": args.thick}
    src, dst = args.datastore.absolute(), args.to_datastore.absolute()
    if args.json:
        job = StorageMigration(args.name, src, dst, store, **kwargs)
        code = await _run(job)
        print(job.record.model_dump_json(indent=2))
        return code
    with progress("storage-migrate") as report:

        def show(info: dict[str, Any]) -> None:
            if "disk_done" in info:
                report.update(
                    info["phase"], info["disk_done"], info["disk_total"], detail=f"disk {info['disk']}"
                )
            else:
                report.update(info["phase"])

        job = StorageMigration(args.name, src, dst, store, on_progress=show, **kwargs)
        code = await _run(job)
    print(human_report(job.record))
    return code


def storage_migrate_command(args: argparse.Namespace) -> int:
    try:
        return run(_storage_migrate(args))
    except ValueError as exc:
        print(f"hikkoshi storage-migrate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _job(
    kind: str,
    request: LiveRequest,
    destination: LocalDestination,
    store: MigrationStore,
    show: Callable[[dict[str, Any]], None] | None,
) -> Job:
    if kind == "cold":
        return ColdMigration(
            request.vm,
            request.source_datastore,
            destination,
            store,
            source_address=request.source_address,
            route=request.route,
            on_progress=show,
        )
    return LiveMigration(request, destination, store, show)


async def _run(coordinator: Job) -> int:
    try:
        await coordinator.run()
    except MigrationRefused as exc:
        print(f"hikkoshi migrate: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"hikkoshi migrate: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 130
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    try:
        return run(_migrate(args))
    except ValueError as exc:
        print(f"hikkoshi migrate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _recover(store: MigrationStore, ids: list[str], as_json: bool) -> int:
    code = 0
    for migration_id in ids:
        record = store.load(migration_id)
        coordinator: Job
        destination = LocalDestination(
            record.vm,
            record.destination.datastore,
            record.destination.runtime_dir,
            address=record.destination.address,
            tls_dir=Path(record.settings.tls_dir) if record.settings.tls_dir else None,
        )
        if record.kind in (MigrationKind.LIVE, MigrationKind.QUICK):
            coordinator = LiveMigration.from_record(record, destination, store)
        elif record.kind == MigrationKind.STORAGE:
            coordinator = StorageMigration.from_record(record, store)
        else:
            coordinator = ColdMigration.from_record(record, store, destination)
        try:
            record = await coordinator.recover()
        except MigrationPending as exc:
            print(f"hikkoshi migrations recover: {migration_id}: {exc} (run again later)", file=sys.stderr)
            record, code = exc.record, 1
        except MigrationError as exc:
            print(f"hikkoshi migrations recover: {migration_id}: {exc}", file=sys.stderr)
            record, code = exc.record, 1
        print(record.model_dump_json(indent=2) if as_json else human_report(record))
    return code


def migrations_command(args: argparse.Namespace) -> int:
    store = MigrationStore(args.state_dir or default_state_dir(args.datastore.absolute()))
    if args.action == "recover":
        unfinished = [r.id for r in store.all() if recovery(r.phase) in ("rollback", "finish")]
        ids = [args.id] if args.id else unfinished
        try:
            return run(_recover(store, ids, args.json))
        except (KeyError, ValueError) as exc:
            print(f"hikkoshi migrations recover: no readable migration {exc}", file=sys.stderr)
            return 2
    if args.action == "show":
        if not args.id:
            print("hikkoshi migrations show: which ID?", file=sys.stderr)
            return 2
        try:
            record = store.load(args.id)
        except (KeyError, ValueError) as exc:
            print(f"hikkoshi migrations: no readable migration {exc}", file=sys.stderr)
            return 2
        print(record.model_dump_json(indent=2) if args.json else human_report(record))
        return 0
    records = store.all()
    if args.json:
        print(json.dumps([json.loads(r.model_dump_json()) for r in records], indent=2))
        return 0
    for r in records:
        down = r.report.get("downtime_ms")
        print(
            f"{r.id}  {r.vm:<16} {r.storage.value:<9} {r.phase.value:<12} "
            f"downtime {down if down is not None else '-'} ms  {r.error or ''}"
        )
    return 0
