"""Load balancing, DRS's way: simulate candidate moves, keep the best one worth its cost, repeat.

Sources are the ``Policy.candidates`` most loaded hosts; destinations, as many of the least loaded in the
source's site (any site with ``Policy.cross_site``). Every unit (VM or must-affinity group) on a source
is a candidate; its goodness against a destination is how much the move lowers the hosts' sum of squared
load deviations, computed in O(1) from the running sums. The best candidate that fits (capacity, CPU
model, rules, datastores), rests on stable loads (the unit's demand and both hosts' measured load, over
the window), converges and is worth its predicted cost at the threshold level is applied. The loop ends
when the imbalance is within the level's tolerance, no candidate is worth it, or the move limit is
reached. Every move lowers the imbalance, so a plan never makes it worse.

Candidates live in a heap across the moves of a plan (lazy greedy): a move changes two hosts, so only
the units of a source whose load changed are scored again, and the rest keep their goodness until they
come to the top, where they are scored afresh against the current destinations; one that lost its edge
goes back into the heap. At 1,000 hosts this scores about a tenth of what rescoring everything would.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, replace

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.model import Limits
from hikkoshi.drs.moving import Priced, commit, price
from hikkoshi.drs.plan import Move, Why
from hikkoshi.drs.policy import Level
from hikkoshi.drs.state import State, Unit

_MIN_GAIN = 1e-12
"""Below this a gain is rounding, not a move's effect."""


@dataclass(frozen=True)
class _Found:
    unit: Unit
    src: str
    dst: str
    stores: dict[str, str]
    priced: Priced
    gain: float


def balance(
    state: State, costs: Costs, level: Level, limits: Limits, budget: int, per_host: dict[str, int]
) -> tuple[list[Move], list[str]]:
    """Balancing moves (at most ``budget``); ``per_host`` counts each host's optional moves so far."""
    moves: list[Move] = []
    notes: list[str] = []
    board = _Board(state, costs, level, limits, per_host)
    while len(moves) < budget and state.imbalance() > level.tolerance:
        found = board.best()
        if found is None:
            notes.append(
                f"imbalance {state.imbalance():.4f} is above the level's {level.tolerance} "
                "but no move is worth its cost (or none rests on stable loads)"
            )
            break
        before = state.imbalance()
        ls, ld = state.load[found.src], state.load[found.dst]
        u = found.unit
        done = commit(state, u, found.dst, found.stores, found.priced, Why.BALANCE, "", found.gain)
        reason = (
            f"{found.src} is at {ls:.0%} and {found.dst} at {ld:.0%} (mean {state.sum / state.n:.0%}); "
            f"moving {u.name} ({u.cpu:.1f} cores, {u.memory / (1 << 30):.1f} GiB active) evens them: "
            f"imbalance {before:.4f} -> {state.imbalance():.4f}, goodness {found.gain:.4f} "
            f"for a cost of {found.priced.cost:.3f}"
        )
        moves += [replace(m, reason=reason + m.reason) for m in done]
        for h in (found.src, found.dst):  # a unit of several VMs is several migrations for each host
            per_host[h] = per_host.get(h, 0) + len(done)
    return moves, notes


# (-goodness, unit name, source, the source's version when scored, the state's epoch when scored,
#  a serial number so that no comparison ever reaches the unit, unit)
_Entry = tuple[float, str, str, int, int, int, Unit]


class _Board:
    """The candidates of one plan's balancing."""

    def __init__(
        self, state: State, costs: Costs, level: Level, limits: Limits, per_host: dict[str, int]
    ) -> None:
        self.state, self.costs, self.level, self.limits = state, costs, level, limits
        self.per_host = per_host
        self.heap: list[_Entry] = []
        self.scored: dict[str, int] = {}
        """Source -> its version when its units were last scored."""
        self.refused: set[tuple[str, str]] = set()
        """(unit, destination) that cannot be done live: that does not change within the plan."""
        self.serial = 0

    def usable(self, h: str) -> bool:
        return self.per_host.get(h, 0) < self.limits.max_moves_per_host and self.state.stable_host(h)

    def fits(self, h: str, unit: Unit) -> bool:
        """Whether ``h`` may take part in all of ``unit``'s migrations within its per-host limit."""
        return self.per_host.get(h, 0) + len(unit.vms) <= self.limits.max_moves_per_host

    def best(self) -> _Found | None:
        """The best candidate worth its cost, or ``None``."""
        st = self.state
        for s in _first(st.policy.candidates, (h for h in st.descending() if self.usable(h))):
            if self.scored.get(s) != st.version[s]:
                self._score(s)
        while self.heap:
            _, name, s, version, epoch, _, unit = heapq.heappop(self.heap)
            if version != st.version[s] or not self.usable(s) or any(n in st.touched for n in unit.vms):
                continue  # the source changed (its units were scored again) or the unit moved
            targets = self._targets(s)
            gains = st.gains(s, unit.cpu, unit.memory, st.targets(targets))
            top = max(gains, default=0.0)
            if top <= _MIN_GAIN:
                continue
            if epoch != st.epoch and self.heap and top < -self.heap[0][0]:
                # Scored before the last move and no longer the best: back in line with its fresh score.
                self._push(-top, name, s, version, unit)
                continue
            found = self._take(unit, s, targets, gains)
            if found is not None:
                return found
        return None

    def _score(self, s: str) -> None:
        st = self.state
        self.scored[s] = st.version[s]
        targets = st.targets(self._targets(s))
        for unit in st.movable_on(s):
            top = max(st.gains(s, unit.cpu, unit.memory, targets), default=0.0)
            if top > _MIN_GAIN:
                self._push(-top, unit.vms[0], s, st.version[s], unit)

    def _push(self, neg: float, name: str, s: str, version: int, unit: Unit) -> None:
        self.serial += 1
        heapq.heappush(self.heap, (neg, name, s, version, self.state.epoch, self.serial, unit))

    def _targets(self, s: str) -> list[str]:
        """The least loaded usable hosts a unit of ``s`` may go to."""
        st = self.state
        site = None if st.policy.cross_site else st.hosts[s].site
        walk = (h for h in st.ascending() if h != s and (site is None or st.hosts[h].site == site))
        return _first(st.policy.candidates, (h for h in walk if self.usable(h)))

    def _take(self, unit: Unit, s: str, targets: list[str], gains: list[float]) -> _Found | None:
        """The unit's best destination that fits and is worth its cost, best goodness first."""
        st = self.state
        for g, d in sorted(zip(gains, targets, strict=True), key=lambda t: (-t[0], t[1])):
            if g <= _MIN_GAIN:
                break
            if (unit.name, d) in self.refused or st.refusal(unit, d) is not None:
                continue
            if not (self.fits(s, unit) and self.fits(d, unit)):
                continue
            stores = st.storage_for(unit, d)
            if stores is None:
                continue
            priced = price(st, self.costs, unit, d, stores)
            if isinstance(priced, str):
                self.refused.add((unit.name, d))
                continue
            if g >= self.level.gain_per_cost * priced.cost:
                return _Found(unit, s, d, stores, priced, g)
        return None


def _first(k: int, hosts: Iterator[str]) -> list[str]:
    out = []
    for h in hosts:
        out.append(h)
        if len(out) >= k:
            break
    return out
