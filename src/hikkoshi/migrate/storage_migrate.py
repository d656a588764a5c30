"""Storage migration of a running VM to another datastore on the same host (seed 000, Storage vMotion).

The guest never stops. 1. The home's files other than the disks (spec, logs, boot files) are copied to
the new home first. 2. Each disk is moved live by the VM's NBD service (``nbd move``: dbt passes or
mirror, a bandwidth limit, thin or thick; the export switches to the new file between two requests and
the old file is deleted only once the new one is complete, flushed and serving). 3. The supervisor
takes over the new home (its lock, pid, state, log, and QEMU's console). 4. The old home is deleted.

A failure before the supervisor moved leaves the VM in its old home: disks already moved are moved
back (live again) and the new home is removed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

from hikkoshi.migrate.job import Job, MigrationError, Progress
from hikkoshi.migrate.phases import Phase, recovery
from hikkoshi.migrate.record import Endpoint, MigrationRecord, MigrationStore
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.migrate.storage_modes import StorageMode
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.host import space
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.migrate.storage")


class StorageMigration(Job):
    """Moves a running VM's home and disks to another datastore."""

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
        on_progress: Progress | None = None,
    ) -> None:
        if mode not in ("mirror", "dbt"):
            raise ValueError(f"mode must be mirror or dbt, not {mode!r}")
        super().__init__(store, on_progress)
        self.src_home = VmHome(source_datastore / vm)
        self.dst_home = VmHome(dest_datastore / vm)
        self.record = MigrationRecord(
            vm=vm,
            kind="storage",
            storage=StorageMode.PRECOPY,
            source=Endpoint(datastore=source_datastore, home=self.src_home.path),
            destination=Endpoint(datastore=dest_datastore, home=self.dst_home.path),
            settings={"mode": mode, "bandwidth": bandwidth, "thick": thick},
        )
        self.spec: VmSpec | None = None
        self.vm: VmSide | None = None
        self.report = {"disks": {}}

    @classmethod
    def from_record(cls, record: MigrationRecord, store: MigrationStore) -> StorageMigration:
        """Take over a recorded storage migration."""
        s = record.settings
        self = cls(
            record.vm,
            record.source.datastore,
            record.destination.datastore,
            store,
            mode=str(s.get("mode", "mirror")),
            bandwidth=s.get("bandwidth"),
            thick=bool(s.get("thick", False)),
        )
        self._take_over(record)
        return self

    # --- the run -------------------------------------------------------------------------------------------

    async def run(self) -> MigrationRecord:
        """Move; the final record (``MigrationError`` if it did not end ``done``)."""
        self._begin()
        await self._precheck()
        try:
            assert self.spec is not None
            await self._new_home(self.src_home, self.dst_home, self.spec)
            self._enter(Phase.STORAGE_PRE)
            for disk in self.spec.disks:
                await self._move(disk.name, self.src_home.disk_path(disk), self.dst_home.disk_path(disk))
            self._enter(Phase.SWITCHOVER)
            assert self.vm is not None
            await self.vm.ctl("rehome", to=str(self.dst_home.path))
        except (Exception, asyncio.CancelledError) as exc:
            self.record.error = str(exc) or type(exc).__name__
            await asyncio.shield(self._rollback())
            raise MigrationError(
                f"storage migration failed and was undone: {self.record.error}", self.record
            ) from None
        self._enter(Phase.CLEANUP)
        await self._cleanup()
        return self.record

    async def recover(self) -> MigrationRecord:
        """Finish (the supervisor moved) or undo what a dead coordinator left."""
        action = recovery(self.record.phase)
        if action in ("nothing", "inspect"):
            return self.record
        self.spec = self._home_spec(self.src_home, self.dst_home)
        moved = self.dst_home.path.exists() and self.dst_home.read_state().get("home") == str(
            self.dst_home.path
        )
        self.vm = VmSide(self.dst_home if moved else self.src_home, self.spec, "VM")
        if moved or action == "finish":
            if self.record.phase != Phase.CLEANUP:
                self._enter(Phase.CLEANUP)
            await self._cleanup()
        else:
            await self._rollback()
        return self.record

    async def _precheck(self) -> None:
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
            if self.spec.firmware == "uefi":
                problems.append("QEMU holds the UEFI variable store open: stop the VM to move it")
            thick = bool(self.record.settings.get("thick"))
            needed = sum(
                d.size if thick else self.src_home.disk_path(d).stat().st_blocks * 512
                for d in self.spec.disks
            )
            if dest.is_dir() and needed > space(dest).free:
                problems.append(f"{dest} has {space(dest).free} bytes free; the disks need {needed}")
            self.vm = VmSide(self.src_home, self.spec, "VM")
        if problems:
            self._refuse(problems)

    async def _move(self, export: str, src: Path, dst: Path) -> None:
        """One disk, live, by the NBD service; returns once it serves from ``dst``."""
        assert self.vm is not None
        s = self.record.settings
        args: dict[str, Any] = {"export": export, "to": str(dst), "mode": s.get("mode", "mirror")}
        if s.get("bandwidth"):
            args["bandwidth"] = s["bandwidth"]
        if s.get("thick"):
            args["thick"] = True
        await self.vm.nbd("move", **args)
        self.record.facts.setdefault("moving", []).append(export)
        self.store.save(self.record)
        while True:
            status = await self.vm.nbd("move-status", export=export)
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
                self.record.facts.setdefault("moved", {})[export] = [str(src), str(dst)]
                self.store.save(self.record)
                return
            if status["phase"] in ("failed", "cancelled"):
                raise SideError(f"moving disk {export}: {status['phase']}: {status['error']}")
            await asyncio.sleep(0.2)

    async def _rollback(self) -> None:
        if self.record.phase != Phase.ROLLBACK:
            self._enter(Phase.ROLLBACK)
        problems = []
        for export, (src, dst) in list(self.record.facts.get("moved", {}).items()):
            try:
                # Live again, the other way: the guest keeps running on whichever file serves it.
                self.record.settings["thick"] = False
                await self._move(export, Path(dst), Path(src))
                del self.record.facts["moved"][export]
            except (SideError, OSError) as exc:
                problems.append(f"disk {export} stays in {dst}: {exc}")
        if not problems and self.record.facts.get("destination_home_created") and self.dst_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.dst_home.path)
        self._end_rollback(problems)

    async def _cleanup(self) -> None:
        # The supervisor serves from the new home; what is left in the old one are copies and logs.
        if self.src_home.path.exists():
            await asyncio.to_thread(shutil.rmtree, self.src_home.path)
        self._finish_report()
        self._enter(Phase.DONE)
