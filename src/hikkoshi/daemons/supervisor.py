"""The supervisor: one small daemon per VM per host that owns the VM's disk service and its QEMU.

``vm start`` (and a migration's destination) runs ``python -m hikkoshi.daemons.supervisor HOME
--ready-fd N --daemonize`` (see :mod:`entry`). The supervisor detaches (fork, ``setsid``), takes the
VM's run lock, prechecks, starts the VM's disk service and then QEMU, and reports on the ready pipe:
one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``. It writes what it does to
``state.json`` at every change and answers its control socket (:meth:`Supervisor.verbs`).

States (:class:`State`): ``running`` (QEMU runs the guest, or holds it paused), ``incoming`` (QEMU
waits for a migration's stream; the guest has not run here), ``serving`` (QEMU is gone after the VM
moved away: the disk service serves the new host until ``release``, or for as long as the VM runs
there when its disks stay here: shared storage; a VM coming back takes QEMU up again here with
``start-incoming``), ``stopping``, ``stopped``.

The disk service is restarted when it dies (up to a bound); QEMU reconnects to it, and a guest that
stopped on a disk error meanwhile (``werror=stop``) is resumed. An outgoing migration is watched by the
guard (:mod:`migration_guard`): if its coordinator goes silent before it committed, the migration is
cancelled and the guest runs on here. SIGTERM or SIGINT stop the VM as ``stop`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from hikkoshi.daemons.disk_service_child import DiskServiceChild
from hikkoshi.daemons.migration_guard import Guard, GuardRefused, GuardState
from hikkoshi.daemons.process import dump_tasks
from hikkoshi.daemons.qemu_run import QemuRun, StopOutcome
from hikkoshi.daemons.verbs import Args, NoArgs, Verbs
from hikkoshi.nbd.control import ControlError, ControlServer, control_request
from hikkoshi.vm import precheck, tcp_sockets
from hikkoshi.vm.accel import DEFAULT_QEMU, choose_accel
from hikkoshi.vm.disk_serving import DiskPlan, Serving
from hikkoshi.vm.errors import PrecheckError, VmError
from hikkoshi.vm.home import VmHome, write_atomically
from hikkoshi.vm.host import host_facts
from hikkoshi.vm.qmp import MigrationWaitTimeout, QmpCommandError
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.daemons.supervisor")

DEFAULT_STOP_TIMEOUT = 60.0
#: How often the disk service may die and be started again before the supervisor gives up on it.
MAX_DISK_RESTARTS = 5
EXIT_OK, EXIT_FAILED, EXIT_RUNNING = 0, 2, 3
#: QEMU's migration states in which a cancel still lets the guest run on here.
_CANCELLABLE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})


class State(enum.StrEnum):
    """What the supervisor is doing (see the module's docstring)."""

    STARTING = "starting"
    RUNNING = "running"
    INCOMING = "incoming"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ReadyPipe:
    """The write end of the pipe ``vm start`` waits on; says once whether the VM came up."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the starter gave up waiting; the log says what happened
        finally:
            os.close(self._fd)
            self._fd = None

    def ok(self, info: dict[str, Any]) -> None:
        """The VM runs."""
        self._send({"ok": True, **info})

    def fail(self, error: str) -> None:
        """The VM did not start, and why."""
        self._send({"ok": False, "error": error})


@dataclass(frozen=True)
class StopRequest:
    """``stop`` from the control socket or a signal."""

    grace: float = DEFAULT_STOP_TIMEOUT
    hard: bool = False


# --- verb arguments ----------------------------------------------------------------------------------------


class StopArgs(Args):
    timeout: float = Field(default=DEFAULT_STOP_TIMEOUT, ge=0, le=3600)
    hard: bool = False


class QmpArgs(Args):
    execute: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] | None = None


class WaitArgs(Args):
    states: list[str] = Field(min_length=1)
    timeout: float = Field(default=3600, ge=0, le=86400)


class RehomeArgs(Args):
    to: str = Field(min_length=2, max_length=4096, pattern=r"^/")


Endpoint = Annotated[str, Field(max_length=300, pattern=r"^[A-Za-z0-9.:\[\]-]+:[0-9]{1,5}$")]
"""``host:port`` (``[v6]:port``) of a connection QEMU makes: one it may have to be cut from."""


class GuardArgs(Args):
    migration: str = Field(min_length=1, max_length=64)
    timeout: float = Field(default=10.0, gt=0, le=3600)
    stream: Endpoint | None = None
    """Where QEMU sends the migration stream: the connection cut if QEMU hangs on it."""
    mirror: Endpoint | None = None
    """Where precopy's disk mirrors write (the destination's disk listener): cut the same way."""


class MigrationArgs(Args):
    migration: str = Field(min_length=1, max_length=64)


class MirrorCutArgs(MigrationArgs):
    target: Endpoint
    """The mirrors' target: QEMU's own connections to it are cut."""


# --- prechecks ---------------------------------------------------------------------------------------------


def _start_prechecks(spec: VmSpec, home: VmHome, plan: DiskPlan) -> None:
    facts = host_facts()
    disks = []
    elsewhere = [d.name for d in spec.disks if plan.serving(d.name).kind != Serving.FILE]
    for disk in spec.disks:
        path = home.disk_path(disk)
        disks.append(
            precheck.DiskState(disk.name, path.is_file(), path.stat().st_size if path.is_file() else 0)
        )
    problems = precheck.check_memory_available(spec, facts)
    problems += precheck.check_boot_files(spec, home.path)
    problems += precheck.check_disks_present(spec, disks, elsewhere)
    problems += precheck.check_networks(spec, facts)
    problems += precheck.check_firmware(spec)
    if problems:
        raise PrecheckError(problems, f"start VM {spec.name!r}")


class Supervisor:
    """Runs one VM on this host until it has nothing left to do here (see the module's docstring)."""

    def __init__(
        self,
        home: VmHome,
        ready: ReadyPipe,
        *,
        accel: str | None,
        qemu: str,
        incoming: bool = False,
        serving: bool = False,
        tls_dir: Path | None = None,
    ) -> None:
        self.home = home
        self.ready = ready
        #: The host's TLS files, for the disk service (disks read from another host).
        self.tls_dir = tls_dir
        self.accel_request = accel
        self.qemu_binary = qemu
        self.start_incoming = incoming
        #: Started to serve the disks only (a holder whose supervisor died is started again this way).
        self.start_serving = serving
        self.spec: VmSpec | None = None
        self.accel = "tcg"
        self.rundir: RunDir | None = None
        self.disks: DiskServiceChild | None = None
        self.qemu: QemuRun | None = None
        self.guard = Guard()
        #: After a hand-off: the VM runs elsewhere and this host serves its disks (until release, or for
        #: good with shared storage). QEMU ending then leaves the supervisor serving, not stopped.
        self.serving_others = serving
        #: The migration stream's endpoint (host:port) of the outgoing migration the guard watches.
        self.stream: str | None = None
        #: The disk mirrors' target (host:port) of that migration (precopy), cut with the stream.
        self.mirror: str | None = None
        self.released = False
        self.stopping = False
        self.requests: asyncio.Queue[StopRequest] = asyncio.Queue()
        self.state: dict[str, Any] = {}
        self._changed = asyncio.Event()
        self._lock_fd = -1
        self._last_outcome: StopOutcome | None = None
        self.verbs = Verbs()
        self._declare()

    # --- state.json ----------------------------------------------------------------------------------------

    def _write_state(self, **changes: Any) -> None:
        self.state.update(changes)
        self.home.write_state(self.state)

    def _enter(self, state: State, **changes: Any) -> None:
        log.info("state: %s", state.value)
        self._write_state(state=state.value, since=time.time(), **changes)

    def _describe(self) -> dict[str, Any]:
        spec, rundir = self.spec, self.rundir
        return {
            "name": spec.name if spec else self.home.name,
            "uuid": str(spec.uuid) if spec else None,
            "accel": self.accel,
            "qemu_pid": None if self.qemu is None or self.qemu.qemu is None else self.qemu.qemu.pid,
            "nbd_pid": None if self.disks is None else self.disks.pid,
            "nbd_running": self.disks is not None and self.disks.running,
            "nbd_socket": str(rundir.nbd_socket) if rundir and spec and spec.disks else None,
            "nbd_control": str(rundir.nbd_control) if rundir and spec and spec.disks else None,
            "disk_restarts": 0 if self.disks is None else self.disks.restarts,
            "rundir": str(rundir.path) if rundir else None,
            "incoming": self.qemu is not None and self.qemu.incoming,
            "taps": {} if self.qemu is None else {str(k): v for k, v in self.qemu.taps.items()},
            "started_at": None if self.qemu is None else self.qemu.started_at,
            "guard": self.guard.state.value,
            "migration": self.guard.migration,
            "serving_others": self.serving_others,
        }

    # --- the life of the supervisor ------------------------------------------------------------------------

    async def run(self) -> int:
        """Supervise the VM; the process's exit status."""
        lock = await self._lock()
        if lock is None:
            pid = self.home.supervisor_pid()
            self.ready.fail(f"VM {self.home.name!r} is running already (supervisor pid {pid})")
            return EXIT_RUNNING
        self._lock_fd = lock
        try:
            return await self._run_locked()
        finally:
            self.home.pid_file.unlink(missing_ok=True)
            os.close(self._lock_fd)  # last: from here on the VM counts as stopped

    async def _lock(self) -> int | None:
        # Someone probing is_running() holds a shared lock for an instant; try a few times.
        for _ in range(20):
            fd = self.home.try_lock()
            if fd is not None:
                return fd
            await asyncio.sleep(0.05)
        return None

    async def _run_locked(self) -> int:
        write_atomically(self.home.pid_file, f"{os.getpid()}\n".encode())
        self.state = {"state": State.STARTING.value, "supervisor_pid": os.getpid(), "since": time.time()}
        control: ControlServer | None = None
        try:
            try:
                spec = self.spec = self.home.load_spec()
                plan = self.home.load_disk_plan()
                if not self.start_incoming and not self.start_serving:
                    # The guest ran here already: a relocation copies on by itself, never dropping blocks.
                    plan = plan.after_switchover()
                    self.home.save_disk_plan(plan)
                _start_prechecks(spec, self.home, plan)
                # After the other checks: finding out whether KVM works may boot a probe guest.
                self.accel = choose_accel(self.accel_request or spec.accel, qemu=self.qemu_binary)
                problems = precheck.check_cpu(spec, self.accel)
                if problems:
                    raise PrecheckError(problems, f"start VM {spec.name!r}")
                self.rundir = RunDir.for_vm(spec.uuid)
                self.rundir.create()
                self._write_state(name=spec.name, uuid=str(spec.uuid), accel=self.accel)
                if spec.disks:
                    self.disks = DiskServiceChild(self.home, self.rundir, tls_dir=self.tls_dir)
                    await self.disks.start()
                control = ControlServer(self.rundir.control_socket)
                self.verbs.install(control)
                await control.start()
                if not self.start_serving:
                    await self._start_qemu(incoming=self.start_incoming)
            except (VmError, ValueError, OSError, RuntimeError) as exc:
                log.error("%s", exc)
                self.ready.fail(str(exc))
                self._enter(State.STOPPED, error=str(exc), exit=None)
                return EXIT_FAILED
            state = State.INCOMING if self.start_incoming else State.RUNNING
            if self.start_serving:
                state = State.SERVING
            self._enter(state, error=None, exit=None, **self._describe())
            self.ready.ok({"supervisor_pid": os.getpid(), **self._describe()})
            await self._life()
        finally:
            if self.qemu is not None:
                await self.qemu.close()
                self.qemu = None
            if self.disks is not None:
                code = await self.disks.stop()
                if code not in (None, 0, -signal.SIGTERM):
                    log.warning("the disk service ended with status %s", code)
            if control is not None:
                await control.close()
            if self.rundir is not None:
                self.rundir.remove()
        outcome = self._last_outcome
        self._enter(
            State.STOPPED,
            exit=None if outcome is None else outcome.as_dict(),
            error=self.state.get("error") or None,
            migrated=self.serving_others,
        )
        log.info("VM %s: supervisor exits (%s)", self.home.name, outcome)
        return EXIT_OK

    async def _start_qemu(self, *, incoming: bool) -> None:
        assert self.spec is not None and self.rundir is not None
        run = QemuRun(
            self.home,
            self.spec,
            accel="kvm" if self.accel == "kvm" else "tcg",
            rundir=self.rundir,
            qemu=self.qemu_binary,
            plan=self.home.load_disk_plan() if incoming else None,
            incoming=incoming,
        )
        await run.start()
        self.qemu = run
        self._changed.set()

    async def _life(self) -> None:
        """Until there is nothing left to do: QEMU runs, ends, the disks are served for another host..."""
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(_logged(self._serve_stop_requests())),
                tg.create_task(_logged(self._watch_disk_service())),
                tg.create_task(_logged(self._watch_guard())),
            ]
            try:
                while True:
                    if self.qemu is not None:
                        self._last_outcome = await self.qemu.wait()
                        await self.qemu.close()
                        self.qemu = None
                        if not self.stopping and self.guard.state == GuardState.COMMITTED:
                            # Past the commit the guest is the destination's, and so are these disks
                            # until it releases them: a QEMU dying here must not take them away (found
                            # by the fault campaign: the source's QEMU killed at storage-post ended its
                            # supervisor, and the post-copy guest waited on its disk for good).
                            self.serving_others = True
                        if self.stopping or not self.serving_others:
                            break
                        self._enter(State.SERVING, qemu_pid=None, taps={}, incoming=False)
                        log.info("QEMU is gone; the disks stay served for the VM's new host")
                    if self.released or self.stopping:
                        break
                    self._changed.clear()
                    await self._changed.wait()
            finally:
                for task in tasks:
                    task.cancel()

    async def _serve_stop_requests(self) -> None:
        while True:
            request = await self.requests.get()
            log.info("stopping (grace %.0f s, hard=%s)", request.grace, request.hard)
            self.stopping = True
            self._enter(State.STOPPING)
            if self.qemu is not None:
                await self.qemu.stop(request.grace, hard=request.hard)
            self._changed.set()

    async def _watch_disk_service(self) -> None:
        disks = self.disks
        if disks is None:
            return
        async with asyncio.TaskGroup() as tg:
            resumer: asyncio.Task[None] | None = None
            while True:
                code = await disks.wait()
                if resumer is not None:
                    resumer.cancel()
                if disks.restarts >= MAX_DISK_RESTARTS:
                    what = f"the disk service ended (status {code}) {disks.restarts + 1} times"
                    log.error("%s; giving up on it", what)
                    self._write_state(error=what)
                    if self.qemu is not None:
                        with contextlib.suppress(QmpCommandError):
                            await self.qemu.pause()  # the disks are gone from under the guest
                    return
                log.error("the disk service ended (status %d); starting it again", code)
                try:
                    await disks.restart()
                except VmError as exc:
                    log.error("could not start the disk service again: %s", exc)
                    continue
                self._write_state(nbd_pid=disks.pid, disk_restarts=disks.restarts)
                # Beside the watch: the next death must be seen while the guest is being resumed.
                resumer = tg.create_task(self._resume_after_io_errors())

    async def _resume_after_io_errors(self, settle: float = 10.0) -> None:
        """After the disk service came back: requests that failed while it was gone stopped the guest
        (``werror=stop``); ``cont`` retries them. Watch until the guest has run ``settle`` s on end."""
        quiet_since = time.monotonic()
        deadline = quiet_since + 60.0
        while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
            qemu = self.qemu
            with contextlib.suppress(QmpCommandError):  # QEMU may be on its way out
                if qemu is not None and await qemu.status() == "io-error":
                    log.info("guest stopped on a disk error while its disk service was down; resuming it")
                    await qemu.resume()
                    quiet_since = time.monotonic()
            await asyncio.sleep(0.05)

    async def _watch_guard(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self.guard.due(time.monotonic()):
                await self._fire_guard()

    async def _fire_guard(self) -> None:
        """The coordinator of an outgoing migration went silent before it committed: cancel it, and let
        the guest run here again (the destination never ran: it may only after a commit)."""
        migration = self.guard.migration
        log.error(
            "migration %s: its coordinator went silent; cancelling it, the guest runs on here", migration
        )
        self.guard = self.guard.fired()
        self._write_state(guard=self.guard.state.value)
        qemu = self.qemu
        if qemu is None:
            return
        for attempt in range(2):
            try:
                info = await qemu.execute("query-migrate")
                status = info.get("status")
                if status == "postcopy-active":
                    log.error(
                        "the migration is in post-copy: the guest's memory is on both sides; not cancelled"
                    )
                    return
                if status in _CANCELLABLE:
                    await qemu.execute("migrate_cancel")
                    assert qemu.qmp is not None
                    with contextlib.suppress(MigrationWaitTimeout):
                        await qemu.qmp.wait_migration(frozenset({"cancelled", "failed", "completed"}), 30)
                if await qemu.status() != "running":
                    await qemu.resume()  # a completed (postmigrate) or paused source takes over again
                return
            except QmpCommandError as exc:
                if attempt == 0 and await self._cut_stream():
                    continue  # QEMU hung on a silent stream: cut, it fails the migration and answers
                log.error("the guard could not resume the guest: %s", exc)
                return

    async def _cut_stream(self) -> int:
        """Cut QEMU's connections to the migration's endpoints, its stream and its disk mirrors' target
        (see :mod:`hikkoshi.vm.tcp_sockets`): a write-blocking mirror whose target went silent hangs
        QEMU's main loop as a stream does, and force-cancelling it with writes in flight corrupts QEMU
        7.2's heap (found by the fault campaign). How many connections were cut."""
        cut = 0
        for what, endpoint in (("disk mirror", self.mirror), ("migration stream", self.stream)):
            if endpoint is not None:
                cut += await self._cut_to(endpoint, f"it hung on the {what}")
        return cut

    async def _cut_to(self, endpoint: str, why: str) -> int:
        """Cut QEMU's connections to ``endpoint`` (``why``, for the log); how many were cut."""
        qemu = self.qemu
        if qemu is None or qemu.qemu is None:
            return 0
        cut = await asyncio.to_thread(tcp_sockets.cut_to, qemu.qemu.pid, endpoint)
        if cut:
            log.warning("cut %d connection(s) of QEMU to %s: %s", cut, endpoint, why)
        return cut

    # --- rehome (storage migration) ------------------------------------------------------------------------

    async def _rehome(self, new: VmHome) -> None:
        """Move the supervisor, its log and QEMU's console into ``new`` (which holds copies of the home's
        files and, by now, the disks); the old home is the caller's to delete."""
        qemu = self.qemu
        if qemu is None:
            raise VmError("QEMU is not running: nothing to rehome")
        lock = new.try_lock()
        if lock is None:
            raise VmError(f"{new.path} is locked by another supervisor")
        old = self.home
        try:
            write_atomically(new.pid_file, f"{os.getpid()}\n".encode())
            # The console: everything so far, then QEMU appends to the new file (no pause: the guest
            # never stops for a storage migration), then whatever reached the old file in between.
            shutil.copyfile(old.console_log, new.console_log)
            copied = new.console_log.stat().st_size
            await qemu.execute(
                "chardev-change",
                {
                    "id": "console",
                    "backend": {"type": "file", "data": {"out": str(new.console_log), "append": True}},
                },
            )
            with old.console_log.open("rb") as src, new.console_log.open("ab") as dst:
                src.seek(copied)
                dst.write(src.read())
            # Our own log: stdout and stderr go to the new supervisor.log from now on.
            shutil.copyfile(old.supervisor_log, new.supervisor_log)
            fd = os.open(new.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            # QEMU's and the disk service's own logs stay with their open files until they restart.
            for name in ("qemu.log", "nbd.log"):
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(old.path / name, new.path / name)
            if self.disks is not None and self.rundir is not None:
                await control_request(self.rundir.nbd_control, "rehome", home=str(new.path))
        except BaseException:
            os.close(lock)
            new.pid_file.unlink(missing_ok=True)
            raise
        self.home = qemu.home = new
        if self.disks is not None:
            self.disks.home = new
        self._write_state(home=str(new.path))
        os.close(self._lock_fd)
        self._lock_fd = lock
        log.info("rehomed from %s to %s", old.path, new.path)

    # --- verbs ---------------------------------------------------------------------------------------------

    def _qemu(self) -> QemuRun:
        if self.qemu is None:
            raise ControlError(f"QEMU is not running here (the supervisor is {self.state.get('state')})")
        return self.qemu

    def _declare(self) -> None:
        verb = self.verbs.verb

        @verb("status", NoArgs, "run state, pids, sockets")
        async def status(_a: NoArgs) -> dict[str, Any]:
            run_state = self.state.get("state")
            if self.qemu is not None:
                try:
                    run_state = await self.qemu.status()
                except QmpCommandError as exc:
                    raise ControlError(str(exc)) from None
            return {
                "state": run_state,
                "supervisor": self.state.get("state"),
                "supervisor_pid": os.getpid(),
                "error": self.state.get("error"),
                **self._describe(),
            }

        @verb("pause", NoArgs, "pause the guest (QMP stop)")
        async def pause(a: NoArgs) -> dict[str, Any]:
            try:
                await self._qemu().pause()
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None
            return await status(a)

        @verb("resume", NoArgs, "let the guest run (QMP cont); an incoming VM runs here from now on")
        async def resume(a: NoArgs) -> dict[str, Any]:
            qemu = self._qemu()
            if not qemu.incoming and not self.guard.may_resume_source:
                raise ControlError(f"migration {self.guard.migration} committed: this VM runs elsewhere now")
            try:
                await qemu.resume()
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None
            if self.state.get("state") == State.INCOMING.value:
                qemu.incoming = False
                self.serving_others = False  # a VM that came back runs here again
                self._enter(State.RUNNING, incoming=False)
            return await status(a)

        @verb("stop", StopArgs, "power off (ACPI for timeout s, then quit, then kill; hard: skip ACPI)")
        def stop(a: StopArgs) -> dict[str, bool]:
            if self.qemu is None and self.serving_others:
                raise ControlError("the VM runs on another host; its disks are served from here")
            self.requests.put_nowait(StopRequest(a.timeout, a.hard))
            return {"stopping": True}

        @verb("stop-serving", MigrationArgs, "the VM came home powered off: stop serving, keep the home")
        def stop_serving(_a: MigrationArgs) -> dict[str, bool]:
            if self.qemu is not None or not self.serving_others:
                raise ControlError("not serving disks for another host")
            self.serving_others = False
            self.stopping = True
            self._changed.set()
            return {"stopping": True}

        @verb("qmp", QmpArgs, "run a QMP command (this host only: the socket is root's)")
        async def qmp(a: QmpArgs) -> Any:
            try:
                return await self._qemu().execute(a.execute, a.arguments)
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None

        @verb("migrate-wait", WaitArgs, "wait for migration states (returns query-migrate)")
        async def migrate_wait(a: WaitArgs) -> dict[str, Any]:
            qemu = self._qemu()
            assert qemu.qmp is not None
            try:
                return await qemu.qmp.wait_migration(frozenset(a.states), a.timeout)
            except MigrationWaitTimeout:
                try:
                    info: dict[str, Any] = await qemu.execute("query-migrate")
                except QmpCommandError as exc:
                    raise ControlError(str(exc)) from None
                return {**info, "timed_out": True}
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None

        @verb("migration-arm", GuardArgs, "the coordinator is alive: cancel the migration if it goes silent")
        def migration_arm(a: GuardArgs) -> dict[str, str]:
            try:
                self.guard = self.guard.arm(a.migration, time.monotonic(), a.timeout)
            except GuardRefused as exc:
                raise ControlError(str(exc)) from None
            if a.stream is not None:
                self.stream = a.stream
            if a.mirror is not None:
                self.mirror = a.mirror
            return {"guard": self.guard.state.value}

        @verb("migration-cut-stream", MigrationArgs, "QEMU hangs on the migration: cut stream and mirrors")
        async def migration_cut_stream(a: MigrationArgs) -> dict[str, int]:
            if self.guard.migration != a.migration or self.guard.state == GuardState.COMMITTED:
                raise ControlError("not this host's uncommitted migration: its stream is not cut")
            return {"cut": await self._cut_stream()}

        @verb("mirror-cut", MirrorCutArgs, "cut QEMU's connections to a disk mirror target (rollback)")
        async def mirror_cut(a: MirrorCutArgs) -> dict[str, int]:
            qemu = self.qemu
            if self.guard.state == GuardState.COMMITTED or qemu is None or qemu.qemu is None:
                raise ControlError("no uncommitted migration's QEMU here: nothing is cut")
            why = f"migration {a.migration} rolls back its disk mirrors"
            return {"cut": await self._cut_to(a.target, why)}

        @verb("migration-commit", MigrationArgs, "the destination may run: the source never runs again")
        def migration_commit(a: MigrationArgs) -> dict[str, str]:
            try:
                self.guard = self.guard.commit(a.migration)
            except GuardRefused as exc:
                raise ControlError(str(exc)) from None
            self._write_state(guard=self.guard.state.value, migration=a.migration)
            return {"guard": self.guard.state.value}

        @verb("migration-disarm", MigrationArgs, "the migration ended here without a commit")
        def migration_disarm(a: MigrationArgs) -> dict[str, str]:
            try:
                self.guard = self.guard.disarm(a.migration)
            except GuardRefused as exc:
                raise ControlError(str(exc)) from None
            self._write_state(guard=self.guard.state.value)
            return {"guard": self.guard.state.value}

        @verb("hand-off", NoArgs, "after a completed migration: QEMU quits, the disks stay served")
        async def hand_off(_a: NoArgs) -> dict[str, bool]:
            if self.guard.state != GuardState.COMMITTED:
                raise ControlError("the migration was not committed here; refusing to hand off")
            qemu = self.qemu
            if qemu is not None and qemu.qemu is not None and qemu.qemu.running:
                try:
                    run_state: str | None = await qemu.status()
                except QmpCommandError:
                    run_state = None  # QEMU on its way out (or deaf): past the commit, it goes either way
                if run_state not in (None, "postmigrate", "finish-migrate", "exited"):
                    raise ControlError(f"QEMU is {run_state}, not migrated out; refusing to hand off")
            # Past the commit the disks are the destination's to read until it releases them, whatever
            # became of QEMU here (it may have died: see _life). Repeating a hand-off is harmless.
            self.serving_others = True
            if qemu is not None and qemu.qemu is not None:
                # Quit, and SIGKILL a QEMU that does not: committed and migrated out, it holds nothing
                # the guest needs, but it may hang on a disk target gone with the link (precopy's mirror
                # into the destination; found by the fault campaign: the link cut at storage-post left a
                # second QEMU of the VM, and the migration "failed", after "QMP quit: no answer").
                await qemu.stop(grace=10.0, hard=True)
            self._changed.set()
            return {"handed_off": True}

        @verb("release", NoArgs, "serving only: stop serving the disks and exit")
        def release(_a: NoArgs) -> dict[str, bool]:
            if self.qemu is not None or not self.serving_others:
                raise ControlError("nothing to release: QEMU runs here")
            self.released = True
            self._changed.set()
            return {"released": True}

        @verb("start-incoming", MigrationArgs, "serving: take the VM back (QEMU waits for a migration)")
        async def start_incoming(a: MigrationArgs) -> dict[str, Any]:
            if self.qemu is not None or not self.serving_others:
                raise ControlError(f"the supervisor is {self.state.get('state')}, not serving")
            try:
                await self._start_qemu(incoming=True)
            except VmError as exc:
                raise ControlError(str(exc)) from None
            self.guard = Guard(cancelled=self.guard.cancelled)
            self._enter(State.INCOMING, error=None, **self._describe())
            return {"supervisor_pid": os.getpid(), **self._describe()}

        @verb("abort-incoming", MigrationArgs, "an incoming migration rolled back: QEMU goes")
        async def abort_incoming(_a: MigrationArgs) -> dict[str, Any]:
            qemu = self.qemu
            if qemu is None or not qemu.incoming:
                raise ControlError("no incoming QEMU here")
            if qemu.qemu is not None:
                await qemu.qemu.kill()
            return {"aborted": True}

        @verb("rehome", RehomeArgs, "take over a new home (after a storage migration)")
        async def rehome(a: RehomeArgs) -> dict[str, Any]:
            try:
                await self._rehome(VmHome(Path(a.to)))
            except (OSError, VmError, QmpCommandError, ControlError) as exc:
                raise ControlError(f"rehome: {exc}") from None
            return {"home": a.to, **self._describe()}

    def request_stop(self) -> None:
        """Signal handler: stop like ``stop`` with the defaults."""
        self.requests.put_nowait(StopRequest())


async def _logged(watcher: Coroutine[Any, Any, None]) -> None:
    """A watcher of the supervisor: whatever goes wrong in it is logged, and never takes the VM down."""
    try:
        await watcher
    except Exception:
        log.exception("a watcher of the supervisor failed")


def _daemonize() -> None:
    """Detach from the starter: it reaps the first child at once, init adopts the second."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hikkoshi.daemons.supervisor``."""
    parser = argparse.ArgumentParser(prog="hikkoshi-supervisor", description=__doc__)
    parser.add_argument("home", type=Path, help="the VM's home directory")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when up (or failed)")
    parser.add_argument("--daemonize", action="store_true", help="detach from the caller")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="override the spec's accelerator")
    parser.add_argument("--qemu", default=DEFAULT_QEMU, help="QEMU binary")
    parser.add_argument(
        "--incoming", action="store_true", help="the destination of a migration (plan: HOME/disks.json)"
    )
    parser.add_argument(
        "--serving", action="store_true", help="serve the disks only: the VM runs on another host"
    )
    parser.add_argument("--tls-dir", type=Path, metavar="DIR", help="this host's TLS files (QEMU layout)")
    args = parser.parse_args(argv)
    if args.daemonize:
        _daemonize()  # before anything starts threads
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s supervisor[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    home = VmHome(args.home.absolute())
    supervisor = Supervisor(
        home,
        ReadyPipe(args.ready_fd),
        accel=args.accel,
        qemu=args.qemu,
        incoming=args.incoming,
        serving=args.serving,
        tls_dir=args.tls_dir.absolute() if args.tls_dir else None,
    )

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # outlives the terminal it came from
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks, log)
        return await supervisor.run()

    try:
        # The standard loop: children are started with a preexec_fn (parent-death signal).
        return asyncio.run(run())
    except Exception as exc:
        log.exception("supervisor failed")
        supervisor.ready.fail(f"supervisor failed: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
