"""Cluster slots (L12): at most ``max_parallel_updates`` nodes of a cluster out of load
balancing at once, held as rows in the store so the limit survives restarts and holds
across controller instances. Waiting nodes queue in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.store import SlotRecord, Store

log = logging.getLogger(__name__)

RECHECK = 1.0
"""Seconds between looks at the store while waiting (another instance may free a slot)."""


SNAPSHOT_AGE = RECHECK / 2
"""Longest a look at the store is shared by a cluster's waiters before a fresh one is made
(a wake-up by a local change always makes a fresh one)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _View:
    """One look at a cluster's slots and queue, shared by every waiter of the cluster."""

    held: list[SlotRecord]
    queue: list[str]


class SlotGate:
    def __init__(self, store: Store, *, owner: str) -> None:
        self.store = store
        self.owner = owner
        self._changed: dict[str, asyncio.Condition] = {}
        """One condition per cluster: a freed slot wakes only that cluster's waiters."""
        self._views: dict[str, tuple[float, asyncio.Task[_View]]] = {}
        """The latest look at the store per cluster: a freed slot wakes every waiter of
        the cluster, and they all read this one look instead of the store each."""

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
        waiting: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> int:
        """Wait for a slot, in queue order; ``stop`` may raise to give up while waiting;
        ``waiting(ahead)`` is called once when the node has to wait, with the nodes that
        hold a slot or queue before it."""
        await self.store.wait_for_slot(cluster=cluster, node=node, run_id=run_id)
        self._forget(cluster)
        try:
            while True:
                if stop is not None:
                    await stop()
                slot = await self._try(cluster=cluster, node=node, limit=limit, run_id=run_id)
                if slot is not None:
                    return slot
                if waiting is not None:
                    view = await self._view(cluster)
                    held = [s.node for s in view.held]
                    queue = view.queue[: view.queue.index(node)] if node in view.queue else []
                    await waiting([*held, *(n for n in queue if n not in held)])
                    waiting = None
                condition = self._condition(cluster)
                async with condition:
                    try:
                        async with asyncio.timeout(RECHECK):
                            await condition.wait()
                    except TimeoutError:
                        pass
        except BaseException:
            await asyncio.shield(self._leave(cluster=cluster, node=node))
            raise

    async def _leave(self, *, cluster: str, node: str) -> None:
        await self.store.leave_slot_queue(cluster=cluster, node=node)
        await self.wake(cluster)  # the nodes behind it move up

    def _forget(self, cluster: str) -> None:
        self._views.pop(cluster, None)

    async def _view(self, cluster: str) -> _View:
        now = asyncio.get_running_loop().time()
        cached = self._views.get(cluster)
        if (
            cached is None
            or now - cached[0] >= SNAPSHOT_AGE
            or (cached[1].done() and (cached[1].cancelled() or cached[1].exception()))
        ):
            # a task of its own: a waiter that gives up does not cancel the others' look
            task = asyncio.create_task(self._read(cluster), name=f"slot-view-{cluster}")
            cached = (now, task)
            self._views[cluster] = cached
        return await asyncio.shield(cached[1])

    async def _read(self, cluster: str) -> _View:
        return _View(
            held=await self.store.slots(cluster), queue=await self.store.slot_queue(cluster)
        )

    async def _try(self, *, cluster: str, node: str, limit: int, run_id: int | None) -> int | None:
        """The node's slot when its turn in the store's queue has come and one is free."""
        view = await self._view(cluster)
        mine = next((s.slot for s in view.held if s.node == node), None)
        if mine is not None:  # taken before a restart
            await self.store.leave_slot_queue(cluster=cluster, node=node)
            self._forget(cluster)
            return mine
        free = limit - len(view.held)
        if free <= 0:
            return None
        position = view.queue.index(node) if node in view.queue else 0
        if position >= free:
            return None
        slot = await self.store.try_take_slot(
            cluster=cluster, node=node, limit=limit, run_id=run_id, owner=self.owner
        )
        self._forget(cluster)
        if slot is None:
            # the look was out of date (another instance took the slot): look again
            await self.wake(cluster)
        return slot

    async def release(self, *, cluster: str, node: str) -> bool:
        released = await self.store.release_slot(cluster=cluster, node=node)
        await self.wake(cluster)
        return released

    async def wake(self, cluster: str | None = None) -> None:
        """Wake the waiters of ``cluster`` (all clusters: ``None``) to look at the store
        again."""
        clusters = list(self._changed) if cluster is None else [cluster]
        for name in clusters:
            self._forget(name)
            condition = self._condition(name)
            async with condition:
                condition.notify_all()
