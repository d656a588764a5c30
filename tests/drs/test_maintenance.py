"""Maintenance mode: hosts emptied over the others, or the reason they cannot be."""

from __future__ import annotations

import pytest

from hikkoshi.drs.maintenance import evacuate
from hikkoshi.drs.model import HostState
from hikkoshi.drs.rules import Rule, RuleKind, Strength
from tests.support.drs_clusters import GIB, MIB, host, snapshot, vm


def test_vms_spread_over_the_other_hosts() -> None:
    hosts = [host("a"), host("b"), host("c"), host("d")]
    vms = [vm(f"v{i}", "a", cpu=2) for i in range(6)] + [vm("busy", "d", cpu=20)]
    e = evacuate(snapshot(hosts, vms), ["a"])
    assert e.complete and e.blocked is None and len(e.moves) == 6
    targets = [m.target for m in e.moves]
    assert targets.count("b") == targets.count("c") == 3  # d is busy, b and c take turns
    assert all("enters maintenance" in m.reason for m in e.moves)
    assert e.max_load_after == pytest.approx(20 / 32)  # d, untouched
    assert e.to_json()["complete"] is True


def test_several_hosts_at_once_never_onto_each_other() -> None:
    hosts = [host(f"h{i}") for i in range(6)]
    vms = [vm(f"v{i}-{j}", f"h{i}", cpu=1 + j) for i in range(6) for j in range(3)]
    e = evacuate(snapshot(hosts, vms), ["h0", "h1"])
    assert e.complete and len(e.moves) == 6
    assert not {m.target for m in e.moves} & {"h0", "h1"}
    assert len({m.target for m in e.moves}) == 4


def test_a_vm_that_fits_nowhere_stops_the_evacuation() -> None:
    hosts = [host("a", memory=256 * GIB), host("b", memory=64 * GIB), host("c", state=HostState.DOWN)]
    vms = [vm("small", "a", memory=4 * GIB), vm("huge", "a", memory=128 * GIB)]
    e = evacuate(snapshot(hosts, vms), ["a"])
    assert not e.complete
    assert e.blocked is not None and e.blocked.startswith("huge cannot leave a: ")
    assert "b lacks memory" in e.blocked and "c is down" in e.blocked
    assert e.moves == ()  # the largest goes first: nothing is half done before the one that cannot go


def test_a_vm_whose_migration_would_not_converge_stops_it() -> None:
    s = snapshot([host("a"), host("b")], [vm("wild", "a", memory=64 * GIB, dirty=4 * GIB)])
    e = evacuate(s, ["a"])
    assert not e.complete and e.blocked is not None and "would not converge" in e.blocked


def test_rules_are_kept_and_should_rules_broken_only_as_a_last_resort() -> None:
    hosts = [host("a"), host("b"), host("c")]
    vms = [vm("one", "a"), vm("two", "b"), vm("three", "c")]
    apart = Rule(
        "apart", RuleKind.ANTI_AFFINITY, frozenset({"one", "two", "three"}), strength=Strength.SHOULD
    )
    e = evacuate(snapshot(hosts, vms, rules=[apart]), ["a"])
    assert e.complete and "breaks a should rule" in e.moves[0].reason
    hard = Rule("apart", RuleKind.ANTI_AFFINITY, frozenset({"one", "two", "three"}))
    e = evacuate(snapshot(hosts, vms, rules=[hard]), ["a"])
    assert (
        not e.complete and e.blocked is not None and "excluded by must anti-affinity rule apart" in e.blocked
    )


def test_another_site_when_the_own_one_is_full() -> None:
    from hikkoshi.drs.model import Link

    hosts = [host("a"), host("b", memory=4 * GIB), host("w", site="west", datastores=("west-san",))]
    s = snapshot(hosts, [vm("v", "a", memory=8 * GIB, dirty=MIB)], links=[Link("east", "west", 125e6, 30)])
    (m,) = evacuate(s, ["a"]).moves
    assert (m.target, m.datastore) == ("w", "west-san")
    assert m.predicted is not None and m.predicted.disk_bytes >= 20 * GIB


def test_unknown_hosts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown hosts: x"):
        evacuate(snapshot([host("a")], []), ["x"])
