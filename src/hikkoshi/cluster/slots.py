"""Which migrations may start: slot accounting and queue order as pure functions (no I/O).

A migration needs one slot of each of its resources (:func:`resources_for`): the source host's
outgoing migrations, the destination's incoming ones, each datastore it reads or writes, the link
between two sites, and the cluster as a whole. A resource has a limit (:func:`limit_of`). Waiting
migrations form one queue, oldest first.

The rule (:func:`decide`): a migration may start when each of its resources has a free slot that
is not reserved for a migration ahead of it in the queue: ``holders + waiters ahead needing it <
limit``. So a slot that frees goes to the first waiter that needs it (nobody behind it can take a
slot it is owed, even while it still waits for another resource), the head of the queue is never
starved, and a waiter behind a blocked head still starts when there are slots enough for both (no
head-of-line blocking on unrelated hosts, nor on the cluster-wide limit while it has room).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hikkoshi.cluster.models import Limits

CLUSTER = "cluster"


def host_out(host: str) -> str:
    return f"host-out:{host}"


def host_in(host: str) -> str:
    return f"host-in:{host}"


def datastore(uuid: str) -> str:
    return f"datastore:{uuid}"


def link(site_a: str, site_b: str) -> str:
    a, b = sorted((site_a, site_b))
    return f"link:{a}~{b}"


def resources_for(
    source: str,
    destination: str,
    *,
    datastores: Iterable[str] = (),
    source_site: str = "default",
    destination_site: str = "default",
) -> tuple[str, ...]:
    """The resources a migration from ``source`` to ``destination`` takes a slot of."""
    out = [host_out(source), host_in(destination)]
    out += [datastore(d) for d in sorted(set(datastores))]
    if source_site != destination_site:
        out.append(link(source_site, destination_site))
    out.append(CLUSTER)
    return tuple(out)


def limit_of(limits: Limits, resource: str) -> int:
    """How many migrations may hold a slot of ``resource`` at once."""
    if resource in limits.overrides:
        return limits.overrides[resource]
    kind = resource.split(":", 1)[0]
    by_kind = {
        "host-out": limits.host_out,
        "host-in": limits.host_in,
        "datastore": limits.datastore,
        "link": limits.link,
        CLUSTER: limits.cluster,
    }
    if kind not in by_kind:
        raise ValueError(f"unknown kind of resource: {resource!r}")
    return by_kind[kind]


@dataclass(frozen=True)
class Waiter:
    """A migration and the resources it needs."""

    job: str
    resources: tuple[str, ...]


@dataclass(frozen=True)
class SlotTable:
    """Who holds which slots, who waits in which order, under which limits."""

    limits: Limits
    holders: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """resource -> the migrations holding a slot of it"""
    queue: tuple[Waiter, ...] = ()
    """oldest first"""

    def held_by(self, job: str) -> frozenset[str]:
        """The resources ``job`` holds a slot of."""
        return frozenset(r for r, jobs in self.holders.items() if job in jobs)


@dataclass(frozen=True)
class Blocked:
    """Why a migration cannot take a slot of ``resource`` now."""

    resource: str
    limit: int
    holders: tuple[str, ...]
    ahead: tuple[str, ...]
    """Migrations earlier in the queue that wait for this resource too: the free slots are theirs."""

    def reason(self) -> str:
        parts = []
        if self.holders:
            parts.append(f"{len(self.holders)}/{self.limit} slots held by {', '.join(self.holders)}")
        if self.ahead:
            parts.append(f"{', '.join(self.ahead)} queued ahead")
        return f"{self.resource}: {'; '.join(parts)}"


@dataclass(frozen=True)
class Decision:
    """May the migration start? If not, its place in the queue (0 = head) and why it waits."""

    admit: bool
    position: int
    blocked: tuple[Blocked, ...] = ()

    def reasons(self) -> list[str]:
        return [b.reason() for b in self.blocked]


def decide(table: SlotTable, waiter: Waiter) -> Decision:
    """Whether ``waiter`` may start now; a waiter not in the queue is judged as if at its tail."""
    jobs = [w.job for w in table.queue]
    position = jobs.index(waiter.job) if waiter.job in jobs else len(jobs)
    ahead = table.queue[:position]
    blocked = []
    for r in waiter.resources:
        holders = tuple(sorted(table.holders.get(r, frozenset()) - {waiter.job}))
        limit = limit_of(table.limits, r)
        waiting = tuple(w.job for w in ahead if r in w.resources)
        if len(holders) + len(waiting) >= limit:
            blocked.append(Blocked(r, limit, holders, waiting))
    return Decision(not blocked, position, tuple(blocked))


def admit(table: SlotTable, job: str) -> SlotTable:
    """The table after ``job`` (queued) took its slots and left the queue."""
    waiter = next(w for w in table.queue if w.job == job)
    holders = dict(table.holders)
    for r in waiter.resources:
        holders[r] = holders.get(r, frozenset()) | {job}
    return SlotTable(table.limits, holders, tuple(w for w in table.queue if w.job != job))


def release(table: SlotTable, job: str) -> SlotTable:
    """The table after ``job`` gave back its slots (it finished, or its lease lapsed)."""
    holders = {r: jobs - {job} for r, jobs in table.holders.items()}
    return SlotTable(table.limits, {r: j for r, j in holders.items() if j}, table.queue)


def enqueue(table: SlotTable, waiter: Waiter) -> SlotTable:
    """The table with ``waiter`` at the tail of the queue."""
    return SlotTable(table.limits, table.holders, (*table.queue, waiter))


def admissible(table: SlotTable) -> tuple[list[str], SlotTable]:
    """Every queued migration that may start now, in queue order, and the table once they did.

    One pass in queue order suffices: a waiter is blocked only by holders and by waiters ahead of
    it, and by the time the pass reaches it those ahead are settled; admitting it only fills slots,
    which unblocks nobody ahead of it.
    """
    started: list[str] = []
    for w in table.queue:
        if decide(table, w).admit:
            table = admit(table, w.job)
            started.append(w.job)
    return started, table


def places(table: SlotTable) -> Sequence[tuple[Waiter, Decision]]:
    """The queue with each waiter's decision (what a listing shows)."""
    return [(w, decide(table, w)) for w in table.queue]
