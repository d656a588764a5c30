"""The cluster's listings as text for people: aligned tables of the rows of
:mod:`hikkoshi.cluster.views`. Pure (``--json`` prints the rows themselves)."""

from __future__ import annotations

from collections.abc import Sequence

from hikkoshi.cluster.limit_settings import ResourceRow
from hikkoshi.cluster.views import HostRow, MigrationRow, QueueRow, VmRow
from hikkoshi.vm.spec import format_size

NONE = "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell (the last one is not padded)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    out = []
    for row in (headers, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        out.append("  ".join([*cells, str(row[-1])]).rstrip())
    return out


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _size(n: int | None) -> str:
    return NONE if n is None else format_size(n)


def _load(r: HostRow) -> str:
    if r.cpu is None:
        return NONE
    return f"cpu {100 * r.cpu:.0f}% in {r.migrations_in} out {r.migrations_out}"


def host_table(rows: Sequence[HostRow]) -> list[str]:
    """``host list``."""
    return table(
        ("NAME", "STATE", "SITE", "VMS", "MEMORY FREE/TOTAL", "LOAD", "API"),
        [
            (
                r.name,
                r.state,
                r.site,
                NONE if r.vms_running is None else f"{r.vms_running}/{r.vms}",
                f"{_size(r.memory_free)}/{_size(r.memory_total)}",
                _load(r),
                r.api_address,
            )
            for r in rows
        ],
    )


def host_details(r: HostRow) -> list[str]:
    """``host show``."""
    lines = [
        f"host         {r.name}",
        f"state        {r.state}" + (f" ({r.maintenance})" if r.maintenance else ""),
        f"site         {r.site}",
        f"API          {r.api_address}",
        f"CPU          {r.cpu_model or NONE}",
        f"memory       {_size(r.memory_free)} free of {_size(r.memory_total)}",
        f"VMs          {NONE if r.vms is None else f'{r.vms_running} running of {r.vms}'}",
        f"load         {_load(r)}",
    ]
    for d in r.datastores:
        lines.append(f"datastore    {d.name} ({d.uuid}): {_size(d.free)} free of {_size(d.capacity)}")
    return lines


def vm_table(rows: Sequence[VmRow]) -> list[str]:
    """``vm list``."""
    return table(
        ("NAME", "HOST", "STATE", "MEMORY", "VCPUS", "UUID"),
        [(r.name, r.host or NONE, r.state, format_size(r.memory), str(r.vcpus), r.uuid) for r in rows],
    )


def migration_table(rows: Sequence[MigrationRow]) -> list[str]:
    """``migrations``: the recorded migrations."""
    return table(
        ("ID", "VM", "SOURCE", "DESTINATION", "PHASE", "COORDINATOR", "AGE", "ERROR"),
        [
            (
                r.id,
                r.vm,
                r.source,
                r.destination,
                r.phase,
                r.coordinator or "none",
                age(r.age),
                r.error or "",
            )
            for r in rows
        ],
    )


def queue_table(rows: Sequence[QueueRow]) -> list[str]:
    """``migrations`` and ``limits show``: who waits, in which order, and why."""
    return table(
        ("PLACE", "MIGRATION", "VM", "WAITED", "REASONS"),
        [(str(q.place), q.job, q.vm or NONE, age(q.waited), "; ".join(q.reasons)) for q in rows],
    )


def resource_table(rows: Sequence[ResourceRow]) -> list[str]:
    """``limits show``: the resources in use or waited for, their limits and holders."""
    return table(
        ("RESOURCE", "HELD", "LIMIT", "HOLDERS"),
        [
            (
                r.resource,
                str(len(r.holders)),
                f"{r.limit}{' (set)' if r.overridden else ''}",
                ", ".join(r.holders) or NONE,
            )
            for r in rows
        ],
    )
