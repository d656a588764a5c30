"""Scheduled migrations, the pure part: when one is due, when it next comes round.

A migration runs once at a given time (:class:`Once`), or in a recurring window (:class:`Window`: daily
02:00-04:00, weekdays only, ...; a window may cross midnight, and belongs to the day it starts). Times
are aware datetimes; a window is read in its own time zone's wall clock (so 02:00 stays 02:00 across a
change of daylight saving time). The service asks :func:`due` at every tick with what it last ran; the
same answer comes for the same question.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo


class Weekday(enum.IntEnum):
    MONDAY = 0
    TUESDAY = 1
    WEDNESDAY = 2
    THURSDAY = 3
    FRIDAY = 4
    SATURDAY = 5
    SUNDAY = 6


EVERY_DAY = frozenset(Weekday)
WEEKDAYS = frozenset(d for d in Weekday if d <= Weekday.FRIDAY)
WEEKENDS = EVERY_DAY - WEEKDAYS


@dataclass(frozen=True)
class Once:
    """At ``at`` (or as soon after as the service looks), once."""

    at: datetime

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ValueError("a scheduled time needs a time zone")


@dataclass(frozen=True)
class Window:
    """Every ``days`` from ``start`` to ``end`` (wall clock in ``tz``); ``end`` <= ``start``: the next day."""

    start: time
    end: time
    days: frozenset[Weekday] = EVERY_DAY
    """The days a window starts on."""
    tz: tzinfo = UTC

    def __post_init__(self) -> None:
        if not self.days:
            raise ValueError("a window needs at least one day")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("window times are wall-clock times: the zone is the window's tz")

    def on(self, day: date) -> tuple[datetime, datetime]:
        """The occurrence starting on ``day`` (whether or not it is one of ``days``)."""
        start = datetime.combine(day, self.start, tzinfo=self.tz)
        end_day = day if self.end > self.start else day + timedelta(days=1)
        return start, datetime.combine(end_day, self.end, tzinfo=self.tz)


When = Once | Window


@dataclass(frozen=True)
class Scheduled:
    """A migration somebody asked for at a time or in a window."""

    id: str
    vm: str
    when: When
    host: str | None = None
    """Where it goes (``None``: the placement decides when it is due)."""
    datastore: str | None = None


def occurrence(when: When, at: datetime) -> tuple[datetime, datetime] | None:
    """The occurrence ``at`` falls in, or ``None``. A :class:`Once` lasts from its time on."""
    _aware(at)
    if isinstance(when, Once):
        return (when.at, datetime.max.replace(tzinfo=UTC)) if at >= when.at else None
    local = at.astimezone(when.tz).date()
    for day in (local - timedelta(days=1), local):  # yesterday's window may run past midnight
        start, end = when.on(day)
        if Weekday(day.weekday()) in when.days and start <= at < end:
            return start, end
    return None


def next_occurrence(when: When, after: datetime) -> tuple[datetime, datetime] | None:
    """The first occurrence starting after ``after`` (``None``: a :class:`Once` already past)."""
    _aware(after)
    if isinstance(when, Once):
        return (when.at, when.at) if when.at > after else None
    local = after.astimezone(when.tz).date()
    for k in range(8):
        day = local + timedelta(days=k)
        start, end = when.on(day)
        if Weekday(day.weekday()) in when.days and start > after:
            return start, end
    raise AssertionError("a week always holds one of the window's days")


def due(items: Iterable[Scheduled], now: datetime, last_run: Mapping[str, datetime]) -> list[Scheduled]:
    """What should start ``now``, by id: a :class:`Once` whose time has come and that never ran; a
    :class:`Window` that is open and has not run since it opened."""
    out = []
    for item in items:
        span = occurrence(item.when, now)
        if span is None:
            continue
        ran = last_run.get(item.id)
        if ran is None or (isinstance(item.when, Window) and ran < span[0]):
            out.append(item)
    return sorted(out, key=lambda s: s.id)


def _aware(t: datetime) -> None:
    if t.tzinfo is None:
        raise ValueError("times must carry a time zone")
