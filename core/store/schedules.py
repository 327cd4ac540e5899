"""Schedules (L4, L5): the weekly times of scheduled updates and downloads per node."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from uuid import uuid4

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.store import tables as t
from core.store.base import utcnow
from core.store.journal import Audited
from core.store.kv import KvStore
from core.store.records import ScheduleRecord

CHUNK = 5000
"""Nodes per statement (PostgreSQL's driver takes at most 32,767 parameters)."""

CHANGED = ("schedules", "changed")
"""The key-value entry every change of a schedule sets to a new random mark, in the same
transaction: an instance sees that schedules changed (also by another instance) by
reading that one row instead of every schedule."""


def _chunks(nodes: Sequence[str]) -> Iterator[list[str]]:
    for first in range(0, len(nodes), CHUNK):
        yield list(nodes[first : first + CHUNK])


class SchedulesStore(KvStore):
    """Schedules (L4, L5): the weekly times of scheduled updates and downloads per node."""

    async def _changed(self, conn: AsyncConnection) -> None:
        await conn.execute(self.kv_upsert(*CHANGED, uuid4().hex))

    async def schedules_mark(self) -> str | None:
        """The mark of the latest change of any schedule (None before the first change):
        a different mark than before means some schedule changed."""
        mark = await self.kv_get(*CHANGED)
        return None if mark is None else str(mark)

    async def set_schedule(
        self, *, node: str, kind: str, days: str, start: str, end: str | None, by: str
    ) -> None:
        await self.set_schedules([node], kind=kind, days=days, start=start, end=end, by=by)

    async def set_schedules(
        self,
        nodes: Sequence[str],
        *,
        kind: str,
        days: str,
        start: str,
        end: str | None,
        by: str,
        audit: Audited | None = None,
    ) -> None:
        """Set the schedule ``kind`` of every node in ``nodes``, in one transaction, with
        ``audit`` recorded for each node (as its target) when given."""
        async with self.transaction() as conn:
            for chunk in _chunks(nodes):
                # the calendar UID stays: calendars see the same event, changed
                found = await conn.execute(
                    select(t.schedules.c.node, t.schedules.c.uid).where(
                        t.schedules.c.node.in_(chunk), t.schedules.c.kind == kind
                    )
                )
                uids: dict[str, str | None] = {row.node: row.uid for row in found}
                await conn.execute(
                    delete(t.schedules).where(
                        t.schedules.c.node.in_(chunk), t.schedules.c.kind == kind
                    )
                )
                now = utcnow()
                await conn.execute(
                    insert(t.schedules),
                    [
                        {
                            "uid": uids.get(node) or t.new_uid(),
                            "node": node,
                            "kind": kind,
                            "days": days,
                            "start": start,
                            "end": end,
                            "enabled": True,
                            "updated_by": by,
                            "updated_at": now,
                        }
                        for node in chunk
                    ],
                )
                if audit is not None:
                    await conn.execute(
                        insert(t.audit), [{**audit.values, "target": node} for node in chunk]
                    )
            if nodes:
                await self._changed(conn)

    async def disable_schedule(self, *, node: str, kind: str, by: str) -> bool:
        return bool(await self.disable_schedules([node], kind=kind, by=by))

    async def disable_schedules(
        self,
        nodes: Sequence[str],
        *,
        kind: str,
        by: str,
        audit: Audited | None = None,
    ) -> list[str]:
        """Switch off the schedule ``kind`` of the nodes that have it on, in one
        transaction (with ``audit`` recorded for each of them, as its target, when given);
        returns those nodes, in the order given."""
        off: set[str] = set()
        async with self.transaction() as conn:
            for chunk in _chunks(nodes):
                on = t.schedules.c.node.in_(chunk), t.schedules.c.kind == kind
                found = (
                    await conn.execute(
                        select(t.schedules.c.node).where(*on, t.schedules.c.enabled.is_(True))
                    )
                ).scalars()
                chosen = sorted(set(found))
                if not chosen:
                    continue
                await conn.execute(
                    update(t.schedules)
                    .where(t.schedules.c.node.in_(chosen), t.schedules.c.kind == kind)
                    .values(enabled=False, updated_by=by, updated_at=utcnow())
                )
                if audit is not None:
                    await conn.execute(
                        insert(t.audit), [{**audit.values, "target": node} for node in chosen]
                    )
                off.update(chosen)
            if off:
                await self._changed(conn)
        return [node for node in nodes if node in off]

    async def schedules(self, node: str | None = None) -> list[ScheduleRecord]:
        query = select(t.schedules).order_by(t.schedules.c.node, t.schedules.c.kind)
        if node is not None:
            query = query.where(t.schedules.c.node == node)
        return await self._all(query, ScheduleRecord)
