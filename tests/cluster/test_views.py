"""The listings' rows: hosts, VMs (owner and state joined), migrations and the queue. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hikkoshi.cluster import views
from hikkoshi.cluster.host_view import HostState, HostView
from hikkoshi.cluster.models import (
    DatastoreInfo,
    HostInfo,
    HostLoad,
    HostStatus,
    JobRecord,
    Maintenance,
    QueueEntry,
    VmRecord,
)
from hikkoshi.migrate.phases import Phase

GIB = 1 << 30


@dataclass(frozen=True)
class Owned:
    vm: VmRecord
    owner: str | None


@dataclass(frozen=True)
class Job:
    record: JobRecord
    coordinator: str | None


@dataclass(frozen=True)
class Place:
    position: int
    entry: QueueEntry
    reasons: tuple[str, ...]


def host(name: str, state: HostState = HostState.UP, vms: dict[str, str] | None = None) -> HostView:
    info = HostInfo(
        name=name,
        api_address=f"http://{name}:8710",
        site="east",
        memory_total=64 * GIB,
        datastores=(DatastoreInfo(name="main", uuid=f"{name}-ds", capacity=100 * GIB),),
        registered_at=1.0,
    )
    status = (
        None
        if state is HostState.DOWN
        else HostStatus(
            memory_free=32 * GIB,
            datastores_free={f"{name}-ds": 40 * GIB},
            load=HostLoad(cpu=0.25, vms=1, migrations_in=1, migrations_out=2),
            vms=vms or {},
            updated_at=5.0,
        )
    )
    maint = Maintenance(reason="disks", since=2.0) if state is HostState.MAINTENANCE else None
    return HostView(info, status, maint, state)


def vm(name: str, uuid: str, datastore: str | None = None) -> VmRecord:
    return VmRecord(uuid=uuid, name=name, memory=GIB, vcpus=2, disk_bytes=GIB, datastore=datastore)


def test_host_rows_up_down_maintenance() -> None:
    rows = views.host_rows(
        [
            host("b", HostState.DOWN),
            host("a", vms={"u1": "running", "u2": "stopped"}),
            host("c", HostState.MAINTENANCE),
        ]
    )
    assert [r.name for r in rows] == ["a", "b", "c"]
    a, b, c = rows
    assert a.state == "up" and a.vms == 2 and a.vms_running == 1 and a.memory_free == 32 * GIB
    assert a.cpu == 0.25 and a.migrations_in == 1 and a.migrations_out == 2
    assert a.datastores == (views.DatastoreRow("main", "a-ds", 100 * GIB, 40 * GIB),)
    assert a.api_address == "http://a:8710" and a.site == "east" and a.maintenance is None
    # A down host keeps what it is, and says nothing of how it is doing.
    assert b.state == "down" and b.memory_total == 64 * GIB
    assert (b.memory_free, b.vms, b.vms_running, b.cpu, b.updated_at) == (None, None, None, None, None)
    assert b.datastores[0].free is None
    assert c.state == "maintenance" and c.maintenance == "disks"


def test_vm_rows_join_owner_and_published_state() -> None:
    hosts = [
        host("a", vms={"u1": "running", "u3": "incoming"}),
        host("b", HostState.DOWN),
        host("c", vms={}),
    ]
    vms = [
        Owned(vm("web", "u1", "a-ds"), "a"),
        Owned(vm("db", "u2"), "b"),  # its owner is down
        Owned(vm("new", "u4", "c-ds"), "c"),  # not published yet
        Owned(vm("orphan", "u5"), None),
        Owned(vm("ghost", "u6", "z-ds"), "gone"),  # an owner that is not registered
    ]
    rows = {r.name: r for r in views.vm_rows(vms, hosts)}
    assert [r.name for r in views.vm_rows(vms, hosts)] == sorted(rows)
    assert rows["web"].state == "running" and rows["web"].host == "a" and rows["web"].datastore == "main"
    assert rows["db"].state == views.UNKNOWN and rows["db"].host == "b" and rows["db"].datastore is None
    assert rows["new"].state == views.UNKNOWN
    assert rows["orphan"].state == views.NO_OWNER and rows["orphan"].host is None
    assert rows["ghost"].state == views.UNKNOWN and rows["ghost"].datastore == "z-ds"
    assert rows["web"].memory == GIB and rows["web"].vcpus == 2 and rows["web"].uuid == "u1"


STATES = st.sampled_from(["running", "stopped", "incoming", "serving", "fenced"])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["h1", "h2", "h3"]),
        st.tuples(st.sampled_from(list(HostState)), st.dictionaries(st.text("uv", min_size=1), STATES)),
    ),
    st.lists(st.tuples(st.text("uv", min_size=1), st.sampled_from(["h1", "h2", "h3", "h4", None]))),
)
def test_a_vm_is_running_only_if_its_up_owner_says_so(
    published: dict[str, tuple[HostState, dict[str, str]]], owned: list[tuple[str, str | None]]
) -> None:
    hosts = [host(n, state, vms) for n, (state, vms) in published.items()]
    vms = [Owned(vm(f"vm-{i}", uuid), owner) for i, (uuid, owner) in enumerate(owned)]
    rows = views.vm_rows(vms, hosts)
    assert len(rows) == len(vms)
    for row in rows:
        if row.host is None:
            assert row.state == views.NO_OWNER
            continue
        entry = published.get(row.host)
        if entry is None or entry[0] is HostState.DOWN:
            assert row.state == views.UNKNOWN
        else:
            assert row.state == entry[1].get(row.uuid, views.UNKNOWN)


def test_migration_rows_and_queue() -> None:
    now = 1000.0
    jobs = [
        Job(JobRecord(id="m2", vm="u1", source="a", destination="b", created_at=990.0), "a"),
        Job(
            JobRecord(
                id="m1",
                vm="u9",
                source="b",
                destination="a",
                phase=Phase.ROLLED_BACK,
                created_at=900.0,
                error="boom",
            ),
            None,
        ),
        Job(JobRecord(id="m3", vm="u1", source="a", destination="c", created_at=995.0), "a"),
    ]
    names = {"u1": "web"}
    rows = views.migration_rows(jobs, names, now, queued=["m3"])
    assert [r.id for r in rows] == ["m1", "m2", "m3"]  # oldest first
    m1, m2, m3 = rows
    assert m1.vm == "u9" and m1.phase == "rolled-back" and m1.coordinator is None and m1.error == "boom"
    assert m2.vm == "web" and m2.phase == "precheck" and m2.coordinator == "a" and m2.age == 10.0
    assert m3.phase == views.QUEUED
    places = [
        Place(1, QueueEntry(job="m4", resources=("cluster",), since=999.0), ("cluster: m3 queued ahead",)),
        Place(0, QueueEntry(job="m3", resources=("host-out:a",), since=996.0), ("host-out:a: 1/1",)),
    ]
    queue = views.queue_rows(places, jobs, names, now)
    assert [(q.place, q.job, q.vm) for q in queue] == [(1, "m3", "web"), (2, "m4", None)]
    assert queue[0].reasons == ("host-out:a: 1/1",) and queue[0].waited == 4.0
    assert views.vm_names(
        [Owned(vm("web", "u1"), "a")],
    ) == {"u1": "web"}
