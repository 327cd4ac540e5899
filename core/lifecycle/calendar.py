"""When schedules fire: weekdays and a wall-clock time in the configured zone.

Pure functions of "now", so they are tested across daylight-saving changes without
waiting. A wall time that does not exist on a day (the clocks jump forward over it)
fires as much later as the jump (02:30 becomes 03:30 summer time); a wall time that
occurs twice (the clocks go back) fires once, at its first occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def days_text(days: tuple[int, ...]) -> str:
    if days == tuple(range(7)):
        return "daily"
    if days == tuple(range(5)):
        return "mon-fri"
    return ",".join(DAY_NAMES[d] for d in days)


def parse_days_text(text: str) -> tuple[int, ...]:
    """The inverse of ``days_text`` (for values read back from the store)."""
    if text == "daily":
        return tuple(range(7))
    if text == "mon-fri":
        return tuple(range(5))
    return tuple(sorted(DAY_NAMES.index(p) for p in text.split(",")))


def time_text(at: time) -> str:
    return at.strftime("%H:%M:%S" if at.second else "%H:%M")


def parse_time_text(text: str) -> time:
    hour, minute, *rest = (int(p) for p in text.split(":"))
    return time(hour, minute, rest[0] if rest else 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Weekly:
    """Fires on ``days`` (0 = Monday) at wall time ``at`` in ``tz``."""

    days: tuple[int, ...]
    at: time
    tz: ZoneInfo

    def on(self, day: date) -> datetime:
        """The instant (UTC) this schedule names on ``day`` (DST-corrected)."""
        wall = datetime.combine(day, self.at).replace(tzinfo=self.tz, fold=0)
        return wall.astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after ``moment``."""
        local_day = moment.astimezone(self.tz).date()
        for offset in range(0, 8):
            day = local_day + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            instant = self.on(day)
            if instant > moment:
                return instant
        raise ValueError("a weekly schedule with no days never fires")

    def previous_at_or_before(self, moment: datetime) -> datetime | None:
        local_day = moment.astimezone(self.tz).date()
        for offset in range(0, 8):
            day = local_day - timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            instant = self.on(day)
            if instant <= moment:
                return instant
        return None
