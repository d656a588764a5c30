"""DRS as text for a terminal: plans, moves as they are carried out, rules, schedules, the automatic
planner's runs. Pure."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from hikkoshi.cluster.models import DrsRunRecord, RuleRecord, ScheduleRecord
from hikkoshi.drs.plan import Move, Plan


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    out = []
    for r in (header, *rows):
        out.append(
            "  ".join([*(str(c).ljust(w) for c, w in zip(r, widths, strict=False)), str(r[-1])]).rstrip()
        )
    return out


def _predicted(m: Move) -> str:
    p = m.predicted
    if p is None:
        return "-"
    return f"{p.total_time_ms / 1000:.1f}s/{p.downtime_ms:.0f}ms/{p.bytes / 2**20:.0f}MiB"


def plan_lines(plan: Plan) -> list[str]:
    """A plan: its moves (VM, from, to, why, predicted time/downtime/bytes, reason), then its notes."""
    head = f"DRS plan at level {plan.level}: imbalance {plan.imbalance_before:.3f}"
    if plan.moves:
        head += f" -> {plan.imbalance_after:.3f} after {len(plan.moves)} move(s)"
    lines = [head]
    if plan.moves:
        rows = [(m.vm, m.source, m.target, m.why.value, _predicted(m), m.reason) for m in plan.moves]
        lines += _table(("VM", "FROM", "TO", "WHY", "PREDICTED", "REASON"), rows)
    else:
        lines.append("no moves")
    lines += [f"note: {n}" for n in plan.notes]
    return lines


def move_line(
    index: int, total: int, vm: str, source: str, target: str, phase: str, error: str | None
) -> str:
    """``[2/5] web: alpha -> beta: memory-precopy`` (and the error once it failed)."""
    line = f"[{index}/{total}] {vm}: {source} -> {target}: {phase}"
    return f"{line} ({error})" if error else line


def rule_lines(rules: Sequence[RuleRecord]) -> list[str]:
    if not rules:
        return ["no rules"]
    rows = [(r.name, r.strength, r.kind, ",".join(r.vms), ",".join(r.hosts) or "-") for r in rules]
    return _table(("NAME", "STRENGTH", "KIND", "VMS", "HOSTS"), rows)


def when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def schedule_lines(schedules: Sequence[ScheduleRecord], now: float | None = None) -> list[str]:
    if not schedules:
        return ["no scheduled migrations"]
    t = time.time() if now is None else now
    rows = []
    for s in schedules:
        due = f"in {s.at - t:.0f}s" if s.state == "pending" and s.at > t else ""
        detail = s.error or (f"migration {s.migration} on {s.runner}" if s.migration else due)
        if s.window is not None and s.outcome:
            detail = f"last run {s.outcome}" + (f": {detail}" if detail else "")
        days = (
            ""
            if not s.days
            else " " + ",".join(("mon", "tue", "wed", "thu", "fri", "sat", "sun")[d] for d in s.days)
        )
        at = f"window {s.window} {s.tz}{days}" if s.window is not None else when(s.at)
        to = f"{s.to}:{s.datastore}" if s.kind == "storage" else s.to
        rows.append((s.id, s.vm, to, at, s.state, detail or "-"))
    return _table(("ID", "VM", "TO", "AT", "STATE", "DETAIL"), rows)


def history_lines(runs: Sequence[DrsRunRecord]) -> list[str]:
    """The automatic planner's runs, oldest first: when, who, the imbalance, each move and its schedule."""
    if not runs:
        return ["no automatic DRS runs recorded"]
    lines = []
    for r in runs:
        head = f"{when(r.at)}  {r.leader}  level {r.level}: imbalance {r.imbalance_before:.3f}"
        head += f" (tolerance {r.threshold:.3f})"
        head += f" -> {r.imbalance_after:.3f}, {len(r.moves)} move(s)" if r.moves else ", no moves"
        lines.append(head)
        for m in r.moves:
            how = f"schedule {m.schedule}" if m.schedule else f"not run: {m.note}"
            lines.append(f"  {m.vm}: {m.source} -> {m.target} ({m.kind}, {m.why}; {how}): {m.reason}")
        lines += [f"  note: {n}" for n in r.notes]
    return lines


def parse_time(text: str, now: float) -> float:
    """``TIME`` of ``schedule add``: ``+30s``/``+5m``/``+2h``, a Unix time, or ISO 8601 (UTC unless it
    says otherwise). ``ValueError`` otherwise."""
    t = text.strip()
    if t.startswith("+") and len(t) > 2 and t[-1] in "smh" and t[1:-1].replace(".", "", 1).isdigit():
        return now + float(t[1:-1]) * {"s": 1, "m": 60, "h": 3600}[t[-1]]
    if t.replace(".", "", 1).isdigit():
        return float(t)
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"--at {text!r}: expected +30s, +5m, +2h, a Unix time or an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
