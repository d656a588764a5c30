"""The DRS snapshot built from etcd's records: always consistent (the planner accepts it), only running
VMs of live owners, rules over what is there; plans and predictions from it."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from hikkoshi.agent.drs_moves import request_of
from hikkoshi.agent.drs_prediction import forecast
from hikkoshi.agent.drs_read import ClusterState
from hikkoshi.agent.drs_snapshot import ClusterVm, latencies, snapshot
from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.models import (
    DatastoreInfo,
    DrsSettings,
    HostInfo,
    HostStatus,
    LinkRecord,
    RuleRecord,
    VmLoad,
)
from hikkoshi.drs.model import problems
from hikkoshi.drs.plan import Move, MoveKind, Why
from hikkoshi.drs.planner import plan

MIB = 1 << 20


def view(
    name: str,
    state: HostState = HostState.UP,
    vms: dict[str, str] | None = None,
    loads: dict[str, VmLoad] | None = None,
) -> HostView:
    info = HostInfo(
        name=name,
        api_address=f"http://{name}:8710",
        site="s" if name != "far" else "t",
        cpu_model="EPYC",
        memory_total=4096 * MIB,
        datastores=(DatastoreInfo(name="main", uuid=f"ds-{name}", capacity=100 << 30),),
    )
    status = (
        None
        if state is HostState.DOWN
        else HostStatus(
            memory_free=2048 * MIB,
            datastores_free={f"ds-{name}": 50 << 30},
            vms=vms or {},
            cpu_cores=4,
            vm_memory=1024 * MIB,
            vm_loads=loads or {},
        )
    )
    return HostView(info, status, None, state)


def cvm(name: str, owner: str | None, memory: int = 128) -> ClusterVm:
    return ClusterVm(name, f"u-{name}", owner, memory * MIB, 1, 16 * MIB, None)


def test_records_become_a_snapshot() -> None:
    busy = VmLoad(cpu=(0.5, 0.5), memory=(100 * MIB, 110 * MIB), disk_write=(1e6, 1e6), datastore="ds-a")
    hosts = [
        view("a", vms={"u-x": "running", "u-y": "stopped"}, loads={"u-x": busy}),
        view("b", HostState.MAINTENANCE, vms={"u-z": "running"}),
        view("c", HostState.DOWN),
        view("far"),
    ]
    vms = [cvm("x", "a"), cvm("y", "a"), cvm("z", "b"), cvm("w", "c"), cvm("orphan", None)]
    rules = [
        RuleRecord(name="apart", kind="anti-affinity", vms=("x", "z")),
        RuleRecord(name="gone", kind="anti-affinity", vms=("y", "w")),
        RuleRecord(name="pin", kind="run-on", vms=("x",), hosts=("a", "nosuch")),
    ]
    s = snapshot(hosts, vms, rules)
    assert problems(s) == []
    assert [v.name for v in s.vms] == ["x", "z"]
    # y is powered off: listed apart, with the host rules naming it (none here).
    assert [(o.vm.name, o.vm.host, o.rules) for o in s.stopped] == [("y", "a", ())]
    x = s.vms[0]
    assert x.host == "a" and x.demand.cpu == (0.5, 0.5) and x.resident == 110 * MIB
    assert x.disks[0].datastore == "ds-a" and s.vms[1].demand.memory == (128 * MIB,)
    assert {r.name for r in s.rules} == {"apart", "pin"} and next(
        r for r in s.rules if r.name == "pin"
    ).hosts == {"a"}
    assert {d.name: d.latency_p90 for d in s.datastores}["ds-a"] == ()
    hs = {h.name: h for h in s.hosts}
    assert hs["a"].memory == 1024 * MIB and hs["a"].cpu_cores == 4 and hs["c"].state.value == "down"
    assert hs["b"].state.value == "maintenance" and len(s.links) == 1
    # The planner takes it: z leaves b (maintenance), not for a (the rule), and says why.
    p = plan(s)
    assert [(m.vm, m.target, m.why.value) for m in p.moves] == [("z", "far", "maintenance")]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["up", "maintenance", "down"]), min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(0, 6), st.integers(64, 1024), st.booleans()), max_size=12),
    st.lists(
        st.tuples(st.sampled_from(["affinity", "anti-affinity"]), st.sets(st.integers(0, 11), max_size=4))
    ),
)
def test_any_records_give_a_consistent_snapshot_and_a_stable_plan(
    states: list[str], placed: list[tuple[int, int, bool]], rule_sets: list[tuple[str, set[int]]]
) -> None:
    names = [f"h{i}" for i in range(len(states))]
    vms = [cvm(f"v{i}", names[h] if h < len(names) else None, mem) for i, (h, mem, _) in enumerate(placed)]
    running: dict[str, dict[str, str]] = {n: {} for n in names}
    for v, (_, _, on) in zip(vms, placed, strict=True):
        if v.owner is not None:
            running[v.owner][v.uuid] = "running" if on else "stopped"
    hosts = [view(n, HostState(st_), running[n]) for n, st_ in zip(names, states, strict=True)]
    rules = [
        RuleRecord(name=f"r{i}", kind=kind, vms=tuple(f"v{j}" for j in sorted(ids)))
        for i, (kind, ids) in enumerate(rule_sets)
        if ids
    ]
    s = snapshot(hosts, vms, rules)
    assert problems(s) == []
    up = {n for n, st_ in zip(names, states, strict=True) if st_ != "down"}
    expected = {v.name for v, (_, _, on) in zip(vms, placed, strict=True) if on and v.owner in up}
    assert {v.name for v in s.vms} == expected
    assert plan(s) == plan(snapshot(hosts, vms, rules))
    for placed_vm in s.vms:
        for h in names:
            if h != placed_vm.host:
                got = forecast(s, placed_vm.name, h)
                assert not isinstance(got, str)
                assert got.predicted.total_time_ms > 0 and got.to_json()["predicted"]["bytes"] > 0  # type: ignore[index]


def test_forecast_refusals_and_modes() -> None:
    s = snapshot([view("a", vms={"u-x": "running"}), view("b")], [cvm("x", "a")])
    assert "not running" in str(forecast(s, "nope", "b"))
    assert "no host" in str(forecast(s, "x", "zz"))
    shared = forecast(s, "x", "b", "shared")
    hybrid = forecast(s, "x", "b", "hybrid")
    assert not isinstance(shared, str) and not isinstance(hybrid, str)
    assert shared.storage == "shared" and hybrid.storage == "hybrid"
    assert hybrid.predicted.disk_bytes > 0 == shared.predicted.disk_bytes
    assert {"total_time_ms", "downtime_ms", "bytes"} <= set(hybrid.predicted.to_json())


def test_a_move_becomes_the_agent_request() -> None:
    hosts = [view("a", vms={"u-x": "running"}), view("b")]
    state = ClusterState(hosts, [], DrsSettings(), snapshot(hosts, [cvm("x", "a")]))
    along = Move("x", "a", "b", MoveKind.MIGRATE, Why.BALANCE, "r", datastore="ds-b")
    assert request_of(state, along) == (
        "/v1/vms/x/migrate",
        {"to": "b", "storage": "hybrid", "datastore": "main"},
    )
    stays = Move("x", "a", "b", MoveKind.MIGRATE, Why.BALANCE, "r")
    assert request_of(state, stays) == ("/v1/vms/x/migrate", {"to": "b", "storage": "shared"})
    disk = Move("x", "a", "a", MoveKind.STORAGE, Why.SPACE, "r", datastore="ds-a")
    assert request_of(state, disk) == ("/v1/vms/x/storage-migrate", {"datastore": "main"})
    cold = Move("x", "a", "b", MoveKind.OFFLINE, Why.MAINTENANCE, "r", datastore="ds-b")
    assert request_of(state, cold) == (
        "/v1/vms/x/migrate",
        {"to": "b", "mode": "offline", "datastore": "main"},
    )


def test_a_powered_off_vm_keeps_its_host_rules_and_leaves_a_host_in_maintenance() -> None:
    hosts = [view("a", HostState.MAINTENANCE, vms={"u-y": "stopped"}), view("b"), view("far")]
    rules = [
        RuleRecord(name="pin", kind="run-on", vms=("y",), hosts=("far",)),
        RuleRecord(name="pair", kind="affinity", vms=("y", "q")),
    ]
    s = snapshot(hosts, [cvm("y", "a")], rules)
    assert problems(s) == [] and s.vms == () and s.rules == ()
    ((off),) = s.stopped
    assert [r.name for r in off.rules] == ["pin"]
    p = plan(s)  # the planner balances running VMs only; maintenance (evacuate) moves this one
    assert p.moves == ()
    from hikkoshi.drs.maintenance import evacuate

    (m,) = evacuate(s, ["a"]).moves
    assert (m.vm, m.target, m.kind) == ("y", "far", MoveKind.OFFLINE)


def test_datastore_latency_is_the_slowest_vm_per_sample() -> None:
    a = VmLoad(disk_latency_ms=(1.0, 9.0, 2.0), datastore="ds-a")
    b = VmLoad(disk_latency_ms=(5.0, 3.0), datastore="ds-a")
    hosts = [view("a", vms={"u-x": "running", "u-y": "running"}, loads={"u-x": a, "u-y": b}), view("b")]
    s = snapshot(hosts, [cvm("x", "a"), cvm("y", "a")])
    assert {d.name: d.latency_p90 for d in s.datastores} == {"ds-a": (1.0, 9.0, 3.0), "ds-b": ()}


def test_measured_links_and_dirty_rates_feed_the_forecast() -> None:
    """A link a migration measured replaces the assumed one (within a site too), one between sites the
    cluster does not have is ignored, and a VM's measured dirty rate reaches the prediction."""
    busy = VmLoad(cpu=(0.5,), memory=(100 * MIB,), dirty_rate=40.0 * MIB)
    hosts = [view("a", vms={"u-x": "running"}, loads={"u-x": busy}), view("b"), view("far")]
    vms = [cvm("x", "a")]
    assumed = snapshot(hosts, vms)
    measured = [
        LinkRecord(a="s", b="s", bandwidth=50e6, rtt_ms=0.3),
        LinkRecord(a="t", b="s", bandwidth=2e6, rtt_ms=80.0),
        LinkRecord(a="s", b="mars", bandwidth=1.0, rtt_ms=1.0),
    ]
    got = snapshot(hosts, vms, measured=measured)
    assert not problems(got)
    assert [(k.a, k.b, k.measured) for k in assumed.links] == [("s", "t", False)]
    assert {(k.a, k.b, k.bandwidth, k.measured) for k in got.links} == {
        ("s", "s", 50e6, True),
        ("t", "s", 2e6, True),
    }
    assert got.vms[0].dirty_rate == 40.0 * MIB
    near, far = forecast(got, "x", "b"), forecast(got, "x", "far")
    before = forecast(assumed, "x", "far")
    assert not isinstance(near, str) and not isinstance(far, str) and not isinstance(before, str)
    assert near.assumptions["link"] == "measured" and near.assumptions["link_bandwidth"] == 50e6
    assert near.assumptions["dirty_rate"] == 40.0 * MIB
    assert far.assumptions["link"] == "measured" and before.assumptions["link"] == "assumed"
    # The measured WAN is slower than the assumed one: the move costs more.
    assert far.predicted.total_time_ms > before.predicted.total_time_ms


def test_a_datastores_latency_is_the_p90_its_hosts_publish() -> None:
    """Where a host publishes its datastore's p90 it is used, not the VMs' p99 (a host that publishes
    none still counts by its VMs)."""
    vm_p99 = VmLoad(cpu=(0.1, 0.1), disk_latency_ms=(50.0, 60.0), datastore="ds-a")
    a = view("a", vms={"u-x": "running"}, loads={"u-x": vm_p99})
    assert a.status is not None
    published = replace(a, status=a.status.model_copy(update={"datastore_latency_p90": {"ds-a": (2.0, 4.0)}}))
    other = VmLoad(cpu=(0.1,), disk_latency_ms=(8.0,), datastore="ds-a")
    b = view("b", vms={"u-y": "running"}, loads={"u-y": other})
    assert latencies([a]) == {"ds-a": (50.0, 60.0)}
    assert latencies([published]) == {"ds-a": (2.0, 4.0)}
    assert latencies([published, b]) == {"ds-a": (2.0, 8.0)}
