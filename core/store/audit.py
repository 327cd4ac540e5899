"""The audit log (L13): who did what, when, to which target."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select

from core.store import tables as t
from core.store.base import StoreBase, audit_values, utcnow
from core.store.journal import Audited
from core.store.records import AuditRecord

PRUNE_CHUNK = 5000
"""Audit records removed per transaction by ``prune_audit``."""


class AuditStore(StoreBase):
    """The audit log (L13): who did what, when, to which target."""

    @staticmethod
    def audit_entry(
        *,
        actor: str,
        source: str,
        action: str,
        target: str | None = None,
        detail: str = "",
        run_id: int | None = None,
    ) -> Audited:
        """One audit record to hand to ``commit`` with other changes."""
        return Audited(
            audit_values(
                at=utcnow(),
                actor=actor,
                source=source,
                action=action,
                target=target,
                detail=detail,
                run_id=run_id,
            )
        )

    async def audit(
        self,
        *,
        actor: str,
        source: str,
        action: str,
        target: str | None = None,
        detail: str = "",
        run_id: int | None = None,
        wait: bool = True,
    ) -> None:
        """One audit record (L13); returns once it is committed (records of many callers
        at once share one transaction: ``core.store.journal``), or at once (``wait``
        false: written with the next transaction)."""
        await self.journal.write(
            self.audit_entry(
                actor=actor,
                source=source,
                action=action,
                target=target,
                detail=detail,
                run_id=run_id,
            ),
            wait=wait,
        )

    async def audit_log(
        self, *, targets: Sequence[str] | None = None, limit: int = 20
    ) -> list[AuditRecord]:
        """The latest ``limit`` records (of ``targets``), with every record handed over
        before (also those not waited for: ``core.store.journal``)."""
        await self.journal.flush()
        query = select(t.audit).order_by(t.audit.c.id.desc()).limit(limit)
        if targets is not None:
            query = query.where(t.audit.c.target.in_(list(targets)))
        return await self._all(query, AuditRecord)

    async def prune_audit(self, before: datetime, *, chunks: int = 10_000) -> int:
        """Remove the audit records older than ``before``, ``PRUNE_CHUNK`` per transaction
        (at most ``chunks`` transactions); how many were removed."""
        removed = 0
        for _ in range(chunks):
            async with self.transaction() as conn:
                oldest = (
                    select(t.audit.c.id)
                    .where(t.audit.c.at < before)
                    .order_by(t.audit.c.id)
                    .limit(PRUNE_CHUNK)
                )
                ids = [row[0] for row in (await conn.execute(oldest)).all()]
                if ids:
                    await conn.execute(delete(t.audit).where(t.audit.c.id.in_(ids)))
            removed += len(ids)
            if len(ids) < PRUNE_CHUNK:
                break
        return removed
