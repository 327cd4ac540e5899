"""The run journal's transaction on PostgreSQL in one round trip.

Written statement by statement, a journal transaction on PostgreSQL is a round trip per
statement (``BEGIN``, a statement per kind of row, ``COMMIT``), and the answer to each
waits for a turn of the busy event loop before the next statement goes out. Here a
transaction's statements go together: each is a set-based statement over the rows of its
kind, all rows given as one JSON parameter, and the function ``tgops_batch`` (migration
0007) runs them in order within the one transaction of the ``SELECT`` that calls it (the
call commits on its own). What one statement writes, the next sees (a run's end reads the
steps inserted before it), which the data-modifying CTEs of one statement would not.

The statements write what ``core.store.journal``'s write on SQLite (where a transaction
is one trip already): the same rows, in the same order. Where a statement by row would
update the same row twice, its changes are merged into one row first (a node's changes,
its version counted per change), or the one that would count is kept (a step's last
detail, its first end). Node changes that derive values from the current row read those
rows first: one more round trip, before the call, without a lock (as the transaction
read them at READ COMMITTED).

Only transactions of up to ``ONE_CALL_ENTRIES`` entries go this way: the JSON rows cost
the server more per row than asyncpg's prepared statements executed for many rows, so a
large transaction (thousands of runs in flight, where a round trip is shared by many
rows anyway) goes statement by statement. Measured in ``bench/RESULTS.md``, sixteenth
pass.

The function prepares each statement once per connection (under a digest of its text)
and runs it with joins by nested loop only: the statements find their rows by key,
joined to a handful of JSON rows whose number the planner cannot see. It runs only the
text it is given, with its caller's rights (``SECURITY INVOKER``): it grants nothing the
store's connection could not do. Only this module's text and the schema's types go into
a statement; every value is in the parameter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable, Mapping, Sequence, Set
from datetime import datetime
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import String, Table, bindparam, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from core.store import tables as t
from core.store.journal import (
    NODES_NAMED,
    Audited,
    Entry,
    NodeChange,
    RunChange,
    RunFinish,
    StepEnd,
    Transition,
    nodes_freed_with_changes,
    resolve_node_changes,
    run_steps_end_rows,
    transition_rows,
)
from core.store.records import node_record

R = TypeVar("R")

ONE_CALL_ENTRIES = 128
"""Entries of a journal transaction that goes in one call at most; a larger one goes
statement by statement (see the module's docstring)."""

FUNCTION = "tgops_batch"
"""Created by migration 0007: runs statement ``i`` with the ``i``-th element of a JSON
array of rows as ``$1``, in order, in the caller's transaction."""

_CALL = text(
    f"SELECT {FUNCTION}(CAST(:names AS TEXT[]), CAST(:statements AS TEXT[]), CAST(:rows AS JSON))"
).bindparams(bindparam("rows", type_=String))


def statements_in(statement: str, parameters: Any) -> list[str] | None:
    """The statements that a call of the function, sent as ``statement`` with
    ``parameters`` (as SQLAlchemy's cursor events give them), runs; ``None`` for any other
    statement (the benchmarks and tests count statements with it)."""
    if f"{FUNCTION}(" not in statement:
        return None
    return [str(x) for x in parameters[1]]  # names, statements, rows


def statements_of(statement: str, parameters: Any) -> list[str]:
    """The statements that ``statement`` (with ``parameters``, as SQLAlchemy's cursor
    events give them) runs: itself, or those the function runs (``statements_in``)."""
    inner = statements_in(statement, parameters)
    return [statement] if inner is None else inner


@cache
def _name(statement: str) -> str:
    """The name the function prepares ``statement`` under (once per connection)."""
    return "tgops_" + hashlib.sha256(statement.encode()).hexdigest()[:24]


_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def _sql_type(table: Table, column: str) -> str:
    return str(table.c[column].type.compile(dialect=_DIALECT))


def _statement(template: str, table: Table, columns: Iterable[tuple[str, str]]) -> str:
    """``template`` with ``{rows}`` replaced by ``json_to_recordset($1) AS x(...)``: the
    parameter's rows, each ``(name, column)`` typed as ``table``'s column, or as a
    boolean where the column is ``BOOLEAN`` (and ``o``, the row's place). Only this
    module's text and the schema's types go into a statement; every value is in the
    parameter."""
    typed = ", ".join(
        f"{name} {column if column == 'BOOLEAN' else _sql_type(table, column)}"
        for name, column in columns
    )
    rows = f"json_to_recordset($1) AS x({typed}, o integer)"
    return template.format(rows=rows)


def _insert(table: Table) -> str:
    """The INSERT of the rows of ``table`` (every column but its id), in their order."""
    columns = [c.name for c in table.c if not c.primary_key]
    names = ", ".join(columns)
    return _statement(
        f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {{rows}} ORDER BY o",  # noqa: S608
        table,
        ((c, c) for c in columns),
    )


_INSERT_STEPS = _insert(t.run_steps)
_RUNNING = _statement(
    "UPDATE runs SET status = 'running', started_at = coalesce(runs.started_at, x.at) "
    "FROM {rows} WHERE runs.id = x.run",
    t.runs,
    (("run", "id"), ("at", "started_at")),
)
_STEP_DETAIL = _statement(
    "UPDATE run_steps SET detail = x.detail FROM {rows} "
    "WHERE run_steps.id = (SELECT max(s.id) FROM run_steps s "
    "WHERE s.run_id = x.run AND s.name = x.name)",
    t.run_steps,
    (("run", "run_id"), ("name", "name"), ("detail", "detail")),
)
_STEP_END = _statement(
    "UPDATE run_steps SET status = coalesce(x.status, run_steps.status), "
    "finished_at = coalesce(x.at, run_steps.finished_at), "
    "detail = coalesce(x.detail, run_steps.detail) FROM {rows} "
    "WHERE run_steps.run_id = x.run AND run_steps.name = x.name "
    "AND run_steps.status = 'running'",
    t.run_steps,
    (
        ("run", "run_id"),
        ("name", "name"),
        ("status", "status"),
        ("at", "finished_at"),
        ("detail", "detail"),
    ),
)
_RUN_END = _statement(
    "UPDATE runs SET status = x.status, error = x.error, finished_at = x.at, "
    "step = coalesce((SELECT l.name FROM run_steps l WHERE l.run_id = runs.id "
    "ORDER BY l.id DESC LIMIT 1), runs.step) FROM {rows} WHERE runs.id = x.run",
    t.runs,
    (("run", "id"), ("status", "status"), ("error", "error"), ("at", "finished_at")),
)
# when the first later step of another name of the same run began (NULL: none)
_NEXT_BEGUN = (
    "(SELECT min(l.started_at) FROM run_steps l WHERE l.run_id = run_steps.run_id "
    "AND l.id > run_steps.id AND l.name <> run_steps.name)"
)
_RUN_STEPS_END = _statement(
    # a step followed by another was done when that one began; the step ``b_done`` (the
    # run's last, carried out) was done at ``b_done_at``; any other ends with the run
    "UPDATE run_steps SET "
    "status = CASE WHEN {next} IS NOT NULL THEN 'done' "
    "WHEN run_steps.name = x.b_done THEN 'done' ELSE x.b_status END, "
    "finished_at = coalesce({next}, "
    "CASE WHEN run_steps.name = x.b_done THEN x.b_done_at END, x.b_at) "
    "FROM {rows} WHERE run_steps.run_id = x.b_run AND run_steps.status = 'running'".replace(
        "{next}", _NEXT_BEGUN
    ),
    t.run_steps,
    (
        ("b_run", "run_id"),
        ("b_status", "status"),
        ("b_done", "name"),
        ("b_done_at", "finished_at"),
        ("b_at", "finished_at"),
    ),
)
_NODE_FREE = _statement(
    # the run's node found by its name (the key), as core.store.journal's
    "UPDATE nodes SET active_run_id = NULL FROM {rows} JOIN runs ON runs.id = x.run "
    "WHERE nodes.name = runs.node AND nodes.active_run_id = x.run",
    t.runs,
    (("run", "id"),),
)
_INSERT_AUDIT = _insert(t.audit)


@cache
def _rows_change(
    table: Table, columns: tuple[str, ...], flagged: bool, freeing: bool = False
) -> str:
    """The UPDATE of ``columns`` of the runs (by id) or nodes (by name) named by the rows'
    ``b_key``: a row's value of column ``c`` is ``v_c``; with ``flagged``, a row changes
    ``c`` only where ``k_c`` is true (rows of different columns in one statement). A
    node's version goes up by the row's ``n``, the changes merged into it. With
    ``freeing`` a node is also released from the run ``f_run`` that ends, if that run
    holds it (``_NODE_FREE``)."""
    key = "name" if table is t.nodes else "id"
    typed = [("b_key", key)]
    changed = []
    for c in columns:
        typed.append((f"v_{c}", c))
        if flagged:
            typed.append((f"k_{c}", "BOOLEAN"))
            changed.append(f"{c} = CASE WHEN x.k_{c} THEN x.v_{c} ELSE {table.name}.{c} END")
        else:
            changed.append(f"{c} = x.v_{c}")
    if freeing:
        typed.append(("f_run", "active_run_id"))
        changed.append(
            "active_run_id = CASE WHEN nodes.active_run_id = x.f_run THEN NULL "
            "ELSE nodes.active_run_id END"
        )
    if table is t.nodes:
        typed.append(("n", "version"))
        changed.append("version = nodes.version + x.n")
    template = f"UPDATE {table.name} SET {', '.join(changed)} FROM {{rows}} "  # noqa: S608
    return _statement(template + f"WHERE {table.name}.{key} = x.b_key", table, typed)


def _add_changes(
    batch: Batch,
    table: Table,
    changes: Iterable[tuple[Hashable, Mapping[str, Any]]],
    freed: Mapping[str, int] | None = None,
) -> None:
    """Row changes as one statement: each row's changes merged into one in the place of
    its first (a later value of a column replaces an earlier one, as a later UPDATE
    would; a node's version counts every change), since a statement updates a row once.
    The nodes of the runs that end, ``freed`` (node: run, ``nodes_freed_with_changes``),
    are released in it, after the changes."""
    merged: dict[Hashable, tuple[dict[str, Any], int]] = {}
    for key, values in changes:
        known, count = merged.get(key, ({}, 0))
        merged[key] = ({**known, **values}, count + 1)
    frees = freed or {}
    for node in frees:
        merged.setdefault(node, ({}, 0))
    if not merged:
        return
    columns = tuple(sorted({c for values, _ in merged.values() for c in values}))
    flagged = any(len(values) != len(columns) for values, _ in merged.values())
    rows = []
    for key, (values, count) in merged.items():
        row: dict[str, Any] = {"b_key": key, "n": count}
        for c in columns:
            row[f"v_{c}"] = values.get(c)
            if flagged:
                row[f"k_{c}"] = c in values
        if frees:
            row["f_run"] = frees.get(str(key))
        rows.append(row)
    batch.add(_rows_change(table, columns, flagged, bool(frees)), rows)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return t.stored_utc(value).isoformat()
    raise TypeError(f"{type(value).__name__} is not a value the store keeps")


class Batch:
    """A transaction's statements and the rows of each, in order."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.rows: list[list[dict[str, Any]]] = []

    def add(self, statement: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self.statements.append(statement)
            self.rows.append([{**row, "o": i} for i, row in enumerate(rows)])

    def payload(self) -> dict[str, Any]:
        return {
            "names": [_name(x) for x in self.statements],
            "statements": self.statements,
            "rows": json.dumps(self.rows, default=_json_value, separators=(",", ":")),
        }


def _first(rows: Iterable[tuple[Hashable, R]]) -> list[R]:
    """Of rows with the same key (the same target row: a statement updates a row once)
    the first given, as a statement by row would leave it where the first makes the row
    no longer match (a step's end: it is no longer running)."""
    kept: dict[Hashable, R] = {}
    for key, row in rows:
        kept.setdefault(key, row)
    return list(kept.values())


def _last(rows: Iterable[tuple[Hashable, R]]) -> list[R]:
    """Of rows with the same key the last given, in its place: what a statement by row
    would leave where each overwrites the one before (a step's detail)."""
    kept: dict[Hashable, R] = {}
    for key, row in rows:
        kept.pop(key, None)
        kept[key] = row
    return list(kept.values())


async def write_entries(
    conn: AsyncConnection, entries: Sequence[Entry], marked: Set[int] = frozenset()
) -> None:
    """The entries in one round trip (two with node changes that derive their values), as
    ``core.store.journal.write_entries`` writes them statement by statement."""
    batch = Batch()
    transitions = [x for x in entries if isinstance(x, Transition)]
    if transitions:
        steps, first = transition_rows(transitions, marked)
        batch.add(_INSERT_STEPS, steps)
        batch.add(_RUNNING, [{"run": r, "at": at} for r, at in first.items()])
    changes = [x for x in entries if isinstance(x, NodeChange)]
    # a run ends once: a second end of it in the same transaction is left out
    ended = _first((x.run_id, x) for x in entries if isinstance(x, RunFinish))
    freed: dict[str, int] = {}
    if changes:
        derived = sorted({x.name for x in changes if x.derive is not None})
        rows = {}
        if derived:
            found = await conn.execute(NODES_NAMED, {"names": derived})
            rows = {row.name: node_record(row) for row in found}
        freed = nodes_freed_with_changes(changes, ended)
        _add_changes(batch, t.nodes, resolve_node_changes(changes, rows), freed)
    _add_changes(batch, t.runs, ((x.run_id, x.values) for x in entries if isinstance(x, RunChange)))
    ends = [x for x in entries if isinstance(x, StepEnd)]
    batch.add(
        _STEP_DETAIL,
        _last(
            ((x.run_id, x.name), {"run": x.run_id, "name": x.name, "detail": x.detail})
            for x in ends
            if x.status is None
        ),
    )
    batch.add(
        _STEP_END,
        _first(
            (
                (x.run_id, x.name),
                {
                    "run": x.run_id,
                    "name": x.name,
                    "status": x.status,
                    "at": x.at,
                    "detail": x.detail,
                },
            )
            for x in ends
            if x.status is not None
        ),
    )
    batch.add(
        _RUN_END,
        [{"run": x.run_id, "status": x.status, "error": x.error, "at": x.at} for x in ended],
    )
    batch.add(_RUN_STEPS_END, run_steps_end_rows(ended))
    released = set(freed.values())
    batch.add(_NODE_FREE, [{"run": x.run_id} for x in ended if x.run_id not in released])
    audits = [dict(x.values) for x in entries if isinstance(x, Audited)]
    audits += [dict(x.audit) for x in ended if x.audit is not None]
    batch.add(_INSERT_AUDIT, audits)
    if batch.statements:
        await conn.execute(_CALL, batch.payload())
