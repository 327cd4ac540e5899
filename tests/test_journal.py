"""Group commit of the run journal and the store's batched writes for an update time, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError

from core.errors import TgopsError
from core.events import LocalEventBus
from core.lifecycle.runs import Flow, RunContext, execute
from core.store import NewRun, NodeChange, RunChange, RunEnd, Store, journal_pg
from core.store import tables as t
from core.store.journal import LAZY_FLUSH, RunFinish, StepEnd, Transition
from core.store.journal_pg import ONE_CALL_ENTRIES, statements_in, statements_of
from core.store.records import NodeRecord
from tests.databases import (
    NO_POSTGRES,
    POSTGRES_URL,
    backends,
    reset_postgres,
    statements_sent,
)

NODES = [f"n{i:02d}" for i in range(1, 21)]


@pytest.fixture(params=backends())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/state.db"
    else:
        assert POSTGRES_URL is not None
        await reset_postgres(POSTGRES_URL)
        url = POSTGRES_URL
    async with Store(url) as opened:
        await opened.sync_nodes([(name, "c1", "sandbox") for name in NODES])
        yield opened


async def _runs(store: Store) -> list[int]:
    return await store.create_runs(
        [
            NewRun(kind="auto-update", node=name, target="c1", actor="alice", params={})
            for name in NODES
        ]
    )


class Commits:
    """Counts the transactions the store commits (on PostgreSQL a journal transaction is
    one call of its function, which commits on its own: ``core.store.journal_pg``)."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        self._engine = store.engine.sync_engine
        event.listen(self._engine, "commit", self._commit)
        event.listen(self._engine, "after_cursor_execute", self._statement)

    def _commit(self, _conn: object) -> None:
        self.count += 1

    def _statement(
        self, _conn: object, _cursor: object, statement: str, parameters: object, *_: object
    ) -> None:
        if statements_in(statement, parameters) is not None:
            self.count += 1

    def close(self) -> None:
        event.remove(self._engine, "commit", self._commit)
        event.remove(self._engine, "after_cursor_execute", self._statement)


async def test_transitions_of_runs_in_flight_share_a_transaction(store: Store) -> None:
    ids = await _runs(store)
    commits = Commits(store)
    try:
        await asyncio.gather(*(store.begin_step(run_id, "download") for run_id in ids))
        first = commits.count
        await asyncio.gather(
            *(store.begin_step(run_id, "slot", after="download") for run_id in ids)
        )
        second = commits.count - first
    finally:
        commits.close()
    # twenty runs, two transitions each: one transaction per batch, not one per run
    assert 1 <= first <= 2 and 1 <= second <= 2, (first, second)
    for run_id in ids:
        steps = await store.steps(run_id)
        assert [(s.name, s.status) for s in steps] == [("download", "done"), ("slot", "running")]
        assert steps[0].finished_at == steps[1].started_at
        run = await store.run(run_id)
        assert run is not None and run.step == "slot" and run.status == "running"
        assert run.started_at == steps[0].started_at


class Statements:
    """Counts the statements the store sends, by their first word and table."""

    def __init__(self, store: Store) -> None:
        self.seen: list[str] = []
        self._engine = store.engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._statement)

    def _statement(
        self, _conn: object, _cursor: object, statement: str, parameters: object, *_: object
    ) -> None:
        for one in statements_of(statement, parameters):
            words = one.split()
            table = next(
                (w for i, w in enumerate(words[1:]) if words[i] in {"FROM", "INTO", "UPDATE"}),
                "-",
            )
            self.seen.append(f"{words[0]} {table.strip(chr(34))}")

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._statement)


