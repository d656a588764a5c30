"""One run of a VM's QEMU: its tap devices, the QEMU process and its QMP session, owned together.

:class:`QemuRun` is an async context manager. Entering creates the taps of bridged NICs and starts
QEMU (paused, until the QMP session is up); then it lets the guest run, or, for the destination of a
migration, leaves it waiting for the stream. Leaving tears everything down, by pid, whatever happened:
QEMU is killed if it is still there and the taps are removed. The disks are not QEMU's: the VM's
disk service (owned by the supervisor beside this) serves them before, during and after a run.

:meth:`QemuRun.stop` is the orderly way out: ACPI power button, then QMP ``quit``, then SIGKILL,
each bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from hikkoshi.vm import tap
from hikkoshi.vm.accel import DEFAULT_QEMU, Accel
from hikkoshi.vm.disk_serving import DiskPlan
from hikkoshi.vm.errors import VmStartError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.precheck import OVMF_VARS
from hikkoshi.vm.procs import Child
from hikkoshi.vm.qemu import UEFI_VARS_FILE, qemu_command
from hikkoshi.vm.qmp import QmpCommandError, QmpSession
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import VmSpec

log = logging.getLogger("hikkoshi.daemons.qemu")

StopHow = Literal["guest", "acpi", "quit", "kill"]


@dataclass(frozen=True)
class StopOutcome:
    """How QEMU ended."""

    how: StopHow
    """``guest``: it powered off (or crashed) by itself; ``acpi``: after the power button;
    ``quit``: QMP quit; ``kill``: SIGKILL."""
    returncode: int
    stop_seconds: float | None
    """From the stop request to QEMU's exit; ``None`` if nobody asked."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


