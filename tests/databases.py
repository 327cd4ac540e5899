"""Database URLs for tests: SQLite in a temp dir, and PostgreSQL from TGOPS_TEST_DATABASE_URL."""

from __future__ import annotations

import os

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

POSTGRES_URL = os.environ.get("TGOPS_TEST_DATABASE_URL")


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
                pytest.mark.skipif(
                    POSTGRES_URL is None, reason="TGOPS_TEST_DATABASE_URL is not set"
                ),
            ],
        ),
    ]
