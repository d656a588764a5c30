"""What the planner hands back: moves, each with its reason, kind, predicted cost and goodness."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hikkoshi.migrate.predict import Prediction


class MoveKind(enum.StrEnum):
    MIGRATE = "migrate"
    """The VM goes to another host (its disks along when that host does not see them)."""
    STORAGE = "storage"
    """The VM stays; its disks go to another datastore the host sees (``storage-migrate``)."""
    OFFLINE = "offline"
    """A powered-off VM goes to another host, its disks along (an offline migration)."""


class Why(enum.StrEnum):
    """What made the move."""

    MAINTENANCE = "maintenance"
    RULE = "rule"
    """A must rule was broken (mandatory)."""
    SHOULD_RULE = "should-rule"
    BALANCE = "balance"
    SPACE = "space"
    LATENCY = "latency"


MANDATORY = frozenset({Why.MAINTENANCE, Why.RULE})


@dataclass(frozen=True)
class Move:
    """One recommended migration."""

    vm: str
    source: str
    """The host it runs on."""
    target: str
    """The host it goes to (the same host for a storage move)."""
    kind: MoveKind
    why: Why
    reason: str
    """One sentence a person reads."""
    datastore: str | None = None
    """Where its disks go, if they move."""
    from_datastores: tuple[str, ...] = ()
    """The datastores its disks leave."""
    predicted: Prediction | None = None
    goodness: float = 0.0
    """How much the move lowers the imbalance (sum of squared deviations of host loads); 0 for moves
    made for another reason than balance."""
    cost: float = 0.0
    """The predicted migration in the policy's cost units."""

    @property
    def mandatory(self) -> bool:
        return self.why in MANDATORY

    def to_json(self) -> dict[str, object]:
        """``{"vm", "from", "to", "reason", "kind", "why", "datastore", "predicted", "goodness", ...}``."""
        return {
            "vm": self.vm,
            "from": self.source,
            "to": self.target,
            "reason": self.reason,
            "kind": self.kind.value,
            "why": self.why.value,
            "mandatory": self.mandatory,
            "datastore": self.datastore,
            "from_datastores": list(self.from_datastores),
            "predicted": None if self.predicted is None else self.predicted.to_json(),
            "goodness": round(self.goodness, 6),
            "cost": round(self.cost, 4),
        }


@dataclass(frozen=True)
class Plan:
    """The moves of one planning run, in the order they should run."""

    moves: tuple[Move, ...]
    imbalance_before: float
    imbalance_after: float
    """What the imbalance will be once every move is done (predicted from the same loads)."""
    level: int
    notes: tuple[str, ...] = ()
    """What the planner could not do, and why (a rule it could not repair, a host it could not empty)."""

    def to_json(self) -> dict[str, object]:
        return {
            "moves": [m.to_json() for m in self.moves],
            "imbalance_before": round(self.imbalance_before, 6),
            "imbalance_after": round(self.imbalance_after, 6),
            "level": self.level,
            "notes": list(self.notes),
        }
