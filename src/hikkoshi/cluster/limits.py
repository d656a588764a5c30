"""Concurrency limits for migrations: counted slots in etcd, a FIFO queue, decided by :mod:`slots`.

A migration takes one key ``slots/<resource>/<job>`` per resource, attached to the migration's lease:
when the migration ends its lease is revoked, and when its coordinator dies the lease lapses; either
way its slots are freed without anyone cleaning up. A migration that cannot start waits as
``queue/<job>`` (also under its lease; the queue order is the keys' create revisions, which etcd
orders totally), watching slots, queue and limits until :func:`hikkoshi.cluster.slots.decide` admits
it.

Taking slots is one transaction: it compares that no key under ``slots/<r>/`` of any of its resources,
nor under ``queue/``, nor ``limits``, was written after the revision the decision was made on
(deletions can only make the decision more true), then writes the slot keys and removes the queue
entry. Concurrent deciders are thus serialised by etcd: never more holders than the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hikkoshi.cluster import slots as s
from hikkoshi.cluster import txn as t
from hikkoshi.cluster.errors import ClusterError, LimitReached, WatchCompacted
from hikkoshi.cluster.keys import Keys
from hikkoshi.cluster.lease import KeptLease
from hikkoshi.cluster.models import Limits, QueueEntry, SlotHolder
from hikkoshi.cluster.store import Store

log = logging.getLogger(__name__)

_RECHECK = 5.0
"""Seconds a waiter trusts its watches before it re-reads the table anyway."""


@dataclass(frozen=True)
class SlotGrant:
    """Slots a migration holds, under its lease."""

    job: str
    resources: tuple[str, ...]
    lease: int


@dataclass(frozen=True)
class QueuePlace:
    """A waiting migration as listed: its place (0 = head), what it needs, since when, why it waits."""

    position: int
    entry: QueueEntry
    reasons: tuple[str, ...]


class Slots:
    """Limits, slots and the queue."""

    def __init__(self, store: Store, keys: Keys | None = None) -> None:
        self.store = store
        self.keys = keys or Keys()

    async def limits(self) -> Limits:
        """The limits in force (the defaults when none were set)."""
        kv = await self.store.get(self.keys.limits)
        return Limits.from_bytes(kv.value) if kv else Limits()

    async def set_limits(self, limits: Limits) -> None:
        """Change the limits; waiters re-decide at once (a lower limit frees nobody: holders finish)."""
        await self.store.put(self.keys.limits, limits.to_bytes())

    async def table(self) -> tuple[s.SlotTable, int]:
        """The slot table as of one revision, and that revision."""
        table, rev, _ = await self._read()
        return table, rev

    async def _read(self) -> tuple[s.SlotTable, int, dict[str, QueueEntry]]:
        k = self.keys
        queue = await self.store.get_prefix(k.queue)
        rev = queue.revision
        held = await self.store.get_prefix(k.slots, revision=rev)
        limits_kv = await self.store.get_range(k.limits, k.limits, revision=rev)
        limits = Limits.from_bytes(limits_kv.kvs[0].value) if limits_kv.kvs else Limits()
        holders: dict[str, frozenset[str]] = {}
        for kv in held.kvs:
            resource, job = kv.key[len(k.slots) :].rsplit("/", 1)
            holders[resource] = holders.get(resource, frozenset()) | {job}
        ordered = sorted(queue.kvs, key=lambda kv: kv.create_revision)
        entries = {e.job: e for e in (QueueEntry.from_bytes(kv.value) for kv in ordered)}
        waiters = tuple(s.Waiter(e.job, e.resources) for e in entries.values())
        return s.SlotTable(limits, holders, waiters), rev, entries

    async def queue(self) -> list[QueuePlace]:
        """The waiting migrations, head first, each with the reasons it waits."""
        table, _, entries = await self._read()
        return [QueuePlace(d.position, entries[w.job], tuple(d.reasons())) for w, d in s.places(table)]

    async def _take(self, waiter: s.Waiter, lease: KeptLease, rev: int, *, queued: bool) -> bool:
        """Take the slots if nothing that could change the decision was written after ``rev``."""
        k = self.keys
        lease.check()
        unchanged = [t.Compare.unchanged_since(k.slots_of(r), rev) for r in waiter.resources]
        unchanged.append(t.Compare.unchanged_since(k.queue, rev))
        unchanged.append(t.Compare(k.limits, t.Target.MOD, t.Op.LESS, rev + 1))
        puts: list[t.Action] = [
            t.Put(k.slot(r, waiter.job), SlotHolder(job=waiter.job).to_bytes(), lease.id)
            for r in waiter.resources
        ]
        if queued:
            puts.append(t.Delete(k.queued(waiter.job)))
        r = await self.store.txn(unchanged, puts)
        return r.succeeded

    async def _changed(self, rev: int) -> None:
        """Return once slots, queue or limits changed after ``rev`` (or a while passed)."""
        k = self.keys
        watched = [(k.slots, True), (k.queue, True), (k.limits, False)]
        done = asyncio.Event()

        async def watch(key: str, prefix: bool) -> None:
            with contextlib.suppress(WatchCompacted):
                async for _ in self.store.watch(key, start_revision=rev + 1, prefix=prefix):
                    break
            done.set()

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RECHECK), asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(watch(key, prefix)) for key, prefix in watched]
                await done.wait()
                for task in tasks:
                    task.cancel()

    async def acquire(
        self,
        job: str,
        resources: Sequence[str],
        lease: KeptLease,
        *,
        no_wait: bool = False,
        on_wait: Callable[[s.Decision], None] | None = None,
    ) -> SlotGrant:
        """Take a slot of every resource for ``job`` under ``lease``, waiting in the queue if need be.

        ``no_wait``: never queue; :class:`LimitReached` with the reasons if it would have to wait.
        ``on_wait`` is told the place and reasons each time they are (re)computed while waiting.
        Cancelling the wait leaves the queue. :class:`LeaseLost` if the lease dies meanwhile.
        """
        waiter = s.Waiter(job, tuple(dict.fromkeys(resources)))
        for r in waiter.resources:
            s.limit_of(Limits(), r)  # an unknown kind of resource is refused before anything is written
        if no_wait:
            return await self._acquire_now(waiter, lease)
        k = self.keys
        entry = QueueEntry(job=job, resources=waiter.resources)
        await self.store.txn(
            [t.Compare.absent(k.queued(job))], [t.Put(k.queued(job), entry.to_bytes(), lease.id)]
        )
        granted = False
        try:
            while True:
                lease.check()
                table, rev = await self.table()
                if table.held_by(job) >= set(waiter.resources):
                    granted = True  # our earlier take, whose answer was lost
                    break
                d = s.decide(table, waiter)
                if d.admit:
                    if await self._take(waiter, lease, rev, queued=True):
                        granted = True
                        break
                    continue
                if on_wait is not None:
                    on_wait(d)
                await self._changed(rev)
        finally:
            if not granted:
                with contextlib.suppress(ClusterError):
                    await self.store.delete(k.queued(job))
        return SlotGrant(job, waiter.resources, lease.id)

    async def _acquire_now(self, waiter: s.Waiter, lease: KeptLease) -> SlotGrant:
        while True:
            table, rev = await self.table()
            if table.held_by(waiter.job) >= set(waiter.resources):
                return SlotGrant(waiter.job, waiter.resources, lease.id)
            d = s.decide(table, waiter)
            if not d.admit:
                raise LimitReached(d.reasons())
            if await self._take(waiter, lease, rev, queued=False):
                return SlotGrant(waiter.job, waiter.resources, lease.id)

    async def release(self, grant: SlotGrant) -> None:
        """Give the slots back (revoking the migration's lease does too)."""
        k = self.keys
        await self.store.txn([], [t.Delete(k.slot(r, grant.job)) for r in grant.resources])
