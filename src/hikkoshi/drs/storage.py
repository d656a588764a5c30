"""Storage DRS: a datastore too full, or too slow, sheds VMs' disks to another datastore of their host.

A datastore is too full above ``Policy.space_threshold`` of its capacity, too slow when the median of its
p90 latency samples over the window is above ``Policy.latency_threshold_ms`` (the median, so one busy
interval does not move disks). Candidates are the VMs with disks there, on up hosts, not already moved by
this plan; a VM's disks on the datastore go together (a ``storage-migrate``) to the datastore of its host
with most room that stays under the space threshold and is not slow itself.

Goodness: for space, the share of the datastore's excess the move removes; for latency, the VM's share of
the datastore's I/O. Cost: the predicted disk move (:func:`hikkoshi.migrate.predict.predict_disk_move`)
in the policy's cost units. The cheapest move that removes all of the excess is taken, else the one with
the best goodness per cost, if it is worth it at the threshold level; until the datastore is under its
threshold (space) or one VM has left it (latency: its new latency is measured, not guessed, before the
next move).
"""

from __future__ import annotations

from dataclasses import dataclass

from hikkoshi.drs import load
from hikkoshi.drs.cost import Costs
from hikkoshi.drs.model import Datastore, HostState, Snapshot, problems
from hikkoshi.drs.plan import Move, MoveKind, Plan, Why
from hikkoshi.drs.policy import Level, Policy
from hikkoshi.drs.state import State
from hikkoshi.migrate.predict import Prediction


@dataclass(frozen=True)
class _Candidate:
    ratio: float
    vm: str
    target: str
    goodness: float
    cost: float
    predicted: Prediction


def storage_plan(snap: Snapshot, policy: Policy | None = None) -> Plan:
    """Storage DRS alone: the disk moves for the snapshot's datastores (host moves aside)."""
    policy = policy or Policy()
    bad = problems(snap)
    if bad:
        raise ValueError("inconsistent snapshot: " + "; ".join(bad[:5]))
    state = State(snap, policy)
    level = policy.balance
    if level is None:
        return Plan((), state.imbalance(), state.imbalance(), policy.level, ("level 1: no storage moves",))
    moves, notes = storage_moves(state, Costs(snap, policy), level, snap.limits.max_moves)
    return Plan(tuple(moves), state.imbalance(), state.imbalance(), policy.level, tuple(notes))


def storage_moves(state: State, costs: Costs, level: Level, budget: int) -> tuple[list[Move], list[str]]:
    """Disk moves off datastores over their space or latency threshold (at most ``budget``)."""
    moves: list[Move] = []
    notes: list[str] = []
    pol = state.policy
    troubled = [
        ds
        for ds in sorted(state.datastores.values(), key=lambda d: d.name)
        if _used(state, ds) > pol.space_threshold or load.median(ds.latency_p90) > pol.latency_threshold_ms
    ]
    residents: dict[str, list[str]] = {ds.name: [] for ds in troubled}
    for n in sorted(state.vms) if troubled else ():
        for d in state.vms[n].disks:
            here = residents.get(d.datastore)
            if here is not None and (not here or here[-1] != n):
                here.append(n)
    for ds in troubled:
        slow = load.median(ds.latency_p90) > pol.latency_threshold_ms
        while len(moves) < budget:
            full = _used(state, ds) > pol.space_threshold
            if not (full or slow):
                break
            best = _best(state, costs, ds, full, residents.get(ds.name, []))
            if best is None or best.ratio < level.gain_per_cost:
                what = "full" if full else "slow"
                notes.append(
                    f"datastore {ds.name} is {what} ({_describe(state, ds)}) but no disk move is worth it"
                )
                break
            host = state.host_of[best.vm]
            reason = (
                f"datastore {ds.name} is {'full' if full else 'slow'} ({_describe(state, ds)}); "
                f"{best.vm}'s disks go to {best.target}: goodness {best.goodness:.3f} "
                f"for a cost of {best.cost:.3f}"
            )
            state.move_disks(best.vm, best.target, frozenset({ds.name}))
            residents[ds.name].remove(best.vm)
            why = Why.SPACE if full else Why.LATENCY
            moves.append(
                Move(
                    vm=best.vm,
                    source=host,
                    target=host,
                    kind=MoveKind.STORAGE,
                    why=why,
                    reason=reason,
                    datastore=best.target,
                    from_datastores=(ds.name,),
                    predicted=best.predicted,
                    goodness=best.goodness,
                    cost=best.cost,
                )
            )
            if not full:
                break  # latency after a move is measured, not predicted
    return moves, notes


def _best(state: State, costs: Costs, ds: Datastore, full: bool, residents: list[str]) -> _Candidate | None:
    pol = state.policy
    over = (_used(state, ds) - pol.space_threshold) * ds.capacity
    total_io = sum(_io(state, n) for n in residents) or 1.0
    best: _Candidate | None = None
    for n in residents:
        host = state.hosts[state.host_of[n]]
        if n in state.touched or host.state is not HostState.UP:
            continue
        need = sum(d.allocated for d in state.vms[n].disks if d.datastore == ds.name)
        targets = [t for t in sorted(host.datastores) if t != ds.name and not _slow(state, t)]
        target = state.room_for(need, targets)
        if target is None:
            continue
        rate = min(ds.copy_rate, state.datastores[target].copy_rate)
        p = costs.disk_move(state.vms[n], frozenset({ds.name}), rate)
        if costs.acceptable(p) is not None:
            continue
        goodness = min(need, over) / over if full else _io(state, n) / total_io
        cost = costs.units(p)
        c = _Candidate(goodness / cost if cost > 0 else float("inf"), n, target, goodness, cost, p)
        if goodness > 0 and (best is None or _rank(c) < _rank(best)):
            best = c
    return best


def _rank(c: _Candidate) -> tuple[int, float, str]:
    """Best first: the cheapest move that removes all of the excess, else the most goodness per cost
    (moving one disk just big enough beats several small ones that add up to it)."""
    return (0, c.cost, c.vm) if c.goodness >= 1 else (1, -c.ratio, c.vm)


def _io(state: State, vm: str) -> float:
    d = state.vms[vm].demand
    return load.mean(d.disk_read) + load.mean(d.disk_write)


def _used(state: State, ds: Datastore) -> float:
    return 1 - state.ds_free[ds.name] / ds.capacity if ds.capacity > 0 else 1.0


def _slow(state: State, name: str) -> bool:
    ds = state.datastores.get(name)
    return ds is None or load.median(ds.latency_p90) > state.policy.latency_threshold_ms


def _describe(state: State, ds: Datastore) -> str:
    return f"{_used(state, ds):.0%} used, p90 latency {load.median(ds.latency_p90):.1f} ms"
