"""The supervisor: a small daemon per running VM that owns its QEMU and NBD service.

``hikkoshi vm start`` runs ``python -m hikkoshi.vm.supervisor HOME --ready-fd N --daemonize``. The
supervisor detaches (fork, ``setsid``), takes the VM's run lock, prechecks, starts the
:class:`~hikkoshi.vm.runtime.VmRuntime` and reports on the ready pipe: one JSON line, ``{"ok":
true, ...}`` or ``{"ok": false, "error": ...}``. Then it serves the control socket
(``status``, ``pause``, ``resume``, ``stop``, ``qmp``) until QEMU ends, tears the rest down, writes
the outcome to ``state.json`` and exits. SIGTERM or SIGINT stop the VM as ``stop`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hikkoshi.nbd.control import ControlError, ControlServer
from hikkoshi.vm import precheck
from hikkoshi.vm.accel import DEFAULT_QEMU, choose_accel
from hikkoshi.vm.disk_plan import IncomingPlan
from hikkoshi.vm.errors import PrecheckError, VmError
from hikkoshi.vm.home import VmHome, write_atomically
from hikkoshi.vm.host import host_facts
from hikkoshi.vm.qmp import MigrationWaitTimeout, QmpCommandError
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.runtime import StopOutcome, VmRuntime
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.vm.supervisor")

DEFAULT_STOP_TIMEOUT = 60.0
MAX_PROXY_RESTARTS = 5
EXIT_OK, EXIT_FAILED, EXIT_RUNNING = 0, 2, 3


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


def _start_prechecks(spec: VmSpec, home: VmHome, plan: IncomingPlan | None) -> None:
    facts = host_facts()
    disks = []
    for disk in spec.disks:
        if plan is not None and plan.backend(disk.name).kind != "local":
            continue  # a proxy creates its cache; a remote disk is the source's
        path = home.disk_path(disk)
        disks.append(
            precheck.DiskState(disk.name, path.is_file(), path.stat().st_size if path.is_file() else 0)
        )
    problems = precheck.check_memory_available(spec, facts)
    problems += precheck.check_boot_files(spec, home.path)
    problems += precheck.check_disks_present(spec, disks) if plan is None else []
    problems += precheck.check_networks(spec, facts)
    problems += precheck.check_firmware(spec)
    if problems:
        raise PrecheckError(problems, f"start VM {spec.name!r}")


class Supervisor:
    """Runs one VM until QEMU ends."""

    def __init__(
        self, home: VmHome, ready: ReadyPipe, *, accel: str | None, qemu: str, incoming: bool = False
    ) -> None:
        self.home = home
        self.incoming = incoming
        #: Set by ``hand-off``: QEMU's state went to a migration's destination; the disk services
        #: keep serving it until ``release``.
        self.handed_off = False
        self.released = asyncio.Event()
        self._lock_fd = -1
        self.ready = ready
        self.accel_request = accel
        self.qemu = qemu
        self.requests: asyncio.Queue[StopRequest] = asyncio.Queue()
        self.state: dict[str, Any] = {}

    def _write_state(self, **changes: Any) -> None:
        self.state.update(changes)
        self.home.write_state(self.state)

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
        self.state = {"state": "starting", "supervisor_pid": os.getpid(), "since": time.time()}
        try:
            spec = self.home.load_spec()
            plan = self.home.load_plan() if self.incoming or self.home.has_plan() else None
            if plan is not None and not self.incoming:
                plan = plan.resumed()
            _start_prechecks(spec, self.home, plan)
            # After the other checks: finding out whether KVM works may boot a probe guest.
            accel = choose_accel(self.accel_request or spec.accel, qemu=self.qemu)
            problems = precheck.check_cpu(spec, accel)
            if problems:
                raise PrecheckError(problems, f"start VM {spec.name!r}")
            self._write_state(name=spec.name, uuid=str(spec.uuid), accel=accel)
            outcome = await self._run_vm(spec, accel, plan)
        except (VmError, ValueError, OSError, RuntimeError) as exc:
            log.error("%s", exc)
            self.ready.fail(str(exc))
            self._write_state(state="stopped", since=time.time(), error=str(exc), exit=None)
            return EXIT_FAILED
        self._write_state(
            state="migrated" if self.handed_off else "stopped",
            since=time.time(),
            exit=outcome.as_dict(),
            error=None,
        )
        log.info("VM %s ended: %s", spec.name, outcome)
        return EXIT_OK

    async def _run_vm(self, spec: VmSpec, accel: str, plan: IncomingPlan | None) -> StopOutcome:
        rundir = RunDir.for_vm(spec.uuid)
        assert accel in ("kvm", "tcg")
        async with VmRuntime(
            self.home,
            spec,
            accel="kvm" if accel == "kvm" else "tcg",
            rundir=rundir,
            qemu=self.qemu,
            plan=plan,
            incoming=self.incoming,
        ) as vm:
            control = ControlServer(rundir.control_socket)
            self._register(control, vm)
            await control.start()
            try:
                state = "incoming" if self.incoming else "running"
                self._write_state(state=state, since=time.time(), error=None, exit=None, **vm.describe())
                self.ready.ok({"supervisor_pid": os.getpid(), **vm.describe()})
                async with asyncio.TaskGroup() as tg:
                    stopper = tg.create_task(self._serve_stop_requests(vm))
                    watcher = tg.create_task(self._watch_nbd(vm))
                    outcome = await vm.wait()
                    stopper.cancel()
                    watcher.cancel()
                if self.handed_off:
                    await self._serve_until_released(vm)
            finally:
                await control.close()
        return outcome

    async def _serve_stop_requests(self, vm: VmRuntime) -> None:
        while True:
            request = await self.requests.get()
            log.info("stopping (grace %.0f s, hard=%s)", request.grace, request.hard)
            self._write_state(state="stopping")
            await vm.stop(request.grace, hard=request.hard)

    async def _serve_until_released(self, vm: VmRuntime) -> None:
        """After a hand-off: QEMU is gone, the disk services serve the destination until ``release``
        (or a stop request, or a service ending by itself)."""
        log.info("VM migrated out; its disks stay served until released")
        self._write_state(state="migrated", since=time.time())
        async with asyncio.TaskGroup() as tg:
            waits = [
                tg.create_task(self.released.wait()),
                tg.create_task(self.requests.get()),
                tg.create_task(vm.wait_nbd()),
            ]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        log.info("released: stopping the disk services")

    async def _watch_nbd(self, vm: VmRuntime) -> None:
        restarts = 0
        while True:
            ended = await vm.wait_nbd()
            if ended is None:
                return
            name, code = ended
            if name.startswith("proxy-") and restarts < MAX_PROXY_RESTARTS:
                # The proxy's cache and bitmap survive any crash: a new one carries on where it stood.
                restarts += 1
                disk = name.removeprefix("proxy-")
                log.error("relocation proxy of %s ended (status %d); restarting it", disk, code)
                try:
                    await vm.restart_proxy(disk, resumed=self.state.get("state") != "incoming")
                    self._write_state(proxy_pids={n: c.pid for n, c in vm.proxies.items()})
                    await self._resume_after_io_errors(vm)
                    continue
                except (VmError, QmpCommandError, OSError) as exc:
                    log.error("could not restart the proxy of %s: %s", disk, exc)
            # QEMU is still there (else this task would have been cancelled): the disks are gone from
            # under the guest. werror/rerror=stop pause it at its next I/O; pause it now.
            what = "the NBD service" if name == "nbd" else f"the relocation proxy {name}"
            log.error("%s ended (status %d) while the VM runs; pausing the guest", what, code)
            self._write_state(error=f"{what} ended with status {code}")
            with contextlib.suppress(QmpCommandError):
                await vm.pause()
            return

    async def _rehome(self, vm: VmRuntime, new: VmHome) -> None:
        """Move the supervisor, its log and QEMU's console into ``new`` (which holds copies of the home's
        files and, by now, the disks); the old home is the caller's to delete."""
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
            await vm.execute(
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
            # QEMU's and the disk services' own logs stay with their open files until they restart.
            for name in ("qemu.log", "nbd.log"):
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(old.path / name, new.path / name)
        except BaseException:
            os.close(lock)
            new.pid_file.unlink(missing_ok=True)
            raise
        self.home = vm.home = new
        self._write_state(home=str(new.path))
        os.close(self._lock_fd)
        self._lock_fd = lock
        log.info("rehomed from %s to %s", old.path, new.path)

    @staticmethod
    async def _resume_after_io_errors(vm: VmRuntime, settle: float = 10.0) -> None:
        """After a disk service came back: requests that failed while it was gone stopped the guest
        (``werror=stop``); ``cont`` retries them. Watch until the guest has run ``settle`` s on end."""
        quiet_since = time.monotonic()
        deadline = quiet_since + 60.0
        while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
            if await vm.status() == "io-error":
                log.info("guest stopped on a disk error while its proxy was down; resuming it")
                await vm.resume()
                quiet_since = time.monotonic()
            await asyncio.sleep(0.05)

    def _register(self, control: ControlServer, vm: VmRuntime) -> None:
        async def status(_args: dict[str, Any]) -> dict[str, Any]:
            try:
                run_state = await vm.status()
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None
            return {
                "state": run_state,
                "supervisor_pid": os.getpid(),
                "error": self.state.get("error"),
                **vm.describe(),
            }

        async def pause(args: dict[str, Any]) -> dict[str, Any]:
            try:
                await vm.pause()
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None
            return await status(args)

        async def resume(args: dict[str, Any]) -> dict[str, Any]:
            try:
                await vm.resume()
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None
            if self.state.get("state") == "incoming":
                self._write_state(state="running", since=time.time())
            return await status(args)

        async def hand_off(_args: dict[str, Any]) -> dict[str, Any]:
            """The migration completed and the destination runs: QEMU quits, the disks keep serving."""
            try:
                run_state = await vm.status()
                if run_state not in ("postmigrate", "finish-migrate"):
                    raise ControlError(f"QEMU is {run_state}, not migrated out; refusing to hand off")
                self.handed_off = True
                await vm.execute("quit")
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None
            return {"handed_off": True}

        async def migrate_wait(args: dict[str, Any]) -> dict[str, Any]:
            """Block until QEMU's migration reaches one of ``states`` (e.g. ``pre-switchover``)."""
            states = args.get("states")
            if not isinstance(states, list) or not all(isinstance(x, str) for x in states):
                raise ControlError('migrate-wait needs "states": [NAME, ...]')
            timeout = float(args.get("timeout", 3600))
            if vm.qmp is None:
                raise ControlError("QEMU is not running")
            try:
                return await vm.qmp.wait_migration(frozenset(states), timeout)
            except MigrationWaitTimeout:
                try:
                    info: dict[str, Any] = await vm.execute("query-migrate")
                except QmpCommandError as exc:
                    raise ControlError(str(exc)) from None
                return {**info, "timed_out": True}
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None

        async def rehome(args: dict[str, Any]) -> dict[str, Any]:
            """The VM's files now live in another home (its disks were moved there live): take it over."""
            path = args.get("to")
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ControlError('rehome needs "to": the new home directory (absolute)')
            try:
                await self._rehome(vm, VmHome(Path(path)))
            except (OSError, VmError, QmpCommandError) as exc:
                raise ControlError(f"rehome: {exc}") from None
            return {"home": path, **vm.describe()}

        def release(_args: dict[str, Any]) -> dict[str, Any]:
            if not self.handed_off:
                raise ControlError("nothing to release: the VM was not handed off")
            self.released.set()
            return {"released": True}

        def stop(args: dict[str, Any]) -> dict[str, Any]:
            timeout = float(args.get("timeout", DEFAULT_STOP_TIMEOUT))
            if not 0 <= timeout <= 3600:
                raise ControlError("timeout must be between 0 and 3600 seconds")
            self.requests.put_nowait(StopRequest(timeout, bool(args.get("hard", False))))
            return {"stopping": True}

        async def qmp(args: dict[str, Any]) -> Any:
            command = args.get("execute")
            arguments = args.get("arguments")
            if not isinstance(command, str) or not (arguments is None or isinstance(arguments, dict)):
                raise ControlError('qmp needs "execute": NAME and optionally "arguments": {...}')
            try:
                return await vm.execute(command, arguments)
            except QmpCommandError as exc:
                raise ControlError(str(exc)) from None

        control.register("status", status, "run state, pids, sockets")
        control.register("pause", pause, "pause the guest (QMP stop)")
        control.register("resume", resume, "resume the guest (QMP cont)")
        control.register("stop", stop, "power off: args timeout (s, ACPI phase), hard (skip ACPI)")
        control.register("qmp", qmp, "run a QMP command: args execute, arguments")
        control.register("hand-off", hand_off, "after a completed migration: QEMU quits, disks keep serving")
        control.register("rehome", rehome, "take over a new home (after a storage migration); args: to")
        control.register("migrate-wait", migrate_wait, "wait for migration states; args: states, timeout")
        control.register("release", release, "after hand-off: stop serving the disks and exit")

    def request_stop(self) -> None:
        """Signal handler: stop like ``stop`` with the defaults."""
        self.requests.put_nowait(StopRequest())


def _daemonize() -> None:
    """Detach from the starter: it reaps the first child at once, init adopts the second."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hikkoshi.vm.supervisor``."""
    parser = argparse.ArgumentParser(prog="hikkoshi-supervisor", description=__doc__)
    parser.add_argument("home", type=Path, help="the VM's home directory")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when up (or failed)")
    parser.add_argument("--daemonize", action="store_true", help="detach from the caller")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="override the spec's accelerator")
    parser.add_argument("--qemu", default=DEFAULT_QEMU, help="QEMU binary")
    parser.add_argument(
        "--incoming", action="store_true", help="the destination of a migration (plan: HOME/incoming.json)"
    )
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
        home, ReadyPipe(args.ready_fd), accel=args.accel, qemu=args.qemu, incoming=args.incoming
    )

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # outlives the terminal it came from
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
