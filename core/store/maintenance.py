"""Maintenance windows (L3): opened, notices sent, started, logon disabled, ended."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update

from core.store import tables as t
from core.store.base import StoreBase, audit_values, record_of, utcnow
from core.store.records import MaintenanceRecord

_m = t.maintenance
_AT = _m.c.ended_at.type
_OPEN = select(_m).where(_m.c.ended_at.is_(None)).order_by(_m.c.start)
_OPEN_OF = _OPEN.where(_m.c.node == bindparam("node"))
_BY_ID = select(_m).where(_m.c.id == bindparam("id"))
_END_OPEN = (
    update(_m)
    .where(_m.c.node == bindparam("b_node"), _m.c.ended_at.is_(None))
    .values(
        ended_at=bindparam("b_at", type_=_AT),
        ended_by=bindparam("b_by"),
        end_reason=bindparam("b_reason"),
    )
    .returning(*_m.c)
)
_STARTED = (
    update(_m)
    .where(
        _m.c.id.in_(bindparam("b_ids", expanding=True)),
        _m.c.started_at.is_(None),
        _m.c.ended_at.is_(None),
    )
    .values(started_at=bindparam("b_at", type_=_AT))
    .returning(_m.c.id)
)
STARTED_AT_ONCE = 1000
"""Windows marked started by one statement at most (a statement's parameters are limited)."""


class MaintenanceStore(StoreBase):
    """Maintenance windows (L3): opened, notices sent, started, logon disabled, ended."""

    async def open_maintenance(
        self,
        *,
        node: str,
        start: datetime,
        reason: str,
        origin: str,
        disable_logon: bool,
        created_by: str,
    ) -> MaintenanceRecord:
        """Schedule maintenance for a node, replacing an open one (which is ended)."""
        now = utcnow()
        async with self.transaction() as conn:
            await conn.execute(
                _END_OPEN, {"b_node": node, "b_at": now, "b_by": created_by, "b_reason": "replaced"}
            )
            new_id = (
                await conn.execute(
                    insert(_m).returning(_m.c.id),
                    {
                        "node": node,
                        "start": start,
                        "reason": reason,
                        "origin": origin,
                        "disable_logon": disable_logon,
                        "created_by": created_by,
                        "created_at": now,
                    },
                )
            ).scalar_one()
            row = (await conn.execute(_BY_ID, {"id": new_id})).one()
        return record_of(MaintenanceRecord, row)

    async def open_maintenance_many(
        self,
        nodes: Sequence[str],
        *,
        start: datetime,
        reason: str,
        origin: str,
        created_by: str,
        audit_source: str,
        audit_detail: str,
    ) -> None:
        """Open the same maintenance window on several nodes in one transaction (open
        ones are replaced), each with its audit record ("maintenance scheduled")."""
        if not nodes:
            return
        now = utcnow()
        names = list(nodes)
        async with self.transaction() as conn:
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.node.in_(names), t.maintenance.c.ended_at.is_(None))
                .values(ended_at=now, ended_by=created_by, end_reason="replaced")
            )
            await conn.execute(
                insert(t.maintenance),
                [
                    {
                        "node": name,
                        "start": start,
                        "reason": reason,
                        "origin": origin,
                        "disable_logon": False,
                        "created_by": created_by,
                        "created_at": now,
                    }
                    for name in names
                ],
            )
            await conn.execute(
                insert(t.audit),
                [
                    audit_values(
                        at=now,
                        actor=created_by,
                        source=audit_source,
                        action="maintenance scheduled",
                        target=name,
                        detail=audit_detail,
                        run_id=None,
                    )
                    for name in names
                ],
            )

    async def maintenance(self, node: str | None = None) -> list[MaintenanceRecord]:
        """Open (not ended) maintenance windows, by start time."""
        if node is None:
            return await self._all(_OPEN, MaintenanceRecord)
        return await self._all(_OPEN_OF, MaintenanceRecord, {"node": node})

    async def maintenance_called_off(self, since: datetime) -> list[MaintenanceRecord]:
        """Windows ended since ``since`` before their start came (cancelled, or replaced by
        a new one), by start time: the calendar feed keeps them as cancelled events."""
        query = (
            select(t.maintenance)
            .where(
                t.maintenance.c.ended_at.is_not(None),
                t.maintenance.c.ended_at >= since,
                t.maintenance.c.ended_at < t.maintenance.c.start,
            )
            .order_by(t.maintenance.c.start, t.maintenance.c.id)
        )
        return await self._all(query, MaintenanceRecord)

    async def maintenance_history(
        self, nodes: Sequence[str], *, limit: int = 10
    ) -> list[MaintenanceRecord]:
        """The last ``limit`` windows of ``nodes`` that ended after their start (those
        that took place, not those replaced or cancelled before), newest end first."""
        if not nodes:
            return []
        query = (
            select(t.maintenance)
            .where(
                t.maintenance.c.node.in_(list(nodes)),
                t.maintenance.c.ended_at.is_not(None),
                t.maintenance.c.ended_at > t.maintenance.c.start,
            )
            .order_by(t.maintenance.c.ended_at.desc(), t.maintenance.c.id.desc())
            .limit(limit)
        )
        return await self._all(query, MaintenanceRecord)

    async def end_maintenance(
        self, node: str, *, by: str, reason: str, at: datetime | None = None
    ) -> MaintenanceRecord | None:
        """End the open window of ``node`` at ``at`` (default: now) and return it as ended
        (one statement); None if none is open."""
        async with self.single_statement() as conn:
            row = (
                await conn.execute(
                    _END_OPEN,
                    {"b_node": node, "b_at": at or utcnow(), "b_by": by, "b_reason": reason},
                )
            ).first()
            if row is None:
                return None
        return record_of(MaintenanceRecord, row)

    async def mark_notice(self, maintenance_ids: Sequence[int], at: datetime) -> None:
        """Record that the windows' users got a notice at ``at`` (one statement)."""
        if not maintenance_ids:
            return
        async with self.single_statement() as conn:
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.id.in_(list(maintenance_ids)))
                .values(last_notice_at=at)
            )

    async def mark_started(self, maintenance_ids: Sequence[int], at: datetime) -> set[int]:
        """Record that open windows' starts were announced, in one transaction: the ids of
        those this call marked, not those announced already or ended (who marks a window
        publishes its MaintenanceStarted, once)."""
        marked: set[int] = set()
        if not maintenance_ids:
            return marked
        async with self.transaction() as conn:
            for first in range(0, len(maintenance_ids), STARTED_AT_ONCE):
                chunk = list(maintenance_ids[first : first + STARTED_AT_ONCE])
                result = await conn.execute(_STARTED, {"b_ids": chunk, "b_at": at})
                marked.update(row.id for row in result)
        return marked

    async def mark_logon_disabled(self, maintenance_id: int, at: datetime) -> None:
        async with self.single_statement() as conn:
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.id == maintenance_id)
                .values(logon_disabled_at=at)
            )
