"""Live and quick migration: a running VM moves to a destination with its memory, its storage in one
of four modes (:mod:`hikkoshi.migrate.storage`) and its network identity.

Phases (:mod:`phases`): precheck, prepare (the source's export and bitmaps, the guest's dirty rate and
disk geometry), home files (and the destination's incoming supervisor), storage pre-phase (precopy's
mirror), memory pre-copy, switchover; the commit; resume on the destination, announce, storage
post-phase (the source's QEMU quits; relocations complete), cleanup (the source lets go).

Switchover: the source QEMU runs with ``pause-before-switchover``. When RAM is nearly copied, QEMU stops
the guest, drains and flushes its I/O (every write has reached the disk service), and waits. The
storage does its part (hybrid: the destination drops what the source's dirty bitmap marks; precopy: the
ready mirrors end) while QEMU sends the rest.

The commit: the source supervisor's guard commits (:mod:`hikkoshi.daemons.migration_guard`), then the
record says so, then the destination runs. While the memory moves the job keeps the guard armed; if
the job dies, the guard cancels the migration and the guest runs on at the source within seconds. A
quick migration is the same with the guest paused from the prepare phase on: its state moves in one
pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from hikkoshi import __version__
from hikkoshi.aio import background, unwrapped
from hikkoshi.block import crashpoints
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.arbiter import DestinationView, SourceView, Way, decide
from hikkoshi.migrate.convergence import Observation, Progress, Schedule, build_schedule
from hikkoshi.migrate.convergence import decide as converge
from hikkoshi.migrate.destination import Destination, DestinationFacts, LocalDestination
from hikkoshi.migrate.holders import release_holder_by_path
from hikkoshi.migrate.job import Job, Step
from hikkoshi.migrate.job import Progress as ProgressFn
from hikkoshi.migrate.ledger import CommitLedger, NoLedger
from hikkoshi.migrate.phases import FORWARD, Phase, committed
from hikkoshi.migrate.precheck import Side, migration_problems
from hikkoshi.migrate.record import (
    Endpoint,
    MigrationKind,
    MigrationRecord,
    MigrationSettings,
    MigrationStore,
)
from hikkoshi.migrate.relocation_wait import serving_of, settle_relocations
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage import MoveContext, Route, StorageStrategy, strategy
from hikkoshi.migrate.storage.base import ReleaseHolder
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.disk_serving import DiskPlan, DiskServing, Serving
from hikkoshi.vm.errors import SpecError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, qemu_version, space
from hikkoshi.vm.qemu import disk_device_id
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.migrate")

#: How long a source supervisor may take to say it serves the disks after QEMU was told to quit.
HAND_OFF_SECONDS = 30.0

#: The source supervisor cancels the migration if the job has not renewed its guard for this long.
GUARD_SECONDS = 10.0
GUARD_RENEW = 2.0
#: A memory stream that moves no byte for this long has stalled (a link gone silent).
STALL_SECONDS = 20.0
#: From ``migrate-continue`` to both sides done: only the last dirty pages and the devices remain.
SWITCHOVER_LIMIT = 60.0


@dataclass(frozen=True)
class LiveRequest:
    """What the user asked for."""

    vm: str
    source_datastore: Path
    storage: StorageMode = StorageMode.HYBRID
    source_address: str = "127.0.0.1"
    """Where the source's disk service listens for the destination (its migration address)."""
    source_host: str = "local"
    source_agent: str | None = None
    max_downtime_ms: int = 300
    bandwidth: int | None = None
    """Memory stream limit, bytes/s (``None``: unlimited)."""
    disk_bandwidth: str | None = None
    """Background disk copy limit (relocating modes), e.g. ``50M``."""
    auto_converge: bool = True
    allow_postcopy: bool = False
    max_seconds: float = 600.0
    qemu: str = DEFAULT_QEMU
    route: Route | None = None
    """How one host reaches a service of the other (default: directly)."""
    paused: bool = False
    """Quick migration: the guest is paused from the prepare phase on; its state moves in one pass."""
    tls_dir: Path | None = None
    """The source host's TLS files (QEMU's x509 layout): every stream between the hosts (memory, disks)
    is encrypted with them; the destination uses its own."""
    tls: bool | None = None
    """Encrypt every stream (with ``tls_dir``); ``None``: whenever ``tls_dir`` is given."""
    source_tls_name: str | None = None
    """The name the source's certificate has (an agent's host name): the destination admits it only.
    ``None`` (by path, hand-made certificates): any certificate of the CA, checked by address."""
    release_holder: ReleaseHolder | None = None
    """How the hosts holding the VM's disks (shared storage) are told to let them go; default: by
    path, on this machine."""
    ledger: CommitLedger = field(default_factory=NoLedger)
    """Where the commit is recorded besides the source supervisor (a cluster's owner key)."""

    def settings(self) -> MigrationSettings:
        """The request as the record keeps it."""
        return MigrationSettings(
            max_downtime_ms=self.max_downtime_ms,
            bandwidth=self.bandwidth,
            disk_bandwidth=self.disk_bandwidth,
            auto_converge=self.auto_converge,
            allow_postcopy=self.allow_postcopy,
            max_seconds=self.max_seconds,
            tls_dir=str(self.tls_dir) if self.tls_dir else None,
            tls=self.encrypted,
            source_host=self.source_host,
            source_agent=self.source_agent,
        )

    @classmethod
    def of(cls, record: MigrationRecord, **more: Any) -> LiveRequest:
        """The request of a recorded migration."""
        s = record.settings
        return cls(
            vm=record.vm,
            source_datastore=record.source.datastore,
            storage=record.storage,
            source_address=record.source.address,
            source_host=s.source_host,
            source_agent=s.source_agent,
            max_downtime_ms=s.max_downtime_ms,
            bandwidth=s.bandwidth,
            disk_bandwidth=s.disk_bandwidth,
            auto_converge=s.auto_converge,
            allow_postcopy=s.allow_postcopy,
            max_seconds=s.max_seconds,
            paused=record.kind == MigrationKind.QUICK,
            tls_dir=Path(s.tls_dir) if s.tls_dir else None,
            tls=s.tls,
            **more,
        )

    @property
    def encrypted(self) -> bool:
        """Whether the streams between the hosts are encrypted."""
        return self.tls if self.tls is not None else self.tls_dir is not None


