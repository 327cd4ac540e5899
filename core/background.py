"""A long-running loop owned by an ``async with`` block: cancelled and awaited on exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)


@asynccontextmanager
async def background(name: str, loop: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    task = asyncio.create_task(_guarded(name, loop), name=name)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _guarded(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    try:
        await loop()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s stopped on an unexpected error", name)
        raise
