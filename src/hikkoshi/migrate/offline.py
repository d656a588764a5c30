"""Cold and quick migration (seeds 002, 003): the VM's files move while it does not run.

- cold: the VM is powered off. Its home files, then its disks (holes kept) are copied to the
  destination datastore and made durable; only then is the source deleted. The source's run lock
  is held throughout, so nobody starts the VM in the middle.
- quick: a running VM is suspended (its memory state saved straight into the destination's home),
  its disks are copied while QEMU stays stopped, the destination loads the state and resumes. The
  guest is stopped for the whole copy; nothing else moves while it runs. Before the destination
  resumes, any failure lets the source go on where it stopped.

The phases are those of :mod:`phases` with the ones that do not apply left out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import time

from hikkoshi.block.sparse_copy import sparse_copy
from hikkoshi.migrate.coordinator import MigrationRequest
from hikkoshi.migrate.job import Job, MigrationError, MigrationRefused, Progress, hand_off, release_source
from hikkoshi.migrate.phases import Phase, recovery
from hikkoshi.migrate.record import Endpoint, MigrationRecord, MigrationStore
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.vm import control
from hikkoshi.vm.disk_plan import PLAN_FILE, IncomingPlan
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import space
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.migrate.offline")

STATE_FILE = "memory.state"


class OfflineMigration(Job):
    """A cold or quick migration."""

    def __init__(
        self,
        request: MigrationRequest,
        store: MigrationStore,
        kind: str,
        on_progress: Progress | None = None,
    ) -> None:
        if kind not in ("cold", "quick"):
            raise ValueError(f"not an offline kind: {kind}")
        super().__init__(store, on_progress)
        self.request = request
        self.src_home = VmHome(request.source_datastore / request.vm)
        self.dst_home = VmHome(request.dest_datastore / request.vm)
        self.record = MigrationRecord(
            vm=request.vm,
            kind="cold" if kind == "cold" else "quick",
            storage=request.storage,
            source=Endpoint(datastore=request.source_datastore, home=self.src_home.path),
            destination=Endpoint(
                datastore=request.dest_datastore,
                home=self.dst_home.path,
                runtime_dir=request.dest_runtime_dir,
            ),
        )
        self.spec: VmSpec | None = None
        self.source: VmSide | None = None
        self.dest: VmSide | None = None
        self._stopped_at: float | None = None

    @classmethod
    def from_record(cls, record: MigrationRecord, store: MigrationStore) -> OfflineMigration:
        """Take over a recorded offline migration."""
        request = MigrationRequest(
            vm=record.vm,
            source_datastore=record.source.datastore,
            dest_datastore=record.destination.datastore,
            dest_runtime_dir=record.destination.runtime_dir,
        )
        self = cls(request, store, record.kind)
        self._take_over(record)
        return self

    # --- the run -------------------------------------------------------------------------------------------

    async def run(self) -> MigrationRecord:
        """Migrate; the final record (``MigrationError`` if it did not end ``done``)."""
        try:
            return await self._run()
        finally:
            self._release_run_lock()

    async def _run(self) -> MigrationRecord:
        self._begin()
        try:
            self._precheck()
            assert self.spec is not None
            await self._new_home(self.src_home, self.dst_home, self.spec)
            if self.record.kind == "cold":
                self._enter(Phase.STORAGE_PRE)
                await self._copy_disks()
            else:
                self._enter(Phase.MEMORY)
                await self._suspend()
                self._enter(Phase.SWITCHOVER)
                await self._copy_disks()
                await self._load_destination()
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, MigrationRefused):
                raise
            self.record.error = str(exc) or type(exc).__name__
            await asyncio.shield(self._rollback())
            raise MigrationError(
                f"migration failed and was rolled back: {self.record.error}", self.record
            ) from None
        try:
            if self.record.kind == "quick":
                self._enter(Phase.RESUME)
            await self._finish_forward()
        except Exception as exc:
            self._failed_after_commit(exc)
        return self.record

    async def recover(self) -> MigrationRecord:
        """Finish or roll back what a dead coordinator left."""
        action = recovery(self.record.phase)
        if action in ("nothing", "inspect"):
            return self.record
        self.spec = self._home_spec(self.src_home, self.dst_home)
        self.source = VmSide(self.src_home, self.spec, "source")
        self.dest = VmSide(self.dst_home, self.spec, "destination")
        if action == "rollback":
            await self._rollback()
        else:
            await self._finish_forward()
        return self.record

    # --- steps ---------------------------------------------------------------------------------------------

    def _precheck(self) -> None:
        req = self.request
        try:
            self.spec = self.src_home.load_spec()
        except (OSError, ValueError) as exc:
            self._refuse([f"no VM {req.vm!r} in {req.source_datastore}: {exc}"])
        assert self.spec is not None
        problems = []
        if not req.dest_datastore.is_dir():
            problems.append(f"destination datastore {req.dest_datastore} does not exist")
        if self.dst_home.path.exists():
            problems.append(f"{self.dst_home.path} exists already: the destination has a VM of that name")
        running = self.src_home.is_running()
        if self.record.kind == "cold":
            if running or not self._hold_run_lock(self.src_home):
                problems.append(f"VM {req.vm!r} is running: stop it, or migrate it live or --quick")
        elif not running:
            problems.append(f"VM {req.vm!r} is not running (cold migration: --offline)")
        needed = sum(
            self.src_home.disk_path(d).stat().st_blocks * 512
            for d in self.spec.disks
            if self.src_home.disk_path(d).exists()
        )
        if req.dest_datastore.is_dir() and needed > space(req.dest_datastore).free:
            problems.append(f"the destination datastore has too little space for {needed} bytes of disks")
        self.source = VmSide(self.src_home, self.spec, "source")
        if problems:
            self._refuse(problems)

    async def _copy_disks(self) -> None:
        assert self.spec is not None
        total = 0
        for disk in self.spec.disks:
            src, dst = self.src_home.disk_path(disk), self.dst_home.disk_path(disk)
            done_before = total

            def progress(n: int, base: int = done_before) -> None:
                self.on_progress(
                    {"phase": self.record.phase.value, "disk_done": base + n, "disk_total": None}
                )

            total += await asyncio.to_thread(sparse_copy, src, dst, progress)
        dir_fd = os.open(self.dst_home.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.report["disk_bytes"] = total

    async def _suspend(self) -> None:
        assert self.source is not None
        src = self.source
        await src.ctl("pause")
        self._stopped_at = time.monotonic()
        self.record.facts["suspended"] = True
        self.store.save(self.record)
        await src.qmp("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        state = self.dst_home.path / STATE_FILE
        await src.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
        info = await src.wait_migration(["completed", "failed", "cancelled"], 600)
        if info.get("status") != "completed":
            raise SideError(f"saving the memory state {info.get('status')}: {info.get('error-desc', '')}")
        self.report["memory_bytes"] = state.stat().st_size

    async def _load_destination(self) -> None:
        assert self.spec is not None
        self.dst_home.save_plan(IncomingPlan(migration=self.record.id))  # every disk local
        await asyncio.to_thread(
            control.start_vm, self.dst_home, incoming=True, runtime_dir=self.request.dest_runtime_dir
        )
        self.dest = VmSide(self.dst_home, self.spec, "destination")
        await self.dest.qmp(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        state = self.dst_home.path / STATE_FILE
        await self.dest.qmp("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
        info = await self.dest.wait_migration(["completed", "failed", "cancelled"], 600)
        if info.get("status") != "completed":
            raise SideError(f"the destination could not load the memory state: {info.get('status')}")

    async def _finish_forward(self) -> None:
        if self.record.kind == "quick":
            if self.record.phase != Phase.RESUME:
                raise SideError(f"cannot finish a quick migration left at {self.record.phase}")
            assert self.dest is not None and self.source is not None
            if (await self.dest.status()).get("state") != "running":
                await self.dest.ctl("resume")
            if self._stopped_at is not None:
                self.report["downtime_ms"] = round((time.monotonic() - self._stopped_at) * 1000, 1)
            if self.src_home.is_running():
                await hand_off(self.source, self.src_home)
                await release_source(self.source, self.src_home)
        if self.record.phase != Phase.CLEANUP:
            self._enter(Phase.CLEANUP)
        if self.src_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.src_home.path)
        (self.dst_home.path / STATE_FILE).unlink(missing_ok=True)
        (self.dst_home.path / PLAN_FILE).unlink(missing_ok=True)
        self._finish_report()
        self._enter(Phase.DONE)

    async def _rollback(self) -> None:
        if self.record.phase != Phase.ROLLBACK:
            self._enter(Phase.ROLLBACK)
        problems = []
        if self.dst_home.path.exists() and self.dst_home.is_running():
            await asyncio.to_thread(control.kill_vm, self.dst_home)
        if self.record.facts.get("destination_home_created") and self.dst_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.dst_home.path)
        if self.record.kind == "quick" and self.source is not None and self.src_home.is_running():
            try:
                if (await self.source.qmp("query-status"))["status"] != "running":
                    await self.source.qmp("cont")  # the destination never ran
            except SideError as exc:
                problems.append(str(exc))
        self._release_run_lock()
        self._end_rollback(problems)
