"""Cluster slots (L12): at most ``max_parallel_updates`` nodes of a cluster out of load
balancing at once, held as rows in the store so the limit survives restarts and holds
across controller instances. Waiting nodes queue in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.store import Store

log = logging.getLogger(__name__)

RECHECK = 1.0
"""Seconds between looks at the store while waiting (another instance may free a slot)."""


class SlotGate:
    def __init__(self, store: Store, *, owner: str) -> None:
        self.store = store
        self.owner = owner
        self._changed = asyncio.Condition()

    async def acquire(
        self,
        *,
        cluster: str,
        node: str,
        limit: int,
        run_id: int | None,
        stop: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Wait for a slot, in queue order; ``stop`` may raise to give up while waiting."""
        await self.store.wait_for_slot(cluster=cluster, node=node, run_id=run_id)
        try:
            while True:
                if stop is not None:
                    await stop()
                queue = await self.store.slot_queue(cluster)
                held = await self.store.slots(cluster)
                mine = next((s.slot for s in held if s.node == node), None)
                if mine is not None:
                    await self.store.leave_slot_queue(cluster=cluster, node=node)
                    return mine
                free = limit - len(held)
                position = queue.index(node) if node in queue else 0
                if position < free:
                    slot = await self.store.try_take_slot(
                        cluster=cluster, node=node, limit=limit, run_id=run_id, owner=self.owner
                    )
                    if slot is not None:
                        return slot
                async with self._changed:
                    try:
                        async with asyncio.timeout(RECHECK):
                            await self._changed.wait()
                    except TimeoutError:
                        pass
        except BaseException:
            await asyncio.shield(self.store.leave_slot_queue(cluster=cluster, node=node))
            raise

    async def release(self, *, cluster: str, node: str) -> bool:
        released = await self.store.release_slot(cluster=cluster, node=node)
        await self.wake()
        return released

    async def wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()
