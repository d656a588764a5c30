"""Powered-off VMs leave a host entering maintenance: offline, spread by memory promised, rules kept."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.drs.maintenance import evacuate
from hikkoshi.drs.model import HostState, Link, Snapshot, StoppedVm, problems
from hikkoshi.drs.plan import MoveKind, Why
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.rules import Rule, RuleKind, Strength
from tests.support.drs_clusters import GIB, host, snapshot, vm


def with_stopped(s: Snapshot, *stopped: StoppedVm) -> Snapshot:
    return replace(s, stopped=tuple(stopped))


def off(
    name: str, on: str, *, memory: int = 4 * GIB, disk: int = 20 * GIB, rules: tuple[Rule, ...] = ()
) -> StoppedVm:
    return StoppedVm(vm(name, on, cpu=0.0, memory=memory, disk=disk), rules)


def test_powered_off_vms_leave_after_the_running_ones_and_spread() -> None:
    hosts = [host("a"), host("b"), host("c")]
    s = with_stopped(
        snapshot(hosts, [vm("run", "a", cpu=4)]),
        *(off(f"o{i}", "a") for i in range(4)),
        off("elsewhere", "b"),
    )
    e = evacuate(s, ["a"])
    assert e.complete and e.blocked is None
    assert e.moves[0].vm == "run" and e.moves[0].kind is MoveKind.MIGRATE
    cold = [m for m in e.moves if m.kind is MoveKind.OFFLINE]
    assert sorted(m.vm for m in cold) == ["o0", "o1", "o2", "o3"]  # not the one on b
    assert all(m.why is Why.MAINTENANCE and m.source == "a" and m.target in ("b", "c") for m in cold)
    # Memory promised spreads them (b already has "elsewhere": c takes the first).
    targets = [m.target for m in cold]
    assert targets.count("b") == targets.count("c") == 2
    assert all("powered off" in m.reason and m.datastore == "east-san" for m in cold)
    p = cold[0].predicted
    assert p is not None and p.downtime_ms == 0 and p.bytes == 20 * GIB and p.memory_bytes == 0


def test_the_copy_is_priced_by_the_link() -> None:
    hosts = [host("a"), host("far", site="west", datastores=("west-san",))]
    link = Link("east", "west", 10e6, 80.0)
    s = with_stopped(snapshot(hosts, [], links=[link]), off("o", "a", disk=1 * GIB))
    (m,) = evacuate(s, ["a"]).moves
    assert m.target == "far" and m.datastore == "west-san" and m.from_datastores == ("east-san",)
    assert m.predicted is not None and m.predicted.total_time_ms > (1 << 30) / 10e6 * 1000


def test_host_rules_of_a_powered_off_vm_are_kept() -> None:
    hosts = [host("a"), host("b"), host("c", memory=1024 * GIB)]
    must = Rule("pinned", RuleKind.RUN_ON, frozenset({"o"}), frozenset({"b"}))
    (m,) = evacuate(with_stopped(snapshot(hosts, []), off("o", "a", rules=(must,))), ["a"]).moves
    assert m.target == "b"  # c has far more room, but the rule says b
    never = Rule("not-b", RuleKind.NOT_RUN_ON, frozenset({"o"}), frozenset({"b", "c"}))
    e = evacuate(with_stopped(snapshot(hosts, []), off("o", "a", rules=(never,))), ["a"])
    assert not e.complete and e.blocked is not None
    assert (
        e.blocked.startswith("o (powered off) cannot leave a: ")
        and "excluded by must not-run-on" in e.blocked
    )
    should = Rule("rather-b", RuleKind.RUN_ON, frozenset({"o"}), frozenset({"b"}), Strength.SHOULD)
    (m,) = evacuate(with_stopped(snapshot(hosts, []), off("o", "a", rules=(should,))), ["a"]).moves
    assert m.target == "b"


def test_without_memory_to_start_it_still_goes_and_says_so() -> None:
    hosts = [host("a"), host("b", memory=8 * GIB), host("c", memory=8 * GIB)]
    s = with_stopped(snapshot(hosts, [vm("big", "b", memory=8 * GIB)]), off("o", "a", memory=16 * GIB))
    (m,) = evacuate(s, ["a"]).moves
    assert m.target == "c" and "no host has room to start it now" in m.reason


def test_no_datastore_with_room_or_no_host_blocks_with_the_reason() -> None:
    hosts = [host("a"), host("b", datastores=("small",)), host("c", state=HostState.DOWN)]
    s = with_stopped(snapshot(hosts, []), off("o", "a", disk=20 * GIB))
    s = replace(s, datastores=tuple(replace(d, free=GIB) if d.name == "small" else d for d in s.datastores))
    e = evacuate(s, ["a"])
    assert not e.complete and e.blocked is not None
    assert "b sees no datastore with room for its disks" in e.blocked


def test_a_powered_off_vm_listed_twice_is_inconsistent() -> None:
    s = with_stopped(snapshot([host("a")], [vm("x", "a")]), off("x", "a"))
    assert any("duplicate VM names" in p for p in problems(s))
    s = with_stopped(snapshot([host("a")], []), off("y", "nowhere"))
    assert any("unknown host nowhere" in p for p in problems(s))


@settings(max_examples=60, deadline=None)
@given(
    n_hosts=st.integers(2, 6),
    n_off=st.integers(0, 12),
    memories=st.lists(st.sampled_from([8, 32, 128]), min_size=6, max_size=6),
    sizes=st.lists(st.integers(1, 64), min_size=12, max_size=12),
)
def test_every_powered_off_vm_leaves_or_the_reason_is_given(
    n_hosts: int, n_off: int, memories: list[int], sizes: list[int]
) -> None:
    hosts = [host(f"h{i}", memory=memories[i] * GIB) for i in range(n_hosts)]
    stopped = [off(f"o{j}", "h0", memory=sizes[j] * GIB) for j in range(n_off)]
    e = evacuate(with_stopped(snapshot(hosts, []), *stopped), ["h0"])
    # Up hosts with the east datastore always exist: every powered-off VM goes, none onto h0.
    assert e.complete and sorted(m.vm for m in e.moves) == sorted(x.vm.name for x in stopped)
    assert all(m.kind is MoveKind.OFFLINE and m.target != "h0" for m in e.moves)
    # A move said to fit does: the memory promised to a host never exceeds what it may give.
    limit = Policy().memory_limit
    promised: dict[str, int] = {}
    for m in e.moves:
        promised[m.target] = promised.get(m.target, 0) + sizes[int(m.vm[1:])] * GIB
        if m.reason.endswith("where it fits"):
            assert promised[m.target] <= memories[int(m.target[1:])] * GIB * limit
