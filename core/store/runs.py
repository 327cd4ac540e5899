"""Runs and their steps (L13, L15): every step is written before it starts and after it ends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import StoreError
from core.store import tables as t
from core.store.base import NodeBusyError, StoreBase, audit_row, record_of, utcnow
from core.store.records import NewRun, RunEnd, RunRecord, StepRecord


class RunsStore(StoreBase):
    """Runs and their steps (L13, L15): every step is written before it starts and after it ends."""

    async def create_run(
        self,
        *,
        kind: str,
        node: str,
        target: str,
        actor: str,
        params: Mapping[str, Any] | None = None,
        owner: str | None = None,
        exclusive: bool = True,
    ) -> int:
        """A new run in state ``queued``; with ``exclusive`` the node is claimed for it.

        Raises ``NodeBusyError`` when the node already has an active run.
        """
        spec = NewRun(
            kind=kind,
            node=node,
            target=target,
            actor=actor,
            params=dict(params or {}),
            owner=owner,
            exclusive=exclusive,
        )
        return (await self.create_runs([spec]))[0]

    async def create_runs(self, specs: Sequence[NewRun]) -> list[int]:
        """Create the runs of one command in one transaction: all of them, or (when one
        node is busy: ``NodeBusyError``) none. Each run's audit record and its place in
        its cluster's slot queue are written with it."""
        now = utcnow()
        ids: list[int] = []
        async with self.transaction() as conn:
            for spec in specs:
                run_id = (
                    await conn.execute(
                        insert(t.runs)
                        .values(
                            kind=spec.kind,
                            node=spec.node,
                            target=spec.target,
                            actor=spec.actor,
                            status="queued",
                            params=dict(spec.params),
                            progress_done=0,
                            progress_total=0,
                            owner=spec.owner,
                            created_at=now,
                        )
                        .returning(t.runs.c.id)
                    )
                ).scalar_one()
                if spec.exclusive:
                    claimed = await conn.execute(
                        update(t.nodes)
                        .where(t.nodes.c.name == spec.node, t.nodes.c.active_run_id.is_(None))
                        .values(active_run_id=run_id)
                    )
                    if claimed.rowcount != 1:
                        busy = (
                            await conn.execute(
                                select(t.nodes.c.active_run_id).where(t.nodes.c.name == spec.node)
                            )
                        ).scalar()
                        await conn.rollback()
                        if busy is None:
                            raise StoreError(f"node {spec.node} is not in the store")
                        raise NodeBusyError(spec.node, int(busy))
                if spec.audit is not None:
                    await conn.execute(
                        audit_row(
                            at=now,
                            actor=spec.actor,
                            source=spec.audit_source,
                            action=f"run {spec.kind}",
                            target=spec.node,
                            detail=spec.audit.replace("{run}", str(run_id)),
                            run_id=run_id,
                        )
                    )
                if spec.slot_queue is not None:
                    await conn.execute(  # a place left by a run that is gone is stale
                        delete(t.slot_waiters).where(
                            t.slot_waiters.c.cluster == spec.slot_queue,
                            t.slot_waiters.c.node == spec.node,
                        )
                    )
                    await conn.execute(
                        insert(t.slot_waiters).values(
                            cluster=spec.slot_queue, node=spec.node, run_id=run_id, queued_at=now
                        )
                    )
                ids.append(int(run_id))
        return ids

    async def run(self, run_id: int) -> RunRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.runs).where(t.runs.c.id == run_id))).first()
        return None if row is None else record_of(RunRecord, row)

    async def runs(
        self,
        *,
        node: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        query = select(t.runs).order_by(t.runs.c.id.desc()).limit(limit)
        if node is not None:
            query = query.where(t.runs.c.node == node)
        if statuses is not None:
            query = query.where(t.runs.c.status.in_(list(statuses)))
        return await self._all(query, RunRecord)

    async def update_run(self, run_id: int, **values: Any) -> None:
        async with self.transaction() as conn:
            await conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))

    async def begin_step(
        self,
        run_id: int,
        name: str,
        detail: str | None = None,
        *,
        after: str | None = None,
    ) -> None:
        """Record that step ``name`` of the run starts; with ``after``, that step ends as
        done in the same transaction (one write per step transition, so that a crash
        leaves either the old step running or the new one started, never neither)."""
        now = utcnow()
        async with self.transaction() as conn:
            if after is not None:
                await self._end_step(conn, run_id, after, status="done", detail=None, now=now)
            await conn.execute(
                insert(t.run_steps).values(
                    run_id=run_id, name=name, status="running", detail=detail, started_at=now
                )
            )
            await conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id)
                .values(
                    step=name,
                    status="running",
                    started_at=func.coalesce(t.runs.c.started_at, now),
                )
            )

    async def end_step(
        self, run_id: int, name: str, *, status: str = "done", detail: str | None = None
    ) -> None:
        async with self.transaction() as conn:
            await self._end_step(conn, run_id, name, status=status, detail=detail, now=utcnow())

    @staticmethod
    async def _end_step(
        conn: AsyncConnection,
        run_id: int,
        name: str,
        *,
        status: str,
        detail: str | None,
        now: datetime,
    ) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": now}
        if detail is not None:
            values["detail"] = detail
        await conn.execute(
            update(t.run_steps)
            .where(
                t.run_steps.c.run_id == run_id,
                t.run_steps.c.name == name,
                t.run_steps.c.status == "running",
            )
            .values(**values)
        )

    async def step_detail(self, run_id: int, name: str, detail: str) -> None:
        """Note what a running step did so far (shown by ``log``); the step goes on."""
        async with self.transaction() as conn:
            await conn.execute(
                update(t.run_steps)
                .where(
                    t.run_steps.c.run_id == run_id,
                    t.run_steps.c.name == name,
                    t.run_steps.c.status == "running",
                )
                .values(detail=detail)
            )

    async def steps(self, run_id: int) -> list[StepRecord]:
        query = (
            select(
                t.run_steps.c.run_id,
                t.run_steps.c.name,
                t.run_steps.c.status,
                t.run_steps.c.detail,
                t.run_steps.c.started_at,
                t.run_steps.c.finished_at,
            )
            .where(t.run_steps.c.run_id == run_id)
            .order_by(t.run_steps.c.id)
        )
        return await self._all(query, StepRecord)

    async def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        error: str | None = None,
        end: RunEnd | None = None,
    ) -> None:
        """End a run and release the node it claimed, in one transaction; with ``end`` the
        outcome goes to the audit log too ("run KIND STATUS": the error, else the message;
        L13)."""
        async with self.transaction() as conn:
            if end is not None:
                await conn.execute(
                    audit_row(
                        at=utcnow(),
                        actor="tgops",
                        source="system",
                        action=f"run {end.kind} {status}",
                        target=end.node,
                        detail=error or end.message,
                        run_id=run_id,
                    )
                )
            await conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id)
                .values(status=status, error=error, finished_at=utcnow())
            )
            await conn.execute(
                update(t.run_steps)
                .where(t.run_steps.c.run_id == run_id, t.run_steps.c.status == "running")
                .values(status="failed" if status == "failed" else "done", finished_at=utcnow())
            )
            await conn.execute(
                update(t.nodes).where(t.nodes.c.active_run_id == run_id).values(active_run_id=None)
            )

    async def run_counts(self, statuses: Sequence[str]) -> dict[tuple[str, str], int]:
        """Runs in one of ``statuses`` per (kind, status)."""
        query = (
            select(t.runs.c.kind, t.runs.c.status, func.count())
            .where(t.runs.c.status.in_(list(statuses)))
            .group_by(t.runs.c.kind, t.runs.c.status)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}
