"""When schedules fire, across weekdays and daylight-saving changes (no waiting)."""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from core.lifecycle.calendar import Weekly, days_text, parse_days_text

BERLIN = ZoneInfo("Europe/Berlin")


def local(moment: datetime) -> str:
    return moment.astimezone(BERLIN).strftime("%a %Y-%m-%d %H:%M %Z")


def test_daily_across_spring_forward() -> None:
    weekly = Weekly(days=tuple(range(7)), at=time(2, 30), tz=BERLIN)
    first = weekly.next_after(datetime(2026, 3, 28, 12, tzinfo=UTC))
    # 02:30 does not exist on 29 March 2026: it fires an hour later, once
    assert local(first) == "Sun 2026-03-29 03:30 CEST"
    assert local(weekly.next_after(first)) == "Mon 2026-03-30 02:30 CEST"
    morning = Weekly(days=tuple(range(7)), at=time(3, 0), tz=BERLIN)
    assert local(morning.next_after(datetime(2026, 3, 28, 12, tzinfo=UTC))) == (
        "Sun 2026-03-29 03:00 CEST"
    )


def test_daily_across_fall_back_fires_once() -> None:
    weekly = Weekly(days=tuple(range(7)), at=time(2, 30), tz=BERLIN)
    first = weekly.next_after(datetime(2026, 10, 24, 12, tzinfo=UTC))
    assert local(first) == "Sun 2026-10-25 02:30 CEST"  # the first of the two 02:30s
    second = weekly.next_after(first)
    assert local(second) == "Mon 2026-10-26 02:30 CET"
    assert (second - first).total_seconds() == 25 * 3600


def test_weekdays_only() -> None:
    weekly = Weekly(days=tuple(range(5)), at=time(22, 0), tz=BERLIN)
    friday_night = datetime(2026, 11, 27, 21, 30, tzinfo=UTC)  # Fri 22:30 Berlin
    assert local(weekly.next_after(friday_night)) == "Mon 2026-11-30 22:00 CET"
    assert local(weekly.previous_at_or_before(friday_night)) == "Fri 2026-11-27 22:00 CET"


def test_days_text_round_trips() -> None:
    for days in [tuple(range(7)), tuple(range(5)), (0, 2, 4), (5, 6), (3,)]:
        assert parse_days_text(days_text(days)) == days
    assert days_text((0, 2, 4)) == "mon,wed,fri"


@given(
    st.datetimes(
        min_value=datetime(2025, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
    ),
    st.sets(st.integers(0, 6), min_size=1),
    st.times(),
)
def test_next_is_after_and_on_a_chosen_day(moment: datetime, days: set[int], at: time) -> None:
    weekly = Weekly(days=tuple(sorted(days)), at=at.replace(microsecond=0), tz=BERLIN)
    nxt = weekly.next_after(moment)
    assert nxt > moment
    assert (nxt - moment).days <= 7
    assert nxt.astimezone(BERLIN).weekday() in days
