"""The destination of a migration on another host, reached through that host's agent: each step of
:class:`~hikkoshi.migrate.destination.Destination` is one request to its ``/v1/incoming`` API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.models import IncomingFacts
from hikkoshi.migrate.destination import Destination, DestinationFacts
from hikkoshi.migrate.home_archive import pack_home
from hikkoshi.migrate.precheck import Side
from hikkoshi.migrate.sides import SideError
from hikkoshi.vm.disk_plan import IncomingPlan
from hikkoshi.vm.facts import CpuFacts, HostFacts, MemoryFacts
from hikkoshi.vm.spec import VmSpec, spec_from_toml


def host_facts_from(data: dict[str, Any]) -> HostFacts:
    """:class:`HostFacts` from their JSON form (``HostFacts.as_dict``)."""
    mem, cpu = data["memory"], data["cpu"]
    return HostFacts(
        hostname=str(data["hostname"]),
        memory=MemoryFacts(total=int(mem["total"]), available=int(mem["available"])),
        cpu=CpuFacts(
            model=str(cpu["model"]),
            vendor=str(cpu["vendor"]),
            flags=frozenset(cpu["flags"]),
            count=int(cpu["count"]),
        ),
        kvm_device=bool(data["kvm_device"]),
        bridges=frozenset(data["bridges"]),
    )


class RemoteDestination(Destination):
    """A datastore of another agent's host."""

    def __init__(self, client: AgentClient, vm: str, datastore: str, datastore_path: Path) -> None:
        super().__init__(vm)
        self.client = client
        self.datastore_name = datastore
        self.datastore = datastore_path
        """Its path there, as the agent said (for the record)."""
        self.agent = client.url
        self._base = f"/v1/incoming/{quote(vm, safe='')}"

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, self._base + path, **kwargs)
        except AgentError as exc:
            if exc.status == 409 and "exists" in exc.detail:
                raise FileExistsError(exc.detail) from None
            raise SideError(f"destination agent {self.client.url}: {exc.detail}") from None
        return response.json() if response.content else None

    async def _control(self, target: str, command: str, args: dict[str, Any], disk: str | None = None) -> Any:
        body = {"target": target, "command": command, "args": args, "disk": disk}
        return (await self._call("POST", "/control", json=body))["result"]

    async def ctl(self, command: str, **args: Any) -> Any:
        return await self._control("supervisor", command, args)

    async def nbd(self, command: str, **args: Any) -> Any:
        return await self._control("nbd", command, args)

    async def proxy(self, disk: str, command: str, **args: Any) -> Any:
        return await self._control("proxy", command, args, disk)

    async def describe(self, accel: str, qemu: str) -> DestinationFacts:
        info = IncomingFacts.model_validate(
            await self._call("GET", "", params={"datastore": self.datastore_name})
        )
        self.datastore = Path(info.datastore_path)
        self.runtime_dir = Path(info.runtime_dir)
        major, minor, micro = [*info.qemu_version, 0, 0, 0][:3]
        side = Side(
            host_facts_from(info.facts),
            info.accel,
            (major, minor, micro),
            info.hikkoshi_version,
            info.free_bytes,
        )
        return DestinationFacts(side, info.datastore_exists, info.home_exists)

    async def create_home(self, source_home: Path, disk_files: set[str]) -> int:
        archive = await asyncio.to_thread(pack_home, source_home, disk_files)
        answer = await self._call(
            "PUT",
            "/home",
            content=archive,
            params={"datastore": self.datastore_name},
            headers={"Content-Type": "application/octet-stream"},
        )
        return int(answer["bytes"])

    async def create_disks(self, sizes: dict[str, int]) -> None:
        await self._call("POST", "/disks", json={"sizes": sizes})

    async def save_plan(self, plan: IncomingPlan) -> None:
        await self._call("PUT", "/plan", json=plan.model_dump(mode="json"))

    async def pull_disks(self, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        body = {"disks": {name: {"uri": uri, "size": size} for name, (uri, size) in disks.items()}}
        result: dict[str, dict[str, Any]] = await self._call("POST", "/pull", json=body, limit=24 * 3600.0)
        return result

    async def start_incoming(self, accel: str, qemu: str | None) -> dict[str, Any]:
        # The destination runs its own QEMU binary: a peer never names a program for it to run.
        result: dict[str, Any] = await self._call("POST", "/start", json={"accel": accel})
        return result

    async def is_running(self) -> bool:
        return bool((await self._call("GET", "/running"))["running"])

    async def home_exists(self) -> bool:
        return bool((await self._call("GET", "", params={"datastore": self.datastore_name}))["home_exists"])

    async def load_spec(self) -> VmSpec:
        return spec_from_toml((await self._call("GET", "/spec"))["toml"])

    async def drop_plan(self) -> None:
        await self._call("DELETE", "/plan")

    async def remove(self) -> None:
        await self._call("DELETE", "")

    async def adopt(self) -> None:
        await self._call("POST", "/adopt")
