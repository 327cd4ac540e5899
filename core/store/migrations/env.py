"""Alembic environment: migrations run on the connection the store hands over at start-up."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from core.store.tables import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


_given = context.config.attributes.get("connection")
if _given is not None:
    _run(_given)
else:  # `alembic revision --autogenerate` by a developer, against a scratch database
    _url = context.config.get_main_option("sqlalchemy.url") or "sqlite://"
    with create_engine(_url).connect() as _connection:
        _run(_connection)
        _connection.commit()
