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
        self._changed: dict[str, asyncio.Condition] = {}
        """One condition per cluster: a freed slot wakes only that cluster's waiters."""

    def _condition(self, cluster: str) -> asyncio.Condition:
        return self._changed.setdefault(cluster, asyncio.Condition())

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
                slot = await self._try(cluster=cluster, node=node, limit=limit, run_id=run_id)
                if slot is not None:
                    return slot
                condition = self._condition(cluster)
                async with condition:
                    try:
                        async with asyncio.timeout(RECHECK):
                            await condition.wait()
                    except TimeoutError:
                        pass
        except BaseException:
            await asyncio.shield(self.store.leave_slot_queue(cluster=cluster, node=node))
            raise

    async def _try(self, *, cluster: str, node: str, limit: int, run_id: int | None) -> int | None:
        """The node's slot when its turn in the store's queue has come and one is free."""
        held = await self.store.slots(cluster)
        mine = next((s.slot for s in held if s.node == node), None)
        if mine is not None:  # taken before a restart
            await self.store.leave_slot_queue(cluster=cluster, node=node)
            return mine
        free = limit - len(held)
        if free <= 0:
            return None
        queue = await self.store.slot_queue(cluster)
        position = queue.index(node) if node in queue else 0
        if position >= free:
            return None
        return await self.store.try_take_slot(
            cluster=cluster, node=node, limit=limit, run_id=run_id, owner=self.owner
        )

    async def release(self, *, cluster: str, node: str) -> bool:
        released = await self.store.release_slot(cluster=cluster, node=node)
        await self.wake(cluster)
        return released

    async def wake(self, cluster: str | None = None) -> None:
        """Wake the waiters of ``cluster`` (all clusters: ``None``)."""
        clusters = list(self._changed) if cluster is None else [cluster]
        for name in clusters:
            condition = self._condition(name)
            async with condition:
                condition.notify_all()
