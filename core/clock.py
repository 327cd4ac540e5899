"""Clocks: the real one, and one a test can set (for DST and schedule tests)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        delay = (when - self.now()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """A clock that only moves when told to; sleepers wake when it passes their time."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start
        self._changed = asyncio.Condition()

    def now(self) -> datetime:
        return self._now

    async def set(self, when: datetime) -> None:
        async with self._changed:
            self._now = when.astimezone(UTC)
            self._changed.notify_all()

    async def sleep_until(self, when: datetime) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._now >= when)
