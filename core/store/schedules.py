"""Schedules (L4, L5): the weekly times of scheduled updates and downloads per node."""

from __future__ import annotations

from uuid import uuid4

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.store import tables as t
from core.store.base import StoreBase, utcnow
from core.store.records import ScheduleRecord

CHANGED = ("schedules", "changed")
"""The key-value entry every change of a schedule sets to a new random mark, in the same
transaction: an instance sees that schedules changed (also by another instance) by
reading that one row instead of every schedule."""


class SchedulesStore(StoreBase):
    """Schedules (L4, L5): the weekly times of scheduled updates and downloads per node."""

    async def _changed(self, conn: AsyncConnection) -> None:
        await conn.execute(self.kv_upsert(*CHANGED, uuid4().hex))

    async def schedules_mark(self) -> str | None:
        """The mark of the latest change of any schedule (None before the first change):
        a different mark than before means some schedule changed."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t.kv.c.value).where(
                        t.kv.c.namespace == CHANGED[0], t.kv.c.key == CHANGED[1]
                    )
                )
            ).first()
        return None if row is None else str(row.value)

    async def set_schedule(
        self, *, node: str, kind: str, days: str, start: str, end: str | None, by: str
    ) -> None:
        async with self.transaction() as conn:
            # the calendar UID stays: calendars see the same event, changed
            uid = (
                await conn.execute(
                    select(t.schedules.c.uid).where(
                        t.schedules.c.node == node, t.schedules.c.kind == kind
                    )
                )
            ).scalar()
            await conn.execute(
                delete(t.schedules).where(t.schedules.c.node == node, t.schedules.c.kind == kind)
            )
            await conn.execute(
                insert(t.schedules).values(
                    uid=uid or t.new_uid(),
                    node=node,
                    kind=kind,
                    days=days,
                    start=start,
                    end=end,
                    enabled=True,
                    updated_by=by,
                    updated_at=utcnow(),
                )
            )
            await self._changed(conn)

    async def disable_schedule(self, *, node: str, kind: str, by: str) -> bool:
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.schedules)
                .where(
                    t.schedules.c.node == node,
                    t.schedules.c.kind == kind,
                    t.schedules.c.enabled.is_(True),
                )
                .values(enabled=False, updated_by=by, updated_at=utcnow())
            )
            if result.rowcount:
                await self._changed(conn)
        return bool(result.rowcount)

    async def schedules(self, node: str | None = None) -> list[ScheduleRecord]:
        query = select(t.schedules).order_by(t.schedules.c.node, t.schedules.c.kind)
        if node is not None:
            query = query.where(t.schedules.c.node == node)
        return await self._all(query, ScheduleRecord)
