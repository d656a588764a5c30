"""A migration's timeline for the page: its phases as a bar, chart rows from its samples, its memory
rounds, the downtime, and predicted vs actual figures. Pure.

Times are seconds since the migration started (its first phase). The samples' own clock starts with
the agent's job, within milliseconds of that; a job taken over after a restart starts its clock again,
which the charts show as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_MIB = float(1 << 20)
_PAGE = 4096

#: The columns of a chart row, in order (``t`` first); the page's charts pick theirs by name.
COLUMNS = (
    "t",
    "memory_mib",
    "dirty_mib_s",
    "cache_pct",
    "demand_mib",
    "background_mib",
    "latency_source_ms",
    "latency_destination_ms",
)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def chart_row(sample: Mapping[str, Any]) -> list[float | None]:
    """One sample as a row of :data:`COLUMNS` (``None`` where the sample has no such figure)."""
    done, total = _num(sample.get("disk_done")), _num(sample.get("disk_total"))
    memory, dirty = _num(sample.get("memory_done")), _num(sample.get("dirty_pages_rate"))
    demand, background = _num(sample.get("disk_demand")), _num(sample.get("disk_background"))
    latency, at = _num(sample.get("io_latency_ms")), sample.get("io_at")
    return [
        _num(sample.get("t")) or 0.0,
        None if memory is None else round(memory / _MIB, 3),
        None if dirty is None else round(dirty * _PAGE / _MIB, 3),
        None if done is None or not total else round(100.0 * done / total, 2),
        None if demand is None else round(demand / _MIB, 3),
        None if background is None else round(background / _MIB, 3),
        latency if at == "source" else None,
        latency if at == "destination" else None,
    ]


def phase_spans(record: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
    """The record's phases as spans ``{phase, start, end, seconds}`` (seconds since the start; the
    current phase ends ``now``, wall clock)."""
    phases = record.get("phases") or []
    if not phases:
        return []
    t0 = float(phases[0]["started"])
    spans = []
    for p in phases:
        start = float(p["started"]) - t0
        seconds = p.get("seconds")
        end = start + float(seconds) if seconds is not None else max(now - t0, start)
        spans.append({"phase": p["phase"], "start": round(start, 3), "end": round(end, 3)})
    return spans


def downtime(record: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any] | None:
    """When the guest was stopped: the report's switchover (once the migration ended), else the
    switchover phase as recorded (``{start, end, ms, exact}``)."""
    switchover = report.get("switchover") or {}
    stopped, gap = _num(switchover.get("stopped_at")), _num(switchover.get("gap_ms"))
    qemu = _num(report.get("downtime_ms"))
    if stopped is not None and (gap is not None or qemu is not None):
        ms = gap if gap is not None else qemu
        assert ms is not None
        return {
            "start": stopped,
            "end": round(stopped + ms / 1000, 4),
            "ms": ms,
            "qemu_ms": qemu,
            "exact": True,
        }
    for span in phase_spans(record, 0.0):
        if span["phase"] == "switchover" and span["end"] > span["start"]:
            ms = round((span["end"] - span["start"]) * 1000, 1)
            return {"start": span["start"], "end": span["end"], "ms": ms, "qemu_ms": qemu, "exact": False}
    return None


def memory_rounds(samples: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The pre-copy passes seen in the samples: ``{round, bytes, dirty_mib_s, remaining, start, end}``.

    QEMU's dirty-sync count is 1 during the first pass and goes up by one at the end of each: pass
    ``n`` is the samples at count ``n``. Its bytes are what was sent from the pass before's last
    sample to its own last one; its dirty rate is the mean of what QEMU measured meanwhile."""
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for s in samples:
        it, done = s.get("iteration"), _num(s.get("memory_done"))
        if isinstance(it, int) and done is not None:
            by_round.setdefault(it, []).append(s)
    rounds, sent_before = [], 0.0
    for it in sorted(by_round):
        points = by_round[it]
        last = points[-1]
        done = _num(last.get("memory_done")) or 0.0
        rates = [r for r in (_num(p.get("dirty_pages_rate")) for p in points) if r is not None]
        rounds.append(
            {
                "round": it,
                "bytes": int(done - sent_before),
                "dirty_mib_s": round(sum(rates) / len(rates) * _PAGE / _MIB, 2) if rates else None,
                "remaining": last.get("memory_remaining"),
                "start": _num(points[0].get("t")),
                "end": _num(last.get("t")),
            }
        )
        sent_before = done
    return rounds


def disk_split(samples: Sequence[Mapping[str, Any]], report: Mapping[str, Any]) -> dict[str, int] | None:
    """Disk bytes the destination fetched because the guest read them vs copied in the background:
    the report's figures once it ended, else the latest sample's."""
    fetched = report.get("disk_fetch") or {}
    if fetched:
        return {
            "demand": sum(int(f.get("demand_bytes", 0)) for f in fetched.values()),
            "background": sum(int(f.get("background_bytes", 0)) for f in fetched.values()),
        }
    # Both only grow: the most seen (a relocation that completed leaves nothing to ask later).
    demand = [v for v in (_num(s.get("disk_demand")) for s in samples) if v is not None]
    background = [v for v in (_num(s.get("disk_background")) for s in samples) if v is not None]
    if not demand and not background:
        return None
    return {"demand": int(max(demand, default=0.0)), "background": int(max(background, default=0.0))}


def predicted_vs_actual(
    predicted: Mapping[str, Any] | None, report: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Rows ``{label, unit, predicted, actual}`` comparing a prediction (``Prediction.to_json()``:
    the report's ``predicted``, or the dashboard's own) with the report; empty without a prediction."""
    if not predicted:
        return []
    elapsed, to_dest = _num(report.get("elapsed_s")), _num(report.get("time_to_destination_s"))
    memory = _num(report.get("memory_bytes"))
    # QEMU's dirty-sync count at the end is the passes before the switchover plus the final sync.
    syncs = _num(report.get("memory_iterations"))
    passes = None if syncs is None else max(syncs - 1, 0.0)
    split = disk_split([], report)
    disk = None if split is None else float(split["demand"] + split["background"])
    rows = [
        ("total time", "s", _num(predicted.get("total_time_ms")), elapsed, 1000.0),
        ("on the destination after", "s", _num(predicted.get("time_to_destination_ms")), to_dest, 1000.0),
        ("downtime", "ms", _num(predicted.get("downtime_ms")), _num(report.get("downtime_ms")), 1.0),
        ("memory sent", "MiB", _num(predicted.get("memory_bytes")), memory, _MIB),
        ("disk moved", "MiB", _num(predicted.get("disk_bytes")), disk, _MIB),
        ("memory passes", "", _num(predicted.get("rounds")), passes, 1.0),
    ]
    out = []
    for label, unit, p, a, scale in rows:
        if p is None:
            continue
        actual = a if a is None or unit in ("s", "") else a / scale
        out.append(
            {
                "label": label,
                "unit": unit,
                "predicted": round(p / scale, 2) if unit else int(p),
                "actual": None if actual is None else round(actual, 2) if unit else int(actual),
            }
        )
    return out
