"""Scheduled migrations: due now, next occurrence; windows across midnight, weekdays, time zones."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hikkoshi.drs.schedule import (
    WEEKDAYS,
    Once,
    Scheduled,
    Weekday,
    Window,
    due,
    next_occurrence,
    occurrence,
)

JST = timezone(timedelta(hours=9))
NIGHTLY = Window(time(2), time(4))


def at(day: int, hour: int, minute: int = 0, tz: timezone = UTC) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=tz)  # 2026-12-07 is a Monday


def test_a_daily_window() -> None:
    assert occurrence(NIGHTLY, at(7, 3)) == (at(7, 2), at(7, 4))
    assert occurrence(NIGHTLY, at(7, 4)) is None
    assert next_occurrence(NIGHTLY, at(7, 3)) == (at(8, 2), at(8, 4))
    assert next_occurrence(NIGHTLY, at(7, 1)) == (at(7, 2), at(7, 4))


def test_weekdays_and_midnight() -> None:
    late = Window(time(22), time(1), days=WEEKDAYS)
    assert occurrence(late, at(12, 0, 30)) == (at(11, 22), at(12, 1))  # Friday's window, on Saturday
    assert occurrence(late, at(12, 23)) is None  # Saturday's does not exist
    assert next_occurrence(late, at(12, 23)) == (at(14, 22), at(15, 1))  # Monday
    assert Weekday(at(14, 0).weekday()) is Weekday.MONDAY


def test_a_window_in_its_own_time_zone() -> None:
    tokyo = Window(time(2), time(4), tz=JST)
    assert occurrence(tokyo, at(7, 18)) == (at(8, 2, tz=JST), at(8, 4, tz=JST))  # 03:00 JST on the 8th
    assert occurrence(tokyo, at(7, 3)) is None


def test_due_once_and_in_windows() -> None:
    items = [
        Scheduled("once", "web", Once(at(7, 12)), host="b"),
        Scheduled("nightly", "db", NIGHTLY),
    ]
    assert due(items, at(7, 11), {}) == []
    assert [s.id for s in due(items, at(7, 12), {})] == ["once"]
    assert [s.id for s in due(items, at(8, 3), {})] == ["nightly", "once"]
    assert [s.id for s in due(items, at(8, 3), {"once": at(7, 12), "nightly": at(8, 2, 30)})] == []
    assert [s.id for s in due(items, at(9, 3), {"once": at(7, 12), "nightly": at(8, 2, 30)})] == ["nightly"]


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        Once(datetime(2026, 12, 7))
    with pytest.raises(ValueError):
        occurrence(NIGHTLY, datetime(2026, 12, 7))
    with pytest.raises(ValueError):
        Window(time(2), time(4), days=frozenset())


windows = st.builds(
    Window,
    st.times(),
    st.times(),
    st.frozensets(st.sampled_from(list(Weekday)), min_size=1),
    st.sampled_from([UTC, JST, timezone(timedelta(hours=-5))]),
)
moments = st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC))


@given(windows, moments)
def test_occurrences_are_consistent(w: Window, now: datetime) -> None:
    nxt = next_occurrence(w, now)
    assert nxt is not None
    start, end = nxt
    assert now < start < end <= start + timedelta(days=1)
    assert start - now <= timedelta(days=8)
    assert occurrence(w, start) == (start, end)
    inside = occurrence(w, now)
    if inside is not None:
        assert inside[0] <= now < inside[1]
    # Nothing starts between now and the next occurrence.
    assert next_occurrence(w, start - timedelta(microseconds=1)) == nxt