async def test_a_transition_is_one_statement_and_the_run_end_writes_the_steps(
    store: Store,
) -> None:
    [run_id, *_] = await _runs(store)
    await store.begin_step(run_id, "download")  # the first one also marks the run running
    statements = Statements(store)
    try:
        await store.begin_step(run_id, "slot", after="download")
        await store.begin_step(run_id, "drain", after="slot")
    finally:
        statements.close()
    # one INSERT of the step that begins; neither the step it ends nor the run is updated
    assert statements.seen == ["INSERT run_steps", "INSERT run_steps"]
    steps = await store.steps(run_id)
    assert [(s.name, s.status) for s in steps] == [
        ("download", "done"),
        ("slot", "done"),
        ("drain", "running"),
    ]
    assert steps[0].finished_at == steps[1].started_at
    assert steps[1].finished_at == steps[2].started_at
    run = await store.run(run_id)
    assert run is not None and run.step == "drain" and run.status == "running"
    await store.finish_run(
        run_id, status="failed", error="drain: refused", end=RunEnd(kind="auto-update", node="n01")
    )
    # as stored, not only as read: the steps the run went past are done when the next one
    # began, the one it ended in ends with it
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(t.run_steps.c.name, t.run_steps.c.status, t.run_steps.c.finished_at)
                .where(t.run_steps.c.run_id == run_id)
                .order_by(t.run_steps.c.id)
            )
        ).all()
        step = await conn.scalar(select(t.runs.c.step).where(t.runs.c.id == run_id))
        raw = (
            await conn.execute(
                text("SELECT finished_at FROM run_steps WHERE run_id = :run"), {"run": run_id}
            )
        ).all()
    if store.dialect == "sqlite":  # times kept as the store writes them everywhere (UTC, no zone)
        assert all(isinstance(r[0], str) and "+" not in r[0] for r in raw), raw
    assert [(r.name, r.status) for r in rows] == [
        ("download", "done"),
        ("slot", "done"),
        ("drain", "failed"),
    ]
    assert [r.finished_at for r in rows[:2]] == [steps[1].started_at, steps[2].started_at]
    assert rows[2].finished_at is not None and rows[2].finished_at >= steps[2].started_at
    assert step == "drain"


async def _nothing(ctx: RunContext) -> None:
    return None


async def _refresh_fails(ctx: RunContext) -> None:
    await asyncio.sleep(0.1)
    raise TgopsError("node status not stored")


@pytest.mark.parametrize("last_resumable", [True, False])
async def test_the_last_step_is_recorded_done_with_the_run_end(
    store: Store, last_resumable: bool
) -> None:
    """A resumable last step is recorded done by the run's end (no write of its own);
    one that is not resumable is ended on its own first, as a crash before the run's end
    must not carry it out again. Either stays done when only the success hook fails."""
    [run_id, *_] = await _runs(store)
    flow = Flow(
        kind="auto-update",
        steps=[("drain", _nothing), ("release", _nothing)],
        resumable=frozenset({"drain", "release"} if last_resumable else {"drain"}),
        on_success=_refresh_fails,
    )
    async with LocalEventBus() as bus:
        ctx = RunContext(
            run_id=run_id,
            kind="auto-update",
            node="n01",
            actor="alice",
            store=store,
            events=bus,
            params={},
        )
        statements = Statements(store)
        try:
            status = await execute(flow, ctx)
        finally:
            statements.close()
    assert status == "failed"
    ends = [s for s in statements.seen if s == "UPDATE run_steps"]
    assert len(ends) == (1 if last_resumable else 2)  # the run's end (and the step's own)
    steps = await store.steps(run_id)
    assert [(s.name, s.status) for s in steps] == [("drain", "done"), ("release", "done")]
    run = await store.run(run_id)
    assert run is not None and run.status == "failed" and run.step == "release"
    # the last step ended when it was done, not when the run ended after the hook
    assert steps[1].finished_at is not None and run.finished_at is not None
    assert run.finished_at - steps[1].finished_at >= timedelta(seconds=0.1)
    assert run.error == "release: node status not stored"


async def _carry_out(store: Store, flow: Flow, run_id: int) -> str:
    """Run ``flow`` as run ``run_id`` on n01; its final status."""
    async with LocalEventBus() as bus:
        ctx = RunContext(
            run_id=run_id,
            kind=flow.kind,
            node="n01",
            actor="alice",
            store=store,
            events=bus,
            params={},
        )
        return await execute(flow, ctx)


