"""Plans carried out on paper: moves applied to a snapshot, timed by their predicted costs, round after round.

:func:`apply` gives the snapshot after a plan (VMs on their new hosts and datastores, datastores' free
space, hosts' measured load shifted by the VMs' own samples). :func:`timeline` schedules the moves the way
an executor would: in plan order, each as soon as its source and destination have a free migration slot
(``Limits.concurrent_per_host``), each lasting its predicted total time. :func:`run` plans, applies and
plans again, as the cluster service would every few minutes, until a plan is empty or the rounds run out.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from hikkoshi.drs.model import Host, HostLoad, Limits, Snapshot, Vm
from hikkoshi.drs.plan import Move, MoveKind, Plan
from hikkoshi.drs.planner import plan as make_plan
from hikkoshi.drs.policy import Policy


def apply(snap: Snapshot, plan: Plan) -> Snapshot:
    """The snapshot once every move of ``plan`` is done (loads as measured before, moved with their VMs)."""
    vms = {v.name: v for v in snap.vms}
    free = {d.name: d.free for d in snap.datastores}
    shift: dict[str, list[tuple[Vm, float]]] = {}
    for m in plan.moves:
        v = vms[m.vm]
        if m.kind is MoveKind.MIGRATE and m.target != v.host:
            shift.setdefault(v.host, []).append((v, -1.0))
            shift.setdefault(m.target, []).append((v, 1.0))
            v = replace(v, host=m.target)
        if m.datastore is not None:
            disks = []
            for d in v.disks:
                if d.datastore in m.from_datastores and d.datastore != m.datastore:
                    free[d.datastore] += d.allocated
                    free[m.datastore] -= d.allocated
                    d = replace(d, datastore=m.datastore)
                disks.append(d)
            v = replace(v, disks=tuple(disks))
        vms[m.vm] = v
    hosts = tuple(_shifted(h, shift[h.name]) if h.name in shift else h for h in snap.hosts)
    stores = tuple(replace(d, free=free[d.name]) for d in snap.datastores)
    return replace(snap, hosts=hosts, vms=tuple(vms[v.name] for v in snap.vms), datastores=stores)


def _shifted(h: Host, moved: Sequence[tuple[Vm, float]]) -> Host:
    """``h``'s measured load with the moved VMs' samples taken off (-1) or added (+1)."""
    cpu, mem = list(h.load.cpu), list(h.load.memory)
    for v, sign in moved:
        for own, theirs in ((cpu, v.demand.cpu), (mem, v.demand.memory)):
            if not own:
                continue
            if len(theirs) == len(own):
                for i, x in enumerate(theirs):
                    own[i] = max(0.0, own[i] + sign * x)
            else:  # windows of other lengths: move the VM's level
                level = sum(theirs) / len(theirs) if theirs else 0.0
                own[:] = [max(0.0, x + sign * level) for x in own]
    return replace(h, load=HostLoad(tuple(cpu), tuple(mem)))


@dataclass(frozen=True)
class Timeline:
    """When each move runs, predicted."""

    spans: tuple[tuple[float, float], ...]
    """Per move of the plan, its start and end in seconds from the plan's start."""
    seconds: float
    """Until the last move ends."""
    bytes: int


def timeline(moves: Sequence[Move], limits: Limits) -> Timeline:
    """Moves run in order, each when its hosts both have a free slot, for its predicted total time.

    Each migration is taken to get the bandwidth its prediction used (the link as measured for one
    stream): ``concurrent_per_host`` should be what a host's migration network carries at that rate."""
    slots: dict[str, list[float]] = {}  # per host, a heap of the times its slots come free
    spans = []
    nbytes = 0
    for m in moves:
        p = m.predicted
        seconds = p.total_time_ms / 1000 if p is not None else 0.0
        nbytes += p.bytes if p is not None else 0
        hosts = sorted({m.source, m.target})
        for h in hosts:
            slots.setdefault(h, [0.0] * limits.concurrent_per_host)
        start = max(slots[h][0] for h in hosts)
        for h in hosts:
            heapq.heapreplace(slots[h], start + seconds)
        spans.append((start, start + seconds))
    return Timeline(tuple(spans), max((e for _, e in spans), default=0.0), nbytes)


@dataclass(frozen=True)
class Round:
    """One planning run and its moves carried out."""

    plan: Plan
    timeline: Timeline


@dataclass(frozen=True)
class Simulation:
    rounds: tuple[Round, ...]
    final: Snapshot

    @property
    def moves(self) -> int:
        return sum(len(r.plan.moves) for r in self.rounds)


def run(
    snap: Snapshot,
    policy: Policy | None = None,
    *,
    rounds: int = 20,
    between: Callable[[Snapshot, int], Snapshot] | None = None,
) -> Simulation:
    """Plan and apply until a plan has no moves or ``rounds`` plans were made; ``between`` may change the
    cluster after each round (load shifts, hosts entering maintenance)."""
    policy = policy or Policy()
    done: list[Round] = []
    for i in range(rounds):
        p = make_plan(snap, policy)
        done.append(Round(p, timeline(p.moves, snap.limits)))
        if not p.moves:
            break
        snap = apply(snap, p)
        if between is not None:
            snap = between(snap, i)
    return Simulation(tuple(done), snap)
