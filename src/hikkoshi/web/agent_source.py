"""The dashboard's source with ``--agent URL ...``: the given agents, each asked over its HTTP API with
the token (the CLI's client). A host is what its agent says; an agent that does not answer is listed as
``unreachable``. There is no cluster here: maintenance mode and DRS are not available."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hikkoshi.agent.client import AgentClient, AgentError
from hikkoshi.agent.models import HostInfo, MigrationInfo, VmInfo
from hikkoshi.web.progress import state_word
from hikkoshi.web.source import Capabilities, NotAvailable, SourceError
from hikkoshi.web.views import (
    DatastoreView,
    DiskView,
    HostView,
    MigrationView,
    Overview,
    Recommendation,
    VmView,
)

#: Reads must not hold a page for long: a host that does not answer within this is ``unreachable``.
READ_TIMEOUT = 5.0
#: Starting a migration asks the destination's agent first (its host, its datastores).
ACT_TIMEOUT = 60.0

NO_CLUSTER = "maintenance mode and DRS come with the cluster: start the dashboard with --etcd URL"


def _error(exc: AgentError) -> SourceError:
    return SourceError(exc.status if exc.status else 502, exc.detail)


def host_view(url: str, info: HostInfo) -> HostView:
    """A host as its agent describes it."""
    return HostView(
        name=info.name,
        url=url,
        state="up",
        site=info.site,
        accel=info.accel,
        memory_total=info.memory_total,
        memory_available=info.memory_available,
        cpu_count=info.cpu_count,
        load_average=info.load_average,
        datastores=[
            DatastoreView(name=d.name, total_bytes=d.total_bytes, free_bytes=d.free_bytes)
            for d in info.datastores
        ],
        vms=info.vms,
    )


def vm_view(host: str, vm: VmInfo, dirty: float | None) -> VmView:
    """A VM as its host's agent describes it."""
    return VmView(
        name=vm.name,
        host=host,
        state=vm.state,
        datastore=vm.datastore,
        memory_mib=vm.memory_mib,
        cpus=vm.cpus,
        disks=[DiskView(name=d.name, size=d.size, provisioning=d.provisioning) for d in vm.disks],
        owner=host if vm.state not in ("incoming", "serving", "migrated") else None,
        last_dirty_rate_mib_s=dirty,
    )


def migration_view(host: str, info: MigrationInfo, names: dict[str, str]) -> MigrationView:
    """A migration as its source's agent reports it (``names``: agent URL -> host name)."""
    dest = info.destination
    return MigrationView(
        id=info.id,
        host=host,
        vm=info.vm,
        kind=info.kind,
        storage=info.storage,
        phase=info.phase,
        state=state_word(info.phase, info.running),
        running=info.running,
        created=info.created,
        finished=info.finished,
        error=info.error,
        destination=names.get(dest.rstrip("/"), dest) if dest else host,
        progress=info.progress,
        report=info.report,
        record=info.record,
    )


