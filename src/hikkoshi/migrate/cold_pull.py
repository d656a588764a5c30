"""Cold migration to another host: a powered-off VM's home files go first (seed 000), then its disks,
which the destination pulls from a read-only export of the source's (:mod:`disk_pull`); the source's
home is deleted only once the destination holds complete, flushed disks and owns the VM.

The source's run lock is held throughout, so the VM cannot be started on the source meanwhile. Until
the destination owns the VM (phase ``cleanup``) any failure removes the destination's copy; after it, a
restarted job finishes the deletion of the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from hikkoshi.migrate.coordinator import Route
from hikkoshi.migrate.destination import Destination
from hikkoshi.migrate.disk_pull import serve_read_only
from hikkoshi.migrate.job import Job, MigrationError, Progress
from hikkoshi.migrate.phases import Phase, recovery
from hikkoshi.migrate.precheck import check_space
from hikkoshi.migrate.record import Endpoint, MigrationRecord, MigrationStore
from hikkoshi.migrate.sides import SideError
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.procs import Child
from hikkoshi.vm.spec import VmSpec


class PullMigration(Job):
    """Moves a powered-off VM to a destination that pulls its disks."""

    def __init__(
        self,
        vm: str,
        source_datastore: Path,
        target: Destination,
        store: MigrationStore,
        *,
        source_address: str = "127.0.0.1",
        route: Route | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        super().__init__(store, on_progress)
        self.src_home = VmHome(source_datastore / vm)
        self.target = target
        self.route = route
        self.record = MigrationRecord(
            vm=vm,
            kind="cold",
            storage=StorageMode.PRECOPY,
            source=Endpoint(datastore=source_datastore, home=self.src_home.path, address=source_address),
            destination=Endpoint(datastore=target.datastore, home=target.home_path, agent=target.agent),
            settings={"pull": True},
        )
        self.spec: VmSpec | None = None
        self._export: Child | None = None

    @classmethod
    def from_record(
        cls, record: MigrationRecord, store: MigrationStore, target: Destination
    ) -> PullMigration:
        """Take over a recorded cold migration."""
        self = cls(record.vm, record.source.datastore, target, store, source_address=record.source.address)
        self._take_over(record)
        return self

    # --- the run -------------------------------------------------------------------------------------------

    async def run(self) -> MigrationRecord:
        """Migrate; the final record (``MigrationError`` if it did not end ``done``)."""
        try:
            return await self._run()
        finally:
            await self._stop_export()
            self._release_run_lock()

    async def _run(self) -> MigrationRecord:
        self._begin()
        await self._precheck()
        try:
            assert self.spec is not None
            self._enter(Phase.PREPARE)
            disks = await self._export_disks(self.spec)
            self._enter(Phase.HOME_FILES)
            await self._send_home(self.target, self.src_home, self.spec)
            self._enter(Phase.STORAGE_PRE)
            async with asyncio.TaskGroup() as tg:
                watch = tg.create_task(self._watch_export())
                try:
                    self.report["disk_pull"] = await self.target.pull_disks(disks)
                finally:
                    watch.cancel()
            await self._stop_export()
        except (Exception, asyncio.CancelledError) as exc:
            self.record.error = str(exc) or type(exc).__name__
            await asyncio.shield(self._rollback())
            raise MigrationError(
                f"migration failed and was rolled back: {self.record.error}", self.record
            ) from None
        try:
            self._enter(Phase.CLEANUP)  # the commit point: the destination holds every disk
            await self._cleanup()
        except Exception as exc:
            self._failed_after_commit(exc)
        return self.record

    async def recover(self) -> MigrationRecord:
        """Roll back (the destination never got everything) or finish (it did)."""
        action = recovery(self.record.phase)
        if action == "rollback":
            await self._rollback()
        elif action == "finish":
            try:
                await self._cleanup()
            except Exception as exc:
                self._failed_after_commit(exc)
        return self.record

    # --- steps ---------------------------------------------------------------------------------------------

    async def _precheck(self) -> None:
        try:
            self.spec = self.src_home.load_spec()
        except (OSError, ValueError) as exc:
            self._refuse([f"no VM {self.record.vm!r} in {self.record.source.datastore}: {exc}"])
        if not self._hold_run_lock(self.src_home):
            self._refuse([f"VM {self.record.vm!r} is running: stop it, or migrate it live or --quick"])
        try:
            there = await self.target.describe("tcg", DEFAULT_QEMU)
        except SideError as exc:
            self._refuse([f"the destination does not answer: {exc}"])
        problems = []
        if not there.datastore_exists:
            problems.append(f"destination datastore {self.target.datastore} does not exist")
        if there.home_exists:
            problems.append(f"{self.target.home_path} exists already: the destination has a VM of that name")
        needed = sum(
            p.stat().st_blocks * 512 for d in self.spec.disks if (p := self.src_home.disk_path(d)).exists()
        )
        problems += check_space(needed, there.side)
        if problems:
            self._refuse(problems)

    async def _export_disks(self, spec: VmSpec) -> dict[str, tuple[str, int]]:
        """Serve the disks read-only where the destination reaches them; file name to (URI, size)."""
        runtime = Path(tempfile.mkdtemp(prefix="hk-cold-", dir="/tmp"))  # short: a socket path
        self.record.facts["export_dir"] = str(runtime)
        files = {d.name: self.src_home.disk_path(d) for d in spec.disks}
        child, base = await serve_read_only(
            files,
            f"{self.record.source.address}:0",
            runtime / "control.sock",
            self.src_home.nbd_log,
            sys.executable,
        )
        self._export = child
        address = base.removeprefix("nbd://")
        if self.route is not None:
            address = await self.route("export", address)
        self.store.save(self.record)
        return {d.file_name: (f"nbd://{address}/{d.name}", d.size) for d in spec.disks}

    async def _watch_export(self) -> None:
        """Progress: what the destination has read from the export so far."""
        assert self.spec is not None
        control = Path(self.record.facts["export_dir"]) / "control.sock"
        total = sum(d.size for d in self.spec.disks)
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(OSError, ControlError):
                stats = await control_request(control, "stats")
                done = sum(int(e["bytes_read"]) for e in stats.values())
                self.on_progress({"phase": Phase.STORAGE_PRE.value, "disk_done": done, "disk_total": total})

    async def _stop_export(self) -> None:
        if self._export is not None:
            await self._export.terminate(grace=10.0)
            self._export = None
        export_dir = self.record.facts.get("export_dir")
        if export_dir:
            shutil.rmtree(export_dir, ignore_errors=True)

    async def _cleanup(self) -> None:
        await self.target.adopt()
        if self.src_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.src_home.path)
        self._finish_report()
        self._enter(Phase.DONE)

    async def _rollback(self) -> None:
        if self.record.phase != Phase.ROLLBACK:
            self._enter(Phase.ROLLBACK)
        await self._stop_export()  # one a dead job left ended with it (parent-death signal)
        problems = []
        if self.record.facts.get("destination_home_created"):
            try:
                await self.target.remove()
            except (SideError, OSError) as exc:
                problems.append(f"destination: {exc}")
        self._release_run_lock()
        self._end_rollback(problems)
