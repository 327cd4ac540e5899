"""The run journal's group commit: step transitions and audit records of all runs in
flight, written together.

Every run writes a transition before each step (the previous step done, the next one
running) and audit records of what its steps did. Instead of one transaction each, what
arrives while a transaction is being written waits for the next one, and each transaction
writes all that is waiting with one statement per kind (ends, starts, the runs' current
steps, audit records). A caller returns only once its own record is committed: a step
starts after its record is durable, as with a transaction of its own (L15), but the store
commits once per batch instead of once per record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.store import tables as t

log = logging.getLogger(__name__)

MAX_BATCH = 500
"""Transitions written by one transaction at most."""

Transaction = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """Step ``name`` of run ``run_id`` starts at ``at``; ``after`` (if any) ended then."""

    run_id: int
    name: str
    detail: str | None
    after: str | None
    at: datetime


_END = (
    update(t.run_steps)
    .where(
        t.run_steps.c.run_id == bindparam("b_run"),
        t.run_steps.c.name == bindparam("b_after"),
        t.run_steps.c.status == "running",
    )
    .values(status="done", finished_at=bindparam("b_at"))
)
_CURRENT = (
    update(t.runs)
    .where(t.runs.c.id == bindparam("b_run"))
    .values(
        step=bindparam("b_name"),
        status="running",
        started_at=func.coalesce(t.runs.c.started_at, bindparam("b_at")),
    )
)


@dataclass(frozen=True, slots=True)
class Audited:
    """One audit record's columns (``audit_values``)."""

    values: Mapping[str, Any]


Entry = Transition | Audited


async def write_entries(conn: AsyncConnection, entries: Sequence[Entry]) -> None:
    """The entries in one transaction: one statement per kind for all of them."""
    transitions = [x for x in entries if isinstance(x, Transition)]
    if transitions:
        await write_transitions(conn, transitions)
    audits = [dict(x.values) for x in entries if isinstance(x, Audited)]
    if audits:
        await conn.execute(insert(t.audit), audits)


async def write_transitions(conn: AsyncConnection, transitions: Sequence[Transition]) -> None:
    """The transitions in one transaction: three statements for all of them."""
    ends = [
        {"b_run": x.run_id, "b_after": x.after, "b_at": x.at}
        for x in transitions
        if x.after is not None
    ]
    if ends:
        await conn.execute(_END, ends)
    await conn.execute(
        insert(t.run_steps),
        [
            {
                "run_id": x.run_id,
                "name": x.name,
                "status": "running",
                "detail": x.detail,
                "started_at": x.at,
            }
            for x in transitions
        ],
    )
    await conn.execute(
        _CURRENT, [{"b_run": x.run_id, "b_name": x.name, "b_at": x.at} for x in transitions]
    )


class StepJournal:
    """Writes the step transitions and audit records of all runs in flight, in batches
    (group commit)."""

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction
        self._waiting: list[tuple[Entry, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0
        """Transactions written so far (for the benchmarks and tests)."""

    async def write(self, entry: Entry) -> None:
        """Return once ``entry`` is committed. A caller stopped before its batch is
        written leaves nothing behind (the entry is not written)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((entry, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain(), name="step-journal")
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done():
                done.cancel()  # not written yet: the writer leaves it out
            raise

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(0)  # transitions made in this same turn join the batch
                batch = [(x, f) for x, f in self._waiting[:MAX_BATCH] if not f.done()]
                del self._waiting[:MAX_BATCH]
                if batch:
                    await self._commit(batch)
        except asyncio.CancelledError:
            for _, done in self._waiting:
                done.cancel()
            self._waiting.clear()
            raise

    async def _commit(self, batch: list[tuple[Entry, asyncio.Future[None]]]) -> None:
        try:
            async with self._transaction() as conn:
                await write_entries(conn, [x for x, _ in batch])
            self.commits += 1
        except BaseException as exc:
            if len(batch) > 1 and isinstance(exc, Exception):
                # one bad entry must not fail the others: each on its own
                for one in batch:
                    await self._commit([one])
                return
            for _, done in batch:
                if done.done():
                    continue
                if isinstance(exc, Exception):
                    done.set_exception(exc)
                else:
                    done.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)
