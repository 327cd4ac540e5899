"""Await domain events of a running service instead of sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from core.events import Event, LocalEventBus


class Recorder:
    """Subscribes to a bus; ``wait_for`` returns the first event matching a predicate."""

    def __init__(self, bus: LocalEventBus) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()
        bus.subscribe("test-recorder", self._record)

    async def _record(self, event: Event) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def wait_for(self, match: Callable[[Event], bool], within: float = 30.0) -> Event:
        async with asyncio.timeout(within), self._changed:
            while True:
                for event in self.events:
                    if match(event):
                        return event
                await self._changed.wait()

    async def wait_count(
        self, match: Callable[[Event], bool], count: int, within: float = 30.0
    ) -> list[Event]:
        async with asyncio.timeout(within), self._changed:
            while True:
                found = [e for e in self.events if match(e)]
                if len(found) >= count:
                    return found
                await self._changed.wait()


async def until(
    check: Callable[[], Awaitable[bool]], within: float = 30.0, step: float = 0.05
) -> None:
    """Poll ``check`` until it holds, bounded by ``within`` seconds.

    Only for state owned by another process (a service in a subprocess), where there is no
    event to await.
    """
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110  (another process's state: nothing to await)
            await asyncio.sleep(step)
