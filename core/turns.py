"""Work that never waits, spread over turns of the event loop.

A simulated node answers without waiting, and a run's first steps run until their first
write: thousands of such calls started together run in one turn of the loop, which
answers nothing else meanwhile (10,000 nodes: about a second). ``in_turns`` lets the
loop take a turn after every few items; ``turn_taking`` makes the holders of a gate take
a turn once they hold it, so the gate really holds the others back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")


async def in_turns(items: Sequence[T], per_turn: int) -> AsyncIterator[T]:
    """``items``, with a turn of the event loop after each ``per_turn`` of them."""
    for index, item in enumerate(items):
        if index and index % per_turn == 0:
            await asyncio.sleep(0)
        yield item


@asynccontextmanager
async def turn_taking(gate: asyncio.Semaphore) -> AsyncIterator[None]:
    """Hold ``gate``, then take a turn of the loop: work that never waits would end
    before the next task asks the gate, which then never holds one back."""
    async with gate:
        await asyncio.sleep(0)
        yield
