"""Maintenance mode: every VM leaves the host, spread over the others by the ordinary placement.

VMs go largest first (their configured memory: the hardest to fit, placed while there is most room),
each to the host that fits it and is least loaded once it is there, in its own site if any host there
fits, else another; should rules are broken only when nothing else fits, and the move says so. Because
every placement counts the ones before it, the VMs spread instead of following each other to the host
that was emptiest at the start. A VM that cannot go anywhere, or whose migration would not converge,
stops the evacuation: the host cannot be emptied, and the reason says why. Powered-off VMs leave
too, after the running ones (:mod:`hikkoshi.drs.stopped`), by offline migrations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.model import HostState, Snapshot, problems
from hikkoshi.drs.moving import commit, price
from hikkoshi.drs.placement import Choice, choose, summarise
from hikkoshi.drs.plan import Move, Why
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.state import State, Unit
from hikkoshi.drs.stopped import stopped_moves


@dataclass(frozen=True)
class Evacuation:
    """The moves that empty the hosts, or as many as could be found and why the rest cannot go."""

    hosts: tuple[str, ...]
    moves: tuple[Move, ...]
    complete: bool
    blocked: str | None
    """Why the evacuation stops (``None``: every VM has a place)."""
    max_load_after: float
    """The highest normalised load of a host once the moves are done."""

    def to_json(self) -> dict[str, object]:
        return {
            "hosts": list(self.hosts),
            "moves": [m.to_json() for m in self.moves],
            "complete": self.complete,
            "blocked": self.blocked,
            "max_load_after": round(self.max_load_after, 4),
        }


def evacuate(snap: Snapshot, hosts: Iterable[str], policy: Policy | None = None) -> Evacuation:
    """Empty ``hosts`` (they take no VM meanwhile)."""
    policy = policy or Policy()
    bad = problems(snap)
    if bad:
        raise ValueError("inconsistent snapshot: " + "; ".join(bad[:5]))
    names = tuple(sorted(set(hosts)))
    known = {h.name for h in snap.hosts}
    unknown = [h for h in names if h not in known]
    if unknown:
        raise ValueError(f"unknown hosts: {', '.join(unknown)}")
    leaving = frozenset(names)
    snap = replace(
        snap,
        hosts=tuple(replace(h, state=HostState.MAINTENANCE) if h.name in leaving else h for h in snap.hosts),
    )
    state = State(snap, policy)
    costs = Costs(snap, policy)
    moves, blocked = evacuation_moves(state, costs, names)
    if blocked is None:
        # Running VMs first (they need the room most); then the powered-off ones, where they may start.
        off, blocked = stopped_moves(state, costs, snap.stopped, names)
        moves += off
    peak = max((state.load[h] for h in state.balanced), default=0.0)
    return Evacuation(names, tuple(moves), blocked is None, blocked, peak)


def evacuation_moves(state: State, costs: Costs, hosts: Iterable[str]) -> tuple[list[Move], str | None]:
    """Moves emptying ``hosts`` (already out of the balance in ``state``); stops at the first VM that
    cannot go, with the reason."""
    units: list[tuple[int, str, str, Unit]] = []
    for h in hosts:
        units += [(-u.allocated, u.name, h, u) for u in state.units_on(h)]
    moves: list[Move] = []
    for _, _, src, unit in sorted(units, key=lambda t: t[:3]):
        got = _destination(state, unit, src)
        if not isinstance(got, Choice):
            return moves, f"{unit.name} cannot leave {src}: {summarise(got)}"
        priced = price(state, costs, unit, got.host, got.stores)
        if isinstance(priced, str):
            return moves, f"{unit.name} cannot leave {src}: {priced}"
        reason = f"{src} enters maintenance; {got.host} fits {unit.name} and is the least loaded that does"
        reason += f" ({got.load_after:.0%} after)"
        if got.breaks_should:
            reason += "; it breaks a should rule: no host keeping it fits"
        moves += commit(state, unit, got.host, got.stores, priced, Why.MAINTENANCE, reason)
    return moves, None


def _destination(state: State, unit: Unit, src: str) -> Choice | dict[str, str]:
    """In the site first, then anywhere; should rules kept, then broken as a last resort."""
    site = frozenset({state.hosts[src].site})
    refused: dict[str, str] = {}
    for sites, loose in ((site, False), (None, False), (None, True)):
        got = choose(state, unit, src, sites=sites, may_break_should=loose)
        if isinstance(got, Choice):
            return got
        refused = got
    return refused