async def test_what_a_step_records_is_committed_with_the_next_step_start(store: Store) -> None:
    """The records of a step that is not resumable (an install: its audit line and the
    node's new versions) are not committed on their own: the next step's start, which is
    waited for after such a step, commits them, before that step does anything."""
    [run_id, *_] = await _runs(store)
    commits = Commits(store)
    seen: dict[str, int] = {}

    async def install(ctx: RunContext) -> None:
        seen["before"] = commits.count
        await ctx.store.commit(
            NodeChange(name=ctx.node, values={"installed": {"tg-base": "1.0"}}),
            ctx.store.audit_entry(
                actor="tgops", source="lifecycle", action="install", target=ctx.node
            ),
            wait=not ctx.lazy,
        )
        seen["recorded"] = commits.count

    async def verify(ctx: RunContext) -> None:
        seen["verify"] = commits.count
        async with store.reading() as conn:
            query = text("SELECT count(*) FROM audit WHERE action = 'install'")
            seen["audit"] = (await conn.execute(query)).scalar_one()
            query = text("SELECT installed FROM nodes WHERE name = 'n01'")
            seen["installed"] = int("tg-base" in str((await conn.execute(query)).scalar_one()))

    flow = Flow(
        kind="auto-update",
        steps=[("install", install), ("verify", verify)],
        resumable=frozenset({"verify"}),
    )
    try:
        assert await _carry_out(store, flow, run_id) == "succeeded"
    finally:
        commits.close()
    assert seen["recorded"] == seen["before"]  # not committed on its own
    assert seen["verify"] == seen["before"] + 1  # but by the next step's start
    assert (seen["audit"], seen["installed"]) == (1, 1)


@pytest.mark.parametrize("idle", [True, False])
async def test_a_step_that_does_nothing_on_the_node_starts_without_a_commit(
    store: Store, idle: bool
) -> None:
    """A resumable step that the flow says does nothing on this node (a cluster node's
    logon step) starts like a lazy one: its start goes with the next waited transition."""
    [run_id, *_] = await _runs(store)
    commits = Commits(store)
    at_start: dict[str, int] = {}

    def step(name: str) -> Any:
        async def mark(ctx: RunContext) -> None:
            at_start[name] = commits.count

        return mark

    flow = Flow(
        kind="scheduled-update",
        steps=[(name, step(name)) for name in ("drain", "logon", "disconnect")],
        resumable=frozenset({"drain", "logon", "disconnect"}),
        idle=(lambda name, ctx: name == "logon") if idle else None,
    )
    try:
        assert await _carry_out(store, flow, run_id) == "succeeded"
    finally:
        commits.close()
    assert at_start["logon"] == at_start["drain"] + (0 if idle else 1)
    assert at_start["disconnect"] == at_start["logon"] + 1
    steps = await store.steps(run_id)
    assert [(s.name, s.status) for s in steps] == [
        ("drain", "done"),
        ("logon", "done"),
        ("disconnect", "done"),
    ]


async def test_a_step_begun_again_after_a_restart_is_not_done(store: Store) -> None:
    [run_id, *_] = await _runs(store)
    await store.begin_step(run_id, "download")
    await store.begin_step(run_id, "drain", after="download")
    # a restart: the run resumes at the step it was in (a new row of the same name)
    async with Store(store.url) as again:
        await again.begin_step(run_id, "drain")
        steps = await again.steps(run_id)
    assert [(s.name, s.status) for s in steps] == [
        ("download", "done"),
        ("drain", "running"),
        ("drain", "running"),
    ]
    await store.begin_step(run_id, "notice", after="drain")
    steps = await store.steps(run_id)
    assert [(s.name, s.status) for s in steps] == [
        ("download", "done"),
        ("drain", "done"),
        ("drain", "done"),
        ("notice", "running"),
    ]
    assert steps[1].finished_at == steps[2].finished_at == steps[3].started_at


