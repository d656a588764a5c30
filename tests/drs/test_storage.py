"""Storage DRS: full or slow datastores shed disks to another datastore their host sees."""

from __future__ import annotations

from dataclasses import replace

from hikkoshi.drs.model import Datastore, Snapshot
from hikkoshi.drs.plan import MoveKind, Why
from hikkoshi.drs.planner import plan
from hikkoshi.drs.policy import Policy
from hikkoshi.drs.simulator import apply
from hikkoshi.drs.storage import storage_plan
from tests.support.drs_clusters import GIB, SAMPLES, TIB, host, snapshot, vm

STORES = ("fast", "slow", "big")


def cluster(fast_free: int, slow_latency: float = 5.0, big_free: int = 9 * TIB) -> Snapshot:
    hosts = [host("a", datastores=STORES), host("b", datastores=("fast", "big"))]
    vms = [vm(f"v{i}", "a", datastore="fast", disk=(i + 1) * 50 * GIB) for i in range(4)]
    vms += [vm("s1", "a", datastore="slow", disk=40 * GIB), vm("s2", "b", datastore="fast", disk=10 * GIB)]
    stores = [
        Datastore("fast", TIB, fast_free, frozenset({"a", "b"}), (5.0,) * SAMPLES),
        Datastore("slow", 10 * TIB, 9 * TIB, frozenset({"a"}), (slow_latency,) * SAMPLES),
        Datastore("big", 10 * TIB, big_free, frozenset({"a", "b"}), (5.0,) * SAMPLES),
    ]
    return snapshot(hosts, vms, datastores=stores)


def test_a_full_datastore_sheds_just_enough() -> None:
    s = cluster(fast_free=int(0.12 * TIB))  # 88 % used: 8 % of 1 TiB over the threshold
    p = storage_plan(s)
    assert p.moves and all(m.kind is MoveKind.STORAGE and m.why is Why.SPACE for m in p.moves)
    (m,) = p.moves
    assert m.source == m.target == "a" and m.datastore == "big" and m.from_datastores == ("fast",)
    assert m.vm == "v1"  # the smallest disk that fixes it alone (100 GiB > 82 GiB over)
    assert "datastore fast is full (88% used" in m.reason
    after = apply(s, p)
    fast = next(d for d in after.datastores if d.name == "fast")
    assert fast.used_fraction <= 0.8
    assert next(v for v in after.vms if v.name == "v1").disks[0].datastore == "big"


def test_a_slow_datastore_sheds_its_busiest_vm_once_per_run() -> None:
    s = cluster(fast_free=TIB // 2, slow_latency=40.0)
    busy = replace(s.vms[4], demand=replace(s.vms[4].demand, disk_write=(50e6,) * SAMPLES))
    s = replace(s, vms=(*s.vms[:4], busy, s.vms[5]))
    (m,) = storage_plan(s).moves
    assert (m.vm, m.why, m.datastore) == ("s1", Why.LATENCY, "big")  # fast is the fuller one
    assert "slow (" in m.reason and "p90 latency 40.0 ms" in m.reason


def test_no_target_with_room_is_noted() -> None:
    s = cluster(fast_free=int(0.05 * TIB), big_free=int(2.05 * TIB))
    s = replace(
        s, datastores=tuple(replace(d, free=int(2.05 * TIB)) if d.name == "slow" else d for d in s.datastores)
    )
    p = storage_plan(s)
    after = apply(s, p)
    assert all(d.used_fraction <= 0.8 for d in after.datastores if d.name != "fast")  # none pushed past
    # Only the disks small enough (10 and 50 GiB) fit anywhere under 80 %: the rest stays, and says so.
    assert sorted(m.vm for m in p.moves) == ["s2", "v0"]
    assert any("datastore fast is full" in n and "no disk move is worth it" in n for n in p.notes)


def test_level_one_and_the_switch() -> None:
    s = cluster(fast_free=int(0.12 * TIB))
    assert storage_plan(s, Policy(level=1)).moves == ()
    assert MoveKind.STORAGE not in {m.kind for m in plan(s, Policy(storage_drs=False)).moves}
    assert MoveKind.STORAGE in {m.kind for m in plan(s).moves}


def test_storage_moves_are_worth_their_cost() -> None:
    # Disks that take an hour to copy are not moved for a small excess at level 2.
    s = cluster(fast_free=int(0.19 * TIB))
    p = storage_plan(s, Policy(level=2))
    assert all(m.goodness / m.cost >= 0.2 for m in p.moves)
