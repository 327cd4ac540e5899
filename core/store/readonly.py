"""The store opened for reading only: what ``tgops check-versions`` reads while the service runs.

``ReadOnlyStore`` never creates the database, never migrates it, and refuses a schema other
than the one this tgops reads, so a monitoring check can never change the store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Self

from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from core.errors import StoreError
from core.store.store import Store


class StoreUnreadableError(StoreError):
    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"store {url} not readable: {cause}")


def _sqlite_file(url: URL) -> Path:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise StoreUnreadableError(
            url.render_as_string(hide_password=True),
            "database_url names no SQLite file (write sqlite+aiosqlite:///PATH)",
        )
    return Path(database).resolve()


def _schema_head() -> str | None:
    scripts = ScriptDirectory(str(Path(__file__).parent / "migrations"))
    return scripts.get_current_head()


class ReadOnlyStore(Store):
    """``async with ReadOnlyStore(url)``: the store opened for reading only.

    Unlike ``Store`` it never creates the database (a missing SQLite file is an error),
    never migrates it, and checks that the schema is the one this tgops reads. Every
    failure raises ``StoreUnreadableError`` with a one-line cause.
    """

    async def __aenter__(self) -> Self:
        url = make_url(self.url)
        shown = self.display_url()
        kwargs: dict[str, Any] = {}
        sqlite = url.get_backend_name() == "sqlite"
        if sqlite:
            path = _sqlite_file(url)
            if not path.is_file():
                raise StoreUnreadableError(
                    shown, f"{path}: no such file (has `tgops serve` run with this database_url?)"
                )
            # a SQLite URI opened with mode=ro: the file is never created nor written
            url = url.set(database=path.as_uri(), query={"uri": "true", "mode": "ro"})
        else:
            kwargs["connect_args"] = {
                # the caller's timeout ends the check first; this only bounds the driver
                "timeout": self._connect_timeout + 1,
                "server_settings": {"default_transaction_read_only": "on"},
            }
        engine = create_async_engine(url, **kwargs)
        if sqlite:
            busy_ms = int(self._connect_timeout * 1000)
            event.listen(engine.sync_engine, "connect", _readonly_pragmas(busy_ms))
        try:
            async with engine.connect() as conn:
                revision = await conn.run_sync(_revision)
        except (OSError, SQLAlchemyError) as exc:
            await engine.dispose()
            cause = _one_line(error_cause(exc))
            if sqlite and "readonly database" in cause:
                # SQLite creates the WAL index (-shm) beside the file on first open
                cause += (
                    f" (reading a WAL database while tgops is stopped needs write access to "
                    f"{path.parent}: run the check as the tgops user or grant its group g+w)"
                )
            raise StoreUnreadableError(shown, cause) from exc
        except BaseException:
            await asyncio.shield(engine.dispose())
            raise
        head = _schema_head()
        if revision != head:
            await engine.dispose()
            if revision is None:
                raise StoreUnreadableError(
                    shown, "no tgops schema in it; start `tgops serve` once to create it"
                )
            raise StoreUnreadableError(
                shown,
                f"schema revision {revision}, this tgops reads {head}; "
                "start this version's `tgops serve` once to migrate it",
            )
        self._engine = engine
        return self


def _readonly_pragmas(busy_ms: int) -> Any:
    def apply(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_ms:d}")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return apply


def _revision(connection: Any) -> str | None:
    """The schema's Alembic revision, or None when there is no tgops schema."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    value = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


def error_cause(exc: BaseException) -> str:
    """The first line of a database error (the driver's own message where there is one)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return (lines[0] if lines else "") or type(original).__name__


def _one_line(value: str, limit: int = 300) -> str:
    """One line, no ``|`` (monitoring output treats it as the start of perfdata), bounded."""
    flat = " ".join(value.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
