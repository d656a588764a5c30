"""The destination of a migration on another host, reached through that host's agent: each operation of
:class:`~hikkoshi.migrate.destination.Destination` is one request to its ``/v1/incoming`` API.

A peer that does not answer (down, or a link gone silent) is a *transient* failure: a job waits and
asks again later rather than giving up on a VM it may already have committed to that host. Requests
are short (seconds); the few that wait on purpose say how long.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.models import IncomingFacts
from hikkoshi.agent.peers import PEER_TIMEOUT
from hikkoshi.migrate import qmp_migration as qm
from hikkoshi.migrate.destination import Destination, DestinationFacts
from hikkoshi.migrate.home_archive import pack_home
from hikkoshi.migrate.precheck import Side
from hikkoshi.migrate.sides import SideError
from hikkoshi.vm.disk_serving import DiskPlan, Holder
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


def side_error(exc: AgentError, what: str) -> SideError:
    """An agent's refusal or silence as a migration side's error (silence and 5xx: transient)."""
    transient = exc.status == 0 or exc.status >= 500
    return SideError(f"{what}: {exc.detail}", transient=transient)


class RemoteDestination(Destination):
    """A datastore of another agent's host; ``client`` is a peer client (:mod:`hikkoshi.agent.peers`):
    the host is the one its certificate names."""

    def __init__(
        self,
        client: AgentClient,
        vm: str,
        datastore: str,
        datastore_path: Path,
        *,
        source_agent: str | None = None,
    ) -> None:
        super().__init__(vm)
        if client.server_name is None:
            raise ValueError("a destination behind an agent is reached by its host name (a peer client)")
        self.client = client
        self.datastore_name = datastore
        self.datastore = datastore_path
        """Its path there, as the agent said (for the record)."""
        self.agent = client.url
        self.host = client.server_name
        self.tls_name = client.server_name
        self.source_agent = source_agent
        self._base = f"/v1/incoming/{quote(vm, safe='')}"

    async def _call(self, method: str, path: str = "", *, limit: float = PEER_TIMEOUT, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, self._base + path, limit=limit, **kwargs)
        except AgentError as exc:
            if exc.status == 409 and "exists" in exc.detail:
                raise FileExistsError(exc.detail) from None
            raise side_error(exc, f"destination agent {self.client.url}") from None
        return response.json() if response.content else None

    def holds(self, holder: Holder) -> bool:
        return holder.host == self.host

    async def describe(self, accel: str, qemu: str) -> DestinationFacts:
        info = IncomingFacts.model_validate(
            await self._call("GET", params={"datastore": self.datastore_name})
        )
        self.datastore = Path(info.datastore_path)
        self.datastore_name = info.datastore
        self.runtime_dir = Path(info.runtime_dir)
        major, minor, micro = [*info.qemu_version, 0, 0, 0][:3]
        side = Side(
            host_facts_from(info.facts),
            info.accel,
            (major, minor, micro),
            info.hikkoshi_version,
            info.free_bytes,
        )
        return DestinationFacts(side, info.datastore_exists, info.home_exists, info.holds_vm, info.uuid)

    async def create_home(self, source_home: Path, disk_files: set[str]) -> int:
        archive = await asyncio.to_thread(pack_home, source_home, disk_files)
        params = {"datastore": self.datastore_name}
        if self.source_agent:
            params["source"] = self.source_agent
        answer = await self._call(
            "PUT",
            "/home",
            content=archive,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            limit=120.0,
        )
        return int(answer["bytes"])

    async def create_disks(self, sizes: dict[str, int]) -> None:
        await self._call("POST", "/disks", json={"sizes": sizes})

    async def save_plan(self, plan: DiskPlan) -> None:
        await self._call("PUT", "/plan", json=plan.model_dump(mode="json"))

    async def pull_disks(self, disks: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
        body = {"disks": {name: {"uri": uri, "size": size} for name, (uri, size) in disks.items()}}
        result: dict[str, dict[str, Any]] = await self._call("POST", "/pull", json=body, limit=24 * 3600.0)
        return result

    async def start_incoming(self, accel: str, qemu: str | None, migration: str) -> dict[str, Any]:
        # The destination runs its own QEMU binary: a peer never names a program for it to run.
        body = {"accel": accel, "migration": migration, "source": self.source_agent}
        result: dict[str, Any] = await self._call("POST", "/start", json=body, limit=180.0)
        return result

    async def prepare_stream(self, *, postcopy: bool, tls: bool, peer: str | None = None) -> None:
        # The destination knows this host by its certificate: ``peer`` is not asked for.
        await self._call("POST", "/stream", json={"postcopy": postcopy, "tls": tls})

    async def listen_stream(self) -> tuple[str, int]:
        answer = await self._call("POST", "/stream/listen")
        return str(answer["host"]), int(answer["port"])

    async def wait_incoming(self, limit: float) -> qm.MigrationInfo:
        answer = await self._call("GET", "/stream", params={"wait": limit}, limit=limit + PEER_TIMEOUT)
        return qm.MigrationInfo.of(answer)

    async def listen_disks(self, migration: str, *, peer: str | None, tls: bool) -> str:
        answer = await self._call("POST", "/disk-listener", json={"migration": migration, "tls": tls})
        return str(answer["address"])

    async def relocation(self, disk: str, action: str) -> dict[str, Any]:
        if action not in ("pause", "resume", "invalidate"):
            raise ValueError(f"no relocation action {action!r}")
        path = f"/relocations/{quote(disk, safe='')}/{action}"
        result: dict[str, Any] = await self._call("POST", path, limit=120.0)
        return result

    async def disk_status(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = await self._call("GET", "/disk-status")
        return result

    async def disk_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/disk-stats")
        return result

    async def set_patience(self, seconds: float | None) -> None:
        await self._call("POST", "/patience", json={"seconds": seconds})

    async def resume(self, token: int | None = None) -> None:
        await self._call("POST", "/resume", json={"token": token})

    async def committed(self, migration: str, token: int | None = None) -> None:
        await self._call("POST", "/committed", json={"migration": migration, "token": token})

    async def announce(self) -> None:
        await self._call("POST", "/announce")

    async def vm_status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/status")
        return result

    async def is_running(self) -> bool:
        try:
            return bool((await self._call("GET", "/running"))["running"])
        except SideError as exc:
            if exc.transient:
                raise
            return False  # not (any more) a VM coming in there

    async def home_exists(self) -> bool:
        answer = await self._call("GET", params={"datastore": self.datastore_name})
        return bool(answer["home_exists"])

    async def load_spec(self) -> VmSpec:
        return spec_from_toml((await self._call("GET", "/spec"))["toml"])

    async def finish(self) -> None:
        await self._call("POST", "/finish")

    async def remove(self) -> None:
        await self._call("DELETE", limit=60.0)

    async def abort_take_back(self) -> None:
        await self._call("DELETE", limit=60.0)

    async def stop_serving(self) -> None:
        await self._call("POST", "/stop-serving", limit=60.0)
