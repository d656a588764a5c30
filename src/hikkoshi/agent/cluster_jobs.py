"""A migration of this agent as a cluster job: recorded in etcd under the coordinating agent's lease,
holding a slot of every limited resource it uses (waiting in the cluster's FIFO queue while a limit is
reached), its phases mirrored to the record as the job enters them, and its commit moving the VM's owner
key (:class:`~hikkoshi.agent.cluster_member.ClusterLedger`). When the block ends the lease is revoked:
the coordinator key and the slots go with it; the record stays, for anyone to read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from hikkoshi.agent.cluster_member import ClusterLedger, ClusterMember
from hikkoshi.aio import background
from hikkoshi.cluster.errors import ClusterError, NoSuchJob, NotCoordinator
from hikkoshi.cluster.jobs import Coordination
from hikkoshi.cluster.lease import kept_lease
from hikkoshi.cluster.models import JobRecord
from hikkoshi.cluster.ownership import Claim, Ownership
from hikkoshi.cluster.slots import Decision, resources_for
from hikkoshi.migrate.phases import FINAL, FORWARD, Phase, PhaseError

log = logging.getLogger("hikkoshi.agent.cluster")

#: The coordinating agent's lease on a migration (its slots and coordinator key live as long).
JOB_LEASE_TTL = 10


@dataclass
class ClusterRun:
    """A running cluster job: its coordination, its ledger, and the phases to mirror."""

    coordination: Coordination | None
    """``None``: etcd has no record of the job any more (its phases are not mirrored)."""
    ledger: ClusterLedger
    phases: asyncio.Queue[tuple[Phase, str | None]]
    commit_phase: Phase = Phase.RESUME
    """The job's commit point: recorded by the commit itself (with the owner key), never mirrored."""

    def entered(self, phase: Phase, error: str | None = None) -> None:
        """The job entered ``phase`` (mirrored to etcd by the run's task, in order)."""
        self.phases.put_nowait((phase, error))


async def _mirror(member: ClusterMember, run: ClusterRun) -> None:
    """Advance the etcd record as the job goes; the commit point is the commit's own write (a phase past
    it mirrored first would say "committed" while the owner key still names the source)."""
    job_id = run.coordination.job_id if run.coordination else "?"
    last = Phase.PRECHECK
    while True:
        phase, error = await run.phases.get()
        try:
            if run.coordination is None or phase in (Phase.RESUME, run.commit_phase) or phase == last:
                last = phase
                continue
            behind = phase in FORWARD and last in FORWARD and FORWARD.index(phase) < FORWARD.index(last)
            if phase not in FINAL and behind:
                continue
            await member.jobs().advance(run.coordination, phase, error=error)
            last = phase
        except NotCoordinator as exc:
            log.error("migration %s: %s", job_id, exc)
        except PhaseError as exc:  # settled in etcd by another host meanwhile: its word stands
            log.info("migration %s: phase %s not recorded: %s", job_id, phase, exc)
        except ClusterError as exc:  # recorded late or not at all: not worth failing for
            log.warning("migration %s: phase %s not in etcd: %s", job_id, phase, exc)
        finally:
            run.phases.task_done()


@contextlib.asynccontextmanager
async def cluster_job(
    member: ClusterMember,
    job_id: str,
    claim: Claim,
    destination: str,
    *,
    datastores: tuple[str, ...] = (),
    source_site: str = "default",
    destination_site: str = "default",
    no_wait: bool = False,
    on_queue: Callable[[Decision], None] | None = None,
) -> AsyncIterator[ClusterRun]:
    """The cluster's side of one migration, for the block's length (see the module's docstring).

    :class:`~hikkoshi.cluster.errors.LimitReached` with ``no_wait`` when a limit is reached."""
    store = member.need_online("starts")
    source = member.host.config.name
    resources = resources_for(
        source, destination, datastores=datastores, source_site=source_site, destination_site=destination_site
    )
    async with kept_lease(store, ttl=JOB_LEASE_TTL) as lease:
        record = JobRecord(
            id=job_id, vm=claim.uuid, source=source, destination=destination, resources=resources
        )
        coordination = await member.jobs().create(record, source, lease)
        await member.slots().acquire(job_id, resources, lease, no_wait=no_wait, on_wait=on_queue)
        run = ClusterRun(coordination, ClusterLedger(member, coordination, claim), asyncio.Queue())
        member.migrations_out += 1
        try:
            async with background(_mirror(member, run), f"mirror {job_id}"):
                yield run
                # The last phases reach etcd before the lease (and the coordinator key) goes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await run.phases.join()
        finally:
            member.migrations_out -= 1


@contextlib.asynccontextmanager
async def taken_over(member: ClusterMember, job_id: str, vm_uuid: str | None) -> AsyncIterator[ClusterRun]:
    """This agent coordinates again a cluster job it left (it restarted): under a new lease, with the
    VM's ownership as it stands. :class:`~hikkoshi.cluster.errors.CoordinatorAlive` while the old
    coordinator's lease has not lapsed yet; a job etcd no longer has gets a read-only ledger."""
    store = member.need_online("takes over")
    me = member.host.config.name
    async with kept_lease(store, ttl=JOB_LEASE_TTL) as lease:
        coordination: Coordination | None
        try:
            coordination, view = await member.jobs().take_over(job_id, me, lease)
            vm_uuid = view.record.vm
        except NoSuchJob:
            coordination = None
        if vm_uuid is None:
            raise ClusterError(f"migration {job_id}: neither etcd nor the source's home names its VM")
        current = await Ownership(store, member.keys).owner(vm_uuid)
        claim = current if current is not None else Claim(vm_uuid, me, 0)
        run = ClusterRun(coordination, ClusterLedger(member, coordination, claim), asyncio.Queue())
        async with background(_mirror(member, run), f"mirror {job_id}"):
            yield run
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await run.phases.join()
