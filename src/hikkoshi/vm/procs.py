"""Child processes that are owned: started with a parent-death signal, stopped by pid, always reaped.

The supervisor of a VM starts QEMU and the NBD service through :class:`Child`. Each child asks the
kernel (``PR_SET_PDEATHSIG``) for a signal when the supervisor dies, so that not even a SIGKILL of
the supervisor leaves a QEMU running that nobody controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from hikkoshi.aio import within

log = logging.getLogger("hikkoshi.vm.procs")

_PR_SET_PDEATHSIG = 1
_libc: Any = None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _death_signal_preexec(sig: signal.Signals) -> Callable[[], None]:
    """A ``preexec_fn`` that arranges for ``sig`` when the process that forked us dies."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # looked up before fork: the child only calls it
    prctl = _libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


class Child:
    """One child process we started and will stop."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self._proc = proc

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        death_signal: signal.Signals = signal.SIGTERM,
        cwd: Path | None = None,
    ) -> Child:
        """Start ``argv``; it receives ``death_signal`` if this process dies first."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            preexec_fn=_death_signal_preexec(death_signal),
        )
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return cls(name, proc)

    @property
    def pid(self) -> int:
        """The process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has been reaped (negative: killed by that signal), else ``None``."""
        return self._proc.returncode

    @property
    def running(self) -> bool:
        """Not yet reaped."""
        return self._proc.returncode is None

    async def stdout_line(self) -> str:
        """The next line of its standard output (started with ``stdout=PIPE``); empty at its end."""
        if self._proc.stdout is None:
            raise ValueError(f"{self.name}: standard output is not a pipe")
        return (await self._proc.stdout.readline()).decode(errors="replace").strip()

    async def wait(self) -> int:
        """Wait for the process to end; return its status."""
        return await self._proc.wait()

    async def wait_for(self, seconds: float) -> bool:
        """Wait up to ``seconds``; whether it ended."""
        try:
            await within(asyncio.shield(self._proc.wait()), seconds)
        except TimeoutError:
            return False
        return True

    def send(self, sig: signal.Signals) -> None:
        """Signal the process by pid, if it is still ours to signal."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def terminate(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; return the exit status."""
        if self.running:
            self.send(signal.SIGTERM)
            if not await self.wait_for(grace):
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", self.name, self.pid, grace)
                self.send(signal.SIGKILL)
        return await self._proc.wait()

    async def kill(self) -> int:
        """SIGKILL and reap."""
        self.send(signal.SIGKILL)
        return await self._proc.wait()
