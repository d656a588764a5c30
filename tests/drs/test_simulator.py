"""The simulator, and small versions of the benchmark's three runs (bench/run_drs.py)."""

from __future__ import annotations

from dataclasses import replace

from hikkoshi.drs.maintenance import evacuate
from hikkoshi.drs.model import HostState, Limits, Snapshot
from hikkoshi.drs.plan import Move, MoveKind, Plan, Why
from hikkoshi.drs.policy import LEVELS, Policy
from hikkoshi.drs.simulator import apply, run, timeline
from hikkoshi.drs.synthetic import Shape, cluster
from hikkoshi.migrate.predict import Finish, Prediction
from tests.support.drs_clusters import loads


def _p(seconds: float) -> Prediction:
    return Prediction(seconds * 1000, 0, 1, seconds * 1000, True, 1, Finish.PRECOPY, 1, 0, 50, 0, "")


def test_timeline_respects_the_slots_per_host() -> None:
    moves = [
        Move(f"v{i}", "a", f"b{i % 2}", MoveKind.MIGRATE, Why.BALANCE, "", predicted=_p(10)) for i in range(4)
    ]
    t = timeline(moves, Limits(concurrent_per_host=2))
    assert t.spans == ((0, 10), (0, 10), (10, 20), (10, 20))  # a runs two at a time
    assert t.seconds == 20 and t.bytes == 4
    assert timeline(moves, Limits(concurrent_per_host=4)).seconds == 10


def test_apply_moves_vms_disks_space_and_host_samples() -> None:
    s = cluster(Shape(hosts=4, vms=40, seed=3))
    v = s.vms[0]
    to = next(h for h in s.hosts if h.name != v.host)
    m = Move(
        v.name,
        v.host,
        to.name,
        MoveKind.MIGRATE,
        Why.BALANCE,
        "",
        datastore="site0-ds1",
        from_datastores=(v.disks[0].datastore,),
    )
    after = apply(s, Plan((m,), 0, 0, 3))
    moved = next(x for x in after.vms if x.name == v.name)
    assert moved.host == to.name and moved.disks[0].datastore == "site0-ds1"
    src_before = next(h for h in s.hosts if h.name == v.host).load.cpu[0]
    src_after = next(h for h in after.hosts if h.name == v.host).load.cpu[0]
    assert abs(src_before - v.demand.cpu[0] - src_after) < 1e-9
    free = {d.name: d.free for d in after.datastores}
    before = {d.name: d.free for d in s.datastores}
    if v.disks[0].datastore != "site0-ds1":
        assert free["site0-ds1"] == before["site0-ds1"] - v.disks[0].allocated


def test_a_skewed_cluster_converges_in_a_few_rounds() -> None:
    """Small version of the benchmark: 40 hosts, 1,200 VMs, 60 % of them on a quarter of the hosts."""
    s = cluster(Shape(hosts=40, vms=1200, hot=0.6, seed=1))
    level = LEVELS[3]
    assert level is not None
    start = loads(s).imbalance()
    assert start > 3 * level.tolerance
    sim = run(s, Policy(level=3), rounds=20)
    final = loads(sim.final).imbalance()
    assert final <= level.tolerance
    assert len(sim.rounds) <= 12
    imbalances = [r.plan.imbalance_before for r in sim.rounds] + [final]
    assert imbalances == sorted(imbalances, reverse=True)  # every round lowers it
    assert all(r.timeline.seconds > 0 for r in sim.rounds if r.plan.moves)


def test_maintenance_of_a_tenth_of_the_hosts() -> None:
    s = cluster(Shape(hosts=40, vms=1200, seed=2))
    leaving = [h.name for h in s.hosts[::10]]
    e = evacuate(s, leaving)
    assert e.complete
    assert len(e.moves) == sum(1 for v in s.vms if v.host in leaving)
    after = apply(s, Plan(e.moves, 0, 0, 3))
    state = loads(after)
    staying = [h for h in s.hosts if h.name not in leaving]
    assert all(state.alloc[h.name] <= h.memory for h in staying)
    # Spread over many hosts, emptiest first: the busiest host stays the one that was busiest.
    before = loads(s)
    assert len({m.target for m in e.moves}) >= 10
    assert e.max_load_after <= max(before.load[h.name] for h in staying) + 1e-9
    assert min(state.load[h.name] for h in staying) > min(before.load[h.name] for h in staying)


def test_rounds_with_the_cluster_changing_between_them() -> None:
    """A host enters maintenance after the first round: the next plan empties it."""
    s = cluster(Shape(hosts=12, vms=300, hot=0.5, seed=4))
    first = s.hosts[0].name

    def enter_maintenance(snap: Snapshot, i: int) -> Snapshot:
        if i != 0:
            return snap
        hosts = tuple(replace(h, state=HostState.MAINTENANCE) if h.name == first else h for h in snap.hosts)
        return replace(snap, hosts=hosts)

    sim = run(s, rounds=10, between=enter_maintenance)
    assert len(sim.rounds) >= 2
    assert any(m.why is Why.MAINTENANCE for m in sim.rounds[1].plan.moves)
    assert not [v for v in sim.final.vms if v.host == first]
    assert sim.rounds[-1].plan.moves == ()