async def _direct(_purpose: str, address: str) -> str:
    return address


class LiveMigration(Job):
    """One live or quick migration (see the module's docstring)."""

    def __init__(
        self,
        request: LiveRequest,
        destination: Destination,
        store: MigrationStore,
        on_progress: ProgressFn | None = None,
    ) -> None:
        super().__init__(store, on_progress)
        self.request = request
        self.target = destination
        self.src_home = VmHome(request.source_datastore / request.vm)
        self.record = MigrationRecord(
            vm=request.vm,
            kind=MigrationKind.QUICK if request.paused else MigrationKind.LIVE,
            storage=request.storage,
            source=Endpoint(
                datastore=request.source_datastore,
                home=self.src_home.path,
                host=request.source_host,
                address=request.source_address,
                agent=request.source_agent,
            ),
            destination=Endpoint(
                datastore=destination.datastore,
                home=destination.home_path,
                host=destination.host,
                runtime_dir=destination.runtime_dir,
                agent=destination.agent,
            ),
            settings=request.settings(),
        )
        self.schedule: Schedule = build_schedule(
            request.max_downtime_ms,
            auto_converge=request.auto_converge,
            allow_postcopy=request.allow_postcopy,
            max_seconds=request.max_seconds,
        )
        self.spec: VmSpec | None = None
        self.source: VmSide | None = None
        self.strategy: StorageStrategy = strategy(request.storage)
        self.source_disks: dict[str, DiskServing] = {}
        self.report = {"actions": [], "iterations": [], "encrypted": request.encrypted}
        self._t_stop = 0.0
        self._guard: asyncio.Task[None] | None = None
        self._ctx: MoveContext | None = None

    @classmethod
    def from_record(
        cls,
        record: MigrationRecord,
        destination: Destination,
        store: MigrationStore,
        on_progress: ProgressFn | None = None,
        **request: Any,
    ) -> LiveMigration:
        """A job taking over a recorded migration (after the one running it died)."""
        self = cls(LiveRequest.of(record, **request), destination, store, on_progress)
        self._take_over(record)
        self.strategy = strategy(record.storage, takes_back=record.facts.destination_takes_back)
        return self

    # --- the context the storage strategy works in -------------------------------------------------------

    @property
    def ctx(self) -> MoveContext:
        """The storage strategy's context (both sides known)."""
        assert self.spec is not None and self.source is not None
        if self._ctx is None:
            self._ctx = MoveContext(
                record=self.record,
                spec=self.spec,
                source=self.source,
                destination=self.target,
                source_address=self.request.source_address,
                source_host=self.request.source_host,
                source_agent=self.request.source_agent,
                source_disks=self.source_disks,
                disk_bandwidth=self.request.disk_bandwidth,
                route=self._route,
                save=self._save,
                progress=self.on_progress,
                release_holder=self.request.release_holder or release_holder_by_path,
                report=self.report,
                tls_dir=self.request.tls_dir if self.request.encrypted else None,
                source_name=self.request.source_tls_name,
            )
        return self._ctx

    async def _route(self, purpose: str, address: str) -> str:
        routed = await (self.request.route or _direct)(purpose, address)
        if routed != address:
            self.record.facts.routes[f"{purpose} {address}"] = routed
        return routed

    # --- precheck ----------------------------------------------------------------------------------------

    async def precheck(self) -> None:
        req = self.request
        try:
            spec = self.src_home.load_spec()
        except (OSError, ValueError) as exc:
            self._refuse([f"no VM {req.vm!r} in {req.source_datastore}: {exc}"])
        self.spec = spec
        self.source = VmSide(self.src_home, spec, "source")
        if not self.src_home.is_running():
            self._refuse([f"VM {req.vm!r} is not running (a powered-off VM: migrate it offline)"])
        status = await self.source.status()
        if status.get("supervisor") == "serving":
            self._refuse([f"VM {req.vm!r} runs on another host; this one only holds its disks"])
        problems: list[str] = []
        if status.get("state") != "running":
            problems.append(f"the VM's QEMU is {status.get('state')}, not running")
        # One routine says how each disk is served now; a relocation still under way finishes first.
        disks = await settle_relocations(self.source, self.on_progress)
        self.source_disks.update(disks)
        facts = await asyncio.to_thread(host_facts)
        qv = await asyncio.to_thread(qemu_version, req.qemu)
        accel = str(status.get("accel", "tcg"))
        try:
            there = await self.target.describe(accel, req.qemu)
        except SideError as exc:
            self._refuse([f"the destination does not answer: {exc}"])
        problems += self._destination_problems(there, spec)
        needed = self._space_needed(spec)
        src_side = Side(facts, accel, qv, __version__, space(req.source_datastore).free)
        problems += migration_problems(spec, src_side, there.side, needed)
        self.record.facts.accel = accel
        if accel == "tcg" and len(self.schedule.downtime_ms) > 1:
            # QEMU 7.2 under TCG corrupts guest memory in migrations of many short iterations (reproduced
            # without hikkoshi: 4 of 12 busy guests crashed at a 50 ms limit, none of 16 at 300 ms). Under
            # TCG the schedule starts at the user's maximum; KVM hosts climb from 50 ms as usual.
            self.schedule = replace(self.schedule, downtime_ms=self.schedule.downtime_ms[-1:])
            self.report["schedule_note"] = "tcg: one downtime step (the maximum)"
        if problems:
            self._refuse(problems)

    def _destination_problems(self, there: DestinationFacts, spec: VmSpec) -> list[str]:
        target = self.target
        problems = []
        if not there.datastore_exists:
            problems.append(f"destination datastore {target.datastore} does not exist")
        takes_back = self._takes_back(there, spec)
        if takes_back:
            self.strategy = strategy(self.request.storage, takes_back=True)
            self.report["storage_note"] = "the destination holds the disks: only memory moves"
        elif there.home_exists:
            problems.append(f"{target.home_path} exists already: the destination has a VM of that name")
        same = isinstance(target, LocalDestination) and (
            target.datastore.resolve() == self.request.source_datastore.resolve()
        )
        if same:
            problems.append("source and destination datastore are the same (use storage-migrate)")
        return problems

    def _takes_back(self, there: DestinationFacts, spec: VmSpec) -> bool:
        """Whether the VM comes home to the host that holds every one of its disks."""
        if not there.holds_vm or there.uuid != str(spec.uuid) or not self.source_disks:
            return False
        return all(
            s.kind == Serving.REMOTE and s.holder is not None and self.target.holds(s.holder)
            for s in self.source_disks.values()
        )

    def _space_needed(self, spec: VmSpec) -> int:
        if not self.strategy.moves_disks:
            return 0
        needed = 0
        for disk in spec.disks:
            if self.source_disks.get(disk.name, DiskServing()).kind == Serving.FILE:
                path = self.src_home.disk_path(disk)
                needed += path.stat().st_blocks * 512 if path.exists() else 0
            else:
                needed += disk.size  # held elsewhere: its allocation is not known here
        return needed

    # --- before the commit point -------------------------------------------------------------------------

    def before_commit(self) -> list[Step]:
        return [
            (Phase.PREPARE, self._prepare),
            (Phase.HOME_FILES, self._home_files),
            (Phase.STORAGE_PRE, self._storage_pre),
            (Phase.MEMORY, self._memory),
            (Phase.SWITCHOVER, self._switchover),
        ]

    async def _prepare(self) -> None:
        assert self.source is not None and self.spec is not None
        if self.request.paused:
            # Quick migration: suspended from here on, so its state moves in one pass; it runs again on
            # the destination, or here after a rollback.
            await self.source.ctl("pause")
        # The guest's dirty rate, measured while everything else is prepared (QEMU samples pages).
        with contextlib.suppress(SideError):
            await qm.dirty_rate_settled(self.source, 3.0)  # the agent's load sampler may be measuring
            await qm.calc_dirty_rate(self.source, 1)
            self.record.facts.dirty_rate_started = True
        await self.strategy.prepare(self.ctx)
        # The disks' geometry as the guest saw it from boot on: the destination's devices get the same
        # and skip QEMU's guess from the first sector, a read across the WAN while it starts.
        for disk in self.spec.disks:
            with contextlib.suppress(SideError):  # without it, the destination's QEMU guesses as before
                chs = await qm.device_geometry(self.source, disk_device_id(disk.name))
                if chs is not None:
                    self.record.facts.geometry[disk.name] = chs
        self._save()

    async def _home_files(self) -> None:
        assert self.spec is not None
        req = self.request
        if not self.record.facts.destination_takes_back:
            await self._send_home(self.target, self.src_home, self.spec)
            sizes = self.strategy.destination_disks(self.ctx)
            if sizes:
                await self.target.create_disks(sizes)
            plan = DiskPlan(
                disks={
                    d.name: s
                    for d in self.spec.disks
                    if (s := self.strategy.destination_serving(self.ctx, d.name)).kind != Serving.FILE
                },
                geometry=self.record.facts.geometry,
                migration=self.record.id,
            )
            await self.target.save_plan(plan)
        info = await self.target.start_incoming(
            self.record.facts.accel or "tcg", req.qemu if req.qemu != DEFAULT_QEMU else None, self.record.id
        )
        self.record.facts.destination_supervisor_pid = info.get("supervisor_pid")
        self._save()

    async def _storage_pre(self) -> None:
        await self.strategy.before_memory(self.ctx)

    # --- memory --------------------------------------------------------------------------------------------

    async def _memory(self) -> None:
        # The dirty-rate sample started in _prepare (1 s) is read beside the stream, never waited for.
        async with background(self._read_dirty_rate(), "dirty rate"):
            await self._stream()

    @contextlib.asynccontextmanager
    async def _guarded(self) -> AsyncIterator[None]:
        """Keep the source supervisor's guard armed while the stream runs (it stops when we do)."""
        assert self.source is not None
        source, migration = self.source, self.record.id
        # Where the stream goes (``tcp:HOST:PORT``): the supervisor cuts that connection if QEMU hangs
        # on it (see hikkoshi.vm.tcp_sockets).
        stream = {"stream": self.record.facts.stream[4:]} if self.record.facts.stream else {}
        if self.record.facts.mirror_target is not None:
            stream["mirror"] = self.record.facts.mirror_target  # precopy's disk mirrors: cut the same way
        await source.ctl("migration-arm", migration=migration, timeout=GUARD_SECONDS, **stream)

        async def renew() -> None:
            while True:
                await asyncio.sleep(GUARD_RENEW)
                with contextlib.suppress(SideError):
                    await source.ctl("migration-arm", migration=migration, timeout=GUARD_SECONDS)

        async with background(renew(), "guard"):
            yield

    async def _stream(self) -> None:
        assert self.source is not None
        req, src, dst = self.request, self.source, self.target
        caps: dict[str, bool] = {
            "events": True,
            "pause_before_switchover": True,
            "auto_converge": bool(self.schedule.throttle_percent),
        }
        if self.schedule.allow_postcopy:
            caps["postcopy_ram"] = True
        tls = self.record.settings.tls
        await dst.prepare_stream(postcopy=self.schedule.allow_postcopy, tls=tls, peer=req.source_tls_name)
        await qm.set_capabilities(src, **caps)
        params: dict[str, int | str] = {
            "downtime_limit": self.schedule.downtime_ms[0],
            "max_bandwidth": req.bandwidth if req.bandwidth else 1 << 40,
        }
        if self.schedule.throttle_percent:
            # QEMU's auto-converge throttles when the guest dirties faster than the link, up to
            # max-cpu-throttle. Until the schedule gets there that ceiling is 1 % (QEMU's least): each
            # throttle step raises it (and jumps there at once).
            params["cpu_throttle_initial"] = 1
            params["max_cpu_throttle"] = 1
        await qm.set_parameters(src, **params)
        host, port = await dst.listen_stream()
        if tls:
            if req.tls_dir is None:
                raise SideError("TLS asked for but the source has no TLS files")
            self.record.facts.tls = True  # recorded first: a rollback drops the credentials
            self._save()
            await qm.forget_incoming_tls(src)  # a VM that came in encrypted leaves encrypted
            await qm.add_tls(src, str(req.tls_dir.absolute()), "client")
            # The destination's certificate must name the host this migration goes to.
            await qm.set_parameters(src, tls_creds=qm.TLS_ID, tls_hostname=dst.tls_name or host)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        uri = f"tcp:{await self._route('stream', target)}"
        self.record.facts.stream = uri
        self._save()
        self.report["memory_started"] = self._since_start()
        async with self._guarded():
            await qm.start(src, uri)
            await self._until_switchover()
        # The guard is renewed by the switchover step from here (it arms again at once).

    async def _until_switchover(self) -> None:
        assert self.source is not None
        progress = Progress()
        started = time.monotonic()
        moved, moved_at = -1, started
        while True:
            info = await qm.wait(self.source, [qm.MigrationStatus.PRE_SWITCHOVER, *qm.TERMINAL], 0.1)
            if info.status == qm.MigrationStatus.PRE_SWITCHOVER:
                self.report["pre_switchover_info"] = info.raw
                return
            if info.terminal:
                raise SideError(f"memory migration {info.status}: {info.error or 'no reason given'}")
            ram = info.ram
            now = time.monotonic()
            if ram.transferred != moved:
                moved, moved_at = ram.transferred, now
            elif now - moved_at > STALL_SECONDS:
                raise SideError(f"the memory stream moved nothing for {STALL_SECONDS:.0f} s", transient=True)
            obs = Observation(iteration=ram.dirty_sync_count, remaining=ram.remaining, elapsed=now - started)
            self.on_progress(
                {
                    "phase": Phase.MEMORY.value,
                    "memory_done": ram.transferred,
                    "memory_remaining": obs.remaining,
                    "memory_total": ram.total,
                    "iteration": obs.iteration,
                    "dirty_pages_rate": ram.dirty_pages_rate,
                    "mbps": ram.mbps,
                }
            )
            before = progress.last_iteration
            progress, action = converge(self.schedule, progress, obs)
            if progress.last_iteration != before:
                self.report["iterations"].append(
                    {
                        "iteration": obs.iteration,
                        "remaining": obs.remaining,
                        "at": round(obs.elapsed, 3),
                        "throttle": info.throttle_percent,
                    }
                )
            if action.kind != "continue":
                await self._apply(action.kind, action.value, action.reason)

    async def _apply(self, kind: str, value: int, reason: str) -> None:
        assert self.source is not None
        self.report["actions"].append(
            {"action": kind, "value": value, "reason": reason, "at": self._since_start()}
        )
        log.info("convergence: %s %s (%s)", kind, value or "", reason)
        if kind == "set-downtime":
            await qm.set_parameters(self.source, downtime_limit=value)
        elif kind == "throttle":
            await qm.set_parameters(
                self.source, cpu_throttle_initial=value, cpu_throttle_increment=value, max_cpu_throttle=value
            )
        elif kind == "postcopy":
            await qm.start_postcopy(self.source)
        else:
            raise SideError(f"memory did not converge: {reason}")

    async def _read_dirty_rate(self) -> None:
        assert self.source is not None
        if not self.record.facts.dirty_rate_started:
            return
        with contextlib.suppress(SideError):
            for _ in range(30):
                rate = await qm.dirty_rate(self.source)
                if rate is not None:
                    self.report["dirty_rate_mib_s"] = rate
                    return
                await asyncio.sleep(0.1)

    # --- switchover and commit -----------------------------------------------------------------------------

    async def _switchover(self) -> None:
        assert self.source is not None and self.spec is not None
        src, dst = self.source, self.target
        t_stop = time.monotonic()
        async with self._guarded(), unwrapped() as tg:
            finish = await self.strategy.switchover(self.ctx, tg)
            storage_done = time.monotonic()
            await qm.continue_switchover(src)
            info = await qm.wait(src, qm.TERMINAL, SWITCHOVER_LIMIT)
            if info.status != qm.MigrationStatus.COMPLETED:
                raise SideError(f"memory migration {info.status}: {info.error or ''}")
            dinfo = await dst.wait_incoming(SWITCHOVER_LIMIT)
            if dinfo.status != qm.MigrationStatus.COMPLETED:
                raise SideError(f"the destination's incoming migration {dinfo.status}")
            figures = await finish()
        self.report["switchover"] = {
            "storage_ms": figures.get("storage_ms", round((storage_done - t_stop) * 1000, 2)),
            "storage": figures.get("storage", {}),
            "stopped_at": round(t_stop - self.t0, 4),
        }
        self.report["migrate_info"] = info.raw
        self._t_stop = t_stop

    async def commit(self) -> None:
        """The source supervisor commits: from now on the source never runs again (the guard refuses if
        it fired meanwhile: then the job rolls back)."""
        assert self.source is not None
        await self.request.ledger.prepare(self.record)  # etcd answers and the VM is still the source's
        await self.source.ctl("migration-commit", migration=self.record.id)
        self.record.facts.committed = True
        self._save()

    # --- after the commit point ----------------------------------------------------------------------------

    def after_commit(self) -> list[Step]:
        return [
            (Phase.RESUME, self._resume),
            (Phase.ANNOUNCE, self._announce),
            (Phase.STORAGE_POST, self._storage_post),
            (Phase.CLEANUP, self._cleanup),
        ]

    async def _resume(self) -> None:
        if not await self.target.is_running():
            await self._destination_gone()
        # The ledger's word first (a cluster's owner key moves to the destination), then the destination
        # resumes with the token it got: an unreachable ledger makes the job wait, never go back.
        token = await self.request.ledger.record_commit(self.record)
        if token is not None and self.record.facts.fencing_token != token:
            self.record.facts.fencing_token = token
            self._save()
            crashpoints.reached("migrate-ledger-committed")  # tests: committed everywhere, not resumed
        try:
            state = (await self.target.vm_status()).get("state")
        except SideError as exc:
            if exc.transient:
                raise
            await self._destination_gone()  # its supervisor ending, or starting again: waited for
        if state == "running":
            return  # resumed before a job died (or started again there)
        try:
            await self.target.resume(self.record.facts.fencing_token)
        except SideError as exc:
            # Its supervisor may outlive a dead QEMU a moment; one not known to be there is waited for.
            if exc.transient or await self.target.qemu_alive():
                raise
            await self._destination_gone()
        now = time.monotonic()
        with contextlib.suppress(SideError):
            await self._final_figures()  # after the resume: never on the guest's time
        if self._t_stop:
            self.report.setdefault("switchover", {})["gap_ms"] = round((now - self._t_stop) * 1000, 2)
        self.report["time_to_destination_s"] = round(now - self.t0, 3)

    async def _destination_gone(self) -> NoReturn:
        """Committed, and the destination's QEMU died before it resumed: the VM is the destination's all
        the same. The job waits until it is started there again (then carries on), and tells the
        destination it may be (found by the fault campaign: B's QEMU killed at resume-destination ended
        the migration "failed", and B refused to start a VM "coming in")."""
        try:
            await self.target.committed(self.record.id, self.record.facts.fencing_token)
        except SideError as exc:
            # Refused while a QEMU there answers (started again meanwhile): the next round sees it run.
            log.info("migration %s: the destination was not told it committed: %s", self.record.id, exc)
        raise SideError(
            "the destination VM is gone after the commit point; its source stays stopped: start it "
            f"again on the destination ({self.target.home_path}) to carry on",
            transient=True,
        )

    async def _final_figures(self) -> None:
        """QEMU announces ``completed`` before it fills in the downtime and total time: ask again."""
        assert self.source is not None
        for _ in range(50):
            info = await qm.query(self.source)
            if info.status != qm.MigrationStatus.COMPLETED or info.total_time_ms:
                if info.status == qm.MigrationStatus.COMPLETED:
                    self.report["migrate_info"] = info.raw
                return
            await asyncio.sleep(0.01)

    async def _announce(self) -> None:
        assert self.spec is not None
        if self.spec.nics:
            # Gratuitous RARPs from the same MAC: switches learn the VM's new port.
            await self.target.announce()

    async def _storage_post(self) -> None:
        assert self.source is not None
        # QEMU on the source quits; its disks stay served to the destination until released.
        if self.src_home.is_running() and self.src_home.read_state().get("state") != "serving":
            await self.source.ctl("hand-off")
            await self._until_source_serves()
        await self.strategy.after_resume(self.ctx)
        self.report["disk_complete_s"] = self._since_start()

    async def _until_source_serves(self) -> None:
        """The hand-off answers once QEMU was told to quit; the supervisor says ``serving`` when it has.
        Waited for: whoever reads the home next (the agent recording that it holds the disks for the
        destination) must not find it ``running``."""
        deadline = time.monotonic() + HAND_OFF_SECONDS
        while self.src_home.is_running() and self.src_home.read_state().get("state") != "serving":
            if time.monotonic() > deadline:
                log.warning("migration %s: the source did not say it serves the disks", self.record.id)
                return
            await asyncio.sleep(0.05)

    async def _cleanup(self) -> None:
        await self.strategy.release(self.ctx)
        if self.strategy.moves_disks:
            self.report["source_released_s"] = self._since_start()
        await self.target.finish()
        self._finish_live_report()

    # --- rollback ------------------------------------------------------------------------------------------

    async def undo(self) -> list[str]:
        problems: list[str] = []
        src = self.source
        if src is not None and self.src_home.is_running():
            try:
                await self._undo_source(src)
            except SideError as exc:
                if await self._source_crashed(src):
                    await self._undo_source_disks()
                    # Its QEMU died (the guest crashed, or was killed) before any commit: the VM is
                    # stopped where it belongs, which is all a rollback could make of it. Counting
                    # this as a rollback problem ended the record "failed", saying nowhere where the
                    # VM is (found by the fault campaign: kill -9 of the source QEMU).
                    log.warning(
                        "migration %s: the source's QEMU is gone (%s); it stays there", self.record.id, exc
                    )
                else:
                    problems.append(str(exc))
        elif self.src_home.path.exists():  # its supervisor is gone: nothing runs to undo, only the plan
            await asyncio.to_thread(self.src_home.forget_listeners, self.record.id)
        if self.record.facts.destination_takes_back:
            await self.target.abort_take_back()
        elif self.record.facts.destination_home_created:
            # Only a home this migration made: a VM of that name that was there before is not ours.
            await self.target.remove()
        return problems

    async def _source_crashed(self, src: VmSide, wait: float = 10.0) -> bool:
        """Whether the source VM's QEMU is gone: its supervisor exits, or says it has no QEMU, within
        ``wait`` s (a supervisor whose QEMU died ends a moment later)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self.src_home.is_running():
                return True
            try:
                if (await src.ctl("status")).get("qemu_pid") is None:
                    return True
            except SideError:
                pass  # on its way out
            await asyncio.sleep(0.2)
        return not self.src_home.is_running()

    async def _undo_source_disks(self) -> None:
        """A source whose QEMU died: its disk service stops serving the destination (the rollback's
        disk part), and a service gone with its supervisor leaves nothing in the disk plan that a start
        would open again (found by the fault campaign: the export's listener and disks.json left on A
        after a rollback, and listening again at the next start)."""
        if self.spec is not None:
            with contextlib.suppress(SideError):
                await self.strategy.rollback(self.ctx)
        if not self.src_home.is_running() and self.src_home.path.exists():
            await asyncio.to_thread(self.src_home.forget_listeners, self.record.id)

    async def _undo_source(self, src: VmSide) -> None:
        try:
            info = await qm.query(src)
        except SideError:
            # QEMU does not answer: it may hang on a stream gone silent (the link cut at the switchover);
            # cut that connection (it then fails the migration) and ask again.
            got = await src.ctl("migration-cut-stream", migration=self.record.id)
            if not got.get("cut"):
                raise
            info = await qm.query(src)
        if info.status in qm.CANCELLABLE:
            await qm.cancel(src)
            await qm.wait(src, qm.TERMINAL, 30)
        if self.spec is not None:
            problems = await self.strategy.rollback(self.ctx)
            if problems:
                raise SideError("; ".join(problems))
        if self.record.facts.tls:
            with contextlib.suppress(SideError):  # a later attempt adds its own
                await qm.drop_tls(src)
        with contextlib.suppress(SideError):
            await src.ctl("migration-disarm", migration=self.record.id)
        if await qm.run_state(src) != "running":
            # QEMU restarts a cancelled migration's guest itself; a completed one stays stopped
            # (postmigrate), and a quick migration's was paused: the destination never ran.
            await qm.cont(src)

    # --- taken over after a crash --------------------------------------------------------------------------

    async def take_over(self) -> None:
        try:
            spec = self.src_home.load_spec()
        except (OSError, ValueError, SpecError):  # past the commit its home files may have left
            spec = await self.target.load_spec()
        self.spec = spec
        self.source = VmSide(self.src_home, spec, "source")
        if self.src_home.is_running():
            with contextlib.suppress(SideError):
                self.source_disks.update(
                    {n: serving_of(s) for n, s in (await self.source.disk_status()).items()}
                )

    async def way_after_crash(self) -> Way:
        if self.record.phase == Phase.ROLLBACK:
            return Way.BACK
        if self.record.phase in FORWARD and FORWARD.index(self.record.phase) > FORWARD.index(Phase.RESUME):
            # Recorded only once the destination was resumed: it ran, it is the VM, running or not (a
            # crashed one is waited for until it is started again). The arbiter's "gone: it may have
            # run" is for a resume not known to have happened; here it ended such a migration failed,
            # the source serving for good (found by the fault campaign: kill -9 of B's QEMU).
            self.report["recovery"] = "the destination was resumed: it is the VM"
            return Way.FORWARD
        src = await self._source_view()
        dest = await self._destination_view()
        ledger = await self.request.ledger.is_committed(self.record)
        decision = decide(committed(self.record.phase) or ledger, src, dest)
        log.info("migration %s: %s (%s)", self.record.id, decision.way, decision.reason)
        if decision.way == Way.FAILED:
            self.record.error = decision.reason
        self.report["recovery"] = decision.reason
        return decision.way

    async def _source_view(self) -> SourceView:
        assert self.source is not None
        if not self.src_home.is_running():
            return SourceView(qemu_alive=False, committed=False)
        try:
            status = await self.source.status()
        except SideError:
            return SourceView(qemu_alive=False, committed=False)
        return SourceView(
            qemu_alive=status.get("qemu_pid") is not None and status.get("supervisor") != "serving",
            committed=status.get("guard") == "committed" and status.get("migration") == self.record.id,
        )

    async def _destination_view(self) -> DestinationView:
        try:
            if not await self.target.is_running():
                return DestinationView(reachable=True, exists=False)
            status = await self.target.vm_status()
            completed = False
            if status.get("supervisor") == "incoming":
                info = await self.target.wait_incoming(0.0)
                completed = info.status == qm.MigrationStatus.COMPLETED
            return DestinationView(
                reachable=True,
                exists=True,
                stream_completed=completed or status.get("state") in ("paused", "postmigrate"),
                ran=status.get("supervisor") == "running",
            )
        except SideError as exc:
            return DestinationView(reachable=not exc.transient, exists=exc.transient)

    # --- report --------------------------------------------------------------------------------------------

    def _finish_live_report(self) -> None:
        info = self.report.get("migrate_info") or {}
        ram = info.get("ram") or {}
        self.report.update(
            {
                "storage": self.record.storage.value,
                "downtime_ms": info.get("downtime"),
                "total_time_ms": info.get("total-time"),
                "setup_time_ms": info.get("setup-time"),
                "memory_bytes": ram.get("transferred"),
                "memory_total_bytes": ram.get("total"),
                "memory_iterations": ram.get("dirty-sync-count"),
                "postcopy_requests": ram.get("postcopy-requests"),
                "encrypted": self.record.settings.tls,
            }
        )
        self.report.pop("pre_switchover_info", None)
