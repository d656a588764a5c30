"""The agent: one per host. Composes the host (datastores, VMs), the incoming side of migrations and
the migration jobs, and owns their lifetime. At start it re-adopts the VMs that kept running while it
was away (their supervisors do not depend on it) and takes over unfinished migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from hikkoshi.agent.db import AgentDb
from hikkoshi.agent.host import AgentConfig, Host
from hikkoshi.agent.incoming import INCOMING, SERVING, Incoming
from hikkoshi.agent.jobs import Jobs, RouteFactory
from hikkoshi.daemons.supervisor_client import holds_for_another_host

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
            state = "running" if home.is_running() else "stopped"
            if state == "running":
                running.append(name)
            self.db.set_vm(name, ds, uuid, state)
        for name, row in known.items():
            if name not in homes and row.get("state") != INCOMING:
                self.db.forget_vm(name)
        return running

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Agent]:
        """The agent at work: jobs run in a task group that ends (cancelling them) when this does."""
        self.adopted = await asyncio.to_thread(self.adopt_running)
        if self.adopted:
            log.info("re-adopted running VMs: %s", ", ".join(self.adopted))
        try:
            async with asyncio.TaskGroup() as tg:
                self.jobs.attach(tg)
                # Takes over migrations left in flight (at once, then whenever one can go on).
                maintenance = tg.create_task(self.jobs.maintain())
                try:
                    yield self
                finally:
                    maintenance.cancel()
                    self.jobs.cancel_all()  # each rolls back what it can, or leaves its record
        finally:
            self.db.close()
