"""SQLite through aiosqlite with one trip to its thread per statement.

aiosqlite runs every call on one thread of its own and hands the result back to the event
loop. SQLAlchemy's adapter makes four such trips for one statement (open a cursor,
execute, fetch the rows, close the cursor), and one more to roll back when a connection
that only read goes back to the pool. Each trip costs both threads a wake-up and, on a
busy loop, the statement a turn of the loop. This adapter does the four steps in one
trip, and does not make the trip for a commit or a rollback when SQLite has no
transaction open and nothing of this connection is still queued on its thread (no
statement, so nothing to end).

On a connection given the execution options ``KEEP_CHANGES`` (the run journal's), a
statement that changes rows and returns none (INSERT, UPDATE or DELETE without RETURNING,
for one parameter set or many) makes no trip of its own: it is kept and run on the
thread, in order, at the start of the connection's next trip (the next statement, or the
commit), so that a transaction of such statements costs one trip instead of one per
statement. Its error, if any, is raised by that trip, inside the same transaction; a
rollback drops what was kept. Its ``rowcount`` and ``lastrowid`` are -1 (not known): such
a connection is for writes whose results nobody reads.

On a connection given ``COMMIT_WITH`` (a transaction that is one statement:
``StoreBase.single_statement``), the statement's trip also commits, after its rows are
taken: the transaction costs one trip instead of two (the statement, then the commit).

The store uses it for every ``sqlite+aiosqlite://`` URL; the URL users write is unchanged.
When the store closes, ``settle`` closes what a stopped task left open on those threads and
waits for them to end: none hands a result to an event loop after the store has closed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import aiosqlite
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

DRIVER = "tgops_aiosqlite"
"""The driver name of this dialect in an SQLAlchemy URL (``sqlite+tgops_aiosqlite``)."""

_Description = tuple[tuple[Any, ...], ...] | None

_KEEP = "tgops_keep_changes"
KEEP_CHANGES = {_KEEP: True}
"""Execution options under which statements that change rows wait for the next trip
(module doc); other dialects ignore them."""

_COMMIT = "tgops_commit_with"
COMMIT_WITH = {_COMMIT: True}
"""Execution options under which a statement's trip also commits its transaction (once
its rows are taken), so that the commit at the transaction's end makes no trip: for a
transaction that is this one statement (``StoreBase.single_statement``); other dialects
ignore them."""


async def _nothing() -> None:
    """Awaited where no trip is made: SQLAlchemy requires each statement to await something,
    and this returns without a turn of the event loop."""


def _execute(
    conn: sqlite3.Connection, operation: str, parameters: Any
) -> tuple[_Description, list[Any], int, int | None]:
    """On aiosqlite's thread: run one statement and take all its rows."""
    cursor = conn.cursor()
    try:
        cursor.execute(operation, () if parameters is None else parameters)
        if cursor.description:
            return cursor.description, cursor.fetchall(), -1, -1
        return None, [], cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _execute_and_commit(
    conn: sqlite3.Connection, operation: str, parameters: Any
) -> tuple[_Description, list[Any], int, int | None]:
    """On aiosqlite's thread: ``_execute``, then commit."""
    result = _execute(conn, operation, parameters)
    conn.commit()
    return result


def _execute_many(
    conn: sqlite3.Connection, operation: str, rows: Sequence[Any]
) -> tuple[int, int | None]:
    """On aiosqlite's thread: run one statement for every parameter set."""
    cursor = conn.cursor()
    try:
        cursor.executemany(operation, rows)
        return cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class _Cursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ()

    def execute(self, operation: Any, parameters: Any = None, *, commit: bool = False) -> Any:
        adapted = cast(_Connection, self._adapt_connection)
        run = _execute_and_commit if commit else _execute
        description, rows, rowcount, lastrowid = adapted.trip(run, operation, parameters)
        self.description = description
        self.rowcount, self.lastrowid = rowcount, lastrowid
        self._rows.clear()
        self._rows.extend(rows)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        adapted = cast(_Connection, self._adapt_connection)
        self.rowcount, self.lastrowid = adapted.trip(_execute_many, operation, seq_of_parameters)
        self.description = None

    def keep(self, function: Callable[..., Any], operation: Any, parameters: Any) -> None:
        """``function(connection, operation, parameters)`` at the start of the next trip."""
        adapted = cast(_Connection, self._adapt_connection)
        adapted.keep(function, operation, parameters)
        adapted.await_(_nothing())
        self.rowcount = self.lastrowid = -1
        self.description = None
        self._rows.clear()


