"""Cluster slots (L12): at most ``max_parallel_updates`` nodes of a cluster out of load
balancing at once, held as rows in the store so the limit survives restarts and holds
across controller instances. Waiting nodes queue in arrival order.

Waiters do not poll the store. A slot freed by a run that knows its cluster's limit is
handed straight to the head of the queue in the freeing transaction
(``Store.release_slot``): when that node waits in this process, only it is woken, and it
holds the slot without a statement of its own. Any other change (a slot freed without a
hand-over, a place in the queue left) wakes the waiters of that cluster, and they share
one look at the store. What other instances change is found by one statement for all
clusters waited for, every ``REMOTE_RECHECK`` seconds while anyone waits: only a cluster
whose slots or queue changed since this process last looked is looked at again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.store import SlotFingerprint, SlotRecord, SlotRelease, Store

log = logging.getLogger(__name__)

RECHECK = 1.0
"""Seconds between a waiter's checks of ``stop`` (a deadline passed): no store access."""

REMOTE_RECHECK = 2.0
"""Seconds between looks for changes made by other instances (one statement for all
clusters waited for)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _View:
    """One look at a cluster's slots and queue, shared by every waiter of the cluster."""

    held: list[SlotRecord]
    queue: list[tuple[int, str]]
    """(place, node) in arrival order."""

    def nodes(self) -> list[str]:
        return [node for _, node in self.queue]

    def fingerprint(self) -> SlotFingerprint:
        return SlotFingerprint(
            held=len(self.held),
            queued=len(self.queue),
            places=sum(place for place, _ in self.queue),
        )


