"""The migration coordinator: carries out the phases of :mod:`phases` between two VM supervisors.

The decisions live in pure modules (phases, convergence, storage modes, prechecks); this module is
the I/O around them. It talks to the source VM's supervisor, NBD service and QEMU (through the
supervisor), starts the destination VM's supervisor in incoming mode with a disk plan, and to its
relocation proxies. The record is saved at every phase change.

Switchover: the source QEMU runs with ``pause-before-switchover``. When RAM is nearly copied, QEMU
stops the guest, drains and flushes its I/O (every write has reached our NBD service), and waits.
Storage then does its part (hybrid: the destination's proxies drop what the source's dirty bitmap
marks; precopy: the ready mirror jobs are completed), and only then does QEMU send the rest.

Failure before the destination resumes rolls back: the migration is cancelled (QEMU resumes the
guest on the source by itself; we make sure), the destination is killed and its home removed, the
source's extra listener and bitmap go. After the destination resumed, the source never runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hikkoshi import __version__
from hikkoshi.migrate.convergence import Observation, Progress, Schedule, build_schedule, decide
from hikkoshi.migrate.destination import Destination, LocalDestination
from hikkoshi.migrate.job import Job, MigrationError, MigrationRefused, hand_off, release_source
from hikkoshi.migrate.phases import FORWARD, Phase, recovery
from hikkoshi.migrate.precheck import Side, migration_problems
from hikkoshi.migrate.record import Endpoint, MigrationRecord, MigrationStore
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage_modes import (
    StorageMode,
    bitmap_name,
    destination_backend,
    moves_disks,
    uses_dirty_bitmap,
)
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.disk_plan import IncomingPlan
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import host_facts, qemu_version, space
from hikkoshi.vm.qemu import disk_device_id
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.migrate")

_TERMINAL = ["completed", "failed", "cancelled"]
#: QEMU object id of the migration stream's TLS credentials.
TLS_ID = "hikkoshi-migration-tls"
#: How long a destination proxy may be unreachable (restarting) after the switchover.
PROXY_GRACE = 60.0


Route = Callable[[str, str], Awaitable[str]]
"""``route(purpose, "host:port") -> "host:port"``: the address to use instead, e.g. a WAN emulator's
relay. Purposes: ``stream`` (the source QEMU sends memory to the destination), ``mirror`` (it writes
the disks to the destination's NBD service, precopy), ``export`` (the destination reads the source's
disks: proxy upstream, or the disk itself with shared storage)."""


@dataclass(frozen=True)
class MigrationRequest:
    """What the user asked for."""

    vm: str
    source_datastore: Path
    dest_datastore: Path
    storage: StorageMode = StorageMode.HYBRID
    dest_runtime_dir: Path | None = None
    source_address: str = "127.0.0.1"
    dest_address: str = "127.0.0.1"
    max_downtime_ms: int = 300
    bandwidth: int | None = None
    """Memory stream limit, bytes/s (``None``: unlimited)."""
    disk_bandwidth: str | None = None
    """Background disk copy limit (proxy modes), e.g. ``50M``."""
    auto_converge: bool = True
    allow_postcopy: bool = False
    max_seconds: float = 600.0
    qemu: str = DEFAULT_QEMU
    route: Route | None = None
    """How one host reaches a service of the other (default: directly); see :data:`Route`."""
    paused: bool = False
    """Quick migration: the guest is paused for the move, after the precheck (its vCPUs stay stopped
    until it runs on the destination, or again on the source after a rollback); the stream carries its
    state in one pass."""
    tls_dir: Path | None = None
    """Encrypt the memory stream: a directory in QEMU's x509 layout (``ca-cert.pem``, ``server-cert.pem``,
    ``server-key.pem`` for the destination; ``client-cert.pem``, ``client-key.pem`` for the source). The
    destination's certificate must name ``dest_address``; both ends verify each other."""


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


