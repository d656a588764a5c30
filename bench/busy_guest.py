"""The busy test guest (disk writer + memory dirtier) as the endurance and fault benchmarks drive it,
through its agent only: made and started, watched on its console while it checks itself, stopped with
its final verdict, and its disk verified on the host.

The disk writer reads back every record it writes, and with ``scrub`` equal to ``progress`` it
compares its whole ring on the disk with its copy in memory right after every ``PROGRESS`` line; the
next ``PROGRESS`` line says that comparison passed (a failure prints ``FAIL`` and ends the workload).
So two ``PROGRESS`` lines printed after a move are the guest's own proof that every record it holds is
intact where it runs now (:meth:`BusyGuest.wait_checked`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from bench.agent_hosts import AgentApi, ApiError
from hikkoshi.guest.diskwriter import DiskwriterError, verify_diskwriter_image

_PROGRESS = re.compile(r"HIKKOSHI-DISKWRITER PROGRESS run=(\d+) durable=(\d+) ")
_DONE = re.compile(r"HIKKOSHI-DISKWRITER DONE run=(\d+) last=(-?\d+) written=\d+ records=\d+ OK")
_FAIL = re.compile(r"HIKKOSHI-\w+ FAIL .*|Kernel panic.*")


class GuestFailed(RuntimeError):
    """The guest reported a failed check, stopped checking, or its disk does not verify."""


@dataclass
class BusyGuest:
    """One busy guest (see the module's docstring)."""

    name: str
    run: int
    slots: int = 32
    """Records in the disk writer's ring (64 KiB each): the ring it scrubs after every PROGRESS line."""
    progress: int = 4
    memory_mib: int = 192
    disk: str = "32M"
    dirty_rate: int = 4
    """MiB/s the memory dirtier rewrites."""
    dirty_mb: int = 24

    def params(self) -> dict[str, str]:
        return {
            "run": str(self.run),
            "slots": str(self.slots),
            "progress": str(self.progress),
            "scrub": str(self.progress),
            "rate": str(self.dirty_rate),
            "mb": str(self.dirty_mb),
        }

    def create(self, api: AgentApi) -> None:
        """Create and start it; return once it has checked its ring twice."""
        api.create_busy(self.name, self.params(), self.memory_mib, self.disk)
        api.start(self.name)
        self.wait_checked(api, 0, timeout=300)

    def console_size(self, api: AgentApi) -> int:
        response = api.request("GET", f"/v1/vms/{self.name}/console", params={"offset": 1 << 40})
        return int(response.headers["X-Console-Size"])

    def wait_checked(self, api: AgentApi, mark: int, timeout: float = 180.0, lines: int = 2) -> int:
        """Wait for ``lines`` PROGRESS lines of this run on the console after character ``mark`` (a new
        boot's console starts from 0); the last durable record they report. :class:`GuestFailed` on a
        FAIL line, or when none come within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            try:
                response = api.request("GET", f"/v1/vms/{self.name}/console", params={"offset": mark})
            except ApiError as exc:
                if exc.status:
                    raise
                time.sleep(0.5)  # the agent restarts
                continue
            if int(response.headers["X-Console-Size"]) < mark:
                mark = 0  # a new boot's console
                continue
            text = response.content.decode(errors="replace")
            fail = _FAIL.search(text)
            if fail:
                raise GuestFailed(f"{self.name}: {fail[0][:300]}")
            seen = [m for m in _PROGRESS.finditer(text) if int(m[1]) == self.run]
            if len(seen) >= lines:
                return int(seen[-1][2])
            time.sleep(0.25)
        raise GuestFailed(f"{self.name}: no {lines} checks within {timeout:.0f} s; console:\n{text[-1500:]}")

    def stop_and_verify(self, api: AgentApi, datastore: Path) -> int:
        """Power it off (its final full check must pass), then verify its disk image on the host; the
        last record."""
        mark = self.console_size(api)
        api.stop(self.name)
        if self.console_size(api) < mark:
            mark = 0
        text = api.console(self.name, mark)
        done = _DONE.search(text)
        if done is None or int(done[1]) != self.run:
            raise GuestFailed(f"{self.name}: no final check after the stop:\n{text[-1500:]}")
        last = int(done[2])
        try:
            report = verify_diskwriter_image(
                datastore / self.name / "disk0.raw", run=self.run, slots=self.slots, durable=last
            )
        except (DiskwriterError, OSError) as exc:
            raise GuestFailed(f"{self.name}: the image does not verify: {exc}") from None
        if report.last != last:
            raise GuestFailed(f"{self.name}: the guest's last record is {last}, the image's {report.last}")
        return last
