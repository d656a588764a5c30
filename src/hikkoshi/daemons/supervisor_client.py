"""Starting VMs and talking to their supervisors (the CLI, the agent, migrations, tests).

:func:`start_vm` launches the supervisor (:mod:`hikkoshi.daemons.supervisor`) and waits on its ready
pipe; the others find the supervisor through the VM's run lock, pid file and control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hikkoshi.aio import within
from hikkoshi.daemons.entry import SUPERVISOR, supervisor_argv
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.errors import RuntimeStateError, VmError, VmStartError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.rundir import RunDir
from hikkoshi.vm.spec import VmSpec

DEFAULT_START_TIMEOUT = 180.0
"""Starting includes probing KVM (booting the test guest once per host boot) and QEMU's start."""


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def start_vm(
    home: VmHome,
    *,
    accel: str | None = None,
    qemu: str | None = None,
    timeout: float = DEFAULT_START_TIMEOUT,
    python: str = sys.executable,
    incoming: bool = False,
    serving: bool = False,
    runtime_dir: Path | None = None,
    tls_dir: Path | None = None,
) -> dict[str, Any]:
    """Start the VM's supervisor in the background and wait until the VM runs (or failed to);
    ``tls_dir``: the host's TLS files (QEMU layout), for disks read from another host.

    Returns what the supervisor reported (pids, accelerator, sockets). Raises
    :class:`RuntimeStateError` if the VM runs already and :class:`VmStartError` if it did not come
    up; the supervisor has then exited, or is killed here if it did not answer in time.
    """
    if home.is_running():
        raise RuntimeStateError(
            f"VM {home.name!r} is running already (supervisor pid {home.supervisor_pid()})"
        )
    if not serving and holds_for_another_host(home):
        raise RuntimeStateError(
            f"VM {home.name!r} runs on another host: this home only holds its disks (shared storage); "
            "start it where it runs, or serve the disks again"
        )
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    cmd = supervisor_argv(
        home,
        ready_fd=write_fd,
        accel=accel,
        qemu=qemu,
        incoming=incoming,
        serving=serving,
        tls_dir=tls_dir,
        python=python,
    )
    env = dict(os.environ)
    if runtime_dir is not None:
        env["HIKKOSHI_RUNTIME_DIR"] = str(runtime_dir)
    try:
        with home.supervisor_log.open("ab") as log:
            starter = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_fd,),
                close_fds=True,
                env=env,
            )
        os.close(write_fd)
        write_fd = -1
        # The starter forks the supervisor and exits at once.
        try:
            starter.wait(timeout=30)
        except subprocess.TimeoutExpired:
            starter.kill()
            starter.wait()
            raise VmStartError(f"the supervisor of {home.name!r} did not detach") from None
        line = _read_line(read_fd, timeout)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
    if line is None:
        pid = home.supervisor_pid()
        if pid is not None and _is_supervisor(pid, home):
            os.kill(pid, signal.SIGKILL)  # its children follow (parent-death signal)
        raise VmStartError(
            f"VM {home.name!r} did not report within {timeout:.0f} s; supervisor log:\n"
            f"{_tail(home.supervisor_log)}"
        )
    if not line:
        raise VmStartError(f"the supervisor of {home.name!r} died at start:\n{_tail(home.supervisor_log)}")
    report = json.loads(line)
    if not report.get("ok"):
        error = str(report.get("error", "unknown error"))
        if "running already" in error:
            raise RuntimeStateError(error)  # the lock is another supervisor's
        # This supervisor releases the run lock as it exits: return once the VM counts as stopped.
        wait_stopped(home, 30)
        raise VmStartError(error)
    return {k: v for k, v in report.items() if k != "ok"}


def holds_for_another_host(home: VmHome) -> bool:
    """Whether the home's VM runs elsewhere and this home only holds its disks (its supervisor said
    so last: it serves them, or served them when it died)."""
    return home.read_state().get("state") == "serving"


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from ``fd``: ``""`` at EOF without one, ``None`` on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return data.decode(errors="replace").strip() if data else ""
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _is_supervisor(pid: int, home: VmHome) -> bool:
    """Whether ``pid`` is this VM's supervisor (and not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return SUPERVISOR.encode() in argv and str(home.path.absolute()).encode() in argv


async def request(home: VmHome, spec: VmSpec, command: str, **args: Any) -> Any:
    """Send a control command to the VM's supervisor."""
    if not home.is_running():
        raise RuntimeStateError(f"VM {home.name!r} is not running")
    socket = run_dir(home, spec).control_socket
    try:
        return await within(control_request(socket, command, **args), 60)
    except (OSError, TimeoutError) as exc:
        raise VmError(f"the supervisor of {home.name!r} does not answer ({exc or 'timeout'})") from None
    except ControlError as exc:
        raise VmError(f"{command}: {exc}") from None


