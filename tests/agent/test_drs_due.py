"""Stored schedules read as the planner's Once and Window: which are due, once per time."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.agent.drs_due import due_now, parse_days, parse_window, parse_zone, when_of
from hikkoshi.cluster.models import ScheduleRecord
from hikkoshi.drs.schedule import Once, Window

MONDAY_0230 = datetime(2026, 12, 7, 2, 30, tzinfo=UTC).timestamp()


def once(at: float, **kw: object) -> ScheduleRecord:
    return ScheduleRecord(id="o", vm="v", to="b", at=at).model_copy(update=kw)


def window(text: str = "02:00-04:00", days: tuple[int, ...] = (), **kw: object) -> ScheduleRecord:
    rec = ScheduleRecord(id="w", vm="v", to="b", window=text, days=days, state="recurring")
    return rec.model_copy(update=kw)


def test_once_is_due_from_its_time_until_it_started() -> None:
    assert due_now([once(100.0)], 99.0) == []
    assert due_now([once(100.0)], 100.0) == ["o"]
    assert due_now([once(100.0)], 5000.0) == ["o"]
    for state in ("started", "done", "failed", "cancelled"):
        assert due_now([once(100.0, state=state)], 5000.0) == []
    assert isinstance(when_of(once(1.0)), Once)


def test_window_is_due_once_per_opening() -> None:
    assert isinstance(when_of(window()), Window)
    assert due_now([window()], MONDAY_0230) == ["w"]
    assert due_now([window()], MONDAY_0230 - 3600) == []  # 01:30
    assert due_now([window(last_run=MONDAY_0230 - 60)], MONDAY_0230) == []  # ran since it opened
    assert due_now([window(last_run=MONDAY_0230 - 86400)], MONDAY_0230) == ["w"]  # yesterday's
    assert due_now([window(days=(1,))], MONDAY_0230) == []  # Tuesdays only
    assert due_now([window(state="cancelled")], MONDAY_0230) == []
    assert due_now([window("23:00-03:00")], MONDAY_0230) == ["w"]  # Sunday's, across midnight


def test_parsing() -> None:
    assert parse_window("02:00-04:30") == (time(2), time(4, 30))
    assert parse_days("weekdays") == (0, 1, 2, 3, 4) and parse_days("sat,sun") == (5, 6)
    assert parse_days("all") == () and parse_days("Monday,fri") == (0, 4)
    for bad in ("2-", "02:00", "02:00-02:00", "x-y"):
        with pytest.raises(ValueError, match="--window"):
            parse_window(bad)
    with pytest.raises(ValueError, match="--days"):
        parse_days("someday")


@given(st.integers(0, 2 * 10**12), st.integers(0, 2 * 10**12))
def test_once_runs_once(at_ms: int, now_ms: int) -> None:
    at, now = at_ms / 1000, now_ms / 1000  # times to the millisecond (datetimes hold microseconds)
    rec = once(at)
    assert due_now([rec], now) == (["o"] if now >= at else [])
    assert due_now([rec.model_copy(update={"state": "started", "last_run": now})], now) == []


def test_a_window_in_a_time_zone() -> None:
    """02:00-04:00 in Tokyo (UTC+9) is open at 17:30 UTC the day before, not at 02:30 UTC."""
    tokyo = window(tz="Asia/Tokyo")
    assert due_now([tokyo], MONDAY_0230) == []
    assert due_now([tokyo], MONDAY_0230 - 9 * 3600) == ["w"]  # Sunday 17:30 UTC = Monday 02:30 in Tokyo
    assert parse_zone("utc") is UTC and parse_zone("Europe/Paris").utcoffset(datetime(2026, 7, 1)) is not None
    for bad in ("Mars/Olympus", "", "../etc/passwd"):
        with pytest.raises(ValueError, match="--tz"):
            parse_zone(bad)
