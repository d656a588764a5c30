"""The skeleton every migration job shares (live, quick, cold, storage), and its rules.

A job records itself (saved at every phase change; tests may crash it or hold it right there:
:mod:`~hikkoshi.block.crashpoints`, :mod:`~hikkoshi.migrate.pause_points`), runs its precheck
(a refusal touches nothing), then its steps before the commit point: any failure, a cancellation
included, rolls back. Then it commits (what commits is the kind's own business: the source supervisor
agreeing that the destination may run, the destination holding every disk, ...), records the commit
phase and runs the steps after it, each safe to repeat.

Failures that may pass (a peer agent down, a link cut: :class:`~hikkoshi.migrate.sides.SideError`
with ``transient``) never end a job that cannot go back: it stays where it stood, the error is
recorded, :class:`MigrationPending` is raised, and whoever runs jobs calls :meth:`Job.recover` again
later. Everything else after the commit point ends ``failed`` for a person to look at.

A job taken over after a crash (:meth:`Job.recover`) asks :meth:`Job.way_after_crash` which way to go;
the default follows :func:`~hikkoshi.migrate.phases.recovery`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from hikkoshi.block import crashpoints
from hikkoshi.migrate import pause_points
from hikkoshi.migrate.arbiter import Way
from hikkoshi.migrate.destination import Destination
from hikkoshi.migrate.phases import FORWARD, Phase, committed, recovery
from hikkoshi.migrate.record import MigrationRecord, MigrationStore, PhaseTime
from hikkoshi.migrate.sides import SideError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.migrate")

Progress = Callable[[dict[str, Any]], None]
Step = tuple[Phase, Callable[[], Awaitable[None]]]


class MigrationError(RuntimeError):
    """The migration did not complete; the record says how it ended."""

    def __init__(self, message: str, record: MigrationRecord) -> None:
        super().__init__(message)
        self.record = record


class MigrationRefused(MigrationError):
    """Prechecks failed: nothing was touched."""


class MigrationPending(MigrationError):
    """A side could not be reached: the job stays where it stood and goes on when asked again."""


class Job(abc.ABC):
    """Base of the migration jobs (see the module's docstring)."""

    record: MigrationRecord
    #: The phase recorded once the job committed (the first of :meth:`after_commit`).
    commit_phase: Phase = Phase.RESUME

    def __init__(self, store: MigrationStore, on_progress: Progress | None) -> None:
        self.store = store
        self.on_progress: Progress = on_progress or (lambda _info: None)
        self.t0 = time.monotonic()
        self.report: dict[str, Any] = {}
        self._run_lock: int | None = None

    # --- what each kind says -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def precheck(self) -> None:
        """Check everything before anything is touched; :meth:`_refuse` with every problem."""

    @abc.abstractmethod
    def before_commit(self) -> list[Step]:
        """The steps before the commit point, in order."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """The act after which there is no way back (raising rolls back)."""

    @abc.abstractmethod
    def after_commit(self) -> list[Step]:
        """The steps from the commit phase on, in order; each safe to repeat."""

    @abc.abstractmethod
    async def undo(self) -> list[str]:
        """Roll back what the steps before the commit did; problems left (a transient
        :class:`SideError` leaves the job in rollback, to be tried again)."""

    async def take_over(self) -> None:
        """Reconnect to the sides of a recorded job (after a crash), before :meth:`way_after_crash`."""
        return None

    async def way_after_crash(self) -> Way:
        """Which way a recorded job goes (default: by its phase)."""
        action = recovery(self.record.phase)
        return Way.BACK if action == "rollback" else Way.FORWARD

    # --- running -----------------------------------------------------------------------------------------

    async def run(self) -> MigrationRecord:
        """Migrate; the final record (:class:`MigrationError` if it did not end ``done``)."""
        try:
            return await self._run()
        finally:
            self._release_run_lock()

    async def _run(self) -> MigrationRecord:
        self._begin()
        await self._hold(Phase.PRECHECK)
        try:
            await self.precheck()
        except MigrationRefused:
            raise
        except Exception as exc:
            self._refuse([f"precheck failed: {exc}"])
        try:
            for phase, step in self.before_commit():
                self._enter(phase)
                await self._hold(phase)
                await step()
            await self.commit()
        except (Exception, asyncio.CancelledError) as exc:
            reason = str(exc) or type(exc).__name__
            log.error(
                "migration %s failed in %s: %s; rolling back", self.record.id, self.record.phase, reason
            )
            self.record.error = reason
            await asyncio.shield(self._rollback())
            raise MigrationError(f"migration failed and was rolled back: {reason}", self.record) from None
        self._enter(self.commit_phase)
        await self._forward()
        return self.record

    async def recover(self) -> MigrationRecord:
        """Finish what a dead job left: roll back, finish forward, or wait for a side (see the module)."""
        if recovery(self.record.phase) in ("nothing", "inspect"):
            return self.record
        await self.take_over()
        way = await self.way_after_crash()
        log.info("migration %s was left at %s: %s", self.record.id, self.record.phase, way)
        if way == Way.WAIT:
            self.record.error = "waiting for a side to come back"
            self.store.save(self.record)
            raise MigrationPending(self.record.error, self.record)
        if way == Way.FAILED:
            self._failed_after_commit(RuntimeError(self.record.error or "neither way is safe"))
        if way == Way.BACK:
            await asyncio.shield(self._rollback())
            return self.record
        if not committed(self.record.phase):
            self._enter(self.commit_phase)
        await self._forward()
        return self.record

    async def _forward(self) -> None:
        """The steps after the commit point, from where the record stands."""
        try:
            for phase, step in self.after_commit():
                if self.record.phase != phase:
                    if FORWARD.index(self.record.phase) > FORWARD.index(phase):
                        continue  # done before
                    self._enter(phase)
                await self._hold(phase)
                await step()
        except SideError as exc:
            if exc.transient:
                self._pending(exc)
            self._failed_after_commit(exc)
        except Exception as exc:
            self._failed_after_commit(exc)
        self.record.error = None
        self._finish_report()
        self._enter(Phase.DONE)

    async def _rollback(self) -> None:
        if self.record.phase != Phase.ROLLBACK:
            self._enter(Phase.ROLLBACK)
        try:
            problems = await self.undo()
        except SideError as exc:
            if exc.transient:
                self._pending(exc)
            problems = [str(exc)]
        self.record.error = _cause(self.record.error)  # the reason it rolled back, not the waits on the way
        self._finish_report()
        if problems:
            self.record.error = f"{self.record.error}; rollback problems: {'; '.join(problems)}"
            self._enter(Phase.FAILED)
        else:
            self._enter(Phase.ROLLED_BACK)

    def _pending(self, exc: SideError) -> NoReturn:
        wait = f"{_WAITING}{self.record.phase}): {exc}"
        cause = _cause(self.record.error)
        self.record.error = f"{cause}; {wait}" if cause else wait
        self.store.save(self.record)
        raise MigrationPending(self.record.error, self.record) from None

    # --- the record --------------------------------------------------------------------------------------

    def _take_over(self, record: MigrationRecord) -> None:
        """Carry on with a recorded migration (its job died): its record, and its report so far."""
        self.record = record
        self.report = {**self.report, **record.report, "recovered": True}

    def _begin(self) -> None:
        """Record the migration as started (in precheck)."""
        self.record.phases = [PhaseTime(phase=Phase.PRECHECK, started=time.time())]
        self.store.save(self.record)

    def _save(self) -> None:
        self.store.save(self.record)

    def _enter(self, phase: Phase) -> None:
        self.record.enter(phase)
        self.store.save(self.record)
        self.on_progress({"phase": phase.value, "elapsed": self._since_start()})
        crashpoints.reached(f"migrate-{phase.value}")  # tests: the job dies right here

    async def _hold(self, phase: Phase) -> None:
        await pause_points.reached(self.record.id, phase.value)  # tests: the job waits right here

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

    def _finish_report(self) -> None:
        """Put the report into the record (the jobs add their own figures to ``self.report``)."""
        self.record.report = {
            "id": self.record.id,
            "vm": self.record.vm,
            "kind": self.record.kind.value,
            "phases_s": self.record.phase_seconds(),
            **self.report,
            "elapsed_s": self._since_start(),
            **({"error": self.record.error} if self.record.error else {}),
        }

    # --- helpers for the kinds ---------------------------------------------------------------------------

    async def _send_home(self, target: Destination, source: VmHome, spec: VmSpec) -> None:
        """Make the VM's home at ``target`` with the source's files but the disks (seed 000)."""
        # Recorded first: a home made but not recorded would be left behind by a rollback.
        self.record.facts.destination_home_created = True
        self.store.save(self.record)
        disk_files = {d.file_name for d in spec.disks}
        try:
            self.report["home_bytes"] = await target.create_home(source.path, disk_files)
        except FileExistsError:
            self.record.facts.destination_home_created = False  # someone else's: never removed
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

    @staticmethod
    def _home_spec(source: VmHome, dest: VmHome) -> VmSpec:
        """The VM's spec, for a job taken over after a crash: from the source, else the destination."""
        return (source if source.spec_file.exists() else dest).load_spec()


_WAITING = "waiting ("


def _cause(error: str | None) -> str | None:
    """A record's error without what waiting for a side added to it: the reason the migration failed
    stays what it was, however often and for whatever it waited since."""
    if not error:
        return None
    return error.split(_WAITING, 1)[0].rstrip("; ") or None
