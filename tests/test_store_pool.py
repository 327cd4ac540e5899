"""PostgreSQL connections in the store's pool: kept once opened (up to ``POOL_SIZE``);
one that waited longer than ``idle_ping`` is asked whether it still works before it is
used, and replaced if the server dropped it; one used a moment ago is taken as it is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from core.store import Store
from core.store.base import POOL_SIZE
from tests.databases import NO_POSTGRES, POSTGRES_URL, reset_postgres

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(POSTGRES_URL is None, reason=NO_POSTGRES),
]


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    async with Store(POSTGRES_URL, idle_ping=0.3) as opened:
        await opened.sync_nodes([("n1", "c1", "sandbox")])
        yield opened


async def _drop_store_connections() -> int:
    """The server ends every connection of the store (application name ``tgops``)."""
    assert POSTGRES_URL is not None
    engine = create_async_engine(POSTGRES_URL)
    try:
        async with engine.begin() as conn:
            result = await conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'tgops' AND pid <> pg_backend_pid()"
            )
            return int(result.scalar_one())
    finally:
        await engine.dispose()


async def test_a_connection_dropped_while_idle_is_replaced_unseen(store: Store) -> None:
    assert await store.node("n1") is not None
    assert await _drop_store_connections() >= 1
    await asyncio.sleep(0.5)  # longer than idle_ping: asked before use
    for _ in range(3):
        record = await store.node("n1")
        assert record is not None and record.name == "n1"


async def test_the_store_names_itself_to_the_server(store: Store) -> None:
    async with store.engine.connect() as conn:
        name = (await conn.exec_driver_sql("SHOW application_name")).scalar_one()
    assert name == "tgops"


async def test_reads_open_no_transaction(store: Store) -> None:
    """A read sends its statements alone: each is its own transaction (no BEGIN before the
    first, no ROLLBACK when the connection goes back to the pool). Inside a transaction
    ``now()`` stays the time the transaction began."""
    since_begin = text("SELECT extract(epoch FROM statement_timestamp() - now())")
    async with store.reading() as conn:
        await conn.exec_driver_sql("SELECT 1")
        await asyncio.sleep(0.1)
        alone = await conn.scalar(since_begin)
    assert alone is not None and alone < 0.05
    async with store.transaction() as conn:  # a transaction, for comparison
        await conn.exec_driver_sql("SELECT 1")
        await asyncio.sleep(0.1)
        inside = await conn.scalar(since_begin)
    assert inside is not None and inside >= 0.1
    assert (await store.node("n1")) is not None  # the store's reads go this way


async def test_postgres_connections_stay_open_between_bursts(store: Store) -> None:
    """Two bursts of more reads at once than the pool holds open no connection beyond the
    pool's size: one that comes back is kept, not closed and opened again for the next
    statement (a server process and asyncpg's look at the server's types each time)."""
    opened: list[object] = []

    def connected(*_args: object) -> None:
        opened.append(None)

    async def read() -> None:
        async with store.reading() as conn:
            await conn.execute(text("SELECT pg_sleep(0.05)"))

    event.listen(store.engine.sync_engine, "connect", connected)
    try:
        for _ in range(2):
            async with asyncio.timeout(30):
                await asyncio.gather(*(read() for _ in range(POOL_SIZE * 2)))
    finally:
        event.remove(store.engine.sync_engine, "connect", connected)
    assert 0 < len(opened) <= POOL_SIZE
