"""The run journal's group commit: step transitions, node changes and audit records of
all runs in flight, written together.

Every run writes a transition before each step (the previous step done, the next one
running), the changes its steps made to its node, and audit records of what they did.
Instead of one transaction each, what arrives while a transaction is being written waits
for the next one (which starts ``GATHER`` seconds after the last one ended at the
earliest, so that under load each gathers a few milliseconds' worth), and each
transaction writes all that is waiting with one statement per kind (steps that start,
runs that start, node changes with the same columns, step details, audit records). A caller
returns only once its own records are committed: a step starts after its record is
durable, as with a transaction of its own (L15), but the store commits once per batch
instead of once per record. The records one caller hands over together are committed in
the same transaction. On SQLite such a transaction is one trip to the database's thread
(``core.store.sqlite.KEEP_CHANGES``): the journal reads nothing its writes return. On
PostgreSQL a small transaction is one call of a function that runs its statements
(``core.store.journal_pg``), a large one goes statement by statement.

A transition is one statement: the row of the step that starts. The step before it is
not updated; it is done once a later step of its run has begun (``done_steps`` reads it
so, and the run's end writes it so); the run's status is set to running by its first
transition only (the journal remembers which runs it has marked, until they end).

A caller may also hand records over without waiting (``wait=False``): they are written
with the next transaction anyone waits for, or after ``LAZY_FLUSH`` seconds at the
latest, always in the order they were handed over (a record waited for is committed only
after every record handed over before it). Runs do this for the start of steps that a
restart simply carries out again (``Flow.lazy``) and for what any step records (audit
lines, node and run changes): those records are committed with the run's next transition
or its end, before the run does anything more. A crash may lose them: a resumable step
runs again after the restart and records them again, one that is not resumable is ended
as interrupted (and its node locked) whatever it had recorded. The output of a driver's
commands goes this way too: a crash can lose the last 0.1 s of it, never a step's record.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence, Set
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import (
    Boolean,
    String,
    Table,
    Update,
    bindparam,
    case,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from core.store import tables as t
from core.store.records import NodeRecord, StepRecord, node_record
from core.store.sqlite import KEEP_CHANGES

log = logging.getLogger(__name__)

MAX_BATCH = 500
"""Transitions written by one transaction at most."""

GATHER = 0.005
"""Seconds between the end of one transaction and the start of the next at least: under
load, what arrives meanwhile is written together (a lone run's record, arriving after
that, is written at once)."""

LAZY_FLUSH = 0.1
"""Seconds records handed over without waiting stay unwritten at most (unless a
transaction is under way)."""

Transaction = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """Step ``name`` of run ``run_id`` starts at ``at``; ``after`` (if any) ended then."""

    run_id: int
    name: str
    detail: str | None
    after: str | None
    at: datetime


def _at(name: str = "b_at") -> Any:
    """The time parameter ``name`` as the store keeps times (inside a function such as
    coalesce a parameter does not take the column's type by itself)."""
    return bindparam(name, type_=t.UTCDateTime())


_RUNNING = (
    update(t.runs)
    .where(t.runs.c.id == bindparam("b_run"))
    .values(status="running", started_at=func.coalesce(t.runs.c.started_at, _at()))
)


@dataclass(frozen=True, slots=True)
class Audited:
    """One audit record's columns (``audit_values``)."""

    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeChange:
    """Columns of node ``name`` to set (its version goes up by one). ``derive`` computes
    more columns from the node's row as it is inside the writing transaction (for a value
    that depends on the current one, such as the staged packages)."""

    name: str
    values: Mapping[str, Any]
    derive: Callable[[NodeRecord], Mapping[str, Any]] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunChange:
    """Columns of run ``run_id`` to set (its parameters, its progress)."""

    run_id: int
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepEnd:
    """Running step ``name`` of run ``run_id`` gets ``status`` (``None``: it goes on) and,
    when given, ``detail``."""

    run_id: int
    name: str
    status: str | None
    detail: str | None
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinish:
    """Run ``run_id`` ends with ``status``: its steps still running end with it, its node
    is free again, and (``audit``) its outcome goes to the audit log."""

    run_id: int
    status: str
    error: str | None
    at: datetime
    audit: Mapping[str, Any] | None = None
    done: str | None = None
    """A step that is done though its row still says running (the run's last step, whose
    end is written with the run's): it ends ``done`` at ``done_at`` whatever the run's
    status."""
    done_at: datetime | None = None
    node: str | None = None
    """The run's node (``RunEnd.node``) when the caller names it: its release then goes
    in the statement of the transaction's node changes, if it has any."""


Entry = Transition | Audited | NodeChange | RunChange | StepEnd | RunFinish

_STEP_END = (
    update(t.run_steps)
    .where(
        t.run_steps.c.run_id == bindparam("b_run"),
        t.run_steps.c.name == bindparam("b_name"),
        t.run_steps.c.status == "running",
    )
    .values(
        status=func.coalesce(bindparam("b_status"), t.run_steps.c.status),
        finished_at=func.coalesce(_at(), t.run_steps.c.finished_at),
        detail=func.coalesce(bindparam("b_detail"), t.run_steps.c.detail),
    )
)
_STEP_DETAIL = (
    update(t.run_steps)
    .where(
        t.run_steps.c.id
        == select(func.max(t.run_steps.c.id))
        .where(
            t.run_steps.c.run_id == bindparam("b_run"),
            t.run_steps.c.name == bindparam("b_name"),
        )
        .scalar_subquery()
    )
    .values(detail=bindparam("b_detail"))
)
_LATER = t.run_steps.alias("later")


def latest_step() -> Any:
    """The name of the latest step of the run of the enclosing query on ``runs``."""
    return (
        select(_LATER.c.name)
        .where(_LATER.c.run_id == t.runs.c.id)
        .order_by(_LATER.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def _next_begun() -> Any:
    """When the first later step of another name of the same run began (``None``: none)."""
    return (
        select(func.min(_LATER.c.started_at))
        .where(
            _LATER.c.run_id == t.run_steps.c.run_id,
            _LATER.c.id > t.run_steps.c.id,
            _LATER.c.name != t.run_steps.c.name,
        )
        .scalar_subquery()
    )


_RUN_END = (
    update(t.runs)
    .where(t.runs.c.id == bindparam("b_run"))
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        finished_at=bindparam("b_at"),
        step=func.coalesce(latest_step(), t.runs.c.step),
    )
)
_RUN_STEPS_END = (
    update(t.run_steps)
    .where(t.run_steps.c.run_id == bindparam("b_run"), t.run_steps.c.status == "running")
    .values(
        # a step followed by another was done when that one began; the step ``b_done``
        # (the run's last, carried out) was done at ``b_done_at``; any other ends with the
        # run
        status=case(
            (_next_begun().is_not(None), "done"),
            (t.run_steps.c.name == bindparam("b_done", type_=String), "done"),
            else_=bindparam("b_status"),
        ),
        finished_at=func.coalesce(
            _next_begun(),
            case((t.run_steps.c.name == bindparam("b_done", type_=String), _at("b_done_at"))),
            _at(),
        ),
    )
)
NODES_NAMED = select(t.nodes).where(t.nodes.c.name.in_(bindparam("names", expanding=True)))
_NODE_FREE = (
    # the run's node found by its name (the key), not by ``active_run_id`` (no index: each
    # run's end read every node, at 1,000 nodes a million rows per update time)
    update(t.nodes)
    .where(
        t.nodes.c.name
        == select(t.runs.c.node).where(t.runs.c.id == bindparam("b_run")).scalar_subquery(),
        t.nodes.c.active_run_id == bindparam("b_run"),
    )
    .values(active_run_id=None)
)


async def write_step_ends(conn: AsyncConnection, ends: Sequence[StepEnd]) -> None:
    """Step ends, and details of steps that go on. A detail goes to the step's latest row
    whether it is still running or not: a record handed over without waiting may be
    written in the same transaction as the transition that ends its step."""
    details = [x for x in ends if x.status is None]
    if details:
        await conn.execute(
            _STEP_DETAIL,
            [{"b_run": x.run_id, "b_name": x.name, "b_detail": x.detail} for x in details],
        )
    finished = [x for x in ends if x.status is not None]
    if finished:
        await conn.execute(
            _STEP_END,
            [
                {
                    "b_run": x.run_id,
                    "b_name": x.name,
                    "b_status": x.status,
                    "b_at": x.at,
                    "b_detail": x.detail,
                }
                for x in finished
            ],
        )


def run_steps_end_rows(finishes: Iterable[RunFinish]) -> list[dict[str, Any]]:
    """The parameters of the update that ends the steps of the runs that end (on
    PostgreSQL also the rows of ``core.store.journal_pg``'s)."""
    return [
        {
            "b_run": x.run_id,
            "b_status": "failed" if x.status == "failed" else "done",
            "b_done": x.done,
            "b_done_at": x.done_at,
            "b_at": x.at,
        }
        for x in finishes
    ]


async def write_run_finishes(
    conn: AsyncConnection, finishes: Sequence[RunFinish], *, freed: Set[int] = frozenset()
) -> None:
    """Three statements for all of them (their audit records go with the others'); two
    when the node changes' statement has released every node (``freed``: those runs)."""
    await conn.execute(
        _RUN_END,
        [
            {"b_run": x.run_id, "b_status": x.status, "b_error": x.error, "b_at": x.at}
            for x in finishes
        ],
    )
    await conn.execute(_RUN_STEPS_END, run_steps_end_rows(finishes))
    unfreed = [{"b_run": x.run_id} for x in finishes if x.run_id not in freed]
    if unfreed:
        await conn.execute(_NODE_FREE, unfreed)


async def write_run_changes(conn: AsyncConnection, changes: Sequence[RunChange]) -> None:
    """The run changes in one transaction: one UPDATE per set of columns."""
    for key, params in _grouped((x.run_id, x.values) for x in changes):
        await conn.execute(row_change(t.runs, key), params)


@cache
def row_change(table: Table, columns: tuple[str, ...]) -> Update:
    """The UPDATE of ``columns`` (parameters ``v_<column>``) of the run (by id) or node (by
    name, its version counted up) whose key is the parameter ``b_key``; built once per set
    of columns (the journal's executemany and ``NodesStore.update_node`` use it)."""
    changed: dict[str, Any] = {k: bindparam(f"v_{k}", type_=table.c[k].type) for k in columns}
    if table is t.nodes:
        query = update(t.nodes).where(t.nodes.c.name == bindparam("b_key"))
        changed["version"] = t.nodes.c.version + 1
    else:
        query = update(t.runs).where(t.runs.c.id == bindparam("b_key"))
    return query.values(**changed)


def _grouped(
    changes: Iterable[tuple[Hashable, Mapping[str, Any]]],
) -> list[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    """Changes (key of the row, columns) as executemany groups with the same columns; a
    row's later change lands in a later group, so the statements keep its order."""
    groups: list[tuple[tuple[str, ...], list[dict[str, Any]]]] = []
    last: dict[Hashable, int] = {}
    for row, values in changes:
        columns = tuple(sorted(values))
        start = last.get(row, -1) + 1
        index = next((i for i in range(start, len(groups)) if groups[i][0] == columns), None)
        if index is None:
            groups.append((columns, []))
            index = len(groups) - 1
        groups[index][1].append({"b_key": row, **{f"v_{k}": v for k, v in values.items()}})
        last[row] = index
    return groups


async def write_node_changes(
    conn: AsyncConnection, changes: Sequence[NodeChange], freed: Mapping[str, int]
) -> None:
    """The node changes in one transaction: one SELECT for those that derive their values,
    and one UPDATE for all (an executemany in their order: a node's later change after its
    earlier one), which also releases the nodes of the runs that end, ``freed`` (node:
    run, ``nodes_freed_with_changes``), after every change."""
    derived = sorted({x.name for x in changes if x.derive is not None})
    rows: dict[str, NodeRecord] = {}
    if derived:
        found = await conn.execute(NODES_NAMED, {"names": derived})
        rows = {row.name: node_record(row) for row in found}
    resolved = resolve_node_changes(changes, rows)
    groups = _grouped(resolved)
    if len(groups) > 1 or freed:
        # changes of several sets of columns, or releases: one statement for all, in
        # their order
        columns = tuple(sorted({c for key, _ in groups for c in key}))
        params = [_flagged(columns, *x) for x in resolved]
        if freed:
            for row in params:
                row.update(f_run=None, n=1)
            params += [
                {**_flagged(columns, node, {}), "f_run": run, "n": 0} for node, run in freed.items()
            ]
        await conn.execute(_nodes_change(columns, bool(freed)), params)
        return
    for key, group in groups:
        await conn.execute(row_change(t.nodes, key), group)


def nodes_freed_with_changes(
    changes: Sequence[NodeChange], finishes: Sequence[RunFinish]
) -> dict[str, int]:
    """The nodes released in the statement of the node changes, each with the run that
    ends on it: those of runs that name their node, unless a change sets
    ``active_run_id`` itself or two runs that end name the same node (then each release
    goes on its own, after the changes, as ``_NODE_FREE``)."""
    if any("active_run_id" in x.values for x in changes):
        return {}
    named = Counter(x.node for x in finishes)
    return {x.node: x.run_id for x in finishes if x.node is not None and named[x.node] == 1}


def resolve_node_changes(
    changes: Sequence[NodeChange], rows: dict[str, NodeRecord]
) -> list[tuple[str, Mapping[str, Any]]]:
    """The node changes as (name, columns), those that derive their values computed from
    ``rows`` (the nodes' rows as read in the transaction, updated here change by change);
    a change of a node not in ``rows`` that derives is left out (not in the store)."""
    resolved: list[tuple[str, Mapping[str, Any]]] = []
    for change in changes:
        values = dict(change.values)
        if change.derive is not None:
            row = rows.get(change.name)
            if row is None:
                continue  # not in the store: nothing to change
            values.update(change.derive(row))
            rows[change.name] = replace(row, **values)
        resolved.append((change.name, values))
    return resolved


@lru_cache(maxsize=128)
def _nodes_change(columns: tuple[str, ...], freeing: bool = False) -> Update:
    """One UPDATE for node changes of different sets of ``columns``: each row of the
    executemany says per column whether it changes it (``k_<column>``) and to what
    (``v_<column>``); its version is counted up as ``row_change`` does. With ``freeing``
    a row may instead release the node from the run ``f_run`` (as ``_NODE_FREE``: only if
    that run holds it, its version unchanged: ``n`` is 0)."""
    n = t.nodes.c
    changed: dict[str, Any] = {
        c: case(
            (bindparam(f"k_{c}", type_=Boolean), bindparam(f"v_{c}", type_=n[c].type)),
            else_=n[c],
        )
        for c in columns
    }
    changed["version"] = n.version + 1
    if freeing:
        changed["active_run_id"] = case(
            (n.active_run_id == bindparam("f_run", type_=n.active_run_id.type), None),
            else_=n.active_run_id,
        )
        changed["version"] = n.version + bindparam("n", type_=n.version.type)
    return update(t.nodes).where(n.name == bindparam("b_key")).values(**changed)


def _flagged(columns: tuple[str, ...], name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"b_key": name}
    for c in columns:
        given = c in values
        params[f"k_{c}"] = given
        params[f"v_{c}"] = values[c] if given else None
    return params


async def write_entries(
    conn: AsyncConnection, entries: Sequence[Entry], marked: Set[int] = frozenset()
) -> None:
    """The entries in one transaction: one statement per kind for all of them (``marked``:
    runs already marked running, ``write_transitions``)."""
    transitions = [x for x in entries if isinstance(x, Transition)]
    if transitions:
        await write_transitions(conn, transitions, marked)
    changes = [x for x in entries if isinstance(x, NodeChange)]
    finishes = [x for x in entries if isinstance(x, RunFinish)]
    freed: dict[str, int] = {}
    if changes:
        freed = nodes_freed_with_changes(changes, finishes)
        await write_node_changes(conn, changes, freed)
    runs = [x for x in entries if isinstance(x, RunChange)]
    if runs:
        await write_run_changes(conn, runs)
    ends = [x for x in entries if isinstance(x, StepEnd)]
    if ends:
        await write_step_ends(conn, ends)
    if finishes:
        await write_run_finishes(conn, finishes, freed=frozenset(freed.values()))
    audits = [dict(x.values) for x in entries if isinstance(x, Audited)]
    audits += [dict(x.audit) for x in finishes if x.audit is not None]
    if audits:
        await conn.execute(insert(t.audit), audits)


async def write_transitions(
    conn: AsyncConnection, transitions: Sequence[Transition], marked: Set[int] = frozenset()
) -> None:
    """The transitions in one transaction: one INSERT of the steps that begin, and one
    UPDATE for the runs not in ``marked`` (runs already marked running). The step a
    transition ends is not written: a step followed by another of its run is done
    (``done_steps``). A step that begins and ends within the same batch (a run's records
    handed over without waiting) is inserted as done."""
    steps, first = transition_rows(transitions, marked)
    await conn.execute(insert(t.run_steps), steps)
    if first:
        await conn.execute(_RUNNING, [{"b_run": r, "b_at": at} for r, at in first.items()])


def transition_rows(
    transitions: Sequence[Transition], marked: Set[int] = frozenset()
) -> tuple[list[dict[str, Any]], dict[int, datetime]]:
    """The rows of the steps that begin (``write_transitions``), and the runs to mark
    running (not in ``marked``) with the time their first step began."""
    begun: set[tuple[int, str]] = set()
    ended_at: dict[tuple[int, str], datetime] = {}
    first: dict[int, datetime] = {}
    for x in transitions:
        if x.after is not None and (x.run_id, x.after) in begun:
            ended_at[(x.run_id, x.after)] = x.at
        begun.add((x.run_id, x.name))
        if x.run_id not in marked:
            first.setdefault(x.run_id, x.at)
    steps = [
        {
            "run_id": x.run_id,
            "name": x.name,
            "status": "done" if (x.run_id, x.name) in ended_at else "running",
            "detail": x.detail,
            "started_at": x.at,
            "finished_at": ended_at.get((x.run_id, x.name)),
        }
        for x in transitions
    ]
    return steps, first


def done_steps(steps: Sequence[StepRecord]) -> list[StepRecord]:
    """Steps (in the order they began) as they are: one still recorded as running is done,
    since the first later step of another name began, when there is one (a transition
    does not write the step it ends). A step begun again after a restart (the same name)
    does not end the earlier row."""
    result = list(steps)
    for index, step in enumerate(result):
        if step.status != "running":
            continue
        after = next((x for x in result[index + 1 :] if x.name != step.name), None)
        if after is not None:
            result[index] = replace(step, status="done", finished_at=after.started_at)
    return result


Writer = Callable[[AsyncConnection, Sequence[Entry], Set[int]], Awaitable[object]]
"""Writes a transaction's entries on a connection (``write_entries`` by default)."""


async def _write_in_one_trip(
    conn: AsyncConnection, entries: Sequence[Entry], marked: Set[int]
) -> None:
    await conn.execution_options(**KEEP_CHANGES)  # SQLite: one trip (core.store.sqlite)
    await write_entries(conn, entries, marked)


class StepJournal:
    """Writes the step transitions and audit records of all runs in flight, in batches
    (group commit)."""

    def __init__(
        self, transaction: Transaction, one_call: tuple[Transaction, Writer, int] | None = None
    ) -> None:
        self._transaction = transaction
        self._one_call = one_call[:2] if one_call is not None else None
        self.one_call_entries = one_call[2] if one_call is not None else 0
        """Entries of a transaction written by ``one_call`` at most (PostgreSQL:
        ``core.store.journal_pg``); a larger one is written statement by statement."""
        self._waiting: list[tuple[Sequence[Entry], asyncio.Future[None] | None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ended = -GATHER  # the loop's time when the last transaction ended
        self.commits = 0
        """Transactions written so far (for the benchmarks and tests)."""
        self.lost = 0
        """Records handed over without waiting that could not be written (logged)."""
        self._marked: set[int] = set()
        """Runs this journal has marked running (committed) that have not ended since."""

    async def write(self, *entries: Entry, wait: bool = True) -> None:
        """Return once ``entries`` are committed (all in the same transaction). A caller
        stopped before its batch is written leaves nothing behind (they are not written).
        With ``wait=False`` return at once: they go with the next transaction (see the
        module's docstring)."""
        loop = asyncio.get_running_loop()
        if not wait:
            self._waiting.append((entries, None))
            if (self._writer is None or self._writer.done()) and self._timer is None:
                self._timer = loop.call_later(LAZY_FLUSH, self._start)
            return
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((entries, done))
        self._start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done():
                done.cancel()  # not written yet: the writer leaves it out
            raise

    async def flush(self) -> None:
        """Return once every record handed over so far is committed."""
        if self._waiting or (self._writer is not None and not self._writer.done()):
            await self.write()

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is None or self._writer.done():
            loop = asyncio.get_running_loop()
            self._writer = loop.create_task(self._drain(), name="step-journal")

    async def _drain(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            while self._waiting:
                await asyncio.sleep(0)  # transitions made in this same turn join the batch
                pause = self._ended + GATHER - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                batch = [(x, f) for x, f in self._waiting[:MAX_BATCH] if f is None or not f.done()]
                del self._waiting[:MAX_BATCH]
                if batch:
                    await self._commit(batch)
                    self._ended = loop.time()
        except asyncio.CancelledError:
            for _, done in self._waiting:
                if done is not None:
                    done.cancel()
            self._lose([x for x, done in self._waiting if done is None], "the store closed")
            self._waiting.clear()
            raise

    def _lose(self, groups: Sequence[Sequence[Entry]], why: str) -> None:
        count = sum(len(group) for group in groups)
        if count:
            self.lost += count
            log.warning("run journal: %d records handed over without waiting lost: %s", count, why)

    async def _commit(
        self, batch: list[tuple[Sequence[Entry], asyncio.Future[None] | None]]
    ) -> None:
        entries = [x for group, _ in batch for x in group]
        try:
            if self._one_call is not None and len(entries) <= self.one_call_entries:
                opened, writer = self._one_call
            else:
                opened, writer = self._transaction, _write_in_one_trip
            async with opened() as conn:
                await writer(conn, entries, self._marked)
            self.commits += 1
            self._marked.update(x.run_id for x in entries if isinstance(x, Transition))
            self._marked.difference_update(x.run_id for x in entries if isinstance(x, RunFinish))
        except BaseException as exc:
            if len(batch) > 1 and isinstance(exc, Exception):
                # one bad entry must not fail the others: each on its own
                for one in batch:
                    await self._commit([one])
                return
            self._lose([x for x, done in batch if done is None], str(exc) or type(exc).__name__)
            for _, done in batch:
                if done is None or done.done():
                    continue
                if isinstance(exc, Exception):
                    done.set_exception(exc)
                else:
                    done.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for _, done in batch:
            if done is not None and not done.done():
                done.set_result(None)
