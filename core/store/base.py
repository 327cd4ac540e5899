"""The store's engine: opening and migrating the database, connections and transactions.

SQLite by default (one connection: SQLite has one writer), PostgreSQL when configured.
Alembic migrations in ``migrations/`` are applied at start-up, idempotently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.errors import StoreError
from core.printable import printable
from core.private import create_private, make_private
from core.store import journal_pg
from core.store.journal import Entry, StepJournal
from core.store.records import NodeRecord, node_record
from core.store.sqlite import COMMIT_WITH, one_trip, settle

log = logging.getLogger(__name__)

ACTIVE_RUN_STATES = ("queued", "running")
R = TypeVar("R")


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoreUnavailableError(StoreError):
    def __init__(self, url: str, cause: str) -> None:
        super().__init__(
            f"database {url}: cannot be opened ({cause}); check database_url and that the "
            "server is running"
        )


class NodeBusyError(StoreError):
    def __init__(self, node: str, run_id: int) -> None:
        self.node = node
        self.run_id = run_id
        super().__init__(
            f"node {node} is busy with run #{run_id}; wait for it to end (see `log {node}`)"
        )


def record_of(cls: type[R], row: Any) -> R:
    if cls is NodeRecord:
        return cast(R, node_record(row))
    return cls(**dict(row._mapping))


def migrations_config(connection: Connection) -> Config:
    """Alembic's configuration of the store's migrations, run on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


def _migrate(connection: Connection) -> None:
    command.upgrade(migrations_config(connection), "head")


IDLE_PING = 1.0
"""Seconds a PostgreSQL connection may have waited in the pool before it is asked whether
it still works when taken out again (a restarted server or an idle timeout drops
connections that wait; a broken one is replaced before anybody uses it). One returned
less than that ago is not asked: under load that was a round trip per transaction."""


