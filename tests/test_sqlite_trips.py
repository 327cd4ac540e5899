"""The SQLite adapter of the store (``core/store/sqlite.py``): one trip to aiosqlite's thread
per statement, none to end a connection that only read, and nothing left half-done when a
statement is cancelled."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite
import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from core.store import Store
from core.store import tables as t
from core.store.journal import NodeChange, StepJournal
from core.store.sqlite import KEEP_CHANGES, OneTripDialect

NOW = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(f"sqlite+aiosqlite:///{tmp_path}/state.db") as opened:
        await opened.sync_nodes([("n1", "c1", "sandbox"), ("n2", "c1", "sandbox")])
        yield opened


async def _trips(conn: AsyncConnection) -> int:
    raw = await conn.get_raw_connection()
    return int(raw.dbapi_connection.trips)  # type: ignore[union-attr]


def _release(holder: sqlite3.Connection) -> None:
    """Let go of SQLite's write lock (from a timer's thread)."""
    holder.execute("ROLLBACK")
    holder.close()


async def test_the_store_uses_the_adapter(store: Store) -> None:
    assert isinstance(store.engine.dialect, OneTripDialect)
    assert store.display_url().startswith("sqlite+aiosqlite:///")


async def test_a_statement_is_one_trip_and_a_read_ends_without_one(store: Store) -> None:
    async with store.engine.connect() as conn:
        before = await _trips(conn)
        rows = (await conn.execute(select(t.nodes.c.name).order_by(t.nodes.c.name))).all()
        assert [r.name for r in rows] == ["n1", "n2"]
        assert await _trips(conn) == before + 1
    async with store.engine.begin() as conn:
        # the read above was ended without a rollback on the thread
        assert await _trips(conn) == before + 1
        await conn.execute(update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=3))
        assert await _trips(conn) == before + 2
    async with store.engine.connect() as conn:
        assert await _trips(conn) == before + 3  # the commit
    record = await store.node("n1")
    assert record is not None and record.sessions == 3


async def test_rows_counts_and_many_parameter_sets(store: Store) -> None:
    async with store.transaction() as conn:
        result = await conn.execute(
            insert(t.kv),
            [
                {"namespace": "test", "key": f"k{i}", "value": {"i": i}, "updated_at": NOW}
                for i in range(5)
            ],
        )
        assert result.rowcount == 5
        changed = await conn.execute(
            update(t.kv).where(t.kv.c.key.in_(["k1", "k2", "nope"])).values(value={"i": -1})
        )
        assert changed.rowcount == 2
    by_key = select(t.kv.c.value).where(t.kv.c.key == bindparam("key"))
    async with store.engine.connect() as conn:
        assert (await conn.execute(by_key, {"key": "k1"})).scalar_one() == {"i": -1}
        assert (await conn.execute(by_key, {"key": "k4"})).scalar_one() == {"i": 4}
        assert (await conn.execute(by_key, {"key": "nope"})).first() is None


def _kv_rows(keys: range) -> list[dict[str, object]]:
    return [
        {"namespace": "test", "key": f"k{i}", "value": {"i": i}, "updated_at": NOW} for i in keys
    ]


async def _kv_keys(store: Store) -> list[str]:
    async with store.engine.connect() as conn:
        return [r.key for r in await conn.execute(select(t.kv.c.key).order_by(t.kv.c.key))]


async def test_with_keep_changes_writes_go_with_the_next_trip(
    store: Store,
) -> None:
    by_key = select(t.kv.c.value).where(t.kv.c.key == bindparam("key"))
    async with store.engine.begin() as conn:
        await conn.execution_options(**KEEP_CHANGES)
        before = await _trips(conn)
        await conn.execute(insert(t.kv), _kv_rows(range(5)))
        await conn.execute(
            update(t.kv).where(t.kv.c.key == bindparam("b_key")).values(value=bindparam("v")),
            [{"b_key": "k1", "v": {"i": -1}}, {"b_key": "k2", "v": {"i": -2}}],
        )
        await conn.execute(update(t.kv).where(t.kv.c.key == "k3").values(value={"i": -3}))
        assert await _trips(conn) == before  # kept, not run yet
        # the next statement runs them first, in the order they came, in the same trip
        assert (await conn.execute(by_key, {"key": "k2"})).scalar_one() == {"i": -2}
        assert await _trips(conn) == before + 1
        await conn.execute(insert(t.kv), _kv_rows(range(5, 7)))
    async with store.engine.connect() as conn:
        assert await _trips(conn) == before + 2  # the commit ran the last one
    assert await _kv_keys(store) == [f"k{i}" for i in range(7)]
    async with store.engine.connect() as conn:
        assert (await conn.execute(by_key, {"key": "k3"})).scalar_one() == {"i": -3}


async def test_a_kept_statement_that_fails_fails_its_transaction(store: Store) -> None:
    async def change_then_fail() -> None:
        async with store.engine.begin() as conn:
            await conn.execution_options(**KEEP_CHANGES)
            await conn.execute(update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=7))
            await conn.execute(insert(t.kv), _kv_rows(range(2)) + _kv_rows(range(1, 2)))

    with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
        await change_then_fail()  # raised by the commit's trip
    record = await store.node("n1")
    assert record is not None and record.sessions == 0
    assert await _kv_keys(store) == []


async def test_a_rolled_back_transaction_drops_what_it_kept(store: Store) -> None:
    async with store.engine.connect() as conn:
        before = await _trips(conn)

    async def keep_then_fail() -> None:
        async with store.engine.begin() as conn:
            await conn.execution_options(**KEEP_CHANGES)
            await conn.execute(insert(t.kv), _kv_rows(range(3)))
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        await keep_then_fail()
    async with store.engine.connect() as conn:
        assert await _trips(conn) == before  # neither the rows nor a rollback went
    assert await _kv_keys(store) == []


async def test_a_journal_transaction_is_one_trip(store: Store) -> None:
    journal = StepJournal(store.transaction)
    async with store.engine.connect() as conn:
        before = await _trips(conn)
    await journal.write(
        NodeChange(name="n1", values={"sessions": 4}),
        NodeChange(name="n2", values={"sessions": 5, "lb": "drained"}),
    )
    async with store.engine.connect() as conn:
        assert await _trips(conn) == before + 1
    assert [(await store.node(n)).sessions for n in ("n1", "n2")] == [4, 5]  # type: ignore[union-attr]


async def test_a_single_statement_commits_in_its_own_trip(store: Store, tmp_path: Path) -> None:
    """On SQLite ``single_statement``'s statement commits in the trip that runs it
    (``COMMIT_WITH``): its rows and row count are there as usual, another connection sees
    the change before the block ends, and the block's end makes no trip."""
    other = sqlite3.connect(tmp_path / "state.db")
    sessions = "SELECT sessions FROM nodes WHERE name = 'n1'"
    async with store.engine.connect() as conn:
        before = await _trips(conn)
    async with store.single_statement() as conn:
        changed = update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=5)
        (row,) = (await conn.execute(changed.returning(t.nodes.c.name))).all()
        assert row.name == "n1"
        assert await _trips(conn) == before + 1
        assert other.execute(sessions).fetchone() == (5,)  # committed already
    async with store.single_statement() as conn:
        result = await conn.execute(
            update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=6)
        )
        assert result.rowcount == 1
    async with store.engine.connect() as conn:
        assert await _trips(conn) == before + 2  # one per statement, none for the commits
    assert other.execute(sessions).fetchone() == (6,)
    other.close()