class _Connection(AsyncAdapt_aiosqlite_connection):
    # trips queued (written on the event loop's thread only) and finished (written on
    # aiosqlite's thread only): a trip of a cancelled statement can still be running
    __slots__ = ("_finished", "_kept", "_queued")

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._queued = 0
        self._finished = 0
        self._kept: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def keep(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(sqlite3_connection, *args)`` at the start of the next trip."""
        self._kept.append((function, args))

    def trip(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run what was kept, then ``function(sqlite3_connection, *args)``, on aiosqlite's
        thread; their errors are raised as SQLAlchemy's adapter raises them."""
        kept, self._kept = self._kept, []

        def call() -> Any:
            try:
                for earlier, earlier_args in kept:
                    earlier(conn, *earlier_args)
                return function(conn, *args)
            finally:
                self._finished += 1

        try:
            conn = self._connection._conn
            self._queued += 1
            return self.await_(self._connection._execute(call))
        except Exception as error:
            self._handle_exception(error)

    @property
    def trips(self) -> int:
        """Trips to aiosqlite's thread made for statements, commits and rollbacks."""
        return self._queued

    def _idle(self) -> bool:
        """No transaction open and nothing of this connection still queued (a closed
        connection is not idle: the trip reports it as SQLAlchemy expects)."""
        if self._queued != self._finished:
            return False
        try:
            return not self._connection._conn.in_transaction
        except ValueError:  # aiosqlite: "no active connection"
            return False

    def cursor(self, server_side: bool = False) -> AsyncAdapt_aiosqlite_cursor:
        if server_side:
            return super().cursor(server_side)
        return _Cursor(self)

    def rollback(self) -> None:
        self._kept.clear()  # never run: nothing to undo
        if not self._idle():
            self.trip(sqlite3.Connection.rollback)

    def commit(self) -> None:
        if self._kept or not self._idle():
            self.trip(sqlite3.Connection.commit)

    def close(self) -> None:
        self._kept.clear()
        super().close()


class _DBAPI(AsyncAdapt_aiosqlite_dbapi):
    def __init__(self, module: Any, sqlite: Any) -> None:
        super().__init__(module, sqlite)
        self.threads: weakref.WeakSet[aiosqlite.Connection] = weakref.WeakSet()
        """aiosqlite's connections (each a thread) made for this engine."""

    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        adapted = super().connect(*arg, **kw)
        if type(adapted) is not AsyncAdapt_aiosqlite_connection:
            return adapted  # the synchronous fallback keeps SQLAlchemy's own adapter
        self.threads.add(cast(aiosqlite.Connection, adapted._connection))
        return _Connection(self, adapted._connection)


async def settle(engine: AsyncEngine, within: float) -> None:
    """Once ``engine``'s pool is disposed: close the connections it made that are still
    open (a task stopped while its statement ran can leave one open, its statement and the
    close SQLAlchemy queued after it still to run on the thread) and wait, ``within``
    seconds at most, until their threads have ended. Until they end they hand results to
    this event loop, which must still be running then (a thread that finds it closed dies
    with an error)."""
    dbapi = engine.sync_engine.dialect.loaded_dbapi
    if not isinstance(dbapi, _DBAPI):
        return
    threads = [thread for thread in dbapi.threads if thread.is_alive()]
    try:
        async with asyncio.timeout(within):
            for thread in threads:
                if thread._running and thread._connection is not None:
                    try:  # queued after whatever is still to run on the thread
                        await thread.close()
                    except (sqlite3.Error, ValueError) as problem:
                        log.debug("closing a store connection: %s", problem)
            for _ in range(int(within / 0.005) + 1):
                if not any(thread.is_alive() for thread in threads):
                    break
                await asyncio.sleep(0.005)
    except TimeoutError:
        pass
    left = sum(thread.is_alive() for thread in threads)
    if left:
        log.warning("store: %d SQLite connection(s) still busy %.0f s after closing", left, within)


def _asked(cursor: Any, context: Any, option: str) -> bool:
    """Whether this statement runs on this adapter with the execution option ``option``."""
    return (
        isinstance(cursor, _Cursor)
        and context is not None
        and bool(context.execution_options.get(option))
    )


def _kept(cursor: Any, context: Any) -> bool:
    """Whether this statement waits for the next trip: it changes rows, returns none and
    runs on a connection with ``KEEP_CHANGES``."""
    return (
        _asked(cursor, context, _KEEP)
        and bool(context.is_crud)
        and not context.compiled.effective_returning
    )


class OneTripDialect(SQLiteDialect_aiosqlite):
    """SQLAlchemy's aiosqlite dialect with the adapter above."""

    supports_statement_cache = True

    def do_executemany(
        self, cursor: Any, statement: Any, parameters: Any, context: Any = None
    ) -> None:
        if _kept(cursor, context):
            cursor.keep(_execute_many, statement, list(parameters))
        else:
            cursor.executemany(statement, parameters)

    def do_execute(self, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        if _kept(cursor, context):
            cursor.keep(_execute, statement, parameters)
        elif _asked(cursor, context, _COMMIT):  # COMMIT_WITH
            cursor.execute(statement, parameters, commit=True)
        else:
            cursor.execute(statement, parameters)

    @classmethod
    def import_dbapi(cls) -> AsyncAdapt_aiosqlite_dbapi:
        return _DBAPI(aiosqlite, sqlite3)


registry.register(f"sqlite.{DRIVER}", __name__, "OneTripDialect")


def one_trip(url: URL) -> URL:
    """``url`` with this dialect when it names aiosqlite, otherwise as it is."""
    if url.drivername == "sqlite+aiosqlite":
        return url.set(drivername=f"sqlite+{DRIVER}")
    return url
