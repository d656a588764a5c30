"""Cold migration: a powered-off VM's home files go first (seed 000), then its disks, which the
destination pulls completely (holes stay holes, flushed) from a read-only export of the source's; the
source's home is deleted only once the destination holds complete, flushed disks and owns the VM.

The source's run lock is held throughout, so the VM cannot be started on the source meanwhile. Until
the destination owns the VM (the commit, phase ``cleanup``) any failure removes the destination's copy;
after it, a job taken over finishes the deletion of the source.

Disks held by another host (shared storage) are pulled from that holder, which is released at the
end; a VM going to the host that holds its disks moves no disk at all: that host's serving supervisor
stops (its home is the VM's again) and the source's home goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from hikkoshi.migrate.destination import Destination
from hikkoshi.migrate.disk_pull import serve_read_only
from hikkoshi.migrate.holders import release_holder_by_path
from hikkoshi.migrate.job import Job, Progress, Step
from hikkoshi.migrate.ledger import CommitLedger, NoLedger
from hikkoshi.migrate.phases import Phase
from hikkoshi.migrate.precheck import check_space
from hikkoshi.migrate.record import (
    Endpoint,
    MigrationKind,
    MigrationRecord,
    MigrationSettings,
    MigrationStore,
)
from hikkoshi.migrate.sides import SideError
from hikkoshi.migrate.storage.base import ReleaseHolder, Route
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.accel import DEFAULT_QEMU
from hikkoshi.vm.disk_serving import DiskServing, Serving
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.procs import Child
from hikkoshi.vm.spec import VmSpec


class ColdMigration(Job):
    """Moves a powered-off VM to a destination that pulls its disks."""

    commit_phase = Phase.CLEANUP

    def __init__(
        self,
        vm: str,
        source_datastore: Path,
        target: Destination,
        store: MigrationStore,
        *,
        source_address: str = "127.0.0.1",
        source_host: str = "local",
        route: Route | None = None,
        release_holder: ReleaseHolder | None = None,
        ledger: CommitLedger | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        super().__init__(store, on_progress)
        self.ledger: CommitLedger = ledger or NoLedger()
        self.src_home = VmHome(source_datastore / vm)
        self.target = target
        self.route = route
        self.release_holder = release_holder or release_holder_by_path
        self.record = MigrationRecord(
            vm=vm,
            kind=MigrationKind.COLD,
            storage=StorageMode.PRECOPY,
            source=Endpoint(
                datastore=source_datastore, home=self.src_home.path, address=source_address, host=source_host
            ),
            destination=Endpoint(
                datastore=target.datastore, home=target.home_path, host=target.host, agent=target.agent
            ),
            settings=MigrationSettings(source_host=source_host),
        )
        self.spec: VmSpec | None = None
        self.plan: dict[str, DiskServing] = {}
        self._export: Child | None = None

    @classmethod
    def from_record(
        cls, record: MigrationRecord, store: MigrationStore, target: Destination, **more: object
    ) -> ColdMigration:
        """Take over a recorded cold migration."""
        self = cls(
            record.vm,
            record.source.datastore,
            target,
            store,
            source_address=record.source.address,
            source_host=record.source.host,
            **more,  # type: ignore[arg-type]
        )
        self._take_over(record)
        return self

    async def run(self) -> MigrationRecord:
        try:
            return await super().run()
        finally:
            await self._stop_export()

    # --- precheck ----------------------------------------------------------------------------------------

    async def precheck(self) -> None:
        try:
            self.spec = spec = self.src_home.load_spec()
            plan = self.src_home.load_disk_plan()
        except (OSError, ValueError) as exc:
            self._refuse([f"no VM {self.record.vm!r} in {self.record.source.datastore}: {exc}"])
        self.plan = {d.name: plan.serving(d.name) for d in spec.disks}
        if not self._hold_run_lock(self.src_home):
            self._refuse([f"VM {self.record.vm!r} is running: stop it, or migrate it live or --quick"])
        if any(s.kind == Serving.RELOCATING for s in self.plan.values()):
            self._refuse([f"VM {self.record.vm!r} has a disk still being relocated: start it to finish"])
        try:
            there = await self.target.describe("tcg", DEFAULT_QEMU)
        except SideError as exc:
            self._refuse([f"the destination does not answer: {exc}"])
        problems = []
        if not there.datastore_exists:
            problems.append(f"destination datastore {self.target.datastore} does not exist")
        takes_back = (
            there.holds_vm
            and there.uuid == str(spec.uuid)
            and all(
                s.kind == Serving.REMOTE and s.holder and self.target.holds(s.holder)
                for s in self.plan.values()
            )
        )
        self.record.facts.destination_takes_back = bool(takes_back)
        if there.home_exists and not takes_back:
            problems.append(f"{self.target.home_path} exists already: the destination has a VM of that name")
        needed = sum(
            p.stat().st_blocks * 512
            for d in spec.disks
            if (p := self.src_home.disk_path(d)).exists() and self.plan[d.name].kind == Serving.FILE
        )
        problems += check_space(needed, there.side)
        if problems:
            self._refuse(problems)

    # --- before the commit -------------------------------------------------------------------------------

    def before_commit(self) -> list[Step]:
        if self.record.facts.destination_takes_back:
            return []
        return [
            (Phase.PREPARE, self._export_disks),
            (Phase.HOME_FILES, self._home),
            (Phase.STORAGE_PRE, self._pull),
        ]

    async def _export_disks(self) -> None:
        """Serve the disks held here read-only where the destination reaches them."""
        assert self.spec is not None
        self.record.facts.holders = [
            s.holder for s in self.plan.values() if s.kind == Serving.REMOTE and s.holder is not None
        ]
        files = {
            d.name: self.src_home.disk_path(d)
            for d in self.spec.disks
            if self.plan[d.name].kind == Serving.FILE
        }
        exports: dict[str, str] = {}
        if files:
            runtime = Path(tempfile.mkdtemp(prefix="hk-cold-", dir="/tmp"))  # short: a socket path
            self.record.facts.export_dir = str(runtime)
            self._save()
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
            exports = {name: f"nbd://{address}/{name}" for name in files}
        for name, serving in self.plan.items():
            if serving.kind == Serving.REMOTE and serving.upstream is not None:
                exports[name] = serving.upstream  # pulled straight from its holder
        self.record.facts.exports = exports
        self._save()

    async def _home(self) -> None:
        assert self.spec is not None
        await self._send_home(self.target, self.src_home, self.spec)

    async def _pull(self) -> None:
        assert self.spec is not None
        disks = {d.file_name: (self.record.facts.exports[d.name], d.size) for d in self.spec.disks}
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(self._watch_export())
            try:
                self.report["disk_pull"] = await self.target.pull_disks(disks)
            finally:
                watch.cancel()
        await self._stop_export()

    async def _watch_export(self) -> None:
        """Progress: what the destination has read from the export so far."""
        assert self.spec is not None
        if not self.record.facts.export_dir:
            return
        control = Path(self.record.facts.export_dir) / "control.sock"
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
        if self.record.facts.export_dir:
            shutil.rmtree(self.record.facts.export_dir, ignore_errors=True)

    async def commit(self) -> None:
        """The destination holds every disk, complete and flushed (or holds them already); the ledger
        can take the commit (recorded first thing after it)."""
        await self.ledger.prepare(self.record)

    # --- after the commit --------------------------------------------------------------------------------

    def after_commit(self) -> list[Step]:
        return [(Phase.CLEANUP, self._cleanup)]

    async def _cleanup(self) -> None:
        # The VM is the destination's from now on (a cluster's owner key moves), before anything goes.
        self.record.facts.fencing_token = await self.ledger.record_commit(self.record)
        if self.record.facts.destination_takes_back:
            await self.target.stop_serving()
        await self.target.finish()
        if self.src_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.src_home.path)
        for holder in list(self.record.facts.holders):
            await self.release_holder(holder, self.record.id)
            self.record.facts.holders.remove(holder)
            self._save()

    async def undo(self) -> list[str]:
        await self._stop_export()  # one a dead job left ended with it (parent-death signal)
        problems = []
        if self.record.facts.destination_home_created:
            try:
                await self.target.remove()
            except (SideError, OSError) as exc:
                if isinstance(exc, SideError) and exc.transient:
                    raise
                problems.append(f"destination: {exc}")
        self._release_run_lock()
        return problems
