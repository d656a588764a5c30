"""Broken rules put right: each VM in the wrong place goes to the best host that keeps every rule.

- run-on / not-run-on: the VM goes to a host the rule allows.
- anti-affinity: of the VMs sharing a host, the first by name stays, the others go.
- affinity: the VMs gather on the host that already has most of them (if it fits the rest), else on
  the best host for all of them.

Must rules are repaired at every level (mandatory); should rules from level 2 on. A repair never breaks
a must rule; repairing a must rule may break a should rule when nothing else fits (and says so),
repairing a should rule never does. A rule that cannot be repaired is noted with the reason.
"""

from __future__ import annotations

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.moving import commit, price
from hikkoshi.drs.placement import Choice, choose, summarise
from hikkoshi.drs.plan import Move, Why
from hikkoshi.drs.rules import Rule, RuleKind, Strength, broken
from hikkoshi.drs.state import State, Unit


def repair(
    state: State, costs: Costs, strength: Strength, budget: int | None = None
) -> tuple[list[Move], list[str]]:
    """Moves repairing the broken rules of ``strength`` (at most ``budget`` moves; ``None``: all)."""
    moves: list[Move] = []
    notes: list[str] = []
    why = Why.RULE if strength is Strength.MUST else Why.SHOULD_RULE
    loose = strength is Strength.MUST  # a must rule outranks should rules, never the other way
    for rule in sorted(state.snap.rules, key=lambda r: r.name):
        if rule.strength is not strength or not broken(rule, state.host_of):
            continue
        if budget is not None and len(moves) >= budget:
            notes.append(f"{rule.describe()} is broken; left for the next run (move limit)")
            continue
        for unit in _strays(state, rule):
            how = broken(rule, state.host_of)
            if not how:
                break
            src = state.host_of[unit.vms[0]]
            down = sorted({state.host_of[n] for n in unit.vms} - set(state.balanced))
            if down:
                notes.append(f"{rule.describe()}: {unit.name} is on {', '.join(down)}, not up")
                continue
            if rule.kind is RuleKind.AFFINITY:
                unit, got = _gathering(state, rule, unit, loose)
            else:
                got = choose(state, unit, src, may_break_should=loose)
            if not isinstance(got, Choice):
                notes.append(f"{rule.describe()}: {unit.name} cannot move: {summarise(got)}")
                continue
            priced = price(state, costs, unit, got.host, got.stores)
            if isinstance(priced, str):
                notes.append(f"{rule.describe()}: {unit.name} cannot move: {priced}")
                continue
            reason = f"{' '.join(how)}; {got.host} keeps it"
            if got.breaks_should:
                reason += ", breaking a should rule: no host keeping every rule fits"
            moves += commit(state, unit, got.host, got.stores, priced, why, reason)
    return moves, notes


def _strays(state: State, rule: Rule) -> list[Unit]:
    """The units that must move to repair ``rule`` (for affinity: the VMs away from the host that has
    most of them, as one unit)."""
    where = sorted((state.host_of[n], n) for n in rule.vms if n in state.host_of)
    if rule.kind is RuleKind.RUN_ON:
        return [state.unit(n) for h, n in where if h not in rule.hosts]
    if rule.kind is RuleKind.NOT_RUN_ON:
        return [state.unit(n) for h, n in where if h in rule.hosts]
    if rule.kind is RuleKind.ANTI_AFFINITY:
        out, kept = [], set()
        for h, n in where:
            if h in kept:
                out.append(state.unit(n))
            kept.add(h)
        return out
    home = _home(state, rule)
    return [_units(state, [n for h, n in where if h != home])]


def _home(state: State, rule: Rule) -> str:
    """The host with most of the rule's VMs (ties: by name)."""
    count: dict[str, int] = {}
    for n in sorted(rule.vms):
        if n in state.host_of:
            count[state.host_of[n]] = count.get(state.host_of[n], 0) + 1
    return min(count, key=lambda h: (-count[h], h))


def _units(state: State, names: list[str]) -> Unit:
    """The VMs ``names`` (and their must-affinity groups) as one unit."""
    vms = sorted({m for n in names for m in state.unit(n).vms})
    return Unit(
        vms=tuple(vms),
        cpu=sum(map(state.cpu_of, vms)),
        memory=sum(map(state.mem_of, vms)),
        allocated=sum(state.vms[n].memory for n in vms),
        cpus=max(state.vms[n].cpus for n in vms),
    )


def _gathering(state: State, rule: Rule, strays: Unit, loose: bool) -> tuple[Unit, Choice | dict[str, str]]:
    """For an affinity rule: the host that has most of its VMs, if the others (``strays``) fit there;
    else the best host for all of them. Returns who moves, and where."""
    home = _home(state, rule)
    why = state.refusal(strays, home, should=not loose)
    stores = state.storage_for(strays, home) if why is None else None
    if why is None and stores is not None:
        breaks = loose and state.refusal(strays, home) is not None
        return strays, Choice(home, stores, breaks, state.load_after(home, strays))
    everyone = _units(state, sorted(n for n in rule.vms if n in state.host_of))
    got = choose(state, everyone, None, may_break_should=loose)
    if isinstance(got, Choice):
        return everyone, got
    return strays, {home: why or "sees no datastore with room for its disks", **got}
