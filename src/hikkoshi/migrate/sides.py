"""A VM on this host as a migration job drives it: its supervisor, its disk service and its QEMU, each
reached through its control socket (root's, on this host only).

The source of every migration is such a side (the job runs on the source's host); a destination on
this host is reached through one too (:class:`~hikkoshi.migrate.destination.LocalDestination`). A
destination on another host never is: its agent offers typed operations instead.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from hikkoshi.aio import within
from hikkoshi.daemons import supervisor_client
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm.errors import VmError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.spec import VmSpec

#: How long one control request may take (a switchover's invalidation across a WAN is the longest).
REQUEST_TIMEOUT = 120.0


class SideError(RuntimeError):
    """A side did not do what it was asked.

    ``transient``: it could not be reached (a peer agent down, a link cut); asking again later may work.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ServiceDown(SideError):
    """A disk service that does not answer: gone with its VM, or being restarted by its supervisor."""


#: How long a disk service that does not answer may take to be back (its supervisor restarts it).
SERVICE_GRACE = 60.0


class VmSide:
    """One VM's supervisor on this host, its disk service and its QEMU."""

    def __init__(self, home: VmHome, spec: VmSpec, label: str) -> None:
        self.home = home
        self.spec = spec
        self.label = label

    async def ctl(self, command: str, **args: Any) -> Any:
        """A supervisor verb."""
        try:
            return await supervisor_client.request(self.home, self.spec, command, **args)
        except VmError as exc:
            raise SideError(f"{self.label}: {exc}") from None

    async def disks(self, command: str, **args: Any) -> Any:
        """A verb of the VM's disk service."""
        value = self.home.read_state().get("nbd_control")
        if not isinstance(value, str):
            raise SideError(f"{self.label}: the VM has no disk service running")
        try:
            return await within(control_request(Path(value), command, **args), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise ServiceDown(f"{self.label} disk service does not answer ({exc or 'timeout'})") from None
        except ControlError as exc:
            raise SideError(f"{self.label} disk service: {command}: {exc}") from None

    async def disks_patiently(self, command: str, grace: float = SERVICE_GRACE, **args: Any) -> Any:
        """A verb of the VM's disk service, asked again while the service is down and the VM's
        supervisor runs (it restarts a disk service that died), for up to ``grace`` s."""
        deadline = time.monotonic() + grace
        while True:
            try:
                return await self.disks(command, **args)
            except ServiceDown:
                if not self.is_running() or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.5)

    # --- QMP through the supervisor (a qmp_migration.QmpPort) --------------------------------------------

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command."""
        args: dict[str, Any] = {"execute": command}
        if arguments is not None:
            args["arguments"] = arguments
        return await self.ctl("qmp", **args)

    async def wait_migration(self, states: list[str], limit: float) -> dict[str, Any]:
        """``query-migrate`` once the migration is in one of ``states`` (or after ``limit`` s)."""
        result: dict[str, Any] = await self.ctl("migrate-wait", states=states, timeout=limit)
        return result

    # --- facts ---------------------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The supervisor's ``status``."""
        result: dict[str, Any] = await self.ctl("status")
        return result

    async def disk_status(self) -> dict[str, dict[str, Any]]:
        """How each disk is served now (kind, relocation progress, holder): the disk service's word."""
        result: dict[str, Any] = await self.disks("status")
        return dict(result.get("disks") or {})

    async def migration(self) -> qm.MigrationInfo:
        """QEMU's outgoing (or incoming) migration."""
        return await qm.query(self)

    def is_running(self) -> bool:
        """Whether the VM's supervisor runs."""
        return self.home.path.exists() and self.home.is_running()
