"""One planning run: a snapshot in, a plan out; the same snapshot always gives the same plan.

In order, each step on the state the ones before left:

1. mandatory: every VM leaves hosts in maintenance; broken must rules are repaired (any level);
2. from level 2: broken should rules are repaired, then Storage DRS (``Policy.storage_drs``), then load
   balancing while the imbalance is above the level's tolerance.

Mandatory moves are not capped (the executor paces them); the others share ``Limits.max_moves``.
"""

from __future__ import annotations

from hikkoshi.drs.balance import balance
from hikkoshi.drs.cost import Costs
from hikkoshi.drs.maintenance import evacuation_moves
from hikkoshi.drs.model import HostState, Snapshot, problems
from hikkoshi.drs.plan import Move, Plan
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.repair import repair
from hikkoshi.drs.rules import Strength
from hikkoshi.drs.state import State
from hikkoshi.drs.storage import storage_moves


def plan(snap: Snapshot, policy: Policy | None = None) -> Plan:
    """The moves the cluster should make now, each with its reason. ``ValueError`` for an inconsistent
    snapshot (:func:`hikkoshi.drs.model.problems`)."""
    policy = policy or Policy()
    bad = problems(snap)
    if bad:
        raise ValueError("inconsistent snapshot: " + "; ".join(bad[:5]))
    state = State(snap, policy)
    costs = Costs(snap, policy)
    before = state.imbalance()
    moves: list[Move] = []
    notes: list[str] = []

    leaving = [h.name for h in snap.hosts if h.state is HostState.MAINTENANCE and state.on[h.name]]
    if leaving:
        done, blocked = evacuation_moves(state, costs, leaving)
        moves += done
        if blocked is not None:
            notes.append(blocked)
    done, why = repair(state, costs, Strength.MUST)
    moves += done
    notes += why

    level = policy.balance
    if level is not None:
        budget = snap.limits.max_moves
        for step in ("should", "storage", "balance"):
            left = budget - sum(1 for m in moves if not m.mandatory)
            if left <= 0:
                break
            if step == "should":
                done, why = repair(state, costs, Strength.SHOULD, left)
            elif step == "storage" and policy.storage_drs:
                done, why = storage_moves(state, costs, level, left)
            elif step == "balance":
                done, why = balance(state, costs, level, snap.limits, left, {})
            else:
                continue
            moves += done
            notes += why
    return Plan(tuple(moves), before, state.imbalance(), policy.level, tuple(notes))
