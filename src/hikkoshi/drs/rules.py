"""Placement rules: which VMs run together, apart, on or off which hosts (vSphere's DRS rules).

A ``must`` rule is never broken by a move the planner makes; finding one broken makes a mandatory move.
A ``should`` rule is kept by every move too, but when nothing else fits, an evacuation may break it
(and says so); finding one broken is corrected at threshold level 2 and above.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class RuleKind(enum.StrEnum):
    AFFINITY = "affinity"
    """The VMs run on one host."""
    ANTI_AFFINITY = "anti-affinity"
    """No two of the VMs run on one host."""
    RUN_ON = "run-on"
    """The VMs run on hosts of the group."""
    NOT_RUN_ON = "not-run-on"
    """The VMs stay off the hosts of the group."""


class Strength(enum.StrEnum):
    MUST = "must"
    SHOULD = "should"


@dataclass(frozen=True)
class Rule:
    """One rule over a set of VMs (and, for the host kinds, a group of hosts)."""

    name: str
    kind: RuleKind
    vms: frozenset[str]
    hosts: frozenset[str] = frozenset()
    strength: Strength = Strength.MUST

    def __post_init__(self) -> None:
        with_hosts = self.kind in (RuleKind.RUN_ON, RuleKind.NOT_RUN_ON)
        if with_hosts != bool(self.hosts):
            raise ValueError(f"rule {self.name}: host groups belong to run-on and not-run-on rules only")
        if not self.vms:
            raise ValueError(f"rule {self.name} names no VMs")

    def describe(self) -> str:
        return f"{self.strength.value} {self.kind.value} rule {self.name}"


def allows(rule: Rule, vm: str, host: str, host_of: Mapping[str, str], moving: Iterable[str] = ()) -> bool:
    """Whether ``vm`` may run on ``host`` under ``rule``, the other VMs being where ``host_of`` says
    (VMs it does not know are not running yet); VMs in ``moving`` go to ``host`` together with ``vm``."""
    if rule.kind is RuleKind.RUN_ON:
        return host in rule.hosts
    if rule.kind is RuleKind.NOT_RUN_ON:
        return host not in rule.hosts
    together = set(moving) | {vm}
    others = (host_of.get(n) for n in rule.vms if n not in together)
    if rule.kind is RuleKind.AFFINITY:
        return all(h is None or h == host for h in others)
    return all(h != host for h in others) and (len(together & rule.vms) <= 1)


def broken(rule: Rule, host_of: Mapping[str, str]) -> list[str]:
    """How ``rule`` is broken by where the VMs are (empty: kept), one sentence per problem."""
    placed = sorted((n, host_of[n]) for n in rule.vms if n in host_of)
    if rule.kind is RuleKind.RUN_ON:
        return [f"{n} runs on {h}, outside {rule.describe()}" for n, h in placed if h not in rule.hosts]
    if rule.kind is RuleKind.NOT_RUN_ON:
        return [f"{n} runs on {h}, excluded by {rule.describe()}" for n, h in placed if h in rule.hosts]
    by_host: dict[str, list[str]] = {}
    for n, h in placed:
        by_host.setdefault(h, []).append(n)
    if rule.kind is RuleKind.AFFINITY:
        if len(by_host) <= 1:
            return []
        spread = "; ".join(f"{', '.join(ns)} on {h}" for h, ns in sorted(by_host.items()))
        return [f"{rule.describe()} is split: {spread}"]
    return [
        f"{', '.join(ns)} share {h} against {rule.describe()}"
        for h, ns in sorted(by_host.items())
        if len(ns) > 1
    ]
