"""Runs and their steps (L13, L15): every step is written before it starts and after it ends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import StoreError
from core.store import tables as t
from core.store.base import (
    NodeBusyError,
    StoreBase,
    audit_values,
    record_of,
    utcnow,
)
from core.store.journal import (
    RunChange,
    RunFinish,
    StepEnd,
    Transition,
    done_steps,
    latest_step,
)
from core.store.records import NewRun, RunEnd, RunRecord, StepRecord

_RUNS = select(
    *(c for c in t.runs.c if c.name != "step"),
    # the run's current step: its latest step row (transitions do not update the run)
    func.coalesce(latest_step(), t.runs.c.step).label("step"),
)


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
        its cluster's slot queue are written with it. One statement per kind of row,
        however many runs (a scheduled update time may start thousands)."""
        if not specs:
            return []
        now = utcnow()
        claimed = [spec.node for spec in specs if spec.exclusive]
        async with self.transaction() as conn:
            if claimed:
                await self._check_free(conn, claimed)
            # one node per run (as a command makes them): the ids are matched by node, and
            # the rows go in one statement; otherwise in the order given (row by row on SQLite)
            by_node = len({spec.node for spec in specs}) == len(specs)
            rows = (
                await conn.execute(
                    insert(t.runs).returning(
                        t.runs.c.id, t.runs.c.node, sort_by_parameter_order=not by_node
                    ),
                    [
                        {
                            "kind": spec.kind,
                            "node": spec.node,
                            "target": spec.target,
                            "actor": spec.actor,
                            "status": "queued",
                            "params": dict(spec.params),
                            "progress_done": 0,
                            "progress_total": 0,
                            "owner": spec.owner,
                            "created_at": now,
                        }
                        for spec in specs
                    ],
                )
            ).all()
            if by_node:
                made = {str(row.node): int(row.id) for row in rows}
                ids = [made[spec.node] for spec in specs]
            else:
                ids = [int(row.id) for row in rows]
            if claimed:
                mine = {spec.node: run_id for spec, run_id in zip(specs, ids, strict=True)}
                await conn.execute(
                    update(t.nodes)
                    .where(t.nodes.c.name == bindparam("b_node"), t.nodes.c.active_run_id.is_(None))
                    .values(active_run_id=bindparam("b_run")),
                    [{"b_node": node, "b_run": mine[node]} for node in claimed],
                )
                # another instance may have claimed one in between: then none is created
                await self._check_free(conn, claimed, mine)
            audits = [
                audit_values(
                    at=now,
                    actor=spec.actor,
                    source=spec.audit_source,
                    action=f"run {spec.kind}",
                    target=spec.node,
                    detail=spec.audit.replace("{run}", str(run_id)),
                    run_id=run_id,
                )
                for spec, run_id in zip(specs, ids, strict=True)
                if spec.audit is not None
            ]
            if audits:
                await conn.execute(insert(t.audit), audits)
            queued = [
                {"b_cluster": spec.slot_queue, "b_node": spec.node, "b_run": run_id}
                for spec, run_id in zip(specs, ids, strict=True)
                if spec.slot_queue is not None
            ]
            if queued:
                await conn.execute(  # a place left by a run that is gone is stale
                    delete(t.slot_waiters).where(
                        t.slot_waiters.c.cluster == bindparam("b_cluster"),
                        t.slot_waiters.c.node == bindparam("b_node"),
                    ),
                    [{"b_cluster": q["b_cluster"], "b_node": q["b_node"]} for q in queued],
                )
                await conn.execute(
                    insert(t.slot_waiters),
                    [
                        {
                            "cluster": q["b_cluster"],
                            "node": q["b_node"],
                            "run_id": q["b_run"],
                            "queued_at": now,
                        }
                        for q in queued
                    ],
                )
        return ids

    @staticmethod
    async def _check_free(
        conn: AsyncConnection, nodes: Sequence[str], mine: Mapping[str, int] | None = None
    ) -> None:
        """``NodeBusyError`` for the first node that has an active run (other than the one
        in ``mine``), ``StoreError`` for one not in the store."""
        active = {
            row.name: row.active_run_id
            for row in await conn.execute(
                select(t.nodes.c.name, t.nodes.c.active_run_id).where(
                    t.nodes.c.name.in_(list(nodes))
                )
            )
        }
        for node in nodes:
            if node not in active:
                raise StoreError(f"node {node} is not in the store")
            busy = active[node]
            if busy is not None and (mine is None or busy != mine.get(node)):
                raise NodeBusyError(node, int(busy))

    async def run(self, run_id: int) -> RunRecord | None:
        async with self.reading() as conn:
            row = (await conn.execute(_RUNS.where(t.runs.c.id == run_id))).first()
        return None if row is None else record_of(RunRecord, row)

    async def runs_of(self, run_ids: Sequence[int]) -> list[RunRecord]:
        """These runs (those in the store), in the order given, read with one statement."""
        if not run_ids:
            return []
        found = {
            r.id: r for r in await self._all(_RUNS.where(t.runs.c.id.in_(list(run_ids))), RunRecord)
        }
        return [found[i] for i in run_ids if i in found]

    async def runs(
        self,
        *,
        node: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 50,
        not_owner: str | None = None,
    ) -> list[RunRecord]:
        """The newest runs first; with ``not_owner``, only those another instance (or
        none) owns."""
        query = _RUNS.order_by(t.runs.c.id.desc()).limit(limit)
        if node is not None:
            query = query.where(t.runs.c.node == node)
        if statuses is not None:
            query = query.where(t.runs.c.status.in_(list(statuses)))
        if not_owner is not None:
            owner = t.runs.c.owner
            query = query.where(or_(owner.is_(None), owner != not_owner))
        return await self._all(query, RunRecord)

    async def update_run(self, run_id: int, **values: Any) -> None:
        async with self.single_statement() as conn:
            await conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))

    async def change_run(self, run_id: int, *, wait: bool = True, **values: Any) -> None:
        """``update_run`` through the run journal: the changes of many runs at once share
        one transaction (``core.store.journal``). Returns once committed (``wait``)."""
        await self.journal.write(RunChange(run_id=run_id, values=values), wait=wait)

    async def begin_step(
        self,
        run_id: int,
        name: str,
        detail: str | None = None,
        *,
        after: str | None = None,
        wait: bool = True,
    ) -> None:
        """Record that step ``name`` of the run starts; with ``after``, that step ends as
        done in the same transaction (one write per step transition, so that a crash
        leaves either the old step running or the new one started, never neither).

        Returns once that is committed (with ``wait`` false: at once, written with the
        next transaction); the transitions of all runs that arrive meanwhile share one
        transaction (group commit).
        """
        await self.journal.write(
            Transition(run_id=run_id, name=name, detail=detail, after=after, at=utcnow()),
            wait=wait,
        )

    async def end_step(
        self, run_id: int, name: str, *, status: str = "done", detail: str | None = None
    ) -> None:
        """The running step ends with ``status`` (through the run journal: committed with
        other runs' records; returns once committed)."""
        await self.journal.write(
            StepEnd(run_id=run_id, name=name, status=status, detail=detail, at=utcnow())
        )

    async def step_detail(self, run_id: int, name: str, detail: str, *, wait: bool = True) -> None:
        """Note what a running step did so far (shown by ``log``); the step goes on."""
        await self.journal.write(
            StepEnd(run_id=run_id, name=name, status=None, detail=detail, at=utcnow()),
            wait=wait,
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
        return done_steps(await self._all(query, StepRecord))

    async def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        error: str | None = None,
        end: RunEnd | None = None,
        done: str | None = None,
        done_at: datetime | None = None,
    ) -> None:
        """End a run and release the node it claimed, in one transaction; with ``end`` the
        outcome goes to the audit log too ("run KIND STATUS": the error, else the message;
        L13). Its steps still running end with it, failed when it failed, except ``done``
        (its last step, carried out but not yet recorded done: it ends done at ``done_at``)."""
        now = utcnow()
        audit = None
        if end is not None:
            audit = audit_values(
                at=now,
                actor="tgops",
                source="system",
                action=f"run {end.kind} {status}",
                target=end.node,
                detail=error or end.message,
                run_id=run_id,
            )
        # through the run journal: the ends of many runs at once share one transaction
        await self.journal.write(
            RunFinish(
                run_id=run_id,
                status=status,
                error=error,
                at=now,
                audit=audit,
                done=done,
                done_at=done_at,
                node=None if end is None else end.node,
            )
        )

    async def run_counts(self, statuses: Sequence[str]) -> dict[tuple[str, str], int]:
        """Runs in one of ``statuses`` per (kind, status)."""
        query = (
            select(t.runs.c.kind, t.runs.c.status, func.count())
            .where(t.runs.c.status.in_(list(statuses)))
            .group_by(t.runs.c.kind, t.runs.c.status)
        )
        async with self.reading() as conn:
            rows = (await conn.execute(query)).all()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}
