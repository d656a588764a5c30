"""Powered-off VMs leaving a host that enters maintenance: each to a host where it could start again.

A powered-off VM takes no load, so the load that spreads running VMs cannot spread these: they go to
the host with the least memory promised (its VMs' configured memory, these included, over its memory),
where the VM's own memory still fits, that offers its CPU model, keeps its run-on and not-run-on rules
and has a datastore with room for its disks under the space threshold; in its own site first. Should
rules are kept when a host keeping them fits. When no host has the memory to start it, it still goes to
the one with the most room (the host must empty; the move says it cannot start there yet). Each move is
an offline migration: its disks go along, copied once, priced by the link.
"""

from __future__ import annotations

from collections.abc import Iterable

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.model import StoppedVm
from hikkoshi.drs.placement import summarise
from hikkoshi.drs.plan import Move, MoveKind, Why
from hikkoshi.drs.rules import Rule, RuleKind, Strength
from hikkoshi.drs.state import State

Key = tuple[bool, bool, bool, float, str]
"""How good a host is for a powered-off VM, smallest best: memory lacking, should rule broken, other
site, memory promised after, name."""


def stopped_moves(
    state: State, costs: Costs, stopped: Iterable[StoppedVm], hosts: Iterable[str]
) -> tuple[list[Move], str | None]:
    """Offline moves of the powered-off VMs on ``hosts`` (already out of the balance in ``state``);
    stops at the first that can go nowhere, with the reason."""
    leaving = set(hosts)
    going = sorted((x for x in stopped if x.vm.host in leaving), key=lambda x: (-x.vm.memory, x.vm.name))
    moves: list[Move] = []
    for x in going:
        vm = x.vm
        got = _destination(state, x)
        if isinstance(got, dict):
            return moves, f"{vm.name} (powered off) cannot leave {vm.host}: {summarise(got)}"
        dst, store, fits = got
        state.alloc[dst] += vm.memory  # promised: it may start there
        for d in vm.disks:
            state.ds_free[d.datastore] = state.ds_free.get(d.datastore, 0) + d.allocated
            state.ds_free[store] -= d.allocated
        reason = f"{vm.host} enters maintenance; {vm.name} is powered off and goes to {dst}, "
        reason += (
            "the host with the least memory promised where it fits"
            if fits
            else ("the host with the most memory left: no host has room to start it now")
        )
        moves.append(
            Move(
                vm=vm.name,
                source=vm.host,
                target=dst,
                kind=MoveKind.OFFLINE,
                why=Why.MAINTENANCE,
                reason=reason,
                datastore=store,
                from_datastores=tuple(sorted(vm.datastores)),
                predicted=costs.cold(vm, state.hosts[vm.host], state.hosts[dst]),
            )
        )
    return moves, None


def _destination(state: State, x: StoppedVm) -> tuple[str, str, bool] | dict[str, str]:
    """The best host, the datastore its disks go to and whether its memory fits there; or why none."""
    vm = x.vm
    src = state.hosts[vm.host]
    model = vm.cpu_model or src.cpu_model
    need = sum(d.allocated for d in vm.disks)
    refused: dict[str, str] = {}
    best: tuple[Key, str, str] | None = None
    for h in state.balanced:
        host = state.hosts[h]
        if h == vm.host:
            continue
        why = _refusal(x.rules, h, must_only=True)
        if why is None and not host.offers(model):
            why = f"has another CPU model ({host.cpu_model})"
        if why is None and vm.cpus > host.cpu_cores:
            why = f"has {host.cpu_cores} cores ({vm.cpus} vCPUs needed)"
        store = state.room_for(need, sorted(host.datastores)) if why is None else None
        if why is None and store is None:
            why = "sees no datastore with room for its disks"
        if why is not None or store is None:
            refused[h] = why or "sees no datastore with room for its disks"
            continue
        promised = state.alloc[h] + vm.memory
        key: Key = (
            promised > host.memory * state.policy.memory_limit,
            _refusal(x.rules, h, must_only=False) is not None,
            host.site != src.site,
            promised / host.memory if host.memory > 0 else float("inf"),
            h,
        )
        if best is None or key < best[0]:
            best = (key, h, store)
    if best is None:
        return refused
    return best[1], best[2], not best[0][0]


def _refusal(rules: Iterable[Rule], h: str, *, must_only: bool) -> str | None:
    for r in rules:
        if must_only and r.strength is not Strength.MUST:
            continue
        if (r.kind is RuleKind.RUN_ON) != (h in r.hosts):
            return f"is excluded by {r.describe()}"
    return None
