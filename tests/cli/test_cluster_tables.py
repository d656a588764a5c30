"""The cluster's listings as text: aligned columns, ages, and what a down host shows. Pure."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hikkoshi.cli.cluster_tables import age, host_details, host_table, queue_table, table
from hikkoshi.cluster.views import DatastoreRow, HostRow, QueueRow

GIB = 1 << 30


def row(name: str, state: str = "up") -> HostRow:
    up = state != "down"
    return HostRow(
        name=name,
        state=state,
        site="east",
        api_address=f"http://{name}:8710",
        cpu_model="EPYC",
        memory_total=64 * GIB,
        memory_free=32 * GIB if up else None,
        vms=3 if up else None,
        vms_running=2 if up else None,
        cpu=0.25 if up else None,
        migrations_in=1 if up else None,
        migrations_out=0 if up else None,
        datastores=(DatastoreRow("main", "u", 100 * GIB, 40 * GIB if up else None),),
        maintenance="disks" if state == "maintenance" else None,
        registered_at=0.0,
        updated_at=1.0 if up else None,
    )


def test_host_table_and_details() -> None:
    lines = host_table([row("alpha"), row("b", "down")])
    assert lines == [
        "NAME   STATE  SITE  VMS  MEMORY FREE/TOTAL  LOAD                API",
        "alpha  up     east  2/3  32 GiB/64 GiB      cpu 25% in 1 out 0  http://alpha:8710",
        "b      down   east  -    -/64 GiB           -                   http://b:8710",
    ]
    details = host_details(row("m", "maintenance"))
    assert "state        maintenance (disks)" in details
    assert "datastore    main (u): 40 GiB free of 100 GiB" in details


def test_queue_table() -> None:
    lines = queue_table(
        [QueueRow(1, "m1", "web", ("host-out:a",), ("host-out:a: 1/1 slots held by m0",), 75.0)]
    )
    assert lines[1].split(None, 4) == ["1", "m1", "web", "1m", "host-out:a: 1/1 slots held by m0"]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.text("ab", max_size=6), min_size=3, max_size=3), max_size=5))
def test_columns_line_up(rows: list[list[str]]) -> None:
    lines = table(("A", "BB", "C"), rows)
    assert len(lines) == len(rows) + 1
    start = max(len(r[0]) for r in [["A"], *rows]) + 2  # where the second column starts, in every line
    for line, cells in zip(lines[1:], rows, strict=True):
        assert line[:start].rstrip() == cells[0] and line.ljust(start)[start:].startswith(cells[1])
        assert not line.endswith(" ")


def test_ages() -> None:
    assert [age(s) for s in (0, 59.9, 60, 3599, 3600, 86399, 86400 * 3)] == [
        "0s",
        "59s",
        "1m",
        "59m",
        "1h",
        "23h",
        "3d",
    ]