async def test_a_transition_whose_caller_stopped_before_it_was_written_is_not_written(
    store: Store,
) -> None:
    [first, second, *_] = await _runs(store)
    kept = asyncio.ensure_future(store.begin_step(first, "download"))
    dropped = asyncio.ensure_future(store.begin_step(second, "download"))
    await asyncio.sleep(0)  # both are waiting for the writer now
    dropped.cancel()  # stopped before the writer took it
    await kept
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert [s.name for s in await store.steps(first)] == ["download"]
    assert await store.steps(second) == []
    run = await store.run(second)
    assert run is not None and run.step is None and run.status == "queued"


async def test_kv_claim_takes_each_key_once(store: Store) -> None:
    at = datetime(2030, 1, 7, 2, 0, tzinfo=UTC).isoformat()
    keys = [f"update:{name}" for name in NODES[:5]]
    await store.kv_set("schedule-fired", keys[0], at)
    assert await store.kv_claim("schedule-fired", keys, at) == keys[1:]
    assert await store.kv_claim("schedule-fired", keys, at) == []
    later = datetime(2030, 1, 8, 2, 0, tzinfo=UTC).isoformat()
    assert await store.kv_claim("schedule-fired", keys[:2], later) == keys[:2]
    assert await store.kv_get("schedule-fired", keys[0]) == later
    assert await store.kv_get("schedule-fired", keys[4]) == at


async def test_maintenance_opened_for_many_nodes_at_once(store: Store) -> None:
    start = datetime(2030, 1, 7, 2, 0, tzinfo=UTC)
    old = await store.open_maintenance(
        node="n01",
        start=start,
        reason="by hand",
        origin="manual",
        disable_logon=False,
        created_by="bob",
    )
    await store.open_maintenance_many(
        NODES[:3],
        start=start,
        reason="Scheduled update",
        origin="scheduled-update",
        created_by="scheduler",
        audit_source="scheduler",
        audit_detail="2030-01-07 03:00: Scheduled update",
    )
    windows = {m.node: m for m in await store.maintenance()}
    assert sorted(windows) == NODES[:3]
    assert {m.origin for m in windows.values()} == {"scheduled-update"}
    assert windows["n01"].id != old.id  # the one set by hand was replaced
    records = await store.audit_log(targets=NODES[:3])
    assert (
        sorted(r.target or "" for r in records if r.action == "maintenance scheduled")
        == (NODES[:3])
    )


async def test_node_and_run_changes_of_runs_in_flight_share_a_transaction(store: Store) -> None:
    ids = await _runs(store)
    await store.update_node(NODES[0], staged={"old": "1"})
    commits = Commits(store)
    try:
        with statements_sent(store.engine) as statements:
            await asyncio.gather(
                *(
                    store.commit(
                        NodeChange(name=name, values={"lb": "drained"}),
                        # derived from the row inside the transaction: the old entry stays
                        NodeChange(
                            name=name,
                            values={},
                            derive=lambda row: {"staged": {**row.staged, "tgpro": "2"}},
                        ),
                        RunChange(run_id=run_id, values={"params": {"plan": [name]}}),
                        store.audit_entry(
                            actor="tgops",
                            source="lifecycle",
                            action="drain",
                            target=name,
                            run_id=run_id,
                        ),
                    )
                    for name, run_id in zip(NODES, ids, strict=True)
                )
            )
    finally:
        commits.close()
    # twenty nodes: one transaction per batch, one statement per kind of row (the node
    # changes of different columns share one UPDATE since it says per row what it changes)
    assert 1 <= commits.count <= 2, commits.count
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE NODES")]
    assert 1 <= len(updates) <= commits.count, updates
    for name, run_id in zip(NODES, ids, strict=True):
        node = await store.node(name)
        first = name == NODES[0]
        assert node is not None and node.lb == "drained"
        assert node.version == (3 if first else 2)  # one more per change
        assert node.staged == ({"old": "1", "tgpro": "2"} if first else {"tgpro": "2"})
        run = await store.run(run_id)
        assert run is not None and run.params == {"plan": [name]}
    drains = [a for a in await store.audit_log(limit=100) if a.action == "drain"]
    assert sorted(a.target or "" for a in drains) == NODES


