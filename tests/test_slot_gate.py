"""Cluster slot waiters are woken, not polling the store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.lifecycle.slots import RECHECK, SlotGate
from core.store import Store
from tests.databases import POSTGRES_URL, backends, reset_postgres, statements_sent


@pytest.fixture(params=backends())
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/state.db"
        return
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    yield POSTGRES_URL


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    async with Store(url) as opened:
        await opened.sync_nodes([(f"n{i}", "c1", "sandbox") for i in range(1, 5)])
        yield opened


async def settled(sent: list[str]) -> None:
    """Until no statement was sent for one RECHECK (bounded: 20 tries)."""
    for _ in range(20):
        before = len(sent)
        await asyncio.sleep(RECHECK * 1.5)
        if len(sent) == before:
            return
    raise AssertionError(f"statements kept coming: {sent[-5:]}")


async def test_waiters_send_no_statements_until_a_slot_is_freed(store: Store) -> None:
    # the look for other instances' changes is made rarely here, so only the waiters'
    # own statements are counted
    gate = SlotGate(store, owner="a", remote_recheck=3600)
    assert await gate.acquire(cluster="c1", node="n1", limit=1, run_id=None) == 0
    with statements_sent(store.engine) as sent:
        waiters = []
        for n in ("n2", "n3", "n4"):  # one after the other: the queue is in arrival order
            waiters.append(
                asyncio.create_task(gate.acquire(cluster="c1", node=n, limit=1, run_id=None))
            )
            for _ in range(100):
                if n in await store.slot_queue("c1"):
                    break
                await asyncio.sleep(0.05)
        assert await store.slot_queue("c1") == ["n2", "n3", "n4"]
        await settled(sent)  # joined the queue and looked once
        joined = len(sent)
        # several RECHECK periods pass: the waiters check their stop condition, not the store
        await asyncio.sleep(RECHECK * 4)
        assert len(sent) == joined
        assert not any(w.done() for w in waiters)

        await gate.release(cluster="c1", node="n1")
        async with asyncio.timeout(30):
            assert await waiters[0] == 0  # the first in the queue, woken at once
        assert not waiters[1].done() and not waiters[2].done()
        await settled(sent)
        # the freed slot: one release, one look shared by the three waiters, one take
        woken = sent[joined:]
        assert sum(s.lstrip().upper().startswith("DELETE FROM CLUSTER_SLOTS") for s in woken) == 1
        reads = [s for s in woken if "FROM cluster_slots" in s and s.lstrip().startswith("SELECT")]
        assert len(reads) <= 2, reads  # the shared look and the take's own check

        await gate.release(cluster="c1", node="n2")
        async with asyncio.timeout(30):
            assert await waiters[1] == 0
        await gate.release(cluster="c1", node="n3")
        async with asyncio.timeout(30):
            assert await waiters[2] == 0
    assert await store.slot_queue("c1") == []


async def test_a_waiter_that_gives_up_wakes_the_ones_behind(store: Store) -> None:
    gate = SlotGate(store, owner="a", remote_recheck=3600)
    assert await gate.acquire(cluster="c1", node="n1", limit=2, run_id=None) == 0
    # n2 queued before n3 (as the runs of one command are) but not waiting yet
    await store.wait_for_slot(cluster="c1", node="n2", run_id=None)
    later = asyncio.create_task(gate.acquire(cluster="c1", node="n3", limit=2, run_id=None))
    await asyncio.sleep(RECHECK * 2)
    assert not later.done()  # n2's turn comes first
    await gate.leave(cluster="c1", node="n2")  # n2's run ended before its turn
    async with asyncio.timeout(30):
        assert await later == 1


async def test_a_slot_freed_by_another_instance_is_found(url: str, store: Store) -> None:
    async with Store(url) as other_store:
        mine = SlotGate(store, owner="a", remote_recheck=0.2)
        other = SlotGate(other_store, owner="b", remote_recheck=3600)
        assert await other.acquire(cluster="c1", node="n1", limit=1, run_id=None) == 0
        waiter = asyncio.create_task(mine.acquire(cluster="c1", node="n2", limit=1, run_id=None))
        await asyncio.sleep(1)
        assert not waiter.done()
        looks = mine.remote_looks
        assert looks >= 1
        # the other instance frees its slot: this one is not told, its watcher finds it
        await other.release(cluster="c1", node="n1")
        async with asyncio.timeout(30):
            assert await waiter == 0
        assert mine.remote_looks > looks


async def test_a_freed_slot_is_handed_to_the_head_of_the_queue(store: Store) -> None:
    gate = SlotGate(store, owner="a", remote_recheck=3600)
    assert await gate.acquire(cluster="c1", node="n1", limit=1, run_id=None) == 0
    waiters = {}
    for n in ("n2", "n3", "n4"):  # one after the other: the queue is in arrival order
        waiters[n] = asyncio.create_task(gate.acquire(cluster="c1", node=n, limit=1, run_id=None))
        for _ in range(100):
            if n in await store.slot_queue("c1"):
                break
            await asyncio.sleep(0.05)
    with statements_sent(store.engine) as sent:
        assert await gate.release(cluster="c1", node="n1", limit=1)
        async with asyncio.timeout(30):
            assert await waiters["n2"] == 0
        await settled(sent)
        # two statements in the freeing transaction; the new holder and the nodes behind it
        # send none (they are not woken to look)
        assert len(sent) == 2, sent
        assert sent[0].lstrip().upper().startswith("DELETE FROM SLOT_WAITERS")
        assert sent[1].lstrip().upper().startswith("UPDATE CLUSTER_SLOTS")
    assert [s.node for s in await store.slots("c1")] == ["n2"]
    assert await store.slot_queue("c1") == ["n3", "n4"]
    assert not waiters["n3"].done() and not waiters["n4"].done()
    # a waiter that gives up leaves the queue; the next freed slot goes to the one behind
    waiters["n3"].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters["n3"]
    assert await store.slot_queue("c1") == ["n4"]
    assert await gate.release(cluster="c1", node="n2", limit=1)
    async with asyncio.timeout(30):
        assert await waiters["n4"] == 0
    # nobody waits: the slot is freed
    assert await gate.release(cluster="c1", node="n4", limit=1)
    assert await store.slots("c1") == []
    assert not await gate.release(cluster="c1", node="n4", limit=1)  # held nothing


async def test_a_slot_above_a_lowered_limit_is_not_handed_on(store: Store) -> None:
    gate = SlotGate(store, owner="a", remote_recheck=3600)
    assert await gate.acquire(cluster="c1", node="n1", limit=2, run_id=None) == 0
    assert await gate.acquire(cluster="c1", node="n2", limit=2, run_id=None) == 1
    # the limit is lowered to 1 while n3 waits: slot 1 is freed, not handed on
    waiter = asyncio.create_task(gate.acquire(cluster="c1", node="n3", limit=1, run_id=None))
    for _ in range(100):
        if await store.slot_queue("c1") == ["n3"]:
            break
        await asyncio.sleep(0.05)
    freed = await store.release_slot(cluster="c1", node="n2", limit=1)
    assert freed.released and freed.to is None
    assert await store.slot_queue("c1") == ["n3"]  # kept its place
    await gate.wake("c1")
    await asyncio.sleep(RECHECK)
    assert not waiter.done()  # slot 0 is still held by n1: the limit of 1 holds
    assert await gate.release(cluster="c1", node="n1", limit=1)
    async with asyncio.timeout(30):
        assert await waiter == 0


async def test_a_slot_handed_to_a_node_of_another_instance_is_found(url: str, store: Store) -> None:
    async with Store(url) as other_store:
        mine = SlotGate(store, owner="a", remote_recheck=0.2)
        other = SlotGate(other_store, owner="b", remote_recheck=3600)
        assert await other.acquire(cluster="c1", node="n1", limit=1, run_id=None) == 0
        waiter = asyncio.create_task(mine.acquire(cluster="c1", node="n2", limit=1, run_id=None))
        for _ in range(100):
            if await store.slot_queue("c1") == ["n2"]:
                break
            await asyncio.sleep(0.05)
        freed = await other_store.release_slot(cluster="c1", node="n1", limit=1)
        assert freed.to == "n2"
        async with asyncio.timeout(30):
            assert await waiter == 0
        assert [s.node for s in await store.slots("c1")] == ["n2"]
