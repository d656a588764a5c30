"""Migration jobs of an agent: live migrations to other agents' hosts and storage migrations between
its own datastores. Each runs as a task of the agent's task group, saves its record in the database
at every phase change, keeps its latest progress and a timeline for the API, and leaves its report
(JSON) and a plot of its timeline (PNG) in ``<state dir>/reports``. At start-up the agent takes over
the migrations a dead agent left: rolled back before the commit point, finished after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.db import AgentDb, DbMigrationStore
from hikkoshi.agent.errors import Conflict, NotFound, Problem
from hikkoshi.agent.host import Host
from hikkoshi.agent.models import HostInfo, MigrateBody, MigrationInfo, StorageMigrateBody
from hikkoshi.agent.remote_destination import RemoteDestination
from hikkoshi.agent.timeline import render_timeline
from hikkoshi.block.throttle import parse_rate
from hikkoshi.migrate.cold_pull import PullMigration
from hikkoshi.migrate.coordinator import Coordinator, MigrationRequest, Route
from hikkoshi.migrate.job import Job, MigrationError
from hikkoshi.migrate.phases import committed, recovery
from hikkoshi.migrate.record import MigrationRecord
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage_migrate import StorageMigration
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.home import VmHome

log = logging.getLogger("hikkoshi.agent")

RouteFactory = Callable[[str, str], AbstractAsyncContextManager[Route | None]]
"""``routes(source_site, destination_site)``: the route function a migration between two sites uses
(e.g. through a WAN emulator), alive for the migration's duration; ``None``: direct."""


@contextlib.asynccontextmanager
async def direct_routes(_src: str, _dst: str) -> AsyncIterator[Route | None]:
    """Every service is reached directly."""
    yield None


class BadPeer(Problem):
    """The destination agent does not answer, or refuses."""

    status = 424


@dataclass
class JobState:
    """One migration job this agent runs."""

    id: str
    vm: str
    role: str
    job: Job
    destination: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    running: bool = True

    def on_progress(self, info: dict[str, Any]) -> None:
        """The job's progress callback: keep the latest, and every point for the timeline."""
        self.progress.update(info)
        self.samples.append((round(time.monotonic() - self.t0, 3), dict(info)))


