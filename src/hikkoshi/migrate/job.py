"""What every kind of migration job shares: its record, phase changes that are saved at once (and where
tests may crash the job), refusal, failure after the commit point, and releasing a migrated-out source."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

from hikkoshi.block import crashpoints
from hikkoshi.migrate.destination import Destination, LocalDestination
from hikkoshi.migrate.phases import Phase
from hikkoshi.migrate.record import MigrationRecord, MigrationStore, PhaseTime
from hikkoshi.migrate.sides import SideError, VmSide
from hikkoshi.vm import control
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.spec import VmSpec

Progress = Callable[[dict[str, Any]], None]


class MigrationError(RuntimeError):
    """The migration did not complete; the record says how it ended."""

    def __init__(self, message: str, record: MigrationRecord) -> None:
        super().__init__(message)
        self.record = record


class MigrationRefused(MigrationError):
    """Prechecks failed: nothing was touched."""


class Job:
    """Base of the live, offline and storage migration jobs."""

    record: MigrationRecord

    def __init__(self, store: MigrationStore, on_progress: Progress | None) -> None:
        self.store = store
        self.on_progress: Progress = on_progress or (lambda _info: None)
        self.t0 = time.monotonic()
        self.report: dict[str, Any] = {}
        self._run_lock: int | None = None

    def _take_over(self, record: MigrationRecord) -> None:
        """Carry on with a recorded migration (its job died): its record, and its report so far."""
        self.record = record
        self.report = {**self.report, **record.report, "recovered": True}

    def _begin(self) -> None:
        """Record the migration as started (in precheck)."""
        self.record.phases = [PhaseTime(phase=Phase.PRECHECK, started=time.time())]
        self.store.save(self.record)

    async def _new_home(self, source: VmHome, dest: VmHome, spec: VmSpec) -> None:
        """Prepare the destination home on this host and copy the source's files but the disks into
        it (seed 000)."""
        self._enter(Phase.PREPARE)
        self._enter(Phase.HOME_FILES)
        await self._send_home(LocalDestination(spec.name, dest.path.parent), source, spec)

    async def _send_home(self, target: Destination, source: VmHome, spec: VmSpec) -> None:
        """Make the VM's home at ``target`` with the source's files but the disks (seed 000)."""
        # Recorded first: a home made but not recorded would be left behind by a rollback.
        self.record.facts["destination_home_created"] = True
        self.store.save(self.record)
        disk_files = {d.file_name for d in spec.disks}
        try:
            self.report["home_bytes"] = await target.create_home(source.path, disk_files)
        except FileExistsError:
            self.record.facts["destination_home_created"] = False  # someone else's: never removed
            raise SideError(f"{target.home_path} appeared on the destination meanwhile") from None

    def _hold_run_lock(self, home: VmHome) -> bool:
        """Take the VM's run lock for the job's duration (it cannot be started meanwhile); whether it
        was free (not: the VM runs)."""
        self._run_lock = home.try_lock()
        return self._run_lock is not None

    def _release_run_lock(self) -> None:
        if self._run_lock is not None:
            os.close(self._run_lock)
            self._run_lock = None

    def _enter(self, phase: Phase) -> None:
        self.record.enter(phase)
        self.store.save(self.record)
        self.on_progress({"phase": phase.value, "elapsed": self._since_start()})
        crashpoints.reached(f"migrate-{phase.value}")  # tests: the job dies right here

    def _since_start(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def _refuse(self, problems: list[str]) -> NoReturn:
        """End as refused, with every problem, before anything was touched."""
        self.record.error = "refused: " + "; ".join(problems)
        self.record.report = {"problems": problems}
        self._enter(Phase.FAILED)
        raise MigrationRefused(self.record.error, self.record)

    def _failed_after_commit(self, exc: Exception) -> NoReturn:
        self.record.error = f"after the commit point: {exc}"
        self._finish_report()
        self._enter(Phase.FAILED)
        raise MigrationError(self.record.error, self.record) from None

    def _end_rollback(self, problems: list[str]) -> None:
        """Rolled back, or failed with what could not be put back."""
        self._finish_report()
        if problems:
            self.record.error = f"{self.record.error}; rollback problems: {'; '.join(problems)}"
            self._enter(Phase.FAILED)
        else:
            self._enter(Phase.ROLLED_BACK)

    def _home_spec(self, source: VmHome, dest: VmHome) -> VmSpec:
        """The VM's spec, for a job taken over after a crash: from the source, else the destination."""
        return (source if source.spec_file.exists() else dest).load_spec()

    def _finish_report(self) -> None:
        """Put the report into the record (the jobs add their own figures to ``self.report``)."""
        self.record.report = {
            "id": self.record.id,
            "vm": self.record.vm,
            "kind": self.record.kind,
            "phases_s": self.record.phase_seconds(),
            **self.report,
            "elapsed_s": self._since_start(),
            **({"error": self.record.error} if self.record.error else {}),
        }


async def hand_off(source: VmSide, home: VmHome) -> None:
    """The destination runs: the source's QEMU quits; its disks stay served until released."""
    if home.read_state().get("state") != "migrated":
        await source.ctl("hand-off")


async def release_source(source: VmSide, home: VmHome) -> None:
    """After :func:`hand_off`, once the destination holds its own disks: the source's disk services
    stop and its supervisor exits."""
    for _ in range(300):  # QEMU quits, then the supervisor says so
        if home.read_state().get("state") == "migrated":
            break
        await asyncio.sleep(0.05)
    await source.ctl("release")
    if not await asyncio.to_thread(control.wait_stopped, home, 60):
        raise SideError("the source supervisor did not exit after release")