async def test_a_single_statement_that_fails_changes_nothing(store: Store) -> None:
    row = {"namespace": "test", "key": "same", "value": 1, "updated_at": NOW}
    async with store.single_statement() as conn:
        await conn.execute(insert(t.kv).values(**row))
    with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
        async with store.single_statement() as conn:
            await conn.execute(insert(t.kv).values(**{**row, "value": 2}))
    async with store.single_statement() as conn:  # the connection serves the next one
        await conn.execute(update(t.kv).values(value=3))
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(t.kv.c.value))).scalars().all() == [3]


async def test_a_failed_statement_rolls_its_transaction_back(store: Store) -> None:
    row = {"namespace": "test", "key": "same", "value": 1, "updated_at": NOW}

    async def change_then_fail() -> None:
        async with store.transaction() as conn:
            await conn.execute(update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=7))
            await conn.execute(insert(t.kv), [row, row])

    with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
        await change_then_fail()
    record = await store.node("n1")
    assert record is not None and record.sessions == 0
    async with store.transaction() as conn:  # the connection serves the next transaction
        await conn.execute(insert(t.kv).values(**row))
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(t.kv.c.value))).scalar_one() == 1


async def test_a_cancelled_write_is_rolled_back_once_it_ran(store: Store, tmp_path: Path) -> None:
    # another connection holds SQLite's write lock: the store's statement waits on the thread
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def write() -> None:
        async with store.transaction() as conn:
            await conn.execute(update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=9))

    task = asyncio.create_task(write())
    await asyncio.sleep(0.3)
    assert not task.done()
    # the lock is let go after the cancel: the waiting statement runs, then the rollback
    # SQLAlchemy queued behind it (the cancelled task waits for both)
    released = threading.Timer(0.3, lambda: _release(other))
    released.start()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    released.join()
    async with asyncio.timeout(10):
        await store.update_node("n2", sessions=4)
    one, two = await store.node("n1"), await store.node("n2")
    assert one is not None and one.sessions == 0
    assert two is not None and two.sessions == 4
    probe = sqlite3.connect(tmp_path / "state.db", timeout=0)
    try:  # no transaction was left open: another writer gets the lock at once
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    finally:
        probe.close()


async def test_closing_waits_for_what_a_stopped_task_left_running(tmp_path: Path) -> None:
    """A task stopped twice while its statement waits for SQLite's lock (the second time
    while SQLAlchemy closes the connection behind that statement) ends at once; the
    statement and the close still run on aiosqlite's thread afterwards. Closing the store
    waits for them: after it no thread of the store is left to hand a result to the event
    loop (a thread that finds the loop closed dies with an error)."""
    url = f"sqlite+aiosqlite:///{tmp_path}/state.db"
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None, check_same_thread=False)
    released = threading.Timer(0.5, lambda: _release(other))
    before = set(threading.enumerate())
    try:
        async with Store(url) as store:
            await store.sync_nodes([("n1", "c1", "sandbox")])
            other.execute("BEGIN IMMEDIATE")  # the store's write waits for SQLite's lock

            async def write() -> None:
                async with store.transaction() as conn:
                    await conn.execute(
                        update(t.nodes).where(t.nodes.c.name == "n1").values(sessions=9)
                    )

            task = asyncio.create_task(write())
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            threads = [
                thread
                for thread in threading.enumerate()
                if isinstance(thread, aiosqlite.Connection) and thread not in before
            ]
            assert any(thread.is_alive() for thread in threads)  # the statement still waits
            released.start()
        assert not any(thread.is_alive() for thread in threads)
    finally:
        released.cancel()
        if released.ident is not None:
            released.join()
    async with Store(url) as store:
        record = await store.node("n1")
        assert record is not None and record.sessions == 0
