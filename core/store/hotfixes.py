"""Hotfixes: selections per node (L9), announcements sent, and phone escalations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from core.store import tables as t
from core.store.base import StoreBase, utcnow


class HotfixesStore(StoreBase):
    """Hotfixes: selections per node (L9), announcements sent, and phone escalations."""

    async def select_hotfixes(self, node: str, ids: Sequence[str], *, by: str) -> list[str]:
        """Select hotfixes for a node; returns the ids that were not selected before."""
        added = []
        async with self.transaction() as conn:
            have = {
                r.hotfix_id
                for r in await conn.execute(
                    select(t.hotfix_selections.c.hotfix_id).where(
                        t.hotfix_selections.c.node == node
                    )
                )
            }
            for hotfix_id in ids:
                if hotfix_id in have:
                    continue
                await conn.execute(
                    insert(t.hotfix_selections).values(
                        node=node, hotfix_id=hotfix_id, selected_by=by, selected_at=utcnow()
                    )
                )
                have.add(hotfix_id)
                added.append(hotfix_id)
        return added

    async def unselect_hotfixes(self, node: str, ids: Sequence[str]) -> list[str]:
        async with self.transaction() as conn:
            have = {
                r.hotfix_id
                for r in await conn.execute(
                    select(t.hotfix_selections.c.hotfix_id).where(
                        t.hotfix_selections.c.node == node
                    )
                )
            }
            removed = [i for i in ids if i in have]
            if removed:
                await conn.execute(
                    delete(t.hotfix_selections).where(
                        t.hotfix_selections.c.node == node,
                        t.hotfix_selections.c.hotfix_id.in_(removed),
                    )
                )
        return removed

    async def selected_hotfixes(self) -> dict[str, list[str]]:
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    select(t.hotfix_selections).order_by(
                        t.hotfix_selections.c.node, t.hotfix_selections.c.hotfix_id
                    )
                )
            ).all()
        selected: dict[str, list[str]] = {}
        for row in rows:
            selected.setdefault(row.node, []).append(row.hotfix_id)
        return selected

    async def mark_announced(self, hotfix_id: str, *, channel: str, urgency: str) -> bool:
        """Record a hotfix as announced; ``False`` when it was announced before."""
        try:
            async with self.transaction() as conn:
                await conn.execute(
                    insert(t.announced_hotfixes).values(
                        hotfix_id=hotfix_id,
                        channel=channel,
                        urgency=urgency,
                        announced_at=utcnow(),
                    )
                )
        except IntegrityError:
            return False
        return True

    async def announced(self, hotfix_ids: Sequence[str]) -> set[str]:
        """Which of these hotfixes were announced before."""
        if not hotfix_ids:
            return set()
        async with self.reading() as conn:
            rows = await conn.execute(
                select(t.announced_hotfixes.c.hotfix_id).where(
                    t.announced_hotfixes.c.hotfix_id.in_(list(hotfix_ids))
                )
            )
            return {r.hotfix_id for r in rows}

    async def announced_at(self, hotfix_ids: Sequence[str]) -> dict[str, datetime]:
        """When each of these hotfixes was first seen (announced or recorded as known)."""
        if not hotfix_ids:
            return {}
        async with self.reading() as conn:
            rows = await conn.execute(
                select(t.announced_hotfixes.c.hotfix_id, t.announced_hotfixes.c.announced_at).where(
                    t.announced_hotfixes.c.hotfix_id.in_(list(hotfix_ids))
                )
            )
            return {r.hotfix_id: r.announced_at for r in rows}

    async def create_escalation(self, hotfix_id: str) -> bool:
        """Start the escalation of a hotfix (status running); ``False`` when it exists."""
        now = utcnow()
        try:
            async with self.transaction() as conn:
                await conn.execute(
                    insert(t.escalations).values(
                        hotfix_id=hotfix_id,
                        status="running",
                        round=0,
                        position=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def escalation(self, hotfix_id: str) -> dict[str, Any] | None:
        """The escalation row of a hotfix as a mapping of its columns, or None."""
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    select(t.escalations).where(t.escalations.c.hotfix_id == hotfix_id)
                )
            ).first()
        return None if row is None else dict(row._mapping)

    async def escalations(self, *, statuses: Sequence[str]) -> list[dict[str, Any]]:
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    select(t.escalations)
                    .where(t.escalations.c.status.in_(list(statuses)))
                    .order_by(t.escalations.c.id)
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    async def update_escalation(
        self, hotfix_id: str, *, expect: Mapping[str, Any], values: Mapping[str, Any]
    ) -> bool:
        """Change an escalation only while its columns still hold ``expect`` (compare and
        set); ``False`` when someone changed it first."""
        allowed = {"status", "round", "position", "call_sid", "acknowledged_by", "acknowledged_at"}
        unknown = (set(expect) | set(values)) - allowed
        if unknown:
            raise ValueError(f"not an escalation column: {', '.join(sorted(unknown))}")
        conditions = [t.escalations.c.hotfix_id == hotfix_id]
        for column, value in expect.items():
            col = t.escalations.c[column]
            if isinstance(value, list | tuple | set | frozenset):
                conditions.append(col.in_(list(value)))
            elif value is None:
                conditions.append(col.is_(None))
            else:
                conditions.append(col == value)
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.escalations).where(*conditions).values(**dict(values), updated_at=utcnow())
            )
        return bool(result.rowcount)
