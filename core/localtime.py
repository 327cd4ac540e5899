"""Wall-clock times in the configured time zone, correct across daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from core.errors import TgopsError


class NonexistentTimeError(TgopsError):
    def __init__(self, when: datetime, tz: ZoneInfo) -> None:
        super().__init__(
            f"{when:%Y-%m-%d %H:%M} does not exist in {tz.key} (the clocks skip it for "
            "daylight saving); choose a time outside the gap"
        )


def to_utc(local: datetime, tz: ZoneInfo) -> datetime:
    """A naive wall-clock time in ``tz`` as an aware UTC datetime.

    A time that occurs twice (clocks going back) means its first occurrence; a time that
    does not occur (clocks going forward) raises ``NonexistentTimeError``.
    """
    aware = local.replace(tzinfo=tz, fold=0)
    back = aware.astimezone(UTC).astimezone(tz)
    if back.replace(tzinfo=None) != local.replace(tzinfo=None):
        raise NonexistentTimeError(local, tz)
    return aware.astimezone(UTC)


def local_text(when: datetime, tz: ZoneInfo) -> str:
    """``2026-12-01 22:00`` (seconds shown only when set) in ``tz``."""
    local = when.astimezone(tz)
    return local.strftime("%Y-%m-%d %H:%M:%S" if local.second else "%Y-%m-%d %H:%M")


def zoned_text(when: datetime, tz: ZoneInfo) -> str:
    """``2026-12-01 22:00 CET``: ``local_text`` with the zone's abbreviation, for replies
    read by people who may sit in another zone than the service."""
    local = when.astimezone(tz)
    return f"{local_text(local, tz)} {local.tzname() or tz.key}"


def zone_note(tz: ZoneInfo) -> str:
    """``times in Europe/Berlin``: the zone of the times a reply lists."""
    return f"times in {tz.key}"
