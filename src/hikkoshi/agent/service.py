"""The agent: one per host. Composes the host (datastores, VMs), the incoming side of migrations and
the migration jobs, and owns their lifetime. At start it re-adopts the VMs that kept running while it
was away (their supervisors do not depend on it) and takes over unfinished migrations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from hikkoshi.agent.cluster_member import ClusterMember
from hikkoshi.agent.db import AgentDb
from hikkoshi.agent.errors import Conflict, Problem
from hikkoshi.agent.host import AgentConfig, Host
from hikkoshi.agent.incoming import INCOMING, SERVING, Incoming
from hikkoshi.agent.jobs import Jobs, RouteFactory
from hikkoshi.agent.vm_rows import RowState
from hikkoshi.daemons import supervisor_client
from hikkoshi.daemons.supervisor_client import holds_for_another_host
from hikkoshi.vm.errors import VmError

log = logging.getLogger("hikkoshi.agent")


class Agent:
    """See the module's docstring."""

    def __init__(self, config: AgentConfig, routes: RouteFactory | None = None) -> None:
        if not config.datastores:
            raise ValueError("an agent needs at least one datastore")
        self.config = config
        self.db = AgentDb(config.state_dir / "agent.sqlite3")
        self.host = Host(config, self.db)
        self.incoming = Incoming(self.host, self.db)
        self.jobs = Jobs(self.host, self.db, self.incoming, routes)
        self.adopted: list[str] = []

    def adopt_running(self) -> list[str]:
        """Bring the database in line with the datastores: VMs that run (a restarted agent finds its
        VMs' supervisors still there), stopped ones, and ones that are gone."""
        known = self.db.vms()
        homes = self.host.homes()
        running = []
        for name, (ds, home) in homes.items():
            row = known.get(name, {})
            if row.get("state") in (INCOMING, SERVING):
                continue  # a migration's business, or disks held for a VM running elsewhere
            try:
                uuid = str(home.load_spec().uuid)
            except (OSError, ValueError):
                uuid = None
            if holds_for_another_host(home):
                self.db.set_vm(name, ds, uuid, SERVING)
                continue
            state = RowState.RUNNING if home.is_running() else RowState.STOPPED
            if state == RowState.RUNNING:
                running.append(name)
            self.db.set_vm(name, ds, uuid, state)
        for name, row in known.items():
            if name not in homes and row.get("state") != INCOMING:
                self.db.forget_vm(name)
        return running

    async def fence_adopted(self) -> list[str]:
        """In a cluster: every VM found running here is owned here, or paused and marked ``fenced``
        (another host owns it: it may run there). A VM the cluster does not know yet is claimed."""
        member = self.host.cluster
        if member is None:
            return []
        fenced = []
        for name in list(self.adopted):
            try:
                ds, home, spec = self.host.find(name)
                await member.ensure_owner(spec)
            except Conflict as exc:
                log.error("VM %s runs here but %s: pausing it", name, exc)
                with contextlib.suppress(VmError):
                    await supervisor_client.request(home, spec, "pause")
                self.db.set_vm(name, ds, str(spec.uuid), RowState.FENCED, json.dumps({"why": str(exc)}))
                self.adopted.remove(name)
                fenced.append(name)
            except Problem as exc:  # etcd went away again, or the VM's home is unreadable: left as is
                log.warning("VM %s: ownership not checked: %s", name, exc)
        return fenced

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Agent]:
        """The agent at work: jobs run in a task group that ends (cancelling them) when this does.

        With a cluster configured the host joins it first (:class:`EtcdUnavailable` if etcd does not
        answer) and leaves it last."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.config.cluster is not None:
                    member = ClusterMember(self.config.cluster, self.host)
                    await stack.enter_async_context(member.joined())
                    self.host.cluster = member
                    stack.callback(setattr, self.host, "cluster", None)
                await self._work(stack)
                yield self
        finally:
            self.db.close()

    async def _work(self, stack: contextlib.AsyncExitStack) -> None:
        """Adopt what runs, then run jobs and maintenance in a task group closed by ``stack``."""
        self.adopted = await asyncio.to_thread(self.adopt_running)
        fenced = await self.fence_adopted()
        if self.adopted:
            log.info("re-adopted running VMs: %s", ", ".join(self.adopted))
        if fenced:
            log.error("paused VMs owned by other hosts: %s", ", ".join(fenced))
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        self.jobs.attach(tg)
        # Takes over migrations left in flight (at once, then whenever one can go on).
        maintenance = tg.create_task(self.jobs.maintain())

        def stop() -> None:
            maintenance.cancel()
            self.jobs.cancel_all()  # each rolls back what it can, or leaves its record

        stack.callback(stop)
