"""The embedded etcd kept running (``hikkoshi cluster up``): a supervisor of the single local member.

It starts the member (:meth:`EtcdMember.single`), waits until it is healthy, restarts it when it dies
unexpectedly (at most ``max_restarts`` times within ``window`` seconds, then it gives up), and stops it
cleanly (SIGTERM, a wait, SIGKILL) when asked. While it runs it holds ``STATE_DIR/cluster.lock`` (one
supervisor per state dir) and says where it is in ``STATE_DIR/cluster.pid``: its pid, etcd's, the
endpoint. :func:`stop_supervisor` (``hikkoshi cluster down``) reads that file to stop it, and stops
etcd too if the supervisor could not.

Pids are recorded with the process's start time (``/proc/PID/stat``), so a pid reused by another
process after a crash is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hikkoshi.cluster.errors import EtcdProcessError
from hikkoshi.cluster.etcd_process import EtcdMember

log = logging.getLogger(__name__)

PID_FILE = "cluster.pid"
LOCK_FILE = "cluster.lock"
LOG_FILE = "cluster.log"


@dataclass(frozen=True)
class ProcessId:
    """A process: its pid and start time (clock ticks after boot), which a reused pid does not share."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The live process ``pid`` (None if there is none, or only its zombie)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command, which may hold spaces
        if fields[0] in ("Z", "X"):
            return None
        return cls(pid, int(fields[19]))

    def alive(self) -> bool:
        """Whether this very process still runs."""
        return ProcessId.of(self.pid) == self


@dataclass(frozen=True)
class SupervisorInfo:
    """What ``cluster.pid`` says."""

    supervisor: ProcessId
    etcd: ProcessId | None
    endpoint: str

    def to_json(self) -> str:
        def pid(p: ProcessId | None) -> dict[str, int] | None:
            return None if p is None else {"pid": p.pid, "start": p.start}

        return json.dumps(
            {"supervisor": pid(self.supervisor), "etcd": pid(self.etcd), "endpoint": self.endpoint}
        )

    @classmethod
    def from_json(cls, text: str) -> SupervisorInfo:
        data = json.loads(text)
        etcd = data.get("etcd")
        return cls(
            ProcessId(**data["supervisor"]),
            ProcessId(**etcd) if etcd else None,
            str(data["endpoint"]),
        )


class PidFile:
    """``STATE_DIR/cluster.pid``, written whole (a reader never sees half of it)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PID_FILE

    def write(self, info: SupervisorInfo) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(info.to_json() + "\n")
        tmp.replace(self.path)

    def read(self) -> SupervisorInfo | None:
        """The file's content; None if there is none (or it is unreadable: a crash while writing)."""
        try:
            return SupervisorInfo.from_json(self.path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class AlreadyRunning(EtcdProcessError):
    """Another supervisor holds this state dir."""


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[IO[str]]:
    """Hold ``STATE_DIR/cluster.lock`` for the block (:class:`AlreadyRunning` if another process does)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK_FILE).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = PidFile(state_dir).read()
            who = f" (supervisor pid {info.supervisor.pid}, etcd at {info.endpoint})" if info else ""
            raise AlreadyRunning(f"a cluster is already up under {state_dir}{who}") from None
        yield f


class Supervisor:
    """Keeps one member running until told to stop (see the module's docstring)."""

    def __init__(
        self,
        member: EtcdMember,
        pid_file: PidFile,
        *,
        max_restarts: int = 5,
        window: float = 600.0,
        pause: float = 1.0,
        on_ready: Callable[[EtcdMember], None] | None = None,
    ) -> None:
        self.member = member
        self.pid_file = pid_file
        self.max_restarts = max_restarts
        self.window = window
        self.pause = pause
        self.on_ready = on_ready
        self.restarts: list[float] = []
        """When the member was restarted (monotonic seconds)."""

    def _record(self) -> None:
        me = ProcessId.of(os.getpid())
        etcd = ProcessId.of(self.member.pid) if self.member.pid is not None else None
        assert me is not None
        self.pid_file.write(SupervisorInfo(me, etcd, self.member.spec.endpoint))

    async def _start(self) -> None:
        self.member.start()
        await self.member.wait_healthy()
        self._record()

    async def _until_exit_or(self, stop: asyncio.Event) -> bool:
        """True when the member exited, False when ``stop`` was set."""
        while not stop.is_set():
            if not self.member.running:
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()
        return False

    def _count_restart(self) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window] + [now]
        if len(self.restarts) > self.max_restarts:
            raise EtcdProcessError(
                f"etcd died {len(self.restarts)} times within {self.window:.0f} s; giving up:\n"
                f"{self.member.log_tail()}"
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Run the member until ``stop`` is set (or it cannot be kept running: :class:`EtcdProcessError`)."""
        try:
            await self._start()
            if self.on_ready is not None:
                self.on_ready(self.member)
            while await self._until_exit_or(stop):
                log.warning("etcd exited unexpectedly; restarting it:\n%s", self.member.log_tail(5))
                self._count_restart()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.pause):
                        await stop.wait()
                if stop.is_set():
                    break
                await self._start()
        finally:
            await self.member.stop()
            self.pid_file.remove()


def _signal(p: ProcessId, sig: int) -> None:
    if p.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)


def _wait_gone(p: ProcessId, within: float) -> bool:
    end = time.monotonic() + within
    while p.alive():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def terminate(p: ProcessId, within: float) -> bool:
    """SIGTERM, up to ``within`` s for it to go, then SIGKILL; False if it had to be killed."""
    _signal(p, signal.SIGTERM)
    if _wait_gone(p, within):
        return True
    _signal(p, signal.SIGKILL)
    _wait_gone(p, 5.0)
    return False


def stop_supervisor(state_dir: Path, within: float = 20.0) -> SupervisorInfo | None:
    """Stop the supervisor of ``state_dir`` and its etcd; what the pid file said (None: nothing ran)."""
    pid_file = PidFile(state_dir)
    info = pid_file.read()
    if info is None:
        return None
    terminate(info.supervisor, within)
    last = pid_file.read() or info  # the supervisor may have restarted etcd since
    for etcd in {last.etcd, info.etcd} - {None}:
        assert etcd is not None
        terminate(etcd, 10.0)
    pid_file.remove()
    return info