class QemuRun:
    """One run of a VM's QEMU (see the module's docstring)."""

    def __init__(
        self,
        home: VmHome,
        spec: VmSpec,
        *,
        accel: Accel,
        rundir: RunDir,
        qemu: str = DEFAULT_QEMU,
        start_timeout: float = 60.0,
        plan: DiskPlan | None = None,
        incoming: bool = False,
    ) -> None:
        self.home = home
        #: An incoming VM's start facts (its disks' geometry on the source).
        self.plan = plan
        #: The destination of a migration: QEMU waits for the stream and stays paused.
        self.incoming = incoming
        self.spec = spec
        self.accel: Accel = accel
        self.rundir = rundir
        self._qemu_binary = qemu
        self._start_timeout = start_timeout
        self.qemu: Child | None = None
        self.qmp: QmpSession | None = None
        self.taps: dict[int, str] = {}
        self.started_at: float | None = None
        self._stop_lock = asyncio.Lock()
        self._stop_phase: StopHow = "guest"
        self._stop_requested_at: float | None = None

    # --- start ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the taps and start QEMU; on failure nothing is left behind."""
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise

    async def close(self) -> None:
        """Kill QEMU if it is still there, remove the taps. Safe to repeat. A stop under way finishes
        first: its QMP session must not go from under it."""
        async with self._stop_lock:
            await self._teardown()

    async def __aenter__(self) -> QemuRun:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        self._rotate_console()
        if self.spec.firmware == "uefi":
            vars_file = self.home.path / UEFI_VARS_FILE
            if not vars_file.exists():
                shutil.copyfile(OVMF_VARS, vars_file)
        for index, nic in enumerate(self.spec.nics):
            if nic.bridge is not None:
                name = tap.tap_name(self.spec.uuid, index, str(self.rundir.path.parent))
                try:
                    await tap.create_tap(name, nic.bridge, nic.mac)
                except tap.TapError as exc:
                    raise VmStartError(f"NIC {index}: {exc}") from None
                self.taps[index] = name
        await self._start_qemu()

    def _rotate_console(self) -> None:
        if self.home.console_log.exists():
            os.replace(self.home.console_log, self.home.path / "console.log.1")

    async def _start_qemu(self) -> None:
        cmd = qemu_command(
            self.spec,
            self.home,
            self.rundir,
            accel=self.accel,
            taps=self.taps,
            qemu=self._qemu_binary,
            plan=self.plan,
            incoming=self.incoming,
        )
        self.qmp = QmpSession(f"vm-{self.spec.name}")
        await self.qmp.listen(self.rundir.qmp_socket)
        with self.home.qemu_log.open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            out.flush()
            self.qemu = await Child.start("qemu", cmd, stdout=out, stderr=out)
        qemu, qmp = self.qemu, self.qmp

        async def fail_if_qemu_exits() -> None:
            await qemu.wait()
            raise VmStartError(f"QEMU exited at start:\n{_tail(self.home.qemu_log)}")

        try:
            async with asyncio.timeout(self._start_timeout), asyncio.TaskGroup() as tg:
                watcher = tg.create_task(fail_if_qemu_exits())
                await qmp.accept()
                watcher.cancel()
        except TimeoutError:
            raise VmStartError(f"QEMU did not connect to QMP within {self._start_timeout:.0f} s") from None
        except BaseExceptionGroup as group:
            # QEMU's early exit (the watcher), or a QMP handshake that failed because of it.
            exited = group.subgroup(VmStartError)
            if exited is not None:
                raise exited.exceptions[0] from None
            raise VmStartError(f"QMP handshake failed: {group.exceptions[0]}") from None
        if not self.incoming:
            await self.qmp.execute("cont")
        # An incoming VM stays paused: the migration's coordinator resumes it after the switchover.
        self.started_at = time.time()

    # --- while running -------------------------------------------------------------------------------------

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ...), or ``exited``."""
        if self.qemu is None or not self.qemu.running or self.qmp is None:
            return "exited"
        try:
            return await self.qmp.status()
        except QmpCommandError:
            if self.qemu.running:
                raise
            return "exited"

    def _session(self) -> QmpSession:
        if self.qmp is None or self.qemu is None or not self.qemu.running:
            raise QmpCommandError("QEMU is not running")
        return self.qmp

    async def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``)."""
        await self._session().execute("stop")

    async def resume(self) -> None:
        """Let a paused guest run again (QMP ``cont``)."""
        await self._session().execute("cont")

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        """Any QMP command."""
        return await self._session().execute(command, arguments)

    async def wait(self) -> StopOutcome:
        """Wait until QEMU has ended; how it ended."""
        assert self.qemu is not None
        code = await self.qemu.wait()
        requested = self._stop_requested_at
        return StopOutcome(
            how=self._stop_phase,
            returncode=code,
            stop_seconds=None if requested is None else round(time.monotonic() - requested, 3),
        )

    async def stop(self, grace: float = 60.0, *, hard: bool = False) -> StopOutcome:
        """Power the VM off: ACPI power button for up to ``grace`` s, then ``quit``, then SIGKILL.

        ``hard`` skips the power button. A paused guest cannot react to the button, so it is
        skipped for one too. Concurrent calls share one stop.
        """
        assert self.qemu is not None
        async with self._stop_lock:
            if self.qemu.running:
                if self._stop_requested_at is None:
                    self._stop_requested_at = time.monotonic()
                if not hard and await self._status_or_none() == "running":
                    await self._phase("acpi", "system_powerdown", grace)
                if self.qemu.running:
                    await self._phase("quit", "quit", 10.0)
                if self.qemu.running:
                    self._stop_phase = "kill"
                    log.warning("QEMU (pid %d) still running; killing it", self.qemu.pid)
                    await self.qemu.kill()
        return await self.wait()

    async def _status_or_none(self) -> str | None:
        try:
            return await self.status()
        except QmpCommandError:
            return None

    async def _phase(self, how: StopHow, command: str, grace: float) -> None:
        assert self.qemu is not None and self.qmp is not None
        self._stop_phase = how
        try:
            await self.qmp.execute(command, limit=min(grace, 10.0))
        except QmpCommandError as exc:
            if self.qemu.running:
                log.info("%s: %s", command, exc)  # e.g. QEMU exiting while we asked
        await self.qemu.wait_for(grace)

    # --- teardown ------------------------------------------------------------------------------------------

    async def _teardown(self) -> None:
        """Kill and reap whatever is still running; remove taps and sockets. Safe to repeat."""
        if self.qemu is not None and self.qemu.running:
            log.warning("tearing down: killing QEMU (pid %d)", self.qemu.pid)
            self._stop_phase = "kill"
            await self.qemu.kill()
        if self.qmp is not None:
            await self.qmp.close()
        for name in self.taps.values():
            with contextlib.suppress(OSError):
                await tap.delete_tap(name)
        self.taps.clear()
        self.rundir.qmp_socket.unlink(missing_ok=True)

    # --- facts ---------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Pids and settings, for ``status``."""
        return {
            "accel": self.accel,
            "qemu_pid": None if self.qemu is None else self.qemu.pid,
            "incoming": self.incoming,
            "taps": {str(k): v for k, v in self.taps.items()},
            "started_at": self.started_at,
        }