class SlotGate:
    def __init__(self, store: Store, *, owner: str, remote_recheck: float = REMOTE_RECHECK) -> None:
        self.store = store
        self.owner = owner
        self.remote_recheck = remote_recheck
        self._wakers: dict[str, dict[str, asyncio.Future[None]]] = {}
        """Per cluster, per waiting node of this process, what wakes it: a change to the
        cluster wakes only that cluster's waiters, a hand-over only its new holder."""
        self._handed: dict[tuple[str, str], int] = {}
        """Slots handed to a waiting node of this process, until its waiter takes them."""
        self._waiting: set[tuple[str, str]] = set()
        """(cluster, node) of every waiter of this process."""
        self._generation: dict[str, int] = {}
        """Per cluster, how often it was woken: a waiter looks at the store again only
        when this changed since its last look."""
        self._views: dict[str, tuple[int, asyncio.Task[_View]]] = {}
        """The latest look at the store per cluster and the generation it was made in:
        the woken waiters of a cluster all read this one look."""
        self._seen: dict[str, SlotFingerprint] = {}
        """What the latest look (and this process's changes since) left each cluster as."""
        self._waiters: dict[str, int] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.remote_looks = 0
        """Looks for other instances' changes so far (for the benchmarks and tests)."""

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
        # counted as waiting before anything is awaited: a slot handed over meanwhile is kept
        self._waiters[cluster] = self._waiters.get(cluster, 0) + 1
        self._waiting.add((cluster, node))
        looked: int | None = None
        try:
            if not await self._queued(cluster, node):
                await self.store.wait_for_slot(cluster=cluster, node=node, run_id=run_id)
                self._forget(cluster)  # a look made before this node joined is stale
            self._watch()
            while True:
                if stop is not None:
                    await stop()
                handed = self._handed.pop((cluster, node), None)
                if handed is not None:
                    return handed
                generation = self._generation.get(cluster, 0)
                if generation != looked:
                    looked = generation
                    slot = await self._try(cluster=cluster, node=node, limit=limit, run_id=run_id)
                    if slot is not None:
                        return slot
                    if waiting is not None:
                        await waiting(await self._ahead(cluster, node))
                        waiting = None
                    continue  # a hand-over or a change may have come meanwhile
                await self._park(cluster, node)
        except BaseException:
            handed = self._handed.pop((cluster, node), None)
            if handed is not None:  # handed over while giving up: pass it on
                await asyncio.shield(self.release(cluster=cluster, node=node, limit=limit))
            await asyncio.shield(self._leave(cluster=cluster, node=node))
            raise
        finally:
            self._waiting.discard((cluster, node))
            self._handed.pop((cluster, node), None)  # also taken through the store meanwhile
            self._waiters[cluster] -= 1
            if not any(self._waiters.values()) and self._watcher is not None:
                self._watcher.cancel()  # nobody waits: nothing to look for
                self._watcher = None

    async def _ahead(self, cluster: str, node: str) -> list[str]:
        """The nodes holding a slot or queued before ``node``."""
        view = await self._view(cluster)
        held = [s.node for s in view.held]
        queue = view.nodes()
        queue = queue[: queue.index(node)] if node in queue else []
        return [*held, *(n for n in queue if n not in held)]

    async def _park(self, cluster: str, node: str) -> None:
        """Until the node is woken (a change to its cluster, a slot handed to it) or
        ``RECHECK`` seconds passed."""
        wakers = self._wakers.setdefault(cluster, {})
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wakers[node] = woken
        try:
            async with asyncio.timeout(RECHECK):
                await woken
        except TimeoutError:
            pass
        finally:
            if wakers.get(node) is woken:
                del wakers[node]

    async def _queued(self, cluster: str, node: str) -> bool:
        """Whether this process's latest look (awaited when under way) shows ``node`` in
        the queue: only its own run (or a hand-over, which gives it a slot) takes it out
        again, so it need not join again nor look again."""
        cached = self._views.get(cluster)
        if cached is None:
            return False
        try:
            view = await asyncio.shield(cached[1])
        except Exception:  # a failed look: join and look again
            return False
        return node in view.nodes()

    async def leave(self, *, cluster: str, node: str) -> None:
        """Take the node out of the cluster's queue (its run ended before its turn)."""
        await self._leave(cluster=cluster, node=node)

    async def _leave(self, *, cluster: str, node: str) -> None:
        await self.store.leave_slot_queue(cluster=cluster, node=node)
        await self.wake(cluster)  # the nodes behind it move up

    def _forget(self, cluster: str) -> None:
        self._views.pop(cluster, None)

    async def _view(self, cluster: str) -> _View:
        generation = self._generation.get(cluster, 0)
        cached = self._views.get(cluster)
        if (
            cached is None
            or cached[0] != generation
            or (cached[1].done() and (cached[1].cancelled() or cached[1].exception()))
        ):
            # a task of its own: a waiter that gives up does not cancel the others' look
            task = asyncio.create_task(self._read(cluster), name=f"slot-view-{cluster}")
            cached = (generation, task)
            self._views[cluster] = cached
        return await asyncio.shield(cached[1])

    async def _read(self, cluster: str) -> _View:
        held, queue = await self.store.slot_state(cluster)
        view = _View(held=held, queue=queue)
        self._seen[cluster] = view.fingerprint()
        return view

    async def _try(self, *, cluster: str, node: str, limit: int, run_id: int | None) -> int | None:
        """The node's slot when its turn in the store's queue has come and one is free."""
        view = await self._view(cluster)
        mine = next((s.slot for s in view.held if s.node == node), None)
        if mine is not None:  # taken before a restart
            await self._leave(cluster=cluster, node=node)
            return mine
        free = limit - len(view.held)
        if free <= 0:
            return None
        nodes = view.nodes()
        position = nodes.index(node) if node in nodes else 0
        if position >= free:
            return None
        slot = await self.store.try_take_slot(
            cluster=cluster,
            node=node,
            limit=limit,
            run_id=run_id,
            owner=self.owner,
            prefer=position,  # the nodes before it take the free slots before this one
        )
        if slot is None:
            # the look was out of date (another instance took the slot): look again
            await self.wake(cluster)
            return None
        # the nodes behind it keep their turn (one place and one free slot fewer each):
        # nobody is woken, and what this process knows of the cluster follows the change
        seen = self._seen.get(cluster)
        if seen is not None:
            place = next((p for p, n in view.queue if n == node), None)
            self._seen[cluster] = SlotFingerprint(
                held=seen.held + 1,
                queued=seen.queued - (place is not None),
                places=seen.places - (place or 0),
            )
        return slot

    async def release(self, *, cluster: str, node: str, limit: int | None = None) -> bool:
        """Free the node's slot; with the cluster's ``limit`` it is handed to the head of
        the queue at once (``Store.release_slot``)."""
        freed: SlotRelease = await self.store.release_slot(cluster=cluster, node=node, limit=limit)
        if freed.to is None or freed.slot is None:
            await self.wake(cluster)
            return freed.released
        # handed over: the other waiters keep their turn (one place fewer ahead of each)
        self._forget(cluster)
        seen = self._seen.get(cluster)
        if seen is not None:
            self._seen[cluster] = SlotFingerprint(
                held=seen.held,
                queued=seen.queued - 1,
                places=seen.places - (freed.place or 0),
            )
        if (cluster, freed.to) in self._waiting:
            # its waiter (parked or between looks) takes it from here; a node waiting in
            # another instance finds it through that instance's watcher
            self._handed[(cluster, freed.to)] = freed.slot
            waker = self._wakers.get(cluster, {}).get(freed.to)
            if waker is not None and not waker.done():
                waker.set_result(None)
        return freed.released

    async def wake(self, cluster: str | None = None) -> None:
        """Wake the waiters of ``cluster`` (all clusters: ``None``) to look at the store
        again."""
        clusters = list(self._wakers) if cluster is None else [cluster]
        for name in clusters:
            self._generation[name] = self._generation.get(name, 0) + 1
            self._forget(name)
            for waker in list(self._wakers.get(name, {}).values()):
                if not waker.done():
                    waker.set_result(None)

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_others(), name="slot-watcher"
            )

    async def _watch_others(self) -> None:
        """While nodes wait: every ``remote_recheck`` seconds one statement tells which
        clusters other instances changed; only their waiters look again."""
        while True:
            await asyncio.sleep(self.remote_recheck)
            clusters = [c for c, n in self._waiters.items() if n > 0]
            if not clusters:
                return
            try:
                async with asyncio.timeout(30):
                    now = await self.store.slot_fingerprints(clusters)
            except Exception as exc:  # the waiters' own looks still work (and time out)
                log.warning("cluster slots: looking for other instances' changes: %s", exc)
                continue
            self.remote_looks += 1
            for cluster in clusters:
                if now.get(cluster) != self._seen.get(cluster):
                    await self.wake(cluster)
