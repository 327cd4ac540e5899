"""Database URLs for tests: SQLite in a temp dir, and PostgreSQL.

PostgreSQL is the server named by TGOPS_TEST_DATABASE_URL when it is set, otherwise a
throwaway server the test session starts itself on first import of this module
(tests/postgres.py). Only a machine without PostgreSQL's binaries skips those tests, with
``NO_POSTGRES`` as the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.store.journal_pg import statements_of
from tests.postgres import MISSING, session_url

POSTGRES_URL = session_url()
NO_POSTGRES = MISSING


async def reset_postgres(url: str) -> None:
    """Empty the test database: every table of a previous test is dropped."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        await engine.dispose()


def backends() -> list[object]:
    return [
        "sqlite",
        pytest.param(
            "postgresql",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(POSTGRES_URL is None, reason=NO_POSTGRES),
            ],
        ),
    ]


@contextmanager
def _cursor_executes(engine: AsyncEngine, seen: Callable[[str, Any], None]) -> Iterator[None]:
    """``seen(statement, parameters)`` for every statement ``engine`` runs meanwhile
    (SQLAlchemy's cursor event)."""

    def listener(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen(statement, parameters)

    sync_engine = engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        event.remove(sync_engine, "before_cursor_execute", listener)


@contextmanager
def statements_with_parameters(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements ``engine`` runs meanwhile, each with its parameters as the
    driver got them (to ``EXPLAIN`` them again)."""
    sent: list[tuple[str, Any]] = []
    with _cursor_executes(
        engine, lambda statement, parameters: sent.append((statement, parameters))
    ):
        yield sent


@contextmanager
def statements_sent(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` runs meanwhile (those of the run journal's function
    one by one, ``statements_of``)."""
    sent: list[str] = []
    with _cursor_executes(
        engine, lambda statement, parameters: sent.extend(statements_of(statement, parameters))
    ):
        yield sent