class Coordinator(Job):
    """Runs one migration from start to end (or rollback)."""

    def __init__(
        self,
        request: MigrationRequest,
        store: MigrationStore,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        destination: Destination | None = None,
    ) -> None:
        super().__init__(store, on_progress)
        self.request = request
        src_home = VmHome(request.source_datastore / request.vm)
        self.target: Destination = destination or LocalDestination(
            request.vm, request.dest_datastore, request.dest_runtime_dir
        )
        self.record = MigrationRecord(
            vm=request.vm,
            kind="quick" if request.paused else "live",
            storage=request.storage,
            source=Endpoint(
                datastore=request.source_datastore, home=src_home.path, address=request.source_address
            ),
            destination=Endpoint(
                datastore=self.target.datastore,
                home=self.target.home_path,
                runtime_dir=self.target.runtime_dir,
                address=request.dest_address,
                agent=self.target.agent,
            ),
            settings={
                "max_downtime_ms": request.max_downtime_ms,
                "bandwidth": request.bandwidth,
                "disk_bandwidth": request.disk_bandwidth,
                "auto_converge": request.auto_converge,
                "allow_postcopy": request.allow_postcopy,
                "paused": request.paused,
                "tls_dir": str(request.tls_dir) if request.tls_dir else None,
            },
        )
        self.schedule: Schedule = build_schedule(
            request.max_downtime_ms,
            auto_converge=request.auto_converge,
            allow_postcopy=request.allow_postcopy,
            max_seconds=request.max_seconds,
        )
        self.src_home = src_home
        self.tls_dir = request.tls_dir.absolute() if request.tls_dir is not None else None
        self.spec: VmSpec | None = None
        self.source: VmSide | None = None
        self.dest: Destination | None = None
        """The destination, once its supervisor was started."""
        self.report = {"actions": [], "iterations": []}
        self._t_stop = 0.0

    # --- plumbing ------------------------------------------------------------------------------------------

    @classmethod
    def from_record(
        cls,
        record: MigrationRecord,
        store: MigrationStore,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        destination: Destination | None = None,
    ) -> Coordinator:
        """A coordinator taking over a recorded migration (after the one running it died);
        ``destination`` reaches the recorded one if it is not a local datastore."""
        s = record.settings
        request = MigrationRequest(
            vm=record.vm,
            source_datastore=record.source.datastore,
            dest_datastore=record.destination.datastore,
            storage=record.storage,
            dest_runtime_dir=record.destination.runtime_dir,
            source_address=record.source.address,
            dest_address=record.destination.address,
            max_downtime_ms=int(s.get("max_downtime_ms", 300)),
            bandwidth=s.get("bandwidth"),
            disk_bandwidth=s.get("disk_bandwidth"),
            auto_converge=bool(s.get("auto_converge", True)),
            allow_postcopy=bool(s.get("allow_postcopy", False)),
            paused=record.kind == "quick",
            tls_dir=Path(s["tls_dir"]) if s.get("tls_dir") else None,
        )
        self = cls(request, store, on_progress, destination)
        self._take_over(record)
        return self

    async def recover(self) -> MigrationRecord:
        """Finish what a dead coordinator left: roll back before the commit point, finish after it."""
        action = recovery(self.record.phase)
        log.info("migration %s was left at %s: %s", self.record.id, self.record.phase, action)
        if action in ("nothing", "inspect"):
            return self.record
        try:
            spec = self.src_home.load_spec()
        except (OSError, ValueError):
            spec = await self.target.load_spec()
        self.spec = spec
        self.source = VmSide(self.src_home, spec, "source")
        if await self.target.home_exists():
            self.dest = self.target
        if action == "rollback":
            await asyncio.shield(self._rollback())
            return self.record
        try:
            await self._finish_forward()
        except Exception as exc:
            self._failed_after_commit(exc)
        return self.record

    async def _finish_forward(self) -> None:
        """The phases after the commit point, each safe to repeat, from where the record stands."""
        steps = [
            (Phase.RESUME, self._resume),
            (Phase.ANNOUNCE, self._announce),
            (Phase.STORAGE_POST, self._storage_post),
            (Phase.CLEANUP, self._cleanup),
        ]
        for phase, step in steps:
            if self.record.phase != phase:
                if FORWARD.index(self.record.phase) > FORWARD.index(phase):
                    continue  # done before
                self._enter(phase)
            await step()
        self._finish_report()
        self._enter(Phase.DONE)

    async def _route(self, purpose: str, address: str) -> str:
        if self.request.route is None:
            return address
        routed = await self.request.route(purpose, address)
        self.record.facts.setdefault("routes", {})[f"{purpose} {address}"] = routed
        return routed

    # --- the whole run -------------------------------------------------------------------------------------

    async def run(self) -> MigrationRecord:
        """Migrate; the final record (``MigrationError`` if it did not end ``done``)."""
        self._begin()
        try:
            await self._precheck()
        except MigrationRefused:
            self.record.error = self.record.error or "refused"
            self._enter(Phase.FAILED)
            raise
        try:
            self._enter(Phase.PREPARE)
            await self._prepare()
            self._enter(Phase.HOME_FILES)
            await self._home_files()
            self._enter(Phase.STORAGE_PRE)
            await self._storage_pre()
            self._enter(Phase.MEMORY)
            await self._memory()
            self._enter(Phase.SWITCHOVER)
            await self._switchover()
        except (Exception, asyncio.CancelledError) as exc:
            reason = str(exc) or type(exc).__name__
            log.error(
                "migration %s failed in %s: %s; rolling back", self.record.id, self.record.phase, reason
            )
            self.record.error = reason
            await asyncio.shield(self._rollback())
            raise MigrationError(f"migration failed and was rolled back: {reason}", self.record) from None
        try:
            self._enter(Phase.RESUME)  # the commit point, recorded before the destination runs
            await self._finish_forward()
        except Exception as exc:
            self._failed_after_commit(exc)
        return self.record

    # --- precheck ------------------------------------------------------------------------------------------

    async def _precheck(self) -> None:
        req = self.request
        problems: list[str] = []
        try:
            spec = self.src_home.load_spec()
        except (OSError, ValueError) as exc:
            self._refuse([f"no VM {req.vm!r} in {req.source_datastore}: {exc}"])
        self.spec = spec
        self.source = VmSide(self.src_home, spec, "source")
        if not self.src_home.is_running():
            self._refuse([f"VM {req.vm!r} is not running (cold migration: copy its home)"])
        status = await self.source.status()
        if status.get("state") != "running":
            problems.append(f"the VM's QEMU is {status.get('state')}, not running")
        facts = await asyncio.to_thread(host_facts)
        qv = await asyncio.to_thread(qemu_version, req.qemu)
        accel = str(status.get("accel", "tcg"))
        try:
            there = await self.target.describe(accel, req.qemu)
        except SideError as exc:
            self._refuse([f"the destination does not answer: {exc}"])
        target = self.target
        if not there.datastore_exists:
            problems.append(f"destination datastore {target.datastore} does not exist")
        if there.home_exists:
            problems.append(f"{target.home_path} exists already: the destination has a VM of that name")
        same = (
            isinstance(target, LocalDestination)
            and target.datastore.resolve() == req.source_datastore.resolve()
        )
        if same:
            problems.append("source and destination datastore are the same (use storage-migrate)")
        needed = (
            sum(_allocated(self.src_home.disk_path(d)) for d in spec.disks) if moves_disks(req.storage) else 0
        )
        src_side = Side(facts, accel, qv, __version__, space(req.source_datastore).free)
        problems += migration_problems(spec, src_side, there.side, needed)
        self.record.facts["accel"] = accel
        if accel == "tcg" and len(self.schedule.downtime_ms) > 1:
            # QEMU 7.2 under TCG corrupts guest memory in migrations of many short iterations (reproduced
            # without hikkoshi: 4 of 12 busy guests crashed at a 50 ms limit, none of 16 at 300 ms). Under
            # TCG the schedule starts at the user's maximum; KVM hosts climb from 50 ms as usual.
            self.schedule = replace(self.schedule, downtime_ms=self.schedule.downtime_ms[-1:])
            self.report["schedule_note"] = "tcg: one downtime step (the maximum)"
        if problems:
            self._refuse(problems)

    # --- preparation ---------------------------------------------------------------------------------------

    async def _prepare(self) -> None:
        assert self.source is not None and self.spec is not None
        req = self.request
        if req.paused:
            # Quick migration: suspended from here on, so its state moves in one pass; it runs again
            # on the destination, or here after a rollback (which resumes a stopped source).
            await self.source.ctl("pause")
        # The guest's dirty rate, measured while everything else is prepared (QEMU samples pages).
        with contextlib.suppress(SideError):
            await self.source.qmp("calc-dirty-rate", {"calc-time": 1})
            self.record.facts["dirty_rate_started"] = time.monotonic()
        if self.spec.disks and req.storage != StorageMode.PRECOPY:
            names = await self.source.nbd("listen", address=f"{req.source_address}:0")
            self.record.facts["source_listen"] = names[0]
            reach = await self._route("export", names[0])
            self.record.facts["exports"] = {d.name: f"nbd://{reach}/{d.name}" for d in self.spec.disks}
        # The disks' geometry as the guest saw it from boot on: the destination's devices get the same
        # and skip QEMU's guess from the first sector, a read across the WAN while it starts.
        geometry: dict[str, list[int]] = {}
        for disk in self.spec.disks:
            path = f"/machine/peripheral/{disk_device_id(disk.name)}"
            with contextlib.suppress(SideError):  # without it, the destination's QEMU guesses as before
                chs = [
                    await self.source.qmp("qom-get", {"path": path, "property": p})
                    for p in ("cyls", "heads", "secs")
                ]
                if all(isinstance(v, int) and v > 0 for v in chs):
                    geometry[disk.name] = chs
        self.record.facts["geometry"] = geometry
        if uses_dirty_bitmap(req.storage):
            # Before the destination's proxy reads anything: every later write is marked.
            for disk in self.spec.disks:
                await self.source.nbd("bitmap-add", export=disk.name, name=bitmap_name(self.record.id))
            self.record.facts["bitmap"] = bitmap_name(self.record.id)
        self.store.save(self.record)

    async def _home_files(self) -> None:
        assert self.spec is not None
        req = self.request
        await self._send_home(self.target, self.src_home, self.spec)
        exports = self.record.facts.get("exports", {})
        plan = IncomingPlan(
            migration=self.record.id,
            disks={
                d.name: destination_backend(
                    req.storage, exports.get(d.name, ""), self.record.id, req.disk_bandwidth
                )
                for d in self.spec.disks
            }
            if req.storage != StorageMode.PRECOPY
            else {},
            geometry={k: tuple(v) for k, v in self.record.facts.get("geometry", {}).items()},
        )
        if req.storage == StorageMode.PRECOPY:
            # The mirror fills them; sparse until it does.
            await self.target.create_disks({d.file_name: d.size for d in self.spec.disks})
        await self.target.save_plan(plan)
        info = await self.target.start_incoming(
            str(self.record.facts.get("accel", "tcg")), req.qemu if req.qemu != DEFAULT_QEMU else None
        )
        self.record.facts["destination_supervisor_pid"] = info.get("supervisor_pid")
        self.dest = self.target
        self.store.save(self.record)

    # --- storage before memory -----------------------------------------------------------------------------

    async def _storage_pre(self) -> None:
        assert self.source is not None and self.dest is not None and self.spec is not None
        if self.request.storage != StorageMode.PRECOPY or not self.spec.disks:
            return
        names = await self.dest.nbd("listen", address=f"{self.request.dest_address}:0")
        host, port = (await self._route("mirror", names[0])).rsplit(":", 1)
        jobs = []
        for disk in self.spec.disks:
            node, job = f"mig-target-{disk.name}", f"mig-{disk.name}"
            await self.source.qmp(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": node,
                    "server": {"type": "inet", "host": host.strip("[]"), "port": port},
                    "export": disk.name,
                },
            )
            self.record.facts.setdefault("mirror_nodes", []).append(node)
            await self.source.qmp(
                "blockdev-mirror",
                {
                    "job-id": job,
                    "device": f"disk-{disk.name}",
                    "target": node,
                    "sync": "full",
                    "copy-mode": "write-blocking",
                },
            )
            jobs.append(job)
            self.record.facts.setdefault("mirror_jobs", []).append(job)
        self.store.save(self.record)
        while True:
            info = await self.source.qmp("query-block-jobs")
            mine = [j for j in info if j.get("device") in jobs]
            if len(mine) < len(jobs):
                raise SideError("a disk mirror job ended before it was in sync")
            self.on_progress(
                {
                    "phase": Phase.STORAGE_PRE.value,
                    "disk_done": sum(j.get("offset", 0) for j in mine),
                    "disk_total": sum(j.get("len", 0) for j in mine),
                }
            )
            if all(j.get("ready") for j in mine):
                self.report["disk_mirror_bytes"] = sum(j.get("len", 0) for j in mine)
                return
            await asyncio.sleep(0.2)

    # --- memory --------------------------------------------------------------------------------------------

    async def _memory(self) -> None:
        # The dirty-rate sample started in _prepare (1 s) is read beside the stream, never waited for
        # first: the destination may be ready before it is.
        dirty_rate = asyncio.ensure_future(self._read_dirty_rate())
        try:
            await self._stream()
        finally:
            if not dirty_rate.done():
                dirty_rate.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dirty_rate

    async def _stream(self) -> None:
        assert self.source is not None and self.dest is not None
        req, src, dst = self.request, self.source, self.dest
        caps_src = {
            "events": True,
            "pause-before-switchover": True,
            "auto-converge": bool(self.schedule.throttle_percent),
        }
        caps_dst = {"events": True}
        if self.schedule.allow_postcopy:
            caps_src["postcopy-ram"] = caps_dst["postcopy-ram"] = True
        await dst.qmp("migrate-set-capabilities", _caps(caps_dst))
        await src.qmp("migrate-set-capabilities", _caps(caps_src))
        if self.tls_dir is not None:
            await self._tls(self.tls_dir)
        params: dict[str, Any] = {"downtime-limit": self.schedule.downtime_ms[0]}
        params["max-bandwidth"] = req.bandwidth if req.bandwidth else 1 << 40
        if self.schedule.throttle_percent:
            # QEMU's auto-converge throttles when the guest dirties faster than the link, up to
            # max-cpu-throttle. Until the schedule gets there that ceiling is 1 % (QEMU's least):
            # each throttle step raises it (and jumps there at once).
            params["cpu-throttle-initial"] = 1
            params["max-cpu-throttle"] = 1
        await src.qmp("migrate-set-parameters", params)
        await dst.qmp("migrate-incoming", {"uri": f"tcp:{req.dest_address}:0"})
        info = await dst.qmp("query-migrate")
        addrs = info.get("socket-address") or []
        if not addrs:
            raise SideError("the destination QEMU did not say where it listens for the stream")
        port = addrs[0]["port"]
        host = req.dest_address
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        uri = f"tcp:{await self._route('stream', target)}"
        self.record.facts["stream"] = uri
        self.store.save(self.record)
        self.report["memory_started"] = self._since_start()
        await src.qmp("migrate", {"uri": uri})
        progress = Progress()
        started = time.monotonic()
        while True:
            info = await src.wait_migration(["pre-switchover", *_TERMINAL], 0.1)
            status = info.get("status")
            if status == "pre-switchover":
                self.report["pre_switchover_info"] = info
                return
            if status in _TERMINAL:
                raise SideError(f"memory migration {status}: {info.get('error-desc', 'no reason given')}")
            ram = info.get("ram") or {}
            obs = Observation(
                iteration=int(ram.get("dirty-sync-count", 0)),
                remaining=int(ram.get("remaining", 0)),
                elapsed=time.monotonic() - started,
            )
            self.on_progress(
                {
                    "phase": Phase.MEMORY.value,
                    "memory_done": int(ram.get("transferred", 0)),
                    "memory_remaining": obs.remaining,
                    "memory_total": int(ram.get("total", 0)),
                    "iteration": obs.iteration,
                    "dirty_pages_rate": ram.get("dirty-pages-rate"),
                    "mbps": ram.get("mbps"),
                }
            )
            before = progress.last_iteration
            progress, action = decide(self.schedule, progress, obs)
            if progress.last_iteration != before:
                self.report["iterations"].append(
                    {
                        "iteration": obs.iteration,
                        "remaining": obs.remaining,
                        "at": round(obs.elapsed, 3),
                        "throttle": info.get("cpu-throttle-percentage", 0),
                    }
                )
            if action.kind != "continue":
                await self._apply(action.kind, action.value, action.reason)

    async def _tls(self, directory: Path) -> None:
        assert self.source is not None and self.dest is not None
        for side, endpoint in ((self.dest, "server"), (self.source, "client")):
            await side.qmp(
                "object-add",
                {
                    "qom-type": "tls-creds-x509",
                    "id": TLS_ID,
                    "dir": str(directory),
                    "endpoint": endpoint,
                    "verify-peer": True,
                },
            )
        self.record.facts["tls"] = True
        await self.dest.qmp("migrate-set-parameters", {"tls-creds": TLS_ID})
        await self.source.qmp(
            "migrate-set-parameters", {"tls-creds": TLS_ID, "tls-hostname": self.request.dest_address}
        )

    async def _apply(self, kind: str, value: int, reason: str) -> None:
        assert self.source is not None
        self.report["actions"].append(
            {"action": kind, "value": value, "reason": reason, "at": self._since_start()}
        )
        log.info("convergence: %s %s (%s)", kind, value or "", reason)
        if kind == "set-downtime":
            await self.source.qmp("migrate-set-parameters", {"downtime-limit": value})
        elif kind == "throttle":
            await self.source.qmp(
                "migrate-set-parameters",
                {"cpu-throttle-initial": value, "cpu-throttle-increment": value, "max-cpu-throttle": value},
            )
        elif kind == "postcopy":
            await self.source.qmp("migrate-start-postcopy")
        else:
            raise SideError(f"memory did not converge: {reason}")

    async def _read_dirty_rate(self) -> None:
        assert self.source is not None
        if "dirty_rate_started" not in self.record.facts:
            return
        with contextlib.suppress(SideError):
            for _ in range(30):
                info = await self.source.qmp("query-dirty-rate")
                if info.get("status") == "measured":
                    self.report["dirty_rate_mib_s"] = info.get("dirty-rate")
                    return
                await asyncio.sleep(0.1)

    # --- switchover ----------------------------------------------------------------------------------------

    async def _switchover(self) -> None:
        assert self.source is not None and self.dest is not None and self.spec is not None
        src, dst = self.source, self.dest
        t_stop = time.monotonic()
        storage: dict[str, Any] = {}
        storage_done = t_stop

        async def invalidate(disk: str) -> None:
            nonlocal storage_done
            result = await dst.proxy(disk, "invalidate")
            storage[disk] = {k: result[k] for k in ("dirty_bytes", "dropped_bytes", "seconds")}
            storage_done = max(storage_done, time.monotonic())

        # The source is stopped and drained: its dirty bitmaps are final. The destination's proxies drop
        # what they name while QEMU sends the rest of memory, not before it (across a WAN each is a round
        # trip to the source): the destination guest runs only after both, and its QEMU reads nothing
        # for it until then (requests it restarts wait for the resume).
        dropping: list[asyncio.Future[None]] = []
        if uses_dirty_bitmap(self.request.storage):
            for disk in self.spec.disks:
                # Until the destination runs, the link is the memory stream's (the guest waits for it):
                # hybrid's copy (of what is dropped now, too) goes on after the resume (_storage_post).
                await dst.proxy(disk.name, "pause")
            dropping = [asyncio.ensure_future(invalidate(d.name)) for d in self.spec.disks]
        try:
            if self.request.storage == StorageMode.PRECOPY:
                for job in self.record.facts.get("mirror_jobs", []):
                    # Ready, and the guest is stopped and drained: cancelling leaves the target in sync.
                    await src.qmp("block-job-cancel", {"device": job})
                await self._wait_jobs_gone()
                storage_done = time.monotonic()
            await src.qmp("migrate-continue", {"state": "pre-switchover"})
            info = await src.wait_migration(_TERMINAL, 120)
            if info.get("status") != "completed":
                raise SideError(f"memory migration {info.get('status')}: {info.get('error-desc', '')}")
            dinfo = await dst.wait_migration(_TERMINAL, 120)
            if dinfo.get("status") != "completed":
                raise SideError(f"the destination's incoming migration {dinfo.get('status')}")
            await asyncio.gather(*dropping)
        finally:
            for task in dropping:
                task.cancel()  # after a failure; the rollback removes the destination anyway
        self.report["switchover"] = {
            "storage_ms": round((storage_done - t_stop) * 1000, 2),
            "storage": storage,
            "stopped_at": round(t_stop - self.t0, 4),
        }
        self.report["migrate_info"] = info
        self._t_stop = t_stop

    async def _final_figures(self) -> None:
        """QEMU announces ``completed`` before it fills in the downtime and total time: ask again."""
        assert self.source is not None
        for _ in range(50):
            info = await self.source.qmp("query-migrate")
            if info.get("status") != "completed" or info.get("total-time"):
                if info.get("status") == "completed":
                    self.report["migrate_info"] = info
                return
            await asyncio.sleep(0.01)

    async def _wait_jobs_gone(self) -> None:
        assert self.source is not None
        jobs = set(self.record.facts.get("mirror_jobs", []))
        for _ in range(600):
            info = await self.source.qmp("query-block-jobs")
            if not any(j.get("device") in jobs for j in info):
                return
            await asyncio.sleep(0.01)
        raise SideError("the disk mirror jobs did not finish")

    # --- after the commit point ----------------------------------------------------------------------------

    async def _resume(self) -> None:
        if self.dest is None or not await self.dest.is_running():
            raise SideError("the destination VM is gone after the commit point; its source stays stopped")
        if (await self.dest.status()).get("state") == "running":
            return  # resumed before a coordinator died
        await self.dest.ctl("resume")
        now = time.monotonic()
        with contextlib.suppress(SideError):
            await self._final_figures()  # after the resume: never on the guest's time
        if self._t_stop:
            self.report.setdefault("switchover", {})["gap_ms"] = round((now - self._t_stop) * 1000, 2)
        self.report["time_to_destination_s"] = round(now - self.t0, 3)

    async def _announce(self) -> None:
        assert self.dest is not None and self.spec is not None
        if self.spec.nics:
            # Gratuitous RARPs from the same MAC: switches learn the VM's new port.
            await self.dest.qmp("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})

    async def _storage_post(self) -> None:
        assert self.source is not None and self.dest is not None and self.spec is not None
        # QEMU on the source quits; its disks keep serving the destination until released.
        if self.src_home.is_running():
            await hand_off(self.source, self.src_home)
        mode = self.request.storage
        if mode not in (StorageMode.POSTCOPY, StorageMode.HYBRID):
            return
        for disk in self.spec.disks:  # paused until now (postcopy: from the start; hybrid: the switchover)
            await self.dest.proxy(disk.name, "resume")
        fetched: dict[str, dict[str, Any]] = {}
        unanswered_since: float | None = None
        while True:
            if not await self.dest.is_running():
                raise SideError(
                    "the destination VM ended before its disks were complete; the source keeps serving "
                    f"them: start it again on the destination ({self.target.home_path}) to carry on"
                )
            done = True
            total = present = 0
            for disk in self.spec.disks:
                try:
                    st = await self.dest.proxy(disk.name, "status")
                    unanswered_since = None
                except SideError:
                    # A proxy that died is restarted by its supervisor (its cache survives): wait.
                    now = time.monotonic()
                    unanswered_since = unanswered_since or now
                    if now - unanswered_since > PROXY_GRACE:
                        raise
                    done = False
                    break
                total += int(st["size"])
                present += int(st["present_bytes"])
                fetched[disk.name] = {
                    "demand_bytes": st["fetched_demand_bytes"],
                    "background_bytes": st["fetched_background_bytes"],
                    "zero_bytes": st["zero_bytes"],
                }
                done = done and st["upstream"] == "detached"
            self.on_progress({"phase": Phase.STORAGE_POST.value, "disk_done": present, "disk_total": total})
            if done:
                break
            await asyncio.sleep(0.2)
        self.report["disk_fetch"] = fetched
        self.report["disk_complete_s"] = self._since_start()

    async def _cleanup(self) -> None:
        assert self.source is not None and self.spec is not None
        if moves_disks(self.request.storage):
            if self.src_home.is_running():
                await release_source(self.source, self.src_home)
            # The destination holds a complete, flushed copy of every disk and serves it.
            if self.src_home.path.exists():
                await asyncio.to_thread(shutil.rmtree, self.src_home.path)
            self.report["source_released_s"] = self._since_start()
        if moves_disks(self.request.storage) and self.dest is not None:
            # Every disk is a complete local file now; with shared storage the plan says where it is.
            await self.dest.drop_plan()
        if self.dest is not None:
            await self.dest.adopt()

    # --- rollback ------------------------------------------------------------------------------------------

    async def _rollback(self) -> None:
        if self.record.phase != Phase.ROLLBACK:
            self._enter(Phase.ROLLBACK)
        problems: list[str] = []
        src = self.source
        if src is not None and self.src_home.is_running():
            try:
                await self._rollback_source(src)
            except SideError as exc:
                problems.append(str(exc))
        try:
            await self._remove_destination()
        except (SideError, OSError) as exc:
            problems.append(f"destination: {exc}")
        self._end_rollback(problems)

    async def _rollback_source(self, src: VmSide) -> None:
        info = await src.qmp("query-migrate")
        if info.get("status") not in (None, "none", *_TERMINAL):
            await src.qmp("migrate_cancel")
            await src.wait_migration(["cancelled", "failed", "completed"], 30)
        for job in self.record.facts.get("mirror_jobs", []):
            with contextlib.suppress(SideError):
                await src.qmp("block-job-cancel", {"device": job, "force": True})
        with contextlib.suppress(SideError):
            await self._wait_jobs_gone()
        for node in self.record.facts.get("mirror_nodes", []):
            with contextlib.suppress(SideError):
                await src.qmp("blockdev-del", {"node-name": node})
        if self.record.facts.get("tls"):
            with contextlib.suppress(SideError):  # a later attempt adds its own
                await src.qmp("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
                await src.qmp("object-del", {"id": TLS_ID})
        status = (await src.qmp("query-status"))["status"]
        if status != "running":
            # QEMU restarts a cancelled migration's guest itself; a completed one stays stopped
            # (postmigrate) -- the destination never ran, so the source takes over again.
            await src.qmp("cont")
        if "source_listen" in self.record.facts:
            with contextlib.suppress(SideError):
                await src.nbd("unlisten", address=self.record.facts["source_listen"])
        if "bitmap" in self.record.facts and self.spec is not None:
            for disk in self.spec.disks:
                with contextlib.suppress(SideError):
                    await src.nbd("bitmap-remove", export=disk.name, name=self.record.facts["bitmap"])

    async def _remove_destination(self) -> None:
        # Only a home this migration made: a VM of that name that was there before is not ours.
        if self.record.facts.get("destination_home_created"):
            await self.target.remove()

    # --- report --------------------------------------------------------------------------------------------

    def _finish_report(self) -> None:
        info = self.report.get("migrate_info") or {}
        ram = info.get("ram") or {}
        report: dict[str, Any] = {
            "id": self.record.id,
            "vm": self.record.vm,
            "storage": self.record.storage.value,
            "outcome": "done" if self.record.phase not in (Phase.ROLLBACK, Phase.FAILED) else "failed",
            "phases_s": self.record.phase_seconds(),
            "downtime_ms": info.get("downtime"),
            "total_time_ms": info.get("total-time"),
            "setup_time_ms": info.get("setup-time"),
            "memory_bytes": ram.get("transferred"),
            "memory_total_bytes": ram.get("total"),
            "memory_iterations": ram.get("dirty-sync-count"),
            "postcopy_requests": ram.get("postcopy-requests"),
            **{k: v for k, v in self.report.items() if k not in ("migrate_info", "pre_switchover_info")},
            "elapsed_s": self._since_start(),
        }
        if self.record.error:
            report["error"] = self.record.error
        self.record.report = report


def _caps(caps: dict[str, bool]) -> dict[str, Any]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
