"""Migrations that ran, as the prediction learns from them. Pure, stdlib only.

A prediction's fixed costs (:class:`~hikkoshi.migrate.predict.Calibration`: the set-up, the
destination's start, the switchover beyond the last memory, the clean-up) depend on the hosts, the
agents and the storage mode far more than on the guest; the defaults are a laboratory's. So every
migration that completes leaves what was known before it (its :class:`Migration`, as JSON) beside what
its report measured, and the next prediction calibrates on the recent ones: those of its own storage
mode when there are enough, else all of them, else the defaults.

``migration_json`` and ``migration_of`` are each other's inverse; ``observed_of`` reads a report and
``calibration_for`` picks the runs and fits them (:func:`~hikkoshi.migrate.predict.calibrate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hikkoshi.migrate.convergence import build_schedule
from hikkoshi.migrate.predict import (
    DEFAULT_CALIBRATION,
    Calibration,
    Disk,
    Link,
    Migration,
    Mode,
    Observed,
    calibrate,
)

#: Runs of one mode needed before a calibration rests on that mode alone (else on every mode's).
MINIMUM_RUNS = 3
#: The most recent runs a calibration uses: the hosts and their software change, old runs mislead.
RECENT_RUNS = 20


def migration_json(m: Migration, max_downtime_ms: int, allow_postcopy: bool = False) -> dict[str, Any]:
    """``m`` as JSON (its schedule by what builds it: the downtime limit and whether post-copy RAM is
    allowed)."""
    return {
        "memory_bytes": m.memory_bytes,
        "dirty_rate": m.dirty_rate,
        "link": {"bandwidth": m.link.bandwidth, "rtt_ms": m.link.rtt_ms},
        "mode": m.mode.value,
        "disks": [[d.size, d.allocated] for d in m.disks],
        "disk_write_rate": m.disk_write_rate,
        "max_downtime_ms": max_downtime_ms,
        "allow_postcopy": allow_postcopy,
        "resident_bytes": m.resident_bytes,
    }


def migration_of(data: Mapping[str, Any]) -> Migration:
    """The :class:`Migration` ``data`` describes; ValueError if it does not describe one."""
    try:
        link = data["link"]
        resident = data.get("resident_bytes")
        return Migration(
            memory_bytes=int(data["memory_bytes"]),
            dirty_rate=float(data["dirty_rate"]),
            link=Link(float(link["bandwidth"]), float(link["rtt_ms"])),
            mode=Mode(data["mode"]),
            disks=tuple(Disk(int(size), int(allocated)) for size, allocated in data.get("disks") or ()),
            disk_write_rate=float(data.get("disk_write_rate") or 0.0),
            schedule=build_schedule(
                int(data["max_downtime_ms"]), allow_postcopy=bool(data.get("allow_postcopy"))
            ),
            resident_bytes=None if resident is None else int(resident),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a migration's inputs: {exc}") from None


def _ms(value: object) -> float | None:
    return float(value) * 1000 if isinstance(value, int | float) and value >= 0 else None


def observed_of(inputs: Mapping[str, Any], report: Mapping[str, Any]) -> Observed | None:
    """What a completed migration's ``report`` measured, beside the ``inputs`` its prediction had;
    ``None`` when the report lacks the figures (QEMU's downtime, the times to the destination and to
    the end) or the inputs do not parse."""
    try:
        migration = migration_of(inputs)
    except ValueError:
        return None
    total = _ms(report.get("elapsed_s"))
    to_destination = _ms(report.get("time_to_destination_s"))
    downtime = (report.get("migrate_info") or {}).get("downtime")
    if total is None or to_destination is None or not isinstance(downtime, int | float):
        return None
    phases = report.get("phases_s") or {}
    return Observed(
        migration=migration,
        total_time_ms=total,
        downtime_ms=float(downtime),
        time_to_destination_ms=to_destination,
        stream_start_ms=_ms(report.get("memory_started")),
        destination_start_ms=_ms(phases.get("prepare-destination")),
    )


def calibration_for(
    runs: Sequence[Observed], mode: Mode, base: Calibration = DEFAULT_CALIBRATION
) -> tuple[Calibration, int]:
    """The calibration for a migration in ``mode`` from ``runs`` (oldest first), and how many runs it
    rests on (0: ``base``, nothing ran yet)."""
    same = [o for o in runs if o.migration.mode is mode][-RECENT_RUNS:]
    chosen = same if len(same) >= MINIMUM_RUNS else list(runs[-RECENT_RUNS:])
    if not chosen:
        return base, 0
    return calibrate(chosen, base), len(chosen)
