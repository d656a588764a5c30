"""The dashboard's source with ``--etcd URL``: the cluster as etcd holds it, the details from each host's
agent.

etcd says which hosts exist and how they stand (up, down: its lease lapsed, maintenance), who owns each
VM, and which migrations the cluster knows (with those waiting for a slot: ``queued``). Each host that
is up is asked through its agent's API (``api_address``), as with ``--agent``, for its VMs, their disks
and its migrations with their live progress; every action but maintenance goes there too. Maintenance
is the cluster's own key (``maintenance/<host>``, :mod:`hikkoshi.cluster.hosts`).

DRS recommendations are the planner's plan of the cluster now (at the cluster's level, as
``hikkoshi drs plan``); applying one re-plans and starts that move at its source's agent (a cluster
job, within the limits). A migration coordinated through etcd jobs is shown as its source's agent
reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hikkoshi.cluster.config import EtcdConfig
from hikkoshi.cluster.errors import ClusterError
from hikkoshi.cluster.host_view import HostState
from hikkoshi.cluster.host_view import HostView as ClusterHost
from hikkoshi.cluster.hosts import clear_maintenance, list_hosts, set_maintenance
from hikkoshi.cluster.jobs import Jobs
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.cluster.store import Store
from hikkoshi.web.agent_source import AgentsSource
from hikkoshi.web.progress import state_word
from hikkoshi.web.source import Capabilities, SourceError
from hikkoshi.web.views import DatastoreView, HostView, MigrationView, Overview, Recommendation

NO_MOVE = "DRS no longer recommends that move (the cluster changed): see the recommendations again"


def agent_url(api_address: str) -> str:
    """A host's agent URL from its registered API address (agents serve HTTPS only: ``HOST:PORT`` is one
    over HTTPS)."""
    return api_address if "://" in api_address else f"https://{api_address}"


def cluster_host(h: ClusterHost) -> HostView:
    """A host as the cluster lists it (when its agent cannot tell more)."""
    free = h.status.datastores_free if h.status else {}
    return HostView(
        name=h.info.name,
        url=agent_url(h.info.api_address),
        state=h.state.value,
        site=h.info.site,
        memory_total=h.info.memory_total,
        memory_available=h.status.memory_free if h.status else 0,
        datastores=[
            DatastoreView(name=d.name, total_bytes=d.capacity, free_bytes=free.get(d.uuid, 0))
            for d in h.info.datastores
        ],
        vms=h.status.load.vms if h.status else 0,
        maintenance_reason=(h.maintenance.reason or "in maintenance") if h.maintenance else None,
    )


class EtcdSource:
    """See the module."""

    kind = "etcd"
    capabilities = Capabilities(maintenance=True, drs=True)

    def __init__(
        self, endpoints: str, token: str, *, ca_file: Path | None = None, keys: Keys | None = None
    ) -> None:
        self.config = EtcdConfig.of(endpoints)
        self.keys = keys or Keys()
        self.agents = AgentsSource([], token, ca_file=ca_file)
        self.token = token
        self.ca_file = ca_file
        self._store: Store | None = None

    async def _etcd(self) -> Store:
        if self._store is None:
            store = Store(self.config)
            try:
                await store.connect()
            except ClusterError as exc:
                raise SourceError(502, str(exc)) from None
            self._store = store
        return self._store

    async def aclose(self) -> None:
        await self.agents.aclose()
        if self._store is not None:
            await self._store.close()

    async def overview(self) -> Overview:
        store = await self._etcd()
        try:
            hosts = await list_hosts(store, self.keys)
            owned = await Ownership(store, self.keys).list_vms()
            jobs = await Jobs(store, self.keys).list()
            queued = {Keys.last(kv.key) for kv in (await store.get_prefix(self.keys.queue)).kvs}
        except ClusterError as exc:
            raise SourceError(502, f"etcd: {exc}") from None
        up = [h for h in hosts if h.state != HostState.DOWN]
        self.agents.set_urls([agent_url(h.info.api_address) for h in up])
        details = await self.agents.overview()
        by_url = {h.url: h for h in details.hosts}
        views = []
        for h in hosts:
            view = cluster_host(h)
            seen = by_url.get(view.url) if h.state != HostState.DOWN else None  # a down host is not asked
            if seen is not None and seen.state == "up":
                # The agent's figures, the cluster's word on the state.
                view = seen.model_copy(
                    update={"state": view.state, "maintenance_reason": view.maintenance_reason}
                )
            elif seen is not None:
                view = view.model_copy(update={"state": "unreachable", "error": seen.error})
            views.append(view)
        owners = {v.vm.name: v.owner for v in owned}
        vms = [v.model_copy(update={"owner": owners.get(v.name, v.owner)}) for v in details.vms]
        shown = {m.id for m in details.migrations}
        migrations = list(details.migrations)
        uuids = {v.vm.uuid: v.vm.name for v in owned}
        for job in jobs:
            r = job.record
            if r.id in shown:
                continue
            migrations.append(
                MigrationView(
                    id=r.id,
                    host=r.source,
                    vm=uuids.get(r.vm, r.vm),
                    kind="live",
                    storage="",
                    phase=r.phase.value,
                    state=state_word(r.phase.value, job.coordinator is not None, queued=r.id in queued),
                    running=job.coordinator is not None,
                    created=r.created_at,
                    finished=r.updated_at
                    if job.record.phase.value in ("done", "rolled-back", "failed")
                    else None,
                    error=r.error,
                    destination=r.destination,
                )
            )
        migrations.sort(key=lambda m: m.created, reverse=True)
        return Overview(hosts=views, vms=vms, migrations=migrations)

    async def migration(self, migration_id: str) -> MigrationView:
        if not self.agents.urls:
            await self.overview()
        return await self.agents.migration(migration_id)

    async def samples(self, migration_id: str, offset: int) -> tuple[list[dict[str, Any]], int]:
        if not self.agents.urls:
            await self.overview()
        return await self.agents.samples(migration_id, offset)

    async def migrate(self, vm: str, host: str, destination: str, storage: str) -> str:
        await self.overview()  # the hosts' agents as the cluster lists them now
        return await self.agents.migrate(vm, host, destination, storage)

    async def cancel(self, migration_id: str) -> None:
        if not self.agents.urls:
            await self.overview()
        await self.agents.cancel(migration_id)

    async def set_maintenance(self, host: str, on: bool, reason: str = "") -> None:
        store = await self._etcd()
        try:
            if on:
                await set_maintenance(store, host, reason or "set on the dashboard", self.keys)
            else:
                await clear_maintenance(store, host, self.keys)
        except ClusterError as exc:
            raise SourceError(502, f"etcd: {exc}") from None

    async def _plan(self) -> tuple[Any, Any]:
        from hikkoshi.agent.drs_read import read_state
        from hikkoshi.drs.planner import plan

        store = await self._etcd()
        try:
            state = await read_state(store, self.keys)
        except ClusterError as exc:
            raise SourceError(502, f"etcd: {exc}") from None
        try:
            return state, plan(state.snapshot, state.policy())
        except ValueError as exc:
            raise SourceError(409, str(exc)) from None

    async def recommendations(self) -> list[Recommendation]:
        _state, p = await self._plan()
        return [
            Recommendation(
                id=f"{m.vm}~{m.target}", vm=m.vm, source=m.source, destination=m.target, reason=m.reason
            )
            for m in p.moves
        ]

    async def apply(self, recommendation_id: str) -> str:
        from hikkoshi.agent.client import AgentClient
        from hikkoshi.agent.drs_moves import start

        state, p = await self._plan()
        move = next((m for m in p.moves if f"{m.vm}~{m.target}" == recommendation_id), None)
        if move is None:
            raise SourceError(409, NO_MOVE)
        (started,) = await start(
            state, [move], lambda url: AgentClient(url, self.token, ca_file=self.ca_file)
        )
        if started.migration is None:
            raise SourceError(409, started.error or "the move did not start")
        await self.overview()  # the agents as the cluster lists them, to follow the migration
        return started.migration
