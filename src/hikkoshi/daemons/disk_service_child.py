"""The VM's disk service as its supervisor owns it: one child process, started, waited for, restarted
when it dies (its disks keep their state on disk: a relocation carries on, a plan says how each disk is
served) and stopped with a final flush."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hikkoshi.daemons.entry import READY_PREFIX, disk_service_argv
from hikkoshi.vm.errors import VmStartError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.procs import Child
from hikkoshi.vm.rundir import RunDir

log = logging.getLogger("hikkoshi.daemons.supervisor")


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


class DiskServiceChild:
    """The disk service process of one VM (see the module's docstring)."""

    def __init__(
        self,
        home: VmHome,
        rundir: RunDir,
        python: str = sys.executable,
        start_timeout: float = 60.0,
        tls_dir: Path | None = None,
    ) -> None:
        self.home = home
        self.tls_dir = tls_dir
        self.rundir = rundir
        self._python = python
        self._start_timeout = start_timeout
        self.child: Child | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The process id, if it was started."""
        return None if self.child is None else self.child.pid

    @property
    def running(self) -> bool:
        """Whether it runs now."""
        return self.child is not None and self.child.running

    async def start(self) -> None:
        """Start it; return once it serves every disk (or :class:`VmStartError` with its log)."""
        cmd = disk_service_argv(self.home, self.rundir, self._python, self.tls_dir)
        log_path = self.home.nbd_log
        with log_path.open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            out.flush()
            start = out.tell()
            child = await Child.start("disk-service", cmd, stdout=out, stderr=out)
        # It prints one "serving" line once it listens.
        deadline = time.monotonic() + self._start_timeout
        try:
            while True:
                with log_path.open("rb") as f:
                    f.seek(start)
                    if READY_PREFIX.encode() in f.read():
                        break
                if not child.running:
                    raise VmStartError(f"the disk service exited at start:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise VmStartError(f"the disk service did not listen within {self._start_timeout:.0f} s")
                await child.wait_for(0.02)
        except BaseException:
            await child.terminate(grace=5.0)
            raise
        self.child = child

    async def wait(self) -> int:
        """Wait until it ends; its exit status."""
        assert self.child is not None
        return await self.child.wait()

    async def restart(self) -> None:
        """Start it again after it died."""
        if self.child is not None and self.child.running:
            await self.child.kill()
        self.restarts += 1
        await self.start()

    async def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (it stops accepting, flushes and closes the disks), SIGKILL after ``grace`` s."""
        if self.child is None:
            return None
        return await self.child.terminate(grace=grace)
