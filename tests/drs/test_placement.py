"""Initial placement: a host that fits the new VM and is least loaded, or a clear reason."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hikkoshi.drs.model import HostState, Snapshot
from hikkoshi.drs.placement import NewDisk, NewVm, place
from hikkoshi.drs.rules import Rule, RuleKind, Strength, allows
from tests.support.drs_clusters import GIB, clusters, host, loads, snapshot, vm


def test_the_least_loaded_host_that_fits() -> None:
    s = snapshot([host("a"), host("b"), host("c")], [vm("x", "a", cpu=10), vm("y", "b", cpu=2)])
    p = place(s, NewVm("new", 8 * GIB, 4, (NewDisk("root", 20 * GIB),)))
    assert (p.host, p.datastore) == ("c", "east-san")
    assert "least loaded" in p.reason and p.to_json()["host"] == "c"


def test_memory_cpu_model_datastore_and_rules_decide() -> None:
    hosts = [
        host("small", memory=8 * GIB),
        host("intel", model="XEON"),
        host("elsewhere", datastores=("other",)),
        host("busy-neighbour"),
        host("right"),
    ]
    s = snapshot(
        hosts,
        [vm("x", "right", cpu=20), vm("noisy", "busy-neighbour", cpu=1)],
        rules=[Rule("keep-apart", RuleKind.ANTI_AFFINITY, frozenset({"new", "noisy"}))],
    )
    p = place(
        s, NewVm("new", 16 * GIB, 4, (NewDisk("root", 10 * GIB),), datastore="east-san", cpu_model="EPYC")
    )
    assert p.host == "right", p.reason


def test_no_host_gives_the_reasons() -> None:
    hosts = [
        host("a", memory=8 * GIB),
        host("b", model="XEON"),
        host("c", state=HostState.MAINTENANCE),
        host("d", cores=2),
    ]
    p = place(snapshot(hosts, []), NewVm("huge", 16 * GIB, 4, cpu_model="EPYC"))
    assert p.host is None
    assert p.reason.startswith("no host fits huge: ")
    for words in ("a lacks memory", "b has another CPU model", "c is maintenance", "d has 2 cores"):
        assert words in p.reason, p.reason


def test_a_named_datastore_must_exist_and_have_room() -> None:
    s = snapshot([host("a")], [])
    assert "no datastore nope" in place(s, NewVm("v", GIB, 1, (NewDisk("d", GIB),), datastore="nope")).reason
    big = NewVm("v", GIB, 1, (NewDisk("d", 100 << 40),), datastore="east-san")
    assert "has no room" in place(s, big).reason
    assert place(s, NewVm("v0", GIB, 1)).host == "a"
    assert "exists already" in place(snapshot([host("a")], [vm("v", "a")]), NewVm("v", GIB, 1)).reason


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(states=True), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 4, 16, 64]), st.booleans())
def test_a_placement_always_fits(s: Snapshot, cpus: int, gib: int, with_rule: bool) -> None:
    rules = list(s.rules)
    if with_rule and s.vms:
        rules.append(
            Rule("away", RuleKind.ANTI_AFFINITY, frozenset({"new", s.vms[0].name}), strength=Strength.MUST)
        )
    s = snapshot(s.hosts, s.vms, rules=rules, datastores=s.datastores, links=s.links)
    p = place(s, NewVm("new", gib * GIB, cpus, (NewDisk("root", 10 * GIB),)))
    state = loads(s)
    if p.host is None:
        assert p.reason.startswith("no host fits new")
        return
    h = state.hosts[p.host]
    assert h.state is HostState.UP and cpus <= h.cpu_cores
    assert state.alloc[p.host] + gib * GIB <= h.memory
    assert state.cpu[p.host] + cpus * 0.5 <= h.cpu_cores
    assert p.datastore in h.datastores
    assert all(allows(r, "new", p.host, state.host_of) for r in rules if "new" in r.vms)


def test_should_rules_are_kept_when_possible_and_broken_only_when_not() -> None:
    s = snapshot([host("a"), host("b")], [vm("x", "a", cpu=1)])
    keep = Rule("near-x", RuleKind.AFFINITY, frozenset({"new", "x"}), strength=Strength.SHOULD)
    p = place(snapshot(s.hosts, s.vms, rules=[keep]), NewVm("new", GIB, 1))
    assert p.host == "a" and "breaks" not in p.reason  # b is emptier, but the rule wants a
    full = snapshot([host("a", memory=4 * GIB), host("b")], [vm("x", "a", cpu=1)], rules=[keep])
    p = place(full, NewVm("new", 2 * GIB, 1))
    assert p.host == "b" and "breaks a should rule" in p.reason
    must = snapshot(full.hosts, full.vms, rules=[replace(keep, strength=Strength.MUST)])
    p = place(must, NewVm("new", 2 * GIB, 1))
    assert p.host is None and "a lacks memory" in p.reason and "b is excluded by must affinity" in p.reason
