"""Small named values (saved manifests, the notifier's watermarks) as JSON per namespace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from core.store import tables as t
from core.store.base import StoreBase, utcnow


class KvStore(StoreBase):
    """Small named values (saved manifests, the notifier's watermarks) as JSON per namespace."""

    async def kv_get(self, namespace: str, key: str) -> Any:
        """The stored value, or None."""
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    select(t.kv.c.value).where(t.kv.c.namespace == namespace, t.kv.c.key == key)
                )
            ).first()
        return None if row is None else row.value

    async def kv_items(self, namespace: str) -> dict[str, Any]:
        """Every stored value of a namespace, by key."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    select(t.kv.c.key, t.kv.c.value).where(t.kv.c.namespace == namespace)
                )
            ).all()
        return {row.key: row.value for row in rows}

    def kv_upsert(self, namespace: str, key: str, value: Any) -> Any:
        """The statement storing ``value`` under ``namespace``/``key`` (one upsert: writers
        of the same key at once do not collide)."""
        insert_ = pg_insert if self.dialect == "postgresql" else sqlite_insert
        row = {"namespace": namespace, "key": key, "value": value, "updated_at": utcnow()}
        statement = insert_(t.kv).values(**row)
        return statement.on_conflict_do_update(
            index_elements=[t.kv.c.namespace, t.kv.c.key],
            set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
        )

    async def kv_set(self, namespace: str, key: str, value: Any) -> None:
        """Store ``value`` (one upsert: writers of the same key at once do not collide)."""
        async with self.transaction() as conn:
            await conn.execute(self.kv_upsert(namespace, key, value))

    async def kv_claim(self, namespace: str, keys: Sequence[str], value: Any) -> list[str]:
        """Set each key to ``value`` in one transaction; returns the keys that did not
        have that value before (the ones this caller claimed), in the given order."""
        if not keys:
            return []
        async with self.transaction() as conn:
            rows = await conn.execute(
                select(t.kv.c.key, t.kv.c.value).where(
                    t.kv.c.namespace == namespace, t.kv.c.key.in_(list(keys))
                )
            )
            have = {row.key: row.value for row in rows}
            fresh = [key for key in keys if key not in have or have[key] != value]
            if fresh:
                await conn.execute(
                    delete(t.kv).where(t.kv.c.namespace == namespace, t.kv.c.key.in_(fresh))
                )
                now = utcnow()
                await conn.execute(
                    insert(t.kv),
                    [
                        {"namespace": namespace, "key": key, "value": value, "updated_at": now}
                        for key in fresh
                    ],
                )
        return fresh

    async def kv_delete(self, namespace: str, key: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(delete(t.kv).where(t.kv.c.namespace == namespace, t.kv.c.key == key))
