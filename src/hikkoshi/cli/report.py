"""A migration's report for people: what happened, phase by phase, with figures (``migrate``,
``storage-migrate``, ``migrations show``; on a host or through an agent)."""

from __future__ import annotations

from typing import Any

from hikkoshi.migrate.record import MigrationRecord


def human_report(record: MigrationRecord) -> str:
    """The report for people."""
    r = record.report
    how = f"storage {record.storage.value}" if record.kind == "live" else record.kind
    lines = [f"migration {record.id}: VM {record.vm}, {how}: {record.phase.value}"]
    if record.error:
        lines.append(f"  error: {record.error}")

    def add(label: str, value: Any, unit: str = "") -> None:
        if value is not None:
            lines.append(f"  {label:<28} {value}{unit}")

    if "encrypted" in r and record.kind != "storage":
        add(
            "streams between the hosts",
            "encrypted (TLS, host certificates)" if r["encrypted"] else "NOT encrypted (plain TCP)",
        )
    add("downtime (QEMU)", r.get("downtime_ms"), " ms")
    sw = r.get("switchover") or {}
    add("guest gap (stop -> resumed)", sw.get("gap_ms"), " ms")
    add("storage at switchover", sw.get("storage_ms"), " ms")
    add("on the destination after", r.get("time_to_destination_s"), " s")
    add("source released after", r.get("source_released_s"), " s")
    mem = r.get("memory_bytes")
    add("memory sent", f"{mem / 2**20:.1f} MiB" if mem else None)
    add("memory iterations", r.get("memory_iterations"))
    add("dirty rate before", r.get("dirty_rate_mib_s"), " MiB/s")
    for disk, f in (r.get("disk_fetch") or {}).items():
        add(
            f"disk {disk}",
            f"{f['demand_bytes'] / 2**20:.1f} MiB on demand, "
            f"{f['background_bytes'] / 2**20:.1f} MiB background",
        )
    for disk, d in (r.get("disks") or {}).items():
        passes = len(d["passes"])
        add(
            f"disk {disk} moved",
            f"{d['copied_bytes'] / 2**20:.1f} MiB copied, {d['zero_bytes'] / 2**20:.1f} MiB holes, "
            f"{passes} pass{'es' * (passes != 1)}, writes held {d['hold_ms']} ms",
        )
    for disk, s in (sw.get("storage") or {}).items():
        add(f"disk {disk} invalidated", f"{s['dropped_bytes'] / 2**20:.2f} MiB")
    for a in r.get("actions") or []:
        add("convergence", f"{a['action']} {a['value'] or ''} ({a['reason']})")
    for phase, seconds in (r.get("phases_s") or {}).items():
        add(f"phase {phase}", seconds, " s")
    return "\n".join(lines)
