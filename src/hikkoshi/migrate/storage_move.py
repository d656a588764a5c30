"""Storage migration of a running VM to another datastore on the same host (seed 000, Storage vMotion).

The guest never stops. 1. The home's files other than the disks (spec, logs, boot files) are copied to
the new home first. 2. A disk still being relocated here finishes first; a disk held by another host
(shared storage) is pulled into its own file here first (and its holder released). 3. Each disk is
moved live by the VM's disk service (``move``: dbt passes or mirror, a bandwidth limit, thin or thick;
the export switches to the new file between two requests and the old file is deleted only once the
new one is complete, flushed and serving). 4. The supervisor takes over the new home (its lock, pid,
state, log, and QEMU's console): the commit. 5. The old home is deleted.

A failure before the supervisor moved leaves the VM in its old home: disks already moved are moved
back (live again) and the new home is removed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

from hikkoshi.migrate.arbiter import Way
from hikkoshi.migrate.destination import LocalDestination
from hikkoshi.migrate.holders import release_holder_by_path
from hikkoshi.migrate.job import Job, Progress, Step
from hikkoshi.migrate.phases import Phase
from hikkoshi.migrate.record import (
    Endpoint,
    MigrationKind,
    MigrationRecord,
    MigrationSettings,
    MigrationStore,
)
from hikkoshi.migrate.relocation_wait import serving_of, settle_relocations
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage.base import ReleaseHolder
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.disk_serving import DiskServing, Serving
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import space
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.migrate.storage")


class StorageMigration(Job):
    """Moves a running VM's home and disks to another datastore."""

    commit_phase = Phase.CLEANUP

    def __init__(
        self,
        vm: str,
        source_datastore: Path,
        dest_datastore: Path,
        store: MigrationStore,
        *,
        mode: str = "mirror",
        bandwidth: str | None = None,
        thick: bool = False,
        release_holder: ReleaseHolder | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        if mode not in ("mirror", "dbt"):
            raise ValueError(f"mode must be mirror or dbt, not {mode!r}")
        super().__init__(store, on_progress)
        self.src_home = VmHome(source_datastore / vm)
        self.dst_home = VmHome(dest_datastore / vm)
        self.release_holder = release_holder or release_holder_by_path
        self.record = MigrationRecord(
            vm=vm,
            kind=MigrationKind.STORAGE,
            storage=StorageMode.PRECOPY,
            source=Endpoint(datastore=source_datastore, home=self.src_home.path),
            destination=Endpoint(datastore=dest_datastore, home=self.dst_home.path),
            settings=MigrationSettings(move_mode=mode, move_bandwidth=bandwidth, thick=thick),
        )
        self.spec: VmSpec | None = None
        self.vm: VmSide | None = None
        self.disks: dict[str, DiskServing] = {}
        self.report = {"disks": {}}

    @classmethod
    def from_record(
        cls, record: MigrationRecord, store: MigrationStore, release_holder: ReleaseHolder | None = None
    ) -> StorageMigration:
        """Take over a recorded storage migration."""
        s = record.settings
        self = cls(
            record.vm,
            record.source.datastore,
            record.destination.datastore,
            store,
            mode=s.move_mode,
            bandwidth=s.move_bandwidth,
            thick=s.thick,
            release_holder=release_holder,
        )
        self._take_over(record)
        return self

    # --- precheck ----------------------------------------------------------------------------------------

    async def precheck(self) -> None:
        problems: list[str] = []
        try:
            self.spec = self.src_home.load_spec()
        except (OSError, ValueError) as exc:
            problems.append(f"no VM {self.record.vm!r} in {self.record.source.datastore}: {exc}")
        dest = self.record.destination.datastore
        if not dest.is_dir():
            problems.append(f"destination datastore {dest} does not exist")
        elif dest.resolve() == self.record.source.datastore.resolve():
            problems.append("the VM is in that datastore already")
        if self.dst_home.path.exists():
            problems.append(f"{self.dst_home.path} exists already")
        if self.spec is not None:
            if not self.src_home.is_running():
                problems.append(f"VM {self.record.vm!r} is not running (a stopped VM: migrate --offline)")
            elif self.src_home.read_state().get("state") == "serving":
                problems.append(f"VM {self.record.vm!r} runs on another host; this one only holds its disks")
            if self.spec.firmware == "uefi":
                problems.append("QEMU holds the UEFI variable store open: stop the VM to move it")
            self.vm = VmSide(self.src_home, self.spec, "VM")
        if problems:
            self._refuse(problems)
        assert self.spec is not None and self.vm is not None
        self.disks = await settle_relocations(self.vm, self.on_progress)
        thick = self.record.settings.thick
        needed = 0
        for d in self.spec.disks:
            if thick or self.disks[d.name].kind != Serving.FILE:
                needed += d.size
            else:
                needed += self.src_home.disk_path(d).stat().st_blocks * 512
        if dest.is_dir() and needed > space(dest).free:
            self._refuse([f"{dest} has {space(dest).free} bytes free; the disks need {needed}"])

    # --- before the commit -------------------------------------------------------------------------------

    def before_commit(self) -> list[Step]:
        return [
            (Phase.PREPARE, self._nothing),
            (Phase.HOME_FILES, self._new_home),
            (Phase.STORAGE_PRE, self._move_disks),
            (Phase.SWITCHOVER, self._rehome),
        ]

    async def _nothing(self) -> None:
        return None

    async def _new_home(self) -> None:
        assert self.spec is not None
        await self._send_home(
            LocalDestination(self.record.vm, self.dst_home.path.parent), self.src_home, self.spec
        )

    async def _move_disks(self) -> None:
        assert self.spec is not None
        for disk in self.spec.disks:
            if self.disks[disk.name].kind == Serving.REMOTE:
                await self._localize(disk.name)
            await self._move(disk.name, self.src_home.disk_path(disk), self.dst_home.disk_path(disk))

    async def _localize(self, export: str) -> None:
        """A disk held by another host becomes a file here first; then its holder lets it go."""
        assert self.vm is not None
        holder = self.disks[export].holder
        await self.vm.disks("localize", export=export)
        self.record.facts.localized.append(export)
        self._save()
        settled = await settle_relocations(self.vm, self.on_progress)
        if settled[export].kind != Serving.FILE:
            raise SideError(f"disk {export} is {settled[export].kind} after pulling it in")
        self.disks[export] = settled[export]
        if holder is not None:
            await self.release_holder(holder, self.record.id)

    async def _move(self, export: str, src: Path, dst: Path) -> None:
        """One disk, live, by the disk service; returns once it serves from ``dst``."""
        assert self.vm is not None
        s = self.record.settings
        args: dict[str, Any] = {"export": export, "to": str(dst), "mode": s.move_mode}
        if s.move_bandwidth:
            args["bandwidth"] = s.move_bandwidth
        if s.thick:
            args["thick"] = True
        await self.vm.disks("move", **args)
        self.record.facts.moving.append(export)
        self._save()
        while True:
            status = await self.vm.disks("move-status", export=export)
            self.on_progress(
                {
                    "phase": self.record.phase.value,
                    "disk": export,
                    "disk_done": status["copied_bytes"] + status["zero_bytes"],
                    "disk_total": status["copied_bytes"] + status["zero_bytes"] + status["pending_bytes"],
                }
            )
            if status["phase"] == "done":
                self.report["disks"][export] = {
                    k: status[k] for k in ("copied_bytes", "zero_bytes", "passes", "hold_ms", "elapsed")
                }
                self.record.facts.moved[export] = (str(src), str(dst))
                self._save()
                return
            if status["phase"] in ("failed", "cancelled"):
                raise SideError(f"moving disk {export}: {status['phase']}: {status['error']}")
            await asyncio.sleep(0.2)

    async def _rehome(self) -> None:
        assert self.vm is not None
        await self.vm.ctl("rehome", to=str(self.dst_home.path))

    async def commit(self) -> None:
        """The supervisor serves from the new home: there is no way back."""
        return None

    # --- after the commit --------------------------------------------------------------------------------

    def after_commit(self) -> list[Step]:
        return [(Phase.CLEANUP, self._cleanup)]

    async def _cleanup(self) -> None:
        # The supervisor serves from the new home; what is left in the old one are copies and logs.
        if self.src_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.src_home.path)

    async def undo(self) -> list[str]:
        problems = []
        self.record.settings.thick = False
        for export, (src, dst) in list(self.record.facts.moved.items()):
            try:
                # Live again, the other way: the guest keeps running on whichever file serves it.
                await self._move(export, Path(dst), Path(src))
                del self.record.facts.moved[export]
            except (SideError, OSError) as exc:
                problems.append(f"disk {export} stays in {dst}: {exc}")
        if not problems and self.record.facts.destination_home_created and self.dst_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.dst_home.path)
        return problems

    # --- taken over after a crash ------------------------------------------------------------------------

    async def take_over(self) -> None:
        self.spec = self._home_spec(self.src_home, self.dst_home)
        moved = self._moved()
        self.vm = VmSide(self.dst_home if moved else self.src_home, self.spec, "VM")
        if self.vm.is_running():
            try:
                self.disks = {n: serving_of(s) for n, s in (await self.vm.disk_status()).items()}
            except SideError:
                self.disks = {}

    def _moved(self) -> bool:
        return self.dst_home.path.exists() and self.dst_home.read_state().get("home") == str(
            self.dst_home.path
        )

    async def way_after_crash(self) -> Way:
        if self.record.phase == Phase.ROLLBACK:
            return Way.BACK
        return Way.FORWARD if self._moved() or self.record.phase == Phase.CLEANUP else Way.BACK
