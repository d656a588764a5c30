"""Migration jobs of an agent: live, quick and cold migrations to other agents' hosts and storage
migrations between its own datastores. Each runs as a task of the agent's task group, saves its record
in the database at every phase change, keeps its latest progress and a timeline for the API, and leaves
its report (JSON) and a plot of its timeline (PNG) in ``<state dir>/reports``.

Nothing a job was doing is left to a person when it can be finished by waiting: at start-up, and every
few seconds after (:meth:`Jobs.maintain`), the agent takes over the migrations its records say are in
flight (rolled back before the commit point, finished after it) and tries again, with a growing pause,
those waiting for a peer that cannot be reached. It also cleans up VMs left here by migrations that
ended elsewhere, and serves again the disks it holds for other hosts if their supervisor died.
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
from urllib.parse import quote

from hikkoshi import __version__
from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.cluster_jobs import ClusterRun, cluster_job, taken_over
from hikkoshi.agent.cluster_member import ClusterUnavailable
from hikkoshi.agent.db import AgentDb, DbMigrationStore
from hikkoshi.agent.errors import Conflict, NotFound, Problem
from hikkoshi.agent.host import Host
from hikkoshi.agent.incoming import INCOMING, RUNNING, SERVING, Incoming
from hikkoshi.agent.link_measure import record_link
from hikkoshi.agent.malloc_arenas import trim
from hikkoshi.agent.models import (
    MigrateBody,
    MigrationInfo,
    PeerHost,
    PeerMigration,
    StorageMigrateBody,
)
from hikkoshi.agent.orphans import OrphanSettler, settle_quietly
from hikkoshi.agent.peers import connect_peer, peer_client
from hikkoshi.agent.remote_destination import RemoteDestination, side_error
from hikkoshi.agent.timeline import draw_timeline
from hikkoshi.block.throttle import parse_rate
from hikkoshi.cluster.errors import ClusterError, CoordinatorAlive, EtcdUnavailable, LimitReached
from hikkoshi.cluster.links import Links
from hikkoshi.cluster.observations import Observations
from hikkoshi.cluster.ownership import Claim
from hikkoshi.cluster.slots import Decision
from hikkoshi.daemons import supervisor_client
from hikkoshi.migrate.cold import ColdMigration
from hikkoshi.migrate.holders import release_holder_by_path
from hikkoshi.migrate.job import Job, MigrationError, MigrationPending
from hikkoshi.migrate.live import LiveMigration, LiveRequest
from hikkoshi.migrate.phases import Phase, committed, recovery
from hikkoshi.migrate.record import MigrationKind, MigrationRecord
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage import Route
from hikkoshi.migrate.storage_move import StorageMigration
from hikkoshi.vm.disk_serving import Holder
from hikkoshi.vm.errors import SpecError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.agent")

RouteFactory = Callable[[str, str], AbstractAsyncContextManager[Route | None]]
"""``routes(source_site, destination_site)``: the route function a migration between two sites uses
(e.g. through a WAN emulator), alive for the migration's duration; ``None``: direct."""

#: How often the agent looks after its records, holders and incoming VMs.
MAINTAIN_SECONDS = 2.0
#: The longest pause between two attempts at a migration waiting for a peer.
MAX_BACKOFF = 30.0


@contextlib.asynccontextmanager
async def direct_routes(_src: str, _dst: str) -> AsyncIterator[Route | None]:
    """Every service is reached directly."""
    yield None


@dataclass(frozen=True)
class _Clustered:
    """What a migration needs to run as a cluster job."""

    claim: Claim
    destination: str
    site: str
    datastores: tuple[str, ...]
    no_wait: bool


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
    #: A job waiting for a peer: when to try again, and how long the pause after that.
    retry_at: float | None = None
    backoff: float = 1.0
    #: The task that runs it (a person's cancel cancels it: before the commit point the job rolls back).
    task: asyncio.Task[None] | None = None

    #: Told of every phase the job enters (a cluster job mirrors them to etcd).
    on_phase: Callable[[Phase], None] | None = None

    def on_progress(self, info: dict[str, Any]) -> None:
        """The job's progress callback: keep the latest, and every point for the timeline."""
        self.progress.update(info)
        self.samples.append((round(time.monotonic() - self.t0, 3), dict(info)))
        phase = info.get("phase")
        if self.on_phase is not None and isinstance(phase, str) and phase in Phase.__members__.values():
            self.on_phase(Phase(phase))