class Jobs:
    """The migration jobs of one agent."""

    def __init__(self, host: Host, db: AgentDb, routes: RouteFactory | None = None) -> None:
        self.host = host
        self.db = db
        self.routes = routes or direct_routes
        self.jobs: dict[str, JobState] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, tg: asyncio.TaskGroup) -> None:
        """The task group that owns the jobs (the agent's lifetime)."""
        self._tg = tg

    @property
    def reports_dir(self) -> Path:
        """Where reports and timeline plots go."""
        return self.host.config.state_dir / "reports"

    def _client(self, url: str) -> AgentClient:
        return AgentClient(url, self.host.config.token, ca_file=self.host.config.peer_ca)

    def _busy_vm(self, vm: str) -> None:
        for state in self.jobs.values():
            if state.running and state.vm == vm:
                raise Conflict(f"VM {vm!r} is being migrated already ({state.id})")

    # --- starting -----------------------------------------------------------------------------------------

    async def migrate(self, name: str, body: MigrateBody) -> str:
        """Start a migration of ``name`` (live, quick or offline) to the agent at ``body.to``; its id."""
        self._busy_vm(name)
        ds, home, _spec = self.host.find(name)
        client = self._client(body.to)
        try:
            try:
                peer = HostInfo.model_validate(await client.get("/v1/host"))
            except AgentError as exc:
                raise BadPeer(f"destination agent {body.to}: {exc.detail}") from None
            if peer.name == self.host.config.name:
                raise Problem("the destination is this agent: use storage-migrate to change datastores")
            dest_ds = body.datastore or (peer.datastores[0].name if peer.datastores else "")
            path = next((d.path for d in peer.datastores if d.name == dest_ds), "/nonexistent")
            target = RemoteDestination(client, name, dest_ds, Path(path))
            request = MigrationRequest(
                vm=name,
                source_datastore=self.host.stores[ds].path,
                dest_datastore=Path(path),
                storage=body.storage,
                source_address=self.host.config.host,
                dest_address=peer.address,
                max_downtime_ms=body.max_downtime_ms,
                bandwidth=int(parse_rate(body.bandwidth)) if body.bandwidth else None,
                disk_bandwidth=body.disk_bandwidth,
                auto_converge=body.auto_converge,
                allow_postcopy=body.allow_postcopy,
                qemu=self.host.config.qemu,
                paused=body.mode == "quick",
            )
        except BaseException:
            await client.aclose()
            raise
        store = DbMigrationStore(self.db, "source")
        if body.mode == "offline":
            cold = PullMigration(
                name, request.source_datastore, target, store, source_address=self.host.config.host
            )
            cold.record.settings["destination_datastore"] = dest_ds
            state = self._register(cold, "source", body.to)
            self._spawn(self._run_to_peer(state, cold, client, peer.site, home))
            return state.id
        coordinator = Coordinator(request, store, destination=target)
        coordinator.record.settings["destination_datastore"] = dest_ds
        coordinator.record.settings["destination_site"] = peer.site
        state = self._register(coordinator, "source", body.to)
        self._spawn(self._run_to_peer(state, coordinator, client, peer.site, home))
        return state.id

    async def storage_migrate(self, name: str, body: StorageMigrateBody) -> str:
        """Start moving ``name``'s home and disks to another datastore of this host; its id."""
        self._busy_vm(name)
        ds, home, _spec = self.host.find(name)
        _dest, store = self.host.datastore(body.datastore)
        if store.path == self.host.stores[ds].path:
            raise Problem(f"VM {name!r} is in datastore {ds!r} already")
        job = StorageMigration(
            name,
            self.host.stores[ds].path,
            store.path,
            DbMigrationStore(self.db, "storage"),
            mode=body.mode,
            bandwidth=body.bandwidth,
            thick=body.thick,
        )
        state = self._register(job, "storage", None)
        self._spawn(self._run_job(state, job.run(), home))
        return state.id

    def _register(self, job: Job, role: str, destination: str | None) -> JobState:
        state = JobState(job.record.id, job.record.vm, role, job, destination)
        job.on_progress = state.on_progress
        self.jobs[state.id] = state
        return state

    def _spawn(self, coro: Any) -> None:
        if self._tg is None:
            coro.close()
            raise Conflict("the agent is not serving yet")
        task = self._tg.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guarded(coro: Any) -> None:
        """A job's task: whatever goes wrong is logged, never raised into the agent's task group (it
        would end the agent with every other job)."""
        try:
            await coro
        except Exception:
            log.exception("a migration job failed unexpectedly")

    def cancel_all(self) -> None:
        """The agent stops: cancel every job (before its commit point a job rolls back; after it, its
        record says where it stood and the next agent finishes it)."""
        for task in self._tasks:
            task.cancel()

    # --- running ------------------------------------------------------------------------------------------

    async def _run_to_peer(
        self,
        state: JobState,
        job: Coordinator | PullMigration,
        client: AgentClient,
        peer_site: str,
        home: VmHome,
    ) -> None:
        """Run a migration to another agent's host, through the routes between the two sites."""
        try:
            async with self.routes(self.host.config.site, peer_site) as route:
                if isinstance(job, Coordinator):
                    job.request = replace(job.request, route=route)
                else:
                    job.route = route
                await self._run_job(state, job.run(), home)
        finally:
            state.running = False  # also when the routes could not be set up
            await client.aclose()

    async def _run_job(self, state: JobState, work: Any, home: VmHome) -> None:
        """Run a job with its I/O-latency sampler; then its report and timeline."""
        try:
            async with asyncio.TaskGroup() as tg:
                sampler = tg.create_task(self._sample_latency(state, home))
                try:
                    await work
                except MigrationError as exc:
                    log.warning("migration %s: %s", state.id, exc)
                except Exception:
                    log.exception("migration %s crashed", state.id)
                finally:
                    sampler.cancel()
        finally:
            state.running = False
            await self._leave_report(state)

    async def _sample_latency(self, state: JobState, home: VmHome) -> None:
        """Every half second, the mean latency of the guest's disk requests over the interval: at the
        source's NBD service while it serves the guest, then at the destination's relocation proxies."""
        try:
            side = VmSide(home, home.load_spec(), "source")
        except (OSError, ValueError):
            return
        last: dict[str, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(0.5)
            await self._sample_cache(state)
            where, stats, fresh = await _guest_io_stats(state.job, side)
            if not stats:
                continue
            n = sum(int(sum(e["requests"].values())) for e in stats.values())
            total_us = sum(e["latency_us"]["mean"] * sum(e["requests"].values()) for e in stats.values())
            before = last.get(where, (0, 0.0) if fresh else None)
            if before is not None and n > before[0]:
                mean_ms = (total_us - before[1]) / (n - before[0]) / 1000
                sample = {"io_latency_ms": round(max(mean_ms, 0.0), 3), "io_at": where}
                state.samples.append((round(time.monotonic() - state.t0, 3), sample))
            last[where] = (n, total_us)

    async def _sample_cache(self, state: JobState) -> None:
        """The destination's relocation proxies: how much of the disks is there already (they copy in the
        background while memory moves, in hybrid mode)."""
        job = state.job
        if not isinstance(job, Coordinator) or job.dest is None or job.spec is None:
            return
        if job.request.storage not in (StorageMode.POSTCOPY, StorageMode.HYBRID):
            return  # no relocation proxies
        if "disk_total" in state.progress and state.progress.get("phase") == "storage-post":
            return  # the job reports it itself now
        done = total = 0
        for disk in job.spec.disks:
            try:
                st = await job.dest.proxy(disk.name, "status")
            except SideError:
                return  # no proxies (precopy, shared), or not started yet
            done += int(st["present_bytes"])
            total += int(st["size"])
        if total:
            state.samples.append(
                (round(time.monotonic() - state.t0, 3), {"disk_done": done, "disk_total": total})
            )

    async def _leave_report(self, state: JobState) -> None:
        record = state.job.record
        self.db.save_migration(record, state.role)
        for t, data in state.samples:
            self.db.add_sample(state.id, t, data)
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        report = self.reports_dir / f"{state.id}.json"
        report.write_text(json.dumps(json.loads(record.model_dump_json()), indent=2))
        try:
            await asyncio.to_thread(
                render_timeline, state.samples, record, self.reports_dir / f"{state.id}.png"
            )
        except Exception:  # a plot never fails a migration
            log.exception("timeline of migration %s", state.id)

    # --- after a restart ----------------------------------------------------------------------------------

    async def recover_all(self) -> list[str]:
        """Take over the migrations a dead agent left unfinished; their ids."""
        taken = []
        for record, role in self.db.migrations():
            if recovery(record.phase) not in ("rollback", "finish") or record.id in self.jobs:
                continue
            job: Job
            client: AgentClient | None = None
            if record.kind in ("live", "quick", "cold") and record.destination.agent:
                client = self._client(record.destination.agent)
                target = RemoteDestination(
                    client,
                    record.vm,
                    str(record.settings.get("destination_datastore", "")),
                    record.destination.datastore,
                )
                store = DbMigrationStore(self.db, role)
                if record.kind == "cold":
                    job = PullMigration.from_record(record, store, target)
                else:
                    job = Coordinator.from_record(record, store, destination=target)
            elif record.kind == "storage":
                job = StorageMigration.from_record(record, DbMigrationStore(self.db, role))
            else:
                log.error("migration %s (%s) cannot be taken over by an agent", record.id, record.kind)
                continue
            state = self._register(job, role, record.destination.agent)
            log.info("taking over migration %s, left at %s", record.id, record.phase.value)
            self._spawn(self._recover(state, job, client, VmHome(record.source.home)))
            taken.append(record.id)
        return taken

    async def _recover(self, state: JobState, job: Job, client: AgentClient | None, home: VmHome) -> None:
        try:
            assert isinstance(job, Coordinator | StorageMigration | PullMigration)
            await self._run_job(state, job.recover(), home)
        finally:
            if client is not None:
                await client.aclose()

    # --- reading ------------------------------------------------------------------------------------------

    def info(self, migration_id: str) -> MigrationInfo:
        """One migration, with its live progress if it runs."""
        state = self.jobs.get(migration_id)
        if state is not None:
            return _info(state.job.record, state.role, state)
        try:
            record, role = self.db.migration(migration_id)
        except KeyError:
            raise NotFound(f"no migration {migration_id!r} here") from None
        return _info(record, role, None)

    def all(self, vm: str | None = None) -> list[MigrationInfo]:
        """Every migration this agent ran (of one VM if given), oldest first."""
        return [self.info(record.id) for record, _role in self.db.migrations(vm)]

    def timeline(self, migration_id: str) -> Path:
        """The PNG of a finished migration's timeline."""
        self.info(migration_id)  # NotFound
        path = self.reports_dir / f"{migration_id}.png"
        if not path.exists():
            raise NotFound(f"migration {migration_id!r} has no timeline (yet)")
        return path


def _info(record: MigrationRecord, role: str, state: JobState | None) -> MigrationInfo:
    return MigrationInfo(
        id=record.id,
        vm=record.vm,
        kind=record.kind,
        role=role,
        phase=record.phase.value,
        storage=record.storage.value,
        running=state.running if state else False,
        created=record.created,
        finished=record.finished,
        error=record.error,
        progress=dict(state.progress) if state else {},
        report=record.report,
        destination=record.destination.agent,
        record=record.model_dump(mode="json"),
    )


async def _stats(request: Awaitable[Any]) -> dict[str, Any] | None:
    """A ``stats`` answer, or ``None`` if that service does not answer (not running, or not yet)."""
    try:
        result = await request
    except (SideError, OSError):
        return None
    return result if isinstance(result, dict) else None


async def _guest_io_stats(job: Job, source: VmSide) -> tuple[str, dict[str, Any] | None, bool]:
    """Where the guest's disk requests are served now, that service's ``stats``, and whether every
    request it counted is the guest's (then the first sample needs no earlier one to compare with)."""
    if isinstance(job, Coordinator) and job.dest and job.spec and committed(job.record.phase):
        # The guest runs on the destination: its proxies serve it (postcopy, hybrid; they started with
        # this migration and serve nobody else), else its own NBD service (precopy: it counted the
        # mirror's writes too), else the source's export still (shared storage).
        stats: dict[str, Any] = {}
        for disk in job.spec.disks:
            stats.update(await _stats(job.dest.proxy(disk.name, "stats")) or {})
        if stats:
            return "destination", stats, True
        local = await _stats(job.dest.nbd("stats"))
        if local:
            return "destination", local, False
    return "source", await _stats(source.nbd("stats")), False
