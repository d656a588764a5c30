"""Migrations as cluster jobs: a record any agent can read, and one coordinator at a time.

``migrations/<id>`` holds the :class:`JobRecord` (phase, VM, source, destination); it is not leased,
so it outlives whoever wrote it. ``coordinators/<id>`` names the coordinating host and is attached
to the migration's lease, which the coordinator keeps alive. Every write to the record compares the
coordinator key's create revision with the one the writer got when it became coordinator: once the
lease lapsed, the key is gone for good (etcd deleted it), a stale coordinator's writes are refused
(:class:`NotCoordinator`), and another agent may :meth:`Jobs.take_over` under a lease of its own, then
roll back or finish as the recorded phase says (:func:`hikkoshi.migrate.phases.recovery`).

Phases follow :mod:`hikkoshi.migrate.phases` (forward only; rollback only before the commit point).
The commit point and the owner key move together: :meth:`Jobs.commit` records ``resume-destination``
and moves the VM's owner key to the destination in one transaction, so "the destination may run" and
"the destination owns the VM" are never true one without the other.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass

from hikkoshi.cluster import txn as t
from hikkoshi.cluster.errors import CoordinatorAlive, JobExists, NoSuchJob, NotCoordinator, OwnedElsewhere
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import KeptLease
from hikkoshi.cluster.models import Coordinator, JobRecord, Owner, now
from hikkoshi.cluster.ownership import Claim
from hikkoshi.cluster.store import KeyValue, Store
from hikkoshi.migrate.phases import FINAL, FORWARD, Phase, Recovery, committed, move, recovery


@dataclass(frozen=True)
class Coordination:
    """The right to write a migration's record, as long as ``lease`` lives and nobody took over."""

    job_id: str
    host: str
    lease: KeptLease
    revision: int
    """The coordinator key's create revision: the fence every write compares."""


@dataclass(frozen=True)
class JobView:
    """A migration as recorded, its coordinator (None: nobody; it can be taken over) and revision."""

    record: JobRecord
    coordinator: str | None
    revision: int

    @property
    def orphaned(self) -> bool:
        """Unfinished and without a coordinator: someone must take it over."""
        return self.coordinator is None and self.record.phase not in FINAL

    @property
    def recovery(self) -> Recovery:
        """What a new coordinator does with it: roll back, finish, nothing, or leave it to a person."""
        return recovery(self.record.phase)


def _coordinator(kv: KeyValue | None) -> Coordinator | None:
    return Coordinator.from_bytes(kv.value) if kv else None


def _one(reads: tuple[KeyValue, ...]) -> KeyValue | None:
    return reads[0] if reads else None