class Jobs:
    """The migration jobs of one agent."""

    def __init__(
        self, host: Host, db: AgentDb, incoming: Incoming, routes: RouteFactory | None = None
    ) -> None:
        self.host = host
        self.db = db
        self.incoming = incoming
        self.routes = routes or direct_routes
        self.jobs: dict[str, JobState] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._settler: OrphanSettler | None = None

    def attach(self, tg: asyncio.TaskGroup) -> None:
        """The task group that owns the jobs (the agent's lifetime)."""
        self._tg = tg

    @property
    def reports_dir(self) -> Path:
        """Where reports and timeline plots go."""
        return self.host.config.state_dir / "reports"

    def _peer(self, url: str, name: str) -> AgentClient:
        """A client of host ``name``'s agent at ``url`` (its certificate must name it)."""
        return peer_client(self.host.config.credentials, url, name)

    def _busy_vm(self, vm: str) -> None:
        for state in self.jobs.values():
            if state.running and state.vm == vm:
                raise Conflict(f"VM {vm!r} is being migrated already ({state.id})")

    def refuse_if_migrating(self, vm: str, action: str) -> None:
        """Refuse ``action`` on a VM a migration job of this agent is moving."""
        for state in self.jobs.values():
            if state.running and state.vm == vm:
                raise Conflict(f"VM {vm!r} is being migrated ({state.id}): it cannot be {action} now")

    def peer_host(self) -> PeerHost:
        """What this host tells the other hosts of its cluster about itself."""
        config = self.host.config
        return PeerHost(
            name=config.name,
            site=config.site,
            version=__version__,
            datastores=list(self.host.stores),
            encrypts=config.encrypt,
        )

    def outcome_for(self, migration_id: str, peer: str) -> PeerMigration:
        """How a migration of this agent to ``peer`` ended (only that peer may ask)."""
        try:
            record, role = self.db.migration(migration_id)
        except KeyError:
            raise NotFound(f"no migration {migration_id!r} to {peer} here") from None
        if role != "source" or record.destination.host != peer:
            raise NotFound(f"no migration {migration_id!r} to {peer} here")
        state = self.jobs.get(migration_id)
        if state is not None:
            record = state.job.record
        was_committed = record.facts.committed or committed(record.phase)
        return PeerMigration(id=record.id, phase=record.phase.value, committed=was_committed)

    async def release_holder(self, vm: str, holder: Holder, migration: str) -> None:
        """Tell the host that held ``vm``'s disks that they are no longer needed there."""
        if holder.agent is None:
            await release_holder_by_path(holder, migration)
            return
        async with self._peer(holder.agent, holder.host) as client:
            try:
                await client.request(
                    "POST", f"/v1/held/{quote(vm, safe='')}/release", json={"migration": migration}
                )
            except AgentError as exc:
                raise side_error(exc, f"the disks' holder {holder.host}") from None

    def _release_for(self, vm: str) -> Callable[[Holder, str], Awaitable[None]]:
        async def release(holder: Holder, migration: str) -> None:
            await self.release_holder(vm, holder, migration)

        return release

    # --- starting -----------------------------------------------------------------------------------------

    async def migrate(self, name: str, body: MigrateBody) -> str:
        """Start a migration of ``name`` (live, quick or offline) to the agent at ``body.to``; its id. The
        agent there must prove with its certificate that it is a host of this cluster (``body.to_host``
        if given) before anything is sent."""
        self._busy_vm(name)
        self.host.protect(name, "migrated")
        ds, home, spec = self.host.find(name)
        config = self.host.config
        cluster = self.host.cluster
        url, expect, claim = body.to, body.to_host, None
        if not body.to.startswith("https://"):
            if cluster is None:
                raise Problem(f"--to {body.to!r}: a host name needs a cluster (agent --etcd); give a URL")
            if expect not in (None, body.to):
                raise Problem(f"--to {body.to!r} names a host: it cannot be host {expect!r}")
            # The address the host registered, and a certificate naming that host (not whoever answers
            # there: a registration is no proof).
            url, expect = (await cluster.resolve(body.to)).api_address, body.to
        if cluster is not None:
            claim = await cluster.ensure_owner(spec)  # this host owns it, as of this token
        try:
            client = await connect_peer(config.credentials, url, expect)
        except AgentError as exc:
            raise BadPeer(f"destination agent {body.to}: {exc.detail}") from None
        try:
            try:
                peer = PeerHost.model_validate(await client.get("/v1/peer/host"))
            except AgentError as exc:
                raise BadPeer(f"destination agent {url}: {exc.detail}") from None
            if client.server_name == config.name:
                raise Problem("the destination is this agent: use storage-migrate to change datastores")
            dest_ds = body.datastore or (peer.datastores[0] if peer.datastores else "")
            target = RemoteDestination(client, name, dest_ds, Path("/unknown"), source_agent=config.url)
            request = LiveRequest(
                vm=name,
                source_datastore=self.host.stores[ds].path,
                storage=body.storage,
                source_address=config.migration_address,
                source_host=config.name,
                source_agent=config.url,
                max_downtime_ms=body.max_downtime_ms,
                bandwidth=int(parse_rate(body.bandwidth)) if body.bandwidth else None,
                disk_bandwidth=body.disk_bandwidth,
                auto_converge=body.auto_converge,
                allow_postcopy=body.allow_postcopy,
                qemu=config.qemu,
                paused=body.mode == "quick",
                tls_dir=config.tls_dir,
                tls=config.encrypt,
                source_tls_name=config.name,
                release_holder=self._release_for(name),
            )
        except BaseException:
            await client.aclose()
            raise
        store = DbMigrationStore(self.db, "source")
        job: Job
        if body.mode == "offline":
            job = ColdMigration(
                name,
                request.source_datastore,
                target,
                store,
                source_address=request.source_address,
                source_host=config.name,
                release_holder=self._release_for(name),
                tls_dir=config.tls_dir if config.encrypt else None,
                source_tls_name=config.name,
            )
        else:
            job = LiveMigration(request, target, store)
        job.record.settings.destination_datastore = dest_ds
        job.record.settings.destination_site = peer.site
        predicted = await self._predict(home, spec, peer.name, body)
        if predicted is not None:
            job.report["predicted"] = predicted
        state = self._register(job, "source", url)
        clustered = None
        if cluster is not None and claim is not None:
            job.record.settings.cluster_job = True
            datastores = (str(self.host.stores[ds].uuid),)
            clustered = _Clustered(claim, peer.name, peer.site, datastores, body.no_wait)
        state.task = self._spawn(self._run_to_peer(state, job, client, peer.site, home, clustered))
        return state.id

    async def _predict(
        self, home: VmHome, spec: VmSpec, target: str, body: MigrateBody
    ) -> dict[str, Any] | None:
        """What the migration is predicted to cost (the report shows it beside what happened): from the
        cluster's figures when in one, else from the VM's size over the default LAN."""
        from hikkoshi.agent.drs_prediction import alone
        from hikkoshi.agent.drs_read import read_state

        cluster = self.host.cluster
        storage = "shared" if body.mode == "offline" else body.storage.value
        try:
            if cluster is not None and cluster.online and cluster.store is not None:
                state = await read_state(cluster.store, cluster.keys)
                got = state.forecast(spec.name, target, storage, max_downtime_ms=body.max_downtime_ms)
                if not isinstance(got, str):
                    # The inputs go with the report: once done, the migration is an observation.
                    return {**got.predicted.to_json(), "calibrated_on": got.assumptions["calibrated_on"],
                            "inputs": got.inputs}  # fmt: skip
            disks = []
            for d in spec.disks:
                try:
                    allocated = home.disk_path(d).stat().st_blocks * 512
                except OSError:
                    allocated = d.size
                disks.append((d.size, min(allocated, d.size)))
            return dict(alone(spec.memory_mib << 20, tuple(disks), storage, body.max_downtime_ms).to_json())
        except Exception:  # a prediction is never a reason not to migrate
            log.exception("no prediction for %s", spec.name)
            return None

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
            release_holder=self._release_for(name),
        )
        state = self._register(job, "storage", None)
        state.task = self._spawn(self._run_job(state, job.run(), home))
        return state.id

    def _register(self, job: Job, role: str, destination: str | None) -> JobState:
        state = JobState(job.record.id, job.record.vm, role, job, destination)
        job.on_progress = state.on_progress
        self.jobs[state.id] = state
        return state

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        if self._tg is None:
            coro.close()
            raise Conflict("the agent is not serving yet")
        task = self._tg.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guarded(coro: Any) -> None:
        """A job's task: whatever goes wrong is logged, never raised into the agent's task group (it
        would end the agent with every other job)."""
        try:
            await coro
        except Exception:
            log.exception("a migration job failed unexpectedly")
        # What the job allocated is free now: its pages go back (see hikkoshi.agent.malloc_arenas).
        await asyncio.to_thread(trim)

    def cancel_all(self) -> None:
        """The agent stops: cancel every job (before its commit point a job rolls back; after it, its
        record says where it stood and the next agent finishes it)."""
        for task in self._tasks:
            task.cancel()

    # --- running ------------------------------------------------------------------------------------------

    async def _run_to_peer(
        self,
        state: JobState,
        job: Job,
        client: AgentClient,
        peer_site: str,
        home: VmHome,
        clustered: _Clustered | None = None,
    ) -> None:
        """Run a migration to another agent's host, through the routes between the two sites (and, in
        a cluster, as a cluster job)."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                if clustered is not None:
                    run = await stack.enter_async_context(self._cluster_job(state, job, clustered))
                    if run is None:
                        return  # refused by a limit: recorded
                    state.on_phase = run.entered
                    self._use_ledger(job, run)
                route = await stack.enter_async_context(self.routes(self.host.config.site, peer_site))
                if isinstance(job, LiveMigration):
                    job.request = replace(job.request, route=route)
                elif isinstance(job, ColdMigration):
                    job.route = route
                await self._run_job(state, job.run(), home)
            if clustered is not None and isinstance(job, LiveMigration) and job.record.phase == Phase.DONE:
                await self._keep_measurements(job, client.url, peer_site)
        finally:
            state.running = False  # also when the routes could not be set up
            await client.aclose()

    async def _keep_measurements(self, job: LiveMigration, url: str, peer_site: str) -> None:
        """Keep what the migration measured for the next prediction: the link, and the migration as an
        observation to calibrate on (never a reason to fail a migration that is done)."""
        cluster = self.host.cluster
        if cluster is None or cluster.store is None:
            return
        try:
            links = Links(cluster.store, cluster.keys)
            await record_link(links, self.host.config.site, peer_site, job.report, url, job.record.id)
            inputs = (job.report.get("predicted") or {}).get("inputs")
            if isinstance(inputs, dict):
                report = job.record.report or job.report
                await Observations(cluster.store, cluster.keys).add(job.record.id, inputs, report)
        except Exception:
            log.exception("migration %s: its figures were not kept for the next prediction", job.record.id)

    @contextlib.asynccontextmanager
    async def _cluster_job(
        self, state: JobState, job: Job, c: _Clustered
    ) -> AsyncIterator[ClusterRun | None]:
        """The migration as a cluster job (queued while a limit is reached); ``None`` if it was refused."""
        member = self.host.cluster
        assert member is not None

        def queued(decision: Decision) -> None:
            state.on_progress(
                {"phase": "queued", "place": decision.position + 1, "reasons": decision.reasons()}
            )

        try:
            async with cluster_job(
                member,
                job.record.id,
                c.claim,
                c.destination,
                datastores=c.datastores,
                source_site=self.host.config.site,
                destination_site=c.site,
                no_wait=c.no_wait,
                on_queue=queued,
            ) as run:
                yield run
        except (LimitReached, ClusterUnavailable, EtcdUnavailable) as exc:
            job.record.error = f"refused: {exc}"
            job.record.enter(Phase.FAILED)
            self.db.save_migration(job.record, state.role)
            state.running = False
            yield None

    async def _run_job(
        self, state: JobState, work: Awaitable[Any], home: VmHome, client: AgentClient | None = None
    ) -> None:
        """Run a job with its I/O-latency sampler; then its report, timeline and the host's records."""
        try:
            async with asyncio.TaskGroup() as tg:
                sampler = tg.create_task(self._sample_latency(state, home))
                try:
                    await work
                except MigrationPending as exc:
                    log.warning("migration %s waits: %s", state.id, exc)
                    state.retry_at = time.monotonic() + state.backoff
                except MigrationError as exc:
                    log.warning("migration %s: %s", state.id, exc)
                except Exception:
                    log.exception("migration %s crashed", state.id)
                finally:
                    sampler.cancel()
        finally:
            state.running = False
            if client is not None:
                await client.aclose()
            self._account(state.job.record)
            await self._leave_report(state)

    def _account(self, record: MigrationRecord) -> None:
        """Keep the host's VM records in line with how a migration ended."""
        if record.phase != Phase.DONE:
            return
        source = VmHome(record.source.home)
        if record.kind == MigrationKind.STORAGE:
            ds = next(
                (n for n, s in self.host.stores.items() if s.path == record.destination.datastore), None
            )
            row = self.db.vms().get(record.vm, {})
            if ds is not None:
                self.db.set_vm(record.vm, ds, row.get("uuid"), row.get("state", RUNNING))
            return
        row = self.db.vms().get(record.vm, {})
        if source.path.exists() and source.read_state().get("state") == SERVING:
            detail = json.dumps({"holding_for": record.destination.host, "migration": record.id})
            self.db.set_vm(record.vm, row.get("datastore", ""), row.get("uuid"), SERVING, detail)
        elif not source.path.exists() and row.get("state") != INCOMING:
            self.db.forget_vm(record.vm)

    async def _sample_latency(self, state: JobState, home: VmHome) -> None:
        """Every half second, the mean latency of the guest's disk requests over the interval: at the
        source's disk service while it serves the guest, then at the destination's."""
        try:
            side = VmSide(home, home.load_spec(), "source")
        except (OSError, ValueError, SpecError):
            return  # past the commit the source's home files may have left (a job taken over there)
        last: dict[str, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(0.5)
            await self._sample_cache(state)
            where, stats = await _guest_io_stats(state.job, side)
            if not stats:
                continue
            n = sum(int(sum(e["requests"].values())) for e in stats.values())
            total_us = sum(e["latency_us"]["mean"] * sum(e["requests"].values()) for e in stats.values())
            before = last.get(where)
            if before is not None and n > before[0]:
                mean_ms = (total_us - before[1]) / (n - before[0]) / 1000
                sample = {"io_latency_ms": round(max(mean_ms, 0.0), 3), "io_at": where}
                state.samples.append((round(time.monotonic() - state.t0, 3), sample))
            last[where] = (n, total_us)

    async def _sample_cache(self, state: JobState) -> None:
        """The destination's relocations: how much of the disks is there already (they copy in the
        background while memory moves, in hybrid mode)."""
        job = state.job
        if not isinstance(job, LiveMigration) or job.spec is None:
            return
        if "disk_total" in state.progress and state.progress.get("phase") == "storage-post":
            return  # the job reports it itself now
        if job.record.phase not in (Phase.STORAGE_PRE, Phase.MEMORY, Phase.SWITCHOVER, Phase.RESUME):
            return
        try:
            disks = await job.target.disk_status()
        except SideError:
            return
        done = total = demand = background = 0
        for st in disks.values():
            relocation = st.get("relocation")
            if relocation is None:
                return  # no relocations (precopy, shared)
            done += int(relocation["present_bytes"])
            total += int(relocation["size"])
            demand += int(relocation.get("fetched_demand_bytes", 0))
            background += int(relocation.get("fetched_background_bytes", 0))
        if total:
            sample = {
                "disk_done": done,
                "disk_total": total,
                "disk_demand": demand,
                "disk_background": background,
            }
            state.samples.append((round(time.monotonic() - state.t0, 3), sample))

    async def _leave_report(self, state: JobState) -> None:
        record = state.job.record
        self.db.save_migration(record, state.role)
        for t, data in state.samples:
            self.db.add_sample(state.id, t, data)
        state.samples.clear()
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        report = self.reports_dir / f"{state.id}.json"
        report.write_text(json.dumps(json.loads(record.model_dump_json()), indent=2))
        try:
            samples = self.db.samples(state.id)
            await draw_timeline(samples, record, self.reports_dir / f"{state.id}.png")
        except Exception:  # a plot never fails a migration
            log.exception("timeline of migration %s", state.id)

    # --- looking after what is in flight ------------------------------------------------------------------

    async def maintain(self) -> None:
        """Every few seconds, for the agent's life: take over what needs it (see the module)."""
        while True:
            for attempt in (self._take_over_records, self._sweep_incoming, self._serve_holders):
                try:
                    await attempt()
                except Exception:
                    log.exception("maintenance: %s", attempt.__name__)
            await asyncio.sleep(MAINTAIN_SECONDS)

    async def _take_over_records(self) -> None:
        now = time.monotonic()
        for record, role in self.db.migrations():
            if recovery(record.phase) not in ("rollback", "finish"):
                continue
            state = self.jobs.get(record.id)
            if state is not None and (state.running or (state.retry_at is not None and state.retry_at > now)):
                continue
            taken = self._job_for(record, role)
            if taken is None:
                continue
            job, client = taken
            if record.settings.cluster_job and not self._cluster_ready(record):
                if client is not None:
                    await client.aclose()
                continue
            new = self._register(job, role, record.destination.agent)
            if state is not None:
                new.backoff = min(state.backoff * 2, MAX_BACKOFF)
            log.info("taking over migration %s, left at %s", record.id, record.phase.value)
            work = self._recover_clustered(new, job) if record.settings.cluster_job else job.recover()
            new.task = self._spawn(self._run_job(new, work, VmHome(record.source.home), client))

    def _cluster_ready(self, record: MigrationRecord) -> bool:
        """Whether a cluster job can be taken over now (this agent is in the cluster, and etcd answers)."""
        member = self.host.cluster
        if member is None:
            log.error(
                "migration %s is a cluster job: start the agent with --etcd to go on with it", record.id
            )
            return False
        return member.online

    async def _recover_clustered(self, state: JobState, job: Job) -> MigrationRecord:
        """Recover a cluster job as its coordinator again (a new lease; waits while the old one lives)."""
        member = self.host.cluster
        assert member is not None
        vm_uuid = None
        with contextlib.suppress(OSError, ValueError):
            vm_uuid = str(VmHome(job.record.source.home).load_spec().uuid)
        try:
            async with taken_over(member, job.record.id, vm_uuid) as run:
                state.on_phase = run.entered
                self._use_ledger(job, run)
                return await job.recover()
        except CoordinatorAlive as exc:
            raise MigrationPending(
                f"its coordinator's lease lives on (host {exc.host})", job.record
            ) from None
        except (ClusterError, ClusterUnavailable) as exc:
            raise MigrationPending(f"the cluster: {exc}", job.record) from None

    @staticmethod
    def _use_ledger(job: Job, run: ClusterRun) -> None:
        run.commit_phase = job.commit_phase
        ledger = run.ledger
        if isinstance(job, LiveMigration):
            job.request = replace(job.request, ledger=ledger)
        elif isinstance(job, ColdMigration):
            job.ledger = ledger

    def _job_for(self, record: MigrationRecord, role: str) -> tuple[Job, AgentClient | None] | None:
        store = DbMigrationStore(self.db, role)
        release = self._release_for(record.vm)
        if record.kind == MigrationKind.STORAGE:
            return StorageMigration.from_record(record, store, release_holder=release), None
        if not record.destination.agent:
            log.error("migration %s (%s) cannot be taken over by an agent", record.id, record.kind)
            return None
        client = self._peer(record.destination.agent, record.destination.host)
        target = RemoteDestination(
            client,
            record.vm,
            record.settings.destination_datastore or "",
            record.destination.datastore,
            source_agent=self.host.config.url,
        )
        job: Job
        config = self.host.config
        if record.kind == MigrationKind.COLD:
            job = ColdMigration.from_record(
                record, store, target, release_holder=release, source_tls_name=config.name
            )
        else:
            job = LiveMigration.from_record(
                record, target, store, qemu=config.qemu, release_holder=release, source_tls_name=config.name
            )
        return job, client

    async def _sweep_incoming(self) -> None:
        """VMs coming in whose migration ended elsewhere without a commit: gone, or serving again."""
        for vm, row in self.db.vms().items():
            if row.get("state") != INCOMING or any(s.running and s.vm == vm for s in self.jobs.values()):
                continue
            detail = Incoming.detail(row)
            source, host, migration = detail.get("source"), detail.get("source_host"), detail.get("migration")
            if not source or not host or not migration:
                continue
            verdict = await self._source_says(source, host, migration)
            member = self.host.cluster
            if verdict == "unknown" and member is not None:
                if self._settler is None or self._settler.member is not member:
                    self._settler = OrphanSettler(member, self.incoming, member.settings.takeover_after)
                await settle_quietly(self._settler, vm, migration)
                continue
            if verdict == "over":
                log.info(
                    "VM %s came in for migration %s, which ended at its source: removing it", vm, migration
                )
                with contextlib.suppress(Problem, SideError, OSError):
                    await self.incoming.remove_abandoned(vm)

    async def _source_says(self, source: str, host: str, migration: str) -> str:
        """``over`` (ended without a commit, or unknown there), ``on`` (in flight or committed), or
        ``unknown`` (the source does not answer). Asked of the host that started the migration (its
        certificate must name it), whatever URL it gave."""
        try:
            async with self._peer(source, host) as client:
                info = PeerMigration.model_validate(await client.get(f"/v1/peer/migrations/{migration}"))
        except (AgentError, ValueError) as exc:
            return "over" if isinstance(exc, AgentError) and exc.status == 404 else "unknown"
        if Phase(info.phase) in (Phase.ROLLED_BACK, Phase.FAILED) and not info.committed:
            return "over"
        return "on"

    async def _serve_holders(self) -> None:
        """Disks this host holds for VMs running elsewhere are served again if their supervisor died."""
        homes = self.host.homes()
        for vm, row in self.db.vms().items():
            if row.get("state") != SERVING or vm not in homes:
                continue
            _ds, home = homes[vm]
            if home.is_running() or not supervisor_client.holds_for_another_host(home):
                continue
            log.warning("the supervisor serving VM %s's disks is gone; serving them again", vm)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    supervisor_client.start_vm,
                    home,
                    serving=True,
                    runtime_dir=self.host.config.runtime_dir,
                    tls_dir=self.host.config.tls_dir,
                )

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
        kind=record.kind.value,
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


async def _guest_io_stats(job: Job, source: VmSide) -> tuple[str, dict[str, Any] | None]:
    """Where the guest's disk requests are served now, and that disk service's ``stats``."""
    if isinstance(job, LiveMigration) and job.spec and committed(job.record.phase):
        stats = await _stats(job.target.disk_stats())
        if stats:
            return "destination", stats
    return "source", await _stats(source.disks("stats"))
