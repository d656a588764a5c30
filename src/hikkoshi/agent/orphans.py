"""Migrations into this host whose coordinator died for good: settled here, in a cluster.

A migration is coordinated by its source's agent. When that agent is gone and its host has been
``down`` in the cluster (its lease lapsed) for ``takeover_after`` seconds, the destination's agent
takes the job over in etcd (the coordinator key, under its own lease) and settles it by the owner
key, which alone says who may run the VM:

- the owner key names this host (the commit was recorded): the migration is finished here. The
  guest resumes with the key's fencing token, announces itself, and the job is recorded ``done``;
  the source cleans up its side when it comes back (its own record says so);
- the owner key still names the source and this host's copy never received the whole state (QEMU is
  still ``inmigrate``, or gone): the migration is rolled back here, the incoming copy removed, the job
  recorded ``rolled-back``. The source, if it ever comes back, still owns the VM;
- the owner key names the source but this copy is complete: nothing is done automatically (logged
  once). The source may have committed locally without reaching etcd; dropping the copy could lose
  the only guest, and the source, when back, may still finish the migration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hikkoshi.agent.cluster_jobs import JOB_LEASE_TTL
from hikkoshi.agent.cluster_member import ClusterMember
from hikkoshi.agent.errors import Problem
from hikkoshi.agent.incoming import Incoming
from hikkoshi.cluster.errors import ClusterError, CoordinatorAlive, NoSuchJob
from hikkoshi.cluster.hosts import list_hosts
from hikkoshi.cluster.jobs import Coordination, JobView
from hikkoshi.cluster.lease import kept_lease
from hikkoshi.cluster.ownership import Ownership
from hikkoshi.migrate.phases import FINAL, Phase
from hikkoshi.migrate.sides import SideError

log = logging.getLogger("hikkoshi.agent.orphans")

#: QEMU run states of an incoming VM that received the whole state (anything else never will now).
COMPLETE_STATES = frozenset({"paused", "running", "suspended"})


@dataclass
class OrphanSettler:
    """See the module's docstring."""

    member: ClusterMember
    incoming: Incoming
    takeover_after: float
    down_since: dict[str, float] = field(default_factory=dict)
    """Migration id -> when its source host was first seen down (this agent's clock)."""
    left: set[str] = field(default_factory=set)
    """Migrations left for a person (said once)."""

    async def settle(self, vm: str, migration: str) -> str | None:
        """Settle the migration of ``vm`` into this host if its coordinator died for good; what was done
        (``finished``, ``rolled-back``), or ``None``."""
        if not self.member.online or migration in self.left:
            return None
        jobs = self.member.jobs()
        try:
            view = await jobs.get(migration)
        except NoSuchJob:
            return None
        if view.coordinator is not None or view.record.phase in FINAL:
            self.down_since.pop(migration, None)
            return None
        if not await self._source_down_long_enough(view):
            return None
        store = self.member.need_online("settles")
        async with kept_lease(store, ttl=JOB_LEASE_TTL) as lease:
            try:
                c, view = await jobs.take_over(migration, self.member.host.config.name, lease)
            except (CoordinatorAlive, NoSuchJob):
                return None
            return await self._settle(vm, c, view)

    async def _source_down_long_enough(self, view: JobView) -> bool:
        store = self.member.need_online("reads")
        source = next(
            (h for h in await list_hosts(store, self.member.keys) if h.info.name == view.record.source), None
        )
        if source is not None and source.status is not None:
            self.down_since.pop(view.record.id, None)
            return False
        first = self.down_since.setdefault(view.record.id, time.monotonic())
        return time.monotonic() - first >= self.takeover_after

    async def _settle(self, vm: str, c: Coordination, view: JobView) -> str | None:
        jobs = self.member.jobs()
        me = self.member.host.config.name
        owner = await Ownership(self.member.need_online("reads"), self.member.keys).owner(view.record.vm)
        source = view.record.source
        if owner is not None and owner.host == me:
            log.warning(
                "migration %s of VM %s committed and its source %s is down: finishing it here",
                c.job_id,
                vm,
                source,
            )
            await self.incoming.resume(vm, owner.token)
            try:
                await self.incoming.announce(vm)
            except (Problem, SideError) as exc:
                log.warning("VM %s: not announced: %s", vm, exc)
            await self.incoming.finish(vm)
            note = (
                f"finished by its destination {me}: the source host {source} was down; it cleans up when back"
            )
            await jobs.advance(c, Phase.DONE, error=note)
            return "finished"
        try:
            state = (await self.incoming.status(vm)).get("state")
        except (Problem, SideError):
            state = None  # its QEMU is gone (the stream broke off): nothing here can run
        if state in COMPLETE_STATES:
            self.left.add(c.job_id)
            note = (
                f"its source host {source} is down, the owner key names {owner.host if owner else 'nobody'}, "
                f"and the copy on {me} is complete ({state}): left for a person"
            )
            log.error("migration %s of VM %s: %s", c.job_id, vm, note)
            return None  # nothing recorded: the source, back, may still finish it
        log.warning(
            "migration %s of VM %s: its source %s is down and it never committed: rolling back",
            c.job_id,
            vm,
            source,
        )
        await jobs.advance(c, Phase.ROLLBACK)
        await self.incoming.remove(vm)
        await jobs.advance(
            c, Phase.ROLLED_BACK, error=f"rolled back by its destination {me}: source host {source} down"
        )
        return "rolled-back"


async def settle_quietly(settler: OrphanSettler, vm: str, migration: str) -> str | None:
    """:meth:`OrphanSettler.settle`, logging instead of raising (the next sweep tries again)."""
    try:
        return await settler.settle(vm, migration)
    except (ClusterError, Problem, SideError, OSError) as exc:
        log.warning("migration %s into this host: not settled now: %s", migration, exc)
        return None