class Jobs:
    """Migration records and their coordinators."""

    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store = store
        self.keys = keys or Keys()

    async def create(self, record: JobRecord, host: str, lease: KeptLease) -> Coordination:
        """Record a new migration coordinated by ``host`` under ``lease``. :class:`JobExists` if the id is."""
        k = self.keys
        nonce = uuidlib.uuid4().hex
        rec, coord = k.migration(record.id), k.coordinator(record.id)
        record = record.model_copy(update={"history": ((record.phase.value, now()),)})
        r = await self.store.txn(
            [t.Compare.absent(rec), t.Compare.absent(coord)],
            [
                t.Put(rec, record.to_bytes()),
                t.Put(coord, Coordinator(host=host, claim=nonce).to_bytes(), lease.id),
            ],
            [t.Get(coord)],
        )
        if r.succeeded:
            return Coordination(record.id, host, lease, r.revision)
        kv = _one(r.reads[0])
        held = _coordinator(kv)
        if kv is not None and held is not None and held.claim == nonce:
            return Coordination(record.id, host, lease, kv.create_revision)
        raise JobExists(f"migration {record.id} is already recorded")

    async def get(self, job_id: str) -> JobView:
        """The migration as recorded now. :class:`NoSuchJob` if there is none."""
        k = self.keys
        r = await self.store.txn([], [t.Get(k.migration(job_id)), t.Get(k.coordinator(job_id))])
        rec, coord = _one(r.reads[0]), _one(r.reads[1])
        if rec is None:
            raise NoSuchJob(f"no migration {job_id}")
        held = _coordinator(coord)
        return JobView(JobRecord.from_bytes(rec.value), held.host if held else None, rec.mod_revision)

    async def list(self) -> list[JobView]:
        """Every recorded migration, in id order, read at one revision."""
        recs = await self.store.get_prefix(self.keys.migrations)
        coords = await self.store.get_prefix(self.keys.coordinators, revision=recs.revision)
        by_id = {Keys.last(kv.key): _coordinator(kv) for kv in coords.kvs}
        out = []
        for kv in recs.kvs:
            held = by_id.get(Keys.last(kv.key))
            out.append(JobView(JobRecord.from_bytes(kv.value), held.host if held else None, kv.mod_revision))
        return out

    def _fence(self, c: Coordination) -> t.Compare:
        c.lease.check()  # by our own clock first: past the TTL we are surely no longer coordinator
        return t.Compare.created_at(self.keys.coordinator(c.job_id), c.revision)

    def _next(self, view: JobView, phase: Phase, error: str | None) -> JobRecord:
        rec = view.record
        move(rec.phase, phase)  # PhaseError if the rules forbid it
        at = now()
        return rec.model_copy(
            update={
                "phase": phase,
                "updated_at": at,
                "history": (*rec.history, (phase.value, at)),
                "error": error if error is not None else rec.error,
            }
        )

    async def advance(self, c: Coordination, phase: Phase, *, error: str | None = None) -> JobRecord:
        """Record that the migration entered ``phase`` (rules of :mod:`~hikkoshi.migrate.phases`).

        :class:`NotCoordinator` if the lease lapsed or someone took over; :class:`PhaseError` if the
        move is not allowed. For ``resume-destination`` use :meth:`commit`.
        """
        if phase is Phase.RESUME:
            raise ValueError("the commit point moves the owner key too: use Jobs.commit")
        rec_key = self.keys.migration(c.job_id)
        while True:
            view = await self.get(c.job_id)
            if view.record.phase is phase:
                return view.record  # a replay of ours whose answer was lost
            new = self._next(view, phase, error)
            r = await self.store.txn(
                [self._fence(c), t.Compare.modified_at(rec_key, view.revision)],
                [t.Put(rec_key, new.to_bytes())],
                [t.Get(self.keys.coordinator(c.job_id))],
            )
            if r.succeeded:
                return new
            self._still_coordinator(c, _one(r.reads[0]))

    def _still_coordinator(self, c: Coordination, kv: KeyValue | None) -> None:
        if kv is None or kv.create_revision != c.revision:
            held = _coordinator(kv)
            who = f"host {held.host!r}" if held else "nobody"
            raise NotCoordinator(f"migration {c.job_id}: no longer coordinated by {c.host!r} (now {who})")

    async def commit(self, c: Coordination, claim: Claim, phase: Phase = Phase.RESUME) -> Claim:
        """The commit point: record ``phase`` (``resume-destination``; an offline or storage move commits
        as it enters ``cleanup``) and move the owner key to the destination.

        ``claim`` is the source's ownership (its token). Returns the destination's claim, whose token
        the destination presents before resuming the VM. :class:`OwnedElsewhere` if the owner key
        moved since ``claim``; :class:`NotCoordinator` as for :meth:`advance`.
        """
        k = self.keys
        rec_key, owner_key = k.migration(c.job_id), k.owner(claim.uuid)
        if not committed(phase) or phase not in FORWARD:
            raise ValueError(f"the commit point is recorded as a committed phase, not {phase}")
        nonce = uuidlib.uuid4().hex
        while True:
            view = await self.get(c.job_id)
            new = self._next(view, phase, None)
            owner = Owner(host=view.record.destination, claim=nonce)
            r = await self.store.txn(
                [
                    self._fence(c),
                    t.Compare.modified_at(rec_key, view.revision),
                    t.Compare.modified_at(owner_key, claim.token),
                ],
                [t.Put(rec_key, new.to_bytes()), t.Put(owner_key, owner.to_bytes())],
                [t.Get(k.coordinator(c.job_id)), t.Get(owner_key)],
            )
            if r.succeeded:
                return Claim(claim.uuid, owner.host, r.revision)
            coord, okv = _one(r.reads[0]), _one(r.reads[1])
            held = Owner.from_bytes(okv.value) if okv else None
            if okv is not None and held is not None and held.claim == nonce:
                return Claim(claim.uuid, held.host, okv.mod_revision)  # ours: the answer was lost
            self._still_coordinator(c, coord)
            if okv is None or okv.mod_revision != claim.token:
                raise OwnedElsewhere(claim.uuid, held.host if held else None, okv.mod_revision if okv else 0)

    async def take_over(self, job_id: str, host: str, lease: KeptLease) -> tuple[Coordination, JobView]:
        """Become the coordinator of a migration whose coordinator's lease lapsed.

        :class:`CoordinatorAlive` while its key exists. Returns the coordination and the record, whose
        :attr:`JobView.recovery` says whether to roll back or finish.
        """
        k = self.keys
        nonce = uuidlib.uuid4().hex
        coord = k.coordinator(job_id)
        r = await self.store.txn(
            [t.Compare.absent(coord), t.Compare(k.migration(job_id), t.Target.CREATE, t.Op.GREATER, 0)],
            [t.Put(coord, Coordinator(host=host, claim=nonce).to_bytes(), lease.id)],
            [t.Get(coord)],
        )
        if r.succeeded:
            return Coordination(job_id, host, lease, r.revision), await self.get(job_id)
        kv = _one(r.reads[0])
        held = _coordinator(kv)
        if kv is None or held is None:
            raise NoSuchJob(f"no migration {job_id}")
        if held.claim != nonce:
            raise CoordinatorAlive(job_id, held.host)
        return Coordination(job_id, host, lease, kv.create_revision), await self.get(job_id)

    async def release(self, c: Coordination) -> None:
        """Stop coordinating (the record stays; someone may take it over). Leaving the lease also does."""
        await self.store.txn([self._fence(c)], [t.Delete(self.keys.coordinator(c.job_id))])