async def test_runs_ending_together_share_a_transaction(store: Store) -> None:
    ids = await _runs(store)
    await asyncio.gather(*(store.begin_step(run_id, "install") for run_id in ids))
    commits = Commits(store)
    try:
        await asyncio.gather(*(store.end_step(run_id, "install") for run_id in ids))
        ended = commits.count
        await asyncio.gather(
            *(
                store.finish_run(
                    run_id,
                    status="succeeded",
                    end=RunEnd(kind="auto-update", node=name, message="installed tgpro 2"),
                )
                for name, run_id in zip(NODES, ids, strict=True)
            )
        )
        finished = commits.count - ended
    finally:
        commits.close()
    assert 1 <= ended <= 2 and 1 <= finished <= 2, (ended, finished)
    for name, run_id in zip(NODES, ids, strict=True):
        run = await store.run(run_id)
        assert run is not None and run.status == "succeeded" and run.finished_at is not None
        assert [(s.name, s.status) for s in await store.steps(run_id)] == [("install", "done")]
        node = await store.node(name)
        assert node is not None and node.active_run_id is None  # free for the next run
    outcomes = [
        a for a in await store.audit_log(limit=100) if a.action == "run auto-update succeeded"
    ]
    assert sorted(a.target or "" for a in outcomes) == NODES
    assert {a.detail for a in outcomes} == {"installed tgpro 2"}


async def test_records_handed_over_without_waiting_are_written_in_order(
    store: Store, tmp_path: Path
) -> None:
    ids = await _runs(store)
    commits = Commits(store)
    try:
        # handed over without waiting: written on their own within LAZY_FLUSH seconds
        await store.begin_step(ids[0], "download", wait=False)
        await store.audit(actor="tgops", source="lifecycle", action="download", wait=False)
        assert commits.count == 0  # nothing written yet
        for _ in range(100):
            if commits.count:
                break
            await asyncio.sleep(LAZY_FLUSH / 2)
        assert commits.count == 1
        assert [s.name for s in await store.steps(ids[0])] == ["download"]
        # a record waited for is committed with (never before) those handed over earlier
        await store.begin_step(ids[1], "download", wait=False)
        await store.begin_step(ids[1], "slot", after="download", wait=False)
        await store.begin_step(ids[1], "drain", after="slot")
        assert commits.count == 2
        steps = {s.name: s.status for s in await store.steps(ids[1])}
        assert steps == {"download": "done", "slot": "done", "drain": "running"}
        # a step's detail handed over before the transition that ends it stays with it
        await store.step_detail(ids[1], "drain", "drained", wait=False)
        await store.begin_step(ids[1], "notice", after="drain")
        assert commits.count == 3
        drain = next(s for s in await store.steps(ids[1]) if s.name == "drain")
        assert (drain.status, drain.detail) == ("done", "drained")
    finally:
        commits.close()
    assert store.journal.lost == 0


