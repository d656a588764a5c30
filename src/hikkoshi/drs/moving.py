"""A chosen destination made into moves: each VM's migration predicted, refused if it cannot be done
live, then applied to the working state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hikkoshi.drs.cost import Costs
from hikkoshi.drs.plan import Move, MoveKind, Why
from hikkoshi.drs.state import State, Unit
from hikkoshi.migrate.predict import Prediction


@dataclass(frozen=True)
class Priced:
    """A unit's migration to one host, predicted."""

    predictions: tuple[tuple[str, str, Prediction, frozenset[str]], ...]
    """Per VM that moves: its name, its host, its prediction and the datastores its disks leave."""
    cost: float


def price(state: State, costs: Costs, unit: Unit, dst: str, stores: Mapping[str, str]) -> Priced | str:
    """The predicted migrations of ``unit``'s VMs (each from where it is) to ``dst``, or why one cannot
    be recommended."""
    out = []
    total = 0.0
    seen = state.hosts[dst].datastores
    for n in unit.vms:
        src = state.host_of[n]
        if src == dst:
            continue
        vm = state.vms[n]
        leaving = vm.datastores - seen if n in stores else frozenset()
        p = costs.migration(vm, state.hosts[src], state.hosts[dst], leaving)
        why = costs.acceptable(p)
        if why is not None:
            return f"{n}: {why}"
        out.append((n, src, p, leaving))
        total += costs.units(p)
    return Priced(tuple(out), total)


def commit(
    state: State,
    unit: Unit,
    dst: str,
    stores: Mapping[str, str],
    priced: Priced,
    why: Why,
    reason: str,
    goodness: float = 0.0,
) -> list[Move]:
    """Apply the move to ``state`` and return its records (one per VM that moves)."""
    state.apply(unit, dst, dict(stores))
    moves = []
    together = f" (with {', '.join(n for n in unit.vms if n != unit.vms[0])}: must stay together)"
    for i, (n, src, p, leaving) in enumerate(priced.predictions):
        moves.append(
            Move(
                vm=n,
                source=src,
                target=dst,
                kind=MoveKind.MIGRATE,
                why=why,
                reason=reason + (together if len(unit.vms) > 1 and i == 0 else ""),
                datastore=stores.get(n),
                from_datastores=tuple(sorted(leaving)),
                predicted=p,
                goodness=goodness if i == 0 else 0.0,
                cost=priced.cost if i == 0 else 0.0,
            )
        )
    return moves
