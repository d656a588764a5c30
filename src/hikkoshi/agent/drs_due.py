"""Which stored schedules are due now: :class:`ScheduleRecord` read as :mod:`hikkoshi.drs.schedule`'s
``Once`` or ``Window``, asked :func:`hikkoshi.drs.schedule.due`. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hikkoshi.cluster.models import ScheduleRecord
from hikkoshi.drs.schedule import EVERY_DAY, Once, Scheduled, Weekday, When, Window, due

DAYS = {d.name[:3].lower(): d for d in Weekday}


def parse_window(text: str) -> tuple[time, time]:
    """``HH:MM-HH:MM``; ``ValueError`` otherwise (the same start and end too)."""
    start, sep, end = text.partition("-")
    try:
        if not sep:
            raise ValueError
        a, b = time.fromisoformat(start.strip()), time.fromisoformat(end.strip())
    except ValueError:
        raise ValueError(f"--window {text!r}: expected HH:MM-HH:MM") from None
    if a == b:
        raise ValueError(f"--window {text!r}: a window needs a length")
    return a, b


def parse_days(text: str) -> tuple[int, ...]:
    """``mon,tue,...``, ``weekdays``, ``weekends`` or ``all``; ``ValueError`` otherwise."""
    t = text.strip().lower()
    if t in ("all", "every", "daily"):
        return ()
    if t == "weekdays":
        return tuple(range(5))
    if t == "weekends":
        return (5, 6)
    out = []
    for word in t.split(","):
        if word.strip()[:3] not in DAYS:
            raise ValueError(f"--days {text!r}: expected mon,tue,... or weekdays, weekends, all")
        out.append(int(DAYS[word.strip()[:3]]))
    return tuple(sorted(set(out)))


def parse_zone(name: str) -> tzinfo:
    """The IANA time zone ``name`` (``UTC``, ``Asia/Tokyo``); ValueError if there is none such."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--tz {name!r}: no such time zone (an IANA name: UTC, Asia/Tokyo, ...)") from None


def when_of(rec: ScheduleRecord) -> When:
    if rec.window is None:
        return Once(datetime.fromtimestamp(rec.at, UTC))
    start, end = parse_window(rec.window)
    days = frozenset(Weekday(d) for d in rec.days) or EVERY_DAY
    return Window(start, end, days, parse_zone(rec.tz))


def due_now(records: Iterable[ScheduleRecord], now: float) -> list[str]:
    """The ids of the schedules that should start at ``now`` (pending once; recurring whose window is
    open and has not run since it opened)."""
    live = [r for r in records if r.state in ("pending", "recurring")]
    items = [Scheduled(r.id, r.vm, when_of(r), r.to) for r in live]
    last = {r.id: datetime.fromtimestamp(r.last_run, UTC) for r in live if r.last_run is not None}
    return [s.id for s in due(items, datetime.fromtimestamp(now, UTC), last)]