def run_dir(home: VmHome, spec: VmSpec) -> RunDir:
    """The runtime directory of a running VM: the one its supervisor recorded (it may run with
    another ``HIKKOSHI_RUNTIME_DIR`` than ours), else the default."""
    recorded = home.read_state().get("rundir")
    return RunDir(Path(recorded)) if isinstance(recorded, str) else RunDir.for_vm(spec.uuid)


def wait_stopped(home: VmHome, timeout: float) -> bool:
    """Wait until the VM's supervisor is gone; whether it is."""
    deadline = time.monotonic() + timeout
    while home.is_running():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def stop_vm(home: VmHome, spec: VmSpec, *, grace: float = 60.0, hard: bool = False) -> dict[str, Any]:
    """Ask the supervisor to power the VM off and wait until it has; the final ``state.json``.

    ``grace`` is how long the guest may take to power off after the ACPI power button."""
    try:
        await request(home, spec, "stop", timeout=grace, hard=hard)
    except VmError:
        # The supervisor may have been on its way out anyway (the guest powered off).
        if home.is_running():
            raise
    # ACPI phase + quit (10 s) + kill + NBD service shutdown (15 s) + slack.
    if not await asyncio.to_thread(wait_stopped, home, (0 if hard else grace) + 60):
        raise VmError(f"VM {home.name!r} did not stop; see {home.supervisor_log}")
    return home.read_state()


def kill_vm(home: VmHome, timeout: float = 30.0, children_grace: float = 10.0) -> bool:
    """SIGKILL the supervisor; whether there was one. Its QEMU and disk service follow it (the kernel
    sends them SIGTERM) and are waited for, and killed if they outlive ``children_grace`` s; then its
    runtime directory goes. Once this returns nothing of the VM runs or is left of its run (a
    rolled-back destination is clean, a new start cannot meet them)."""
    pid = home.supervisor_pid()
    if not home.is_running() or pid is None or not _is_supervisor(pid, home):
        return False
    children = _recorded_children(home, pid)
    rundir = home.read_state().get("rundir")
    os.kill(pid, signal.SIGKILL)
    if not wait_stopped(home, timeout):
        raise VmError(f"VM {home.name!r}: supervisor pid {pid} survived SIGKILL")
    _wait_gone(children, children_grace)
    if isinstance(rundir, str):
        RunDir(Path(rundir)).remove()  # its sockets: the supervisor removes them as it ends, not killed
    return True


def _stat(pid: int) -> tuple[int, int] | None:
    """``pid``'s parent and start time (clock ticks since boot: it tells a process from a later one
    with its pid); ``None`` if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _recorded_children(home: VmHome, supervisor: int) -> list[tuple[int, int]]:
    """The supervisor's children its state records (QEMU, the disk service), with their start times."""
    out = []
    for pid in home.recorded_pids():
        stat = _stat(pid)
        if stat is not None and stat[0] == supervisor:  # its own child: not a recycled pid
            out.append((pid, stat[1]))
    return out


def _wait_gone(children: list[tuple[int, int]], grace: float) -> None:
    """Wait until each of ``children`` (pid, start time) is gone; SIGKILL those left after ``grace``."""
    deadline = time.monotonic() + grace
    killed = False
    while True:
        left = [(pid, t) for pid, t in children if (_stat(pid) or (0, 0))[1] == t]
        if not left:
            return
        if time.monotonic() > deadline:
            if killed:
                raise VmError(f"processes {[pid for pid, _t in left]} survived SIGKILL")
            for pid, _t in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 10.0
        time.sleep(0.02)


async def vm_status(home: VmHome, spec: VmSpec) -> dict[str, Any]:
    """The running VM's status from its supervisor, or the last state recorded for a stopped one."""
    if home.is_running():
        status: dict[str, Any] = await request(home, spec, "status")
        return {"running": True, **status}
    state = home.read_state()
    error = state.get("error")
    if state.get("state") not in (None, "stopped"):
        # The lock is free but the supervisor never wrote its last word: it was killed.
        error = f"the supervisor (pid {state.get('supervisor_pid')}) ended without recording how; killed?"
    return {
        "running": False,
        "state": "stopped",
        "last_exit": state.get("exit") if state.get("state") == "stopped" else None,
        "last_error": error,
        "since": state.get("since") if state.get("state") == "stopped" else None,
    }