async def test_closing_the_store_writes_what_was_handed_over(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/state.db"
    async with Store(url) as opened:
        await opened.sync_nodes([("n1", "c1", "sandbox")])
        (run_id,) = await opened.create_runs(
            [NewRun(kind="auto-update", node="n1", target="c1", actor="alice", params={})]
        )
        await opened.begin_step(run_id, "download", wait=False)
        await opened.audit(actor="tgops", source="lifecycle", action="noted", wait=False)
    async with Store(url) as again:
        assert [s.name for s in await again.steps(run_id)] == ["download"]
        assert any(r.action == "noted" for r in await again.audit_log())


async def test_every_journal_write_finds_its_rows_by_key(tmp_path: Path) -> None:
    """SQLite's plan of each statement the journal writes with searches an index; none
    reads a whole table. A run's end once freed its node by ``active_run_id`` (no index):
    every run's end read every node, at 10,000 nodes 100 million rows per update time."""
    async with Store(f"sqlite+aiosqlite:///{tmp_path}/state.db") as store:
        await store.sync_nodes([(name, "c1", "sandbox") for name in NODES])
        ids = await _runs(store)
        sent: list[tuple[str, Any]] = []

        def seen(_conn: object, _cursor: object, statement: str, params: Any, *_: object) -> None:
            if statement.split(maxsplit=1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
                sent.append((statement, params[0] if isinstance(params, list) else params))

        engine = store.engine.sync_engine
        event.listen(engine, "before_cursor_execute", seen)
        try:
            for run_id, name in zip(ids[:2], NODES, strict=False):
                await store.begin_step(run_id, "download")
                await store.step_detail(run_id, "download", "1 of 2 files")
                await store.commit(
                    NodeChange(name=name, values={"lb": "drained"}),
                    NodeChange(name=name, values={}, derive=lambda row: {"staged": {}}),
                    RunChange(run_id=run_id, values={"params": {"plan": []}}),
                )
                await store.begin_step(run_id, "install", after="download")
                await store.end_step(run_id, "install", detail="installed")
            await store.finish_run(
                ids[0], status="succeeded", error=None, end=RunEnd(kind="auto-update", node="n01")
            )
            await store.finish_run(
                ids[1], status="failed", error="x", end=RunEnd(kind="auto-update", node="n02")
            )
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        plans: dict[str, list[str]] = {}
        async with store.engine.connect() as conn:
            for statement, params in dict(sent).items():
                rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                plans[statement] = [row[-1] for row in rows]
    assert any(s.startswith("UPDATE nodes SET active_run_id") for s in plans), plans
    scans = {s: p for s, p in plans.items() if any(line.startswith("SCAN") for line in p)}
    assert not scans, scans


async def test_node_changes_of_different_columns_in_one_statement_keep_their_order(
    store: Store,
) -> None:
    """A transaction's node changes are one UPDATE whatever columns each changes (times,
    text, JSON, a value set back to NULL): each row changes only its own columns, a node's
    later change applies after its earlier one, and the version counts every change."""
    since = datetime(2026, 12, 6, 7, tzinfo=UTC)
    await store.update_node(NODES[1], lb="drained", installed={"tgpro": "1"})
    before = {name: await store.node(name) for name in NODES[:2]}
    with statements_sent(store.engine) as statements:
        await store.commit(
            NodeChange(
                name=NODES[0],
                values={"update_lock_since": since, "update_lock_reason": "install failed"},
            ),
            NodeChange(name=NODES[1], values={"lb": None}),
            NodeChange(name=NODES[1], values={"installed": {"tgpro": "2"}, "lb": "active"}),
            NodeChange(name=NODES[0], values={"update_lock_reason": "install failed twice"}),
        )
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE NODES")]
    assert len(updates) == 1, updates
    first, second = await store.node(NODES[0]), await store.node(NODES[1])
    assert first is not None and second is not None
    assert first.update_lock_since == since
    assert first.update_lock_reason == "install failed twice"
    assert first.lb == before[NODES[0]].lb and first.installed == before[NODES[0]].installed
    assert second.lb == "active" and second.installed == {"tgpro": "2"}
    assert second.update_lock_since is None
    assert first.version == before[NODES[0]].version + 2
    assert second.version == before[NODES[1]].version + 2


async def test_a_run_end_frees_its_node_in_the_statement_of_the_node_changes(
    store: Store,
) -> None:
    """Runs that end in a transaction with node changes release their nodes in the same
    UPDATE: a node only from the run that holds it, its version counted only for its
    changes; a transaction without node changes releases them on its own."""
    a, b, c, d, *_ = await _runs(store)
    # n04 is held by run b (as after a recovery gave it to another run): d's end must
    # leave it alone
    await store.update_node(NODES[3], active_run_id=b)
    before = {name: await store.node(name) for name in NODES[:4]}
    now = datetime.now(UTC)
    statements = Statements(store)
    try:
        await store.journal.write(
            NodeChange(name=NODES[0], values={"lb": "active", "left_drained_by_run": None}),
            NodeChange(name=NODES[1], values={"sessions": 2}),
            RunFinish(run_id=a, status="succeeded", error=None, at=now, node=NODES[0]),
            RunFinish(run_id=c, status="failed", error="boom", at=now, node=NODES[2]),
            RunFinish(run_id=d, status="cancelled", error=None, at=now, node=NODES[3]),
        )
        together = statements.seen.count("UPDATE nodes")
        statements.seen.clear()
        await store.journal.write(
            RunFinish(run_id=b, status="succeeded", error=None, at=now, node=NODES[1])
        )
        alone = statements.seen.count("UPDATE nodes")
    finally:
        statements.close()
    assert (together, alone) == (1, 1)
    held: dict[str, int | None] = {}
    counted: dict[str, int] = {}
    for name in NODES[:4]:
        node, earlier = await store.node(name), before[name]
        assert node is not None and earlier is not None
        held[name], counted[name] = node.active_run_id, node.version - earlier.version
    assert held == {NODES[0]: None, NODES[1]: None, NODES[2]: None, NODES[3]: b}
    assert counted == {NODES[0]: 1, NODES[1]: 1, NODES[2]: 0, NODES[3]: 0}
    for run_id, status in ((a, "succeeded"), (b, "succeeded"), (c, "failed"), (d, "cancelled")):
        run = await store.run(run_id)
        assert run is not None and run.status == status


async def _journal_script(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """The same journal transactions of every kind of entry, on ``store``; the rows they
    leave (every column but the times the store sets from its clock: a run's creation,
    an audit record's)."""
    await store.sync_nodes([(name, "c1", "sandbox") for name in NODES])
    a, b, c, d, *_ = await _runs(store)
    await store.update_node(NODES[3], active_run_id=b)  # d's end must leave it to b
    start = datetime(2026, 12, 6, 8, tzinfo=UTC)

    def at(seconds: float) -> datetime:
        return start + timedelta(seconds=seconds)

    def staged(row: NodeRecord) -> dict[str, Any]:
        return {"staged": {**row.staged, "tgpro": "2"}}

    await store.journal.write(
        Transition(run_id=a, name="download", detail="1 file", after=None, at=at(1)),
        # begins and ends in the same transaction: inserted done
        Transition(run_id=a, name="slot", detail=None, after="download", at=at(2)),
        Transition(run_id=a, name="drain", detail=None, after="slot", at=at(3)),
        Transition(run_id=b, name="download", detail=None, after=None, at=at(1)),
        NodeChange(name=NODES[0], values={"lb": "drained", "sessions": 3}),
        NodeChange(name=NODES[0], values={}, derive=staged),
        NodeChange(name=NODES[0], values={"lb": None}),  # back to NULL, after the others
        NodeChange(name=NODES[1], values={"update_lock_since": at(3), "update_lock_reason": "x"}),
        NodeChange(name=NODES[1], values={}, derive=staged),
        NodeChange(name="absent", values={}, derive=staged),  # not in the store: nothing
        RunChange(run_id=a, values={"params": {"plan": [1, 2]}}),
        RunChange(run_id=a, values={"progress_done": 5, "progress_total": 9}),
        RunChange(run_id=b, values={"progress_done": 1}),
        StepEnd(run_id=b, name="download", status=None, detail="first", at=at(3)),
        StepEnd(run_id=b, name="download", status=None, detail="second", at=at(4)),
        store.audit_entry(actor="tgops", source="lifecycle", action="drain", target=NODES[0]),
        store.audit_entry(actor="tgops", source="lifecycle", action="note", detail="ünïcode"),
    )
    await store.journal.write(
        StepEnd(run_id=b, name="download", status="failed", detail=None, at=at(5)),
        StepEnd(run_id=b, name="download", status="done", detail="late", at=at(6)),
        Transition(run_id=c, name="install", detail=None, after=None, at=at(5)),
        NodeChange(name=NODES[0], values={}, derive=staged),
        RunFinish(
            run_id=a,
            status="succeeded",
            error=None,
            at=at(7),
            audit=store.audit_entry(actor="tgops", source="system", action="run done").values,
            done="drain",
            done_at=at(6.5),
            node=NODES[0],  # released in the statement of the node changes
        ),
        RunFinish(run_id=c, status="failed", error="boom", at=at(8), node=NODES[2]),
        RunFinish(run_id=d, status="cancelled", error=None, at=at(8), node=NODES[3]),
        RunFinish(run_id=b, status="failed", error="not named", at=at(9)),  # on its own
    )
    tables = {
        "runs": select(*(c for c in t.runs.c if c.name != "created_at")).order_by(t.runs.c.id),
        "run_steps": select(t.run_steps).order_by(t.run_steps.c.id),
        "nodes": select(t.nodes).order_by(t.nodes.c.name),
        "audit": select(*(c for c in t.audit.c if c.name != "at")).order_by(t.audit.c.id),
    }
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with store.reading() as conn:
        for name, query in tables.items():
            rows[name] = [tuple(row) for row in await conn.execute(query)]
    return rows


@pytest.mark.postgres
@pytest.mark.skipif(POSTGRES_URL is None, reason=NO_POSTGRES)
async def test_a_journal_transaction_leaves_the_same_rows_on_every_store(tmp_path: Path) -> None:
    """On PostgreSQL a small journal transaction is one call of the store's function
    (``core.store.journal_pg``), a larger one goes statement by statement as on SQLite:
    the same entries leave the same rows either way (a step begun and ended in one
    transaction, node changes merged in order and derived from the row, details of which
    the last counts, a step's first end, run ends with their steps, node and audit)."""
    assert POSTGRES_URL is not None
    async with Store(f"sqlite+aiosqlite:///{tmp_path}/state.db") as sqlite:
        expected = await _journal_script(sqlite)
    seen: dict[int, dict[str, list[tuple[Any, ...]]]] = {}
    for limit in (ONE_CALL_ENTRIES, 0):
        await reset_postgres(POSTGRES_URL)
        async with Store(POSTGRES_URL) as store:
            store.journal.one_call_entries = limit
            with statements_sent(store.engine) as sent:
                seen[limit] = await _journal_script(store)
        inner = [s for s in sent if "json_to_recordset" in s]  # the function's statements
        assert (len(inner) > 0) == (limit > 0), sent
    assert expected["run_steps"][1][2:4] == ("slot", "done")
    assert [r[5] for r in expected["runs"][:4]] == ["succeeded", "failed", "failed", "cancelled"]
    held = [r[list(t.nodes.c.keys()).index("active_run_id")] for r in expected["nodes"][:4]]
    assert held == [None, None, None, expected["runs"][1][0]]  # run b's
    assert seen[ONE_CALL_ENTRIES] == expected
    assert seen[0] == expected


@pytest.mark.postgres
@pytest.mark.skipif(POSTGRES_URL is None, reason=NO_POSTGRES)
async def test_a_journal_call_that_failed_leaves_its_connection_usable() -> None:
    """The function prepares each statement once per connection and notes it in a
    setting; a call that fails sets the setting back but not the prepared statement, so
    the next call on the same connection must find it prepared rather than prepare it
    again (which PostgreSQL refuses)."""
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    async with Store(POSTGRES_URL) as store:
        await store.sync_nodes([(name, "c1", "sandbox") for name in NODES])
        [run_id, *_] = await _runs(store)
        now = datetime.now(UTC)
        async with store.single_statement() as conn:
            with pytest.raises(IntegrityError):  # no such run: its step cannot be inserted
                await journal_pg.write_entries(
                    conn,
                    [Transition(run_id=99999, name="download", detail=None, after=None, at=now)],
                )
            await journal_pg.write_entries(
                conn, [Transition(run_id=run_id, name="download", detail=None, after=None, at=now)]
            )
        assert [s.name for s in await store.steps(run_id)] == ["download"]