class AgentsSource:
    """See the module."""

    kind = "agents"
    capabilities = Capabilities(
        maintenance=False, drs=False, maintenance_note=NO_CLUSTER, drs_note=NO_CLUSTER
    )

    def __init__(self, urls: list[str], token: str, ca_file: Path | None = None) -> None:
        self.token = token
        self.ca_file = ca_file
        self.urls: list[str] = []
        self.clients: dict[str, AgentClient] = {}
        #: What the last overview found: host name -> agent URL, and migration id -> agent URL.
        self.host_urls: dict[str, str] = {}
        self.migration_urls: dict[str, str] = {}
        self.set_urls(urls)

    def set_urls(self, urls: list[str]) -> None:
        """The agents to ask from now on (a cluster's hosts come and go)."""
        self.urls = list(dict.fromkeys(u.rstrip("/") for u in urls))
        for url in self.urls:
            if url not in self.clients:
                self.clients[url] = AgentClient(url, self.token, ca_file=self.ca_file, timeout=READ_TIMEOUT)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    # --- reading ------------------------------------------------------------------------------------------

    async def _read_agent(self, url: str) -> tuple[HostView, list[VmInfo], list[MigrationInfo]]:
        client = self.clients[url]
        try:
            info, vms, migrations = await asyncio.gather(
                client.get("/v1/host"), client.get("/v1/vms"), client.get("/v1/migrations")
            )
        except AgentError as exc:
            return HostView(name=url, url=url, state="unreachable", error=exc.detail), [], []
        host = host_view(url, HostInfo.model_validate(info))
        return (
            host,
            [VmInfo.model_validate(v) for v in vms],
            [MigrationInfo.model_validate(m) for m in migrations],
        )

    async def overview(self) -> Overview:
        reads = await asyncio.gather(*(self._read_agent(u) for u in self.urls))
        names = {host.url: host.name for host, _vms, _migs in reads if host.state == "up"}
        self.host_urls = {name: url for url, name in names.items()}
        hosts, vms, migrations = [], [], []
        dirty: dict[str, float] = {}
        for host, _vms, migs in reads:
            for m in migs:
                self.migration_urls[m.id] = host.url
                rate = m.report.get("dirty_rate_mib_s")
                if m.phase == "done" and isinstance(rate, int | float):
                    dirty[m.vm] = float(rate)  # oldest first: the latest wins
                migrations.append(migration_view(host.name, m, names))
        for host, host_vms, _migs in reads:
            hosts.append(host)
            vms += [vm_view(host.name, v, dirty.get(v.name)) for v in host_vms]
        migrations.sort(key=lambda m: m.created, reverse=True)
        return Overview(hosts=hosts, vms=vms, migrations=migrations)

    async def _where(self, migration_id: str) -> tuple[str, MigrationInfo]:
        """The agent that runs a migration, and the migration."""
        known = self.migration_urls.get(migration_id)
        for url in [known] if known else self.urls:
            try:
                info = MigrationInfo.model_validate(
                    await self.clients[url].get(f"/v1/migrations/{migration_id}")
                )
            except AgentError as exc:
                if exc.status == 404:
                    continue
                raise _error(exc) from None
            self.migration_urls[migration_id] = url
            return url, info
        raise SourceError(404, f"no agent knows migration {migration_id}")

    async def migration(self, migration_id: str) -> MigrationView:
        url, info = await self._where(migration_id)
        if not self.host_urls:
            await self.overview()
        names = {u: n for n, u in self.host_urls.items()}
        return migration_view(names.get(url, url), info, names)

    async def samples(self, migration_id: str, offset: int) -> tuple[list[dict[str, Any]], int]:
        url = self.migration_urls.get(migration_id) or (await self._where(migration_id))[0]
        try:
            page = await self.clients[url].get(f"/v1/migrations/{migration_id}/samples", offset=offset)
        except AgentError as exc:
            raise _error(exc) from None
        return list(page["samples"]), int(page["total"])

    # --- acting -------------------------------------------------------------------------------------------

    async def _url_of(self, host: str) -> str:
        if host not in self.host_urls:
            await self.overview()
        try:
            return self.host_urls[host]
        except KeyError:
            raise SourceError(404, f"no host {host!r} answers") from None

    async def migrate(self, vm: str, host: str, destination: str, storage: str) -> str:
        source, target = await self._url_of(host), await self._url_of(destination)
        if source == target:
            raise SourceError(422, "the destination is the VM's own host")
        try:
            accepted = await self.clients[source].post(
                f"/v1/vms/{quote(vm, safe='')}/migrate", {"to": target, "storage": storage}, limit=ACT_TIMEOUT
            )
        except AgentError as exc:
            raise _error(exc) from None
        self.migration_urls[accepted["id"]] = source
        return str(accepted["id"])

    async def cancel(self, migration_id: str) -> None:
        url, _info = await self._where(migration_id)
        try:
            await self.clients[url].post(f"/v1/migrations/{migration_id}/cancel", limit=ACT_TIMEOUT)
        except AgentError as exc:
            raise _error(exc) from None

    async def set_maintenance(self, host: str, on: bool, reason: str = "") -> None:
        raise NotAvailable(NO_CLUSTER)

    async def recommendations(self) -> list[Recommendation]:
        raise NotAvailable(NO_CLUSTER)

    async def apply(self, recommendation_id: str) -> str:
        raise NotAvailable(NO_CLUSTER)
