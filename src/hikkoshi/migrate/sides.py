"""The two sides of a migration as the coordinator sees them: a running VM's supervisor, its disk
services (NBD service, relocation proxies) and its QEMU, each reached through its control socket."""

from __future__ import annotations

import abc
import asyncio
from pathlib import Path
from typing import Any

from hikkoshi.nbd.control import ControlError, control_request
from hikkoshi.vm import control
from hikkoshi.vm.errors import VmError
from hikkoshi.vm.home import VmHome
from hikkoshi.vm.spec import VmSpec


class SideError(RuntimeError):
    """A side did not do what it was asked."""


class ControlSide(abc.ABC):
    """A VM's supervisor as a migration job drives it: control commands to the supervisor, its NBD
    service and its relocation proxies; QMP through the supervisor. Reached locally (:class:`VmSide`)
    or through the host's agent."""

    label: str

    @abc.abstractmethod
    async def ctl(self, command: str, **args: Any) -> Any:
        """A supervisor control command."""

    @abc.abstractmethod
    async def nbd(self, command: str, **args: Any) -> Any:
        """A command to the VM's NBD service."""

    @abc.abstractmethod
    async def proxy(self, disk: str, command: str, **args: Any) -> Any:
        """A command to the relocation proxy of ``disk``."""

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command, through the supervisor."""
        args: dict[str, Any] = {"execute": command}
        if arguments is not None:
            args["arguments"] = arguments
        return await self.ctl("qmp", **args)

    async def status(self) -> dict[str, Any]:
        """The supervisor's ``status``."""
        result: dict[str, Any] = await self.ctl("status")
        return result

    async def wait_migration(self, states: list[str], limit: float) -> dict[str, Any]:
        """``query-migrate`` once the migration is in one of ``states``, or after ``limit`` seconds
        (then with ``timed_out``), whichever comes first."""
        result: dict[str, Any] = await self.ctl("migrate-wait", states=states, timeout=limit)
        return result


class VmSide(ControlSide):
    """One VM's supervisor on this host, reached through its control sockets."""

    def __init__(self, home: VmHome, spec: VmSpec, label: str) -> None:
        self.home = home
        self.spec = spec
        self.label = label

    async def ctl(self, command: str, **args: Any) -> Any:
        """A supervisor control command."""
        try:
            return await control.request(self.home, self.spec, command, **args)
        except VmError as exc:
            raise SideError(f"{self.label}: {exc}") from None

    def _state_path(self, key: str) -> Path:
        value = self.home.read_state().get(key)
        if not isinstance(value, str):
            raise SideError(f"{self.label}: the supervisor has not recorded {key}")
        return Path(value)

    async def nbd(self, command: str, **args: Any) -> Any:
        """A command to the VM's NBD service."""
        return await _request(self._state_path("nbd_control"), f"{self.label} NBD service", command, args)

    async def proxy(self, disk: str, command: str, **args: Any) -> Any:
        """A command to the relocation proxy of ``disk``."""
        controls = self.home.read_state().get("proxy_controls") or {}
        if disk not in controls:
            raise SideError(f"{self.label}: no relocation proxy for disk {disk}")
        return await _request(Path(controls[disk]), f"{self.label} proxy of {disk}", command, args)


async def _request(path: Path, what: str, command: str, args: dict[str, Any]) -> Any:
    try:
        return await asyncio.wait_for(control_request(path, command, **args), 120)
    except (OSError, TimeoutError) as exc:
        raise SideError(f"{what} does not answer ({exc or 'timeout'})") from None
    except ControlError as exc:
        raise SideError(f"{what}: {command}: {exc}") from None