def _ping_when_idle(idle_ping: float) -> tuple[Any, Any]:
    """Pool listeners (checkin, checkout) that ping a connection taken out after more
    than ``idle_ping`` seconds in the pool."""

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["returned_at"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < idle_ping:
            return  # just connected, or used a moment ago
        try:
            dbapi_connection.ping()
        except Exception as exc:  # the pool replaces it and takes another
            raise DisconnectionError(f"connection lost while idle: {exc}") from exc

    return checkin, checkout


POOL_SIZE = 15
"""PostgreSQL connections the store keeps at most (as many as before, 5 kept and 10
more on demand; now all kept)."""

SETTLE = 15.0
"""Seconds a closing store waits at most for SQLite statements a stopped task left running
(longer than SQLite's busy timeout, 10 s, that such a statement can wait for a lock)."""


async def _close(engine: AsyncEngine) -> None:
    """Close the engine's pooled connections, then those a stopped task left open
    (``core.store.sqlite.settle``)."""
    await engine.dispose()
    await settle(engine, SETTLE)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


AUDIT_DETAIL_LIMIT = 2000
"""Characters of an audit record's detail that are kept; a longer one is cut and marked."""
AUDIT_FIELD_LIMIT = 200
"""Characters kept of an audit record's actor, source, action and target."""


def clipped(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with a mark saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [cut: {len(text) - limit} more characters]"


def audit_values(
    *,
    at: datetime,
    actor: str,
    source: str,
    action: str,
    target: str | None,
    detail: str,
    run_id: int | None,
) -> dict[str, Any]:
    """One audit record's columns, made safe to store and to show: control characters
    removed, the detail cut at ``AUDIT_DETAIL_LIMIT`` characters (marked)."""
    return {
        "at": at,
        "actor": clipped(printable(actor), AUDIT_FIELD_LIMIT),
        "source": clipped(printable(source), AUDIT_FIELD_LIMIT),
        "action": clipped(printable(action), AUDIT_FIELD_LIMIT),
        "target": None if target is None else clipped(printable(target), AUDIT_FIELD_LIMIT),
        "detail": clipped(printable(detail), AUDIT_DETAIL_LIMIT),
        "run_id": run_id,
    }


class StoreBase:
    """The engine and its transactions; every aggregate's methods run over these."""

    def __init__(
        self, url: str, *, connect_timeout: float = 10.0, idle_ping: float = IDLE_PING
    ) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._idle_ping = idle_ping
        self._engine: AsyncEngine | None = None

    @property
    def dialect(self) -> str:
        """The URL's backend, "sqlite" or "postgresql", read once per URL (parsing the URL
        for every statement cost the event loop about 30 us each time)."""
        known = self._dialect
        if known is None or known[0] != self.url:
            known = self._dialect = (self.url, make_url(self.url).get_backend_name())
        return known[1]

    _dialect: tuple[str, str] | None = None

    _journal: StepJournal | None = None

    @property
    def journal(self) -> StepJournal:
        """The group commit of step transitions and audit records (``core.store.journal``)."""
        if self._journal is None:
            if self.engine.dialect.name == "postgresql":
                # a transaction's statements in one round trip (core.store.journal_pg)
                self._journal = StepJournal(
                    self.transaction,
                    (self.single_statement, journal_pg.write_entries, journal_pg.ONE_CALL_ENTRIES),
                )
            else:
                self._journal = StepJournal(self.transaction)
        return self._journal

    async def commit(self, *entries: Entry, wait: bool = True) -> None:
        """Write ``entries`` (node and run changes, audit records) through the run journal,
        in one transaction with those of other runs; returns once committed (``wait``) or
        at once (written with the next transaction: ``core.store.journal``)."""
        await self.journal.write(*entries, wait=wait)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("the store is not open; use `async with Store(url)`")
        return self._engine

    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    async def __aenter__(self) -> Self:
        url = make_url(self.url)
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                database = Path(url.database)
                database.parent.mkdir(parents=True, exist_ok=True)
                # SQLite gives its -wal and -shm files the database file's mode: 0600, as
                # the store holds contacts and the outbox's messages
                create_private(database)
                for side in ("-wal", "-shm"):
                    make_private(database.with_name(database.name + side))
            # SQLite has one writer: one connection, so that no statement of this process
            # ever waits in SQLite's busy handler for another of its own connections (that
            # wait can block the event loop when a cursor is freed there)
            kwargs["pool_size"] = 1
            kwargs["max_overflow"] = 0
            kwargs["pool_timeout"] = 120
        else:
            # thousands of runs at one update time queue for the pool's connections: a
            # statement waits its turn rather than failing its run after the default 30 s
            kwargs["pool_timeout"] = 120
            # every connection stays open once opened: with the pool's default of 5 kept and
            # 10 more opened on demand, each of those 10 was closed when it came back while 5
            # waited, and opened again for the next statement; at 1,000 nodes that was 1,300
            # connections per update time (a server process each, and asyncpg's look at the
            # server's types), as much of the server's CPU as all statements together
            kwargs["pool_size"] = POOL_SIZE
            kwargs["max_overflow"] = 0
            kwargs["connect_args"] = {
                "timeout": self._connect_timeout,
                "server_settings": {"application_name": "tgops"},
            }
        engine = create_async_engine(one_trip(url), **kwargs)
        if url.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            checkin, checkout = _ping_when_idle(self._idle_ping)
            event.listen(engine.sync_engine.pool, "checkin", checkin)
            event.listen(engine.sync_engine.pool, "checkout", checkout)
        try:
            async with asyncio.timeout(self._connect_timeout + 20):
                async with engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        # one instance migrates at a time
                        await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(74470501)")
                    await conn.run_sync(_migrate)
        except (OSError, SQLAlchemyError, TimeoutError) as exc:
            await _close(engine)
            cause = str(getattr(exc, "orig", None) or exc).splitlines()[0] or type(exc).__name__
            raise StoreUnavailableError(self.display_url(), cause) from exc
        self._engine = engine
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._engine is not None:
            if self._journal is not None:
                try:  # what runs handed over without waiting is written before closing
                    async with asyncio.timeout(30):
                        await asyncio.shield(self._journal.flush())
                except Exception as problem:  # closing goes on
                    log.warning("run journal: not flushed before closing the store: %s", problem)
            await asyncio.shield(_close(self._engine))
            self._engine = self._reader = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def single_statement(self) -> AsyncIterator[AsyncConnection]:
        """A connection for a write that is one statement (``async with``): on PostgreSQL
        the statement commits on its own, without the BEGIN and COMMIT that a transaction
        sends each as a round trip of its own (a statement is atomic: PostgreSQL runs it
        in a transaction of its own, data-modifying CTEs included); on SQLite a
        transaction whose statement commits in the trip that runs it (``COMMIT_WITH``:
        one trip to the database's thread instead of two). Run one statement in it: a
        second would be a transaction of its own."""
        if self.engine.dialect.name != "postgresql":
            async with self.transaction() as conn:
                yield await conn.execution_options(**COMMIT_WITH)
            return
        async with self.reading() as conn:
            yield conn

    _reader: AsyncEngine | None = None

    def reading(self) -> AsyncConnection:
        """A connection for reading (``async with store.reading() as conn``). On PostgreSQL
        it opens no transaction: no BEGIN before the first statement and no ROLLBACK when
        it goes back to the pool, two round trips of three for a read by key (each
        statement sees what was committed when it began, as inside a transaction at the
        default READ COMMITTED). On SQLite a read ends without a trip anyway
        (``core.store.sqlite``)."""
        engine = self.engine
        if self._reader is None:
            postgres = engine.dialect.name == "postgresql"
            self._reader = (
                engine.execution_options(isolation_level="AUTOCOMMIT") if postgres else engine
            )
        return self._reader.connect()

    async def _all(self, query: Any, cls: type[R], params: dict[str, Any] | None = None) -> list[R]:
        async with self.reading() as conn:
            rows = (await conn.execute(query, params)).all()
        return [record_of(cls, r) for r in rows]
