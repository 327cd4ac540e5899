"""The store on SQLite and on PostgreSQL (TGOPS_TEST_DATABASE_URL or a throwaway server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, insert, inspect

from core.store import NodeBusyError, Store, StoreUnavailableError
from core.store import tables as t
from core.store.base import migrations_config
from core.store.outbox import ENQUEUE_ROWS
from tests.databases import POSTGRES_URL, backends, reset_postgres, statements_with_parameters


def index_names(connection: Connection, table: str) -> set[str | None]:
    """The names of ``table``'s indexes (run with ``run_sync``)."""
    return {i["name"] for i in inspect(connection).get_indexes(table)}


def downgrade_to(connection: Connection, revision: str) -> None:
    """Migrate the store on ``connection`` down to ``revision`` (opening it again migrates
    it up to the head)."""
    command.downgrade(migrations_config(connection), revision)


@pytest.fixture(params=backends())
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/state.db"
        return
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    yield POSTGRES_URL


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    async with Store(url) as opened:
        await opened.sync_nodes(
            [
                ("n1", "c1", "sandbox"),
                ("n2", "c1", "sandbox"),
                ("n3", "c1", "sandbox"),
                ("solo", None, "sandbox"),
            ]
        )
        yield opened


async def test_migrations_create_every_table_and_are_idempotent(url: str) -> None:
    for _ in range(2):
        async with Store(url) as store:

            def tables(sync_conn: object) -> set[str]:
                return set(inspect(sync_conn).get_table_names())

            async with store.engine.connect() as conn:
                names = await conn.run_sync(tables)
    assert {
        "nodes",
        "runs",
        "run_steps",
        "audit",
        "schedules",
        "maintenance",
        "hotfix_selections",
        "cluster_slots",
        "slot_waiters",
        "outbox",
        "announced_hotfixes",
        "escalations",
        "alembic_version",
    } <= names


async def test_sqlite_uses_wal_and_creates_its_directory(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/deep/dir/state.db"
    async with Store(url) as store, store.engine.connect() as conn:
        mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
    assert mode == "wal"
    assert (tmp_path / "deep" / "dir" / "state.db").exists()


async def test_unreachable_database_is_one_clear_error() -> None:
    with pytest.raises(StoreUnavailableError) as info:
        async with Store("postgresql+asyncpg://nobody:pw@127.0.0.1:1/none", connect_timeout=2):
            pass
    text = str(info.value)
    assert "postgresql+asyncpg://nobody:***@127.0.0.1:1/none" in text
    assert "pw" not in text.replace("postgresql", "")
    assert "check database_url" in text


async def test_nodes_survive_reopen_and_keep_state(url: str) -> None:
    async with Store(url) as store:
        await store.sync_nodes([("n1", "c1", "sandbox")])
        since = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
        await store.update_node(
            "n1",
            update_lock_since=since,
            update_lock_reason="install failed",
            installed={"tg-base": "1.2"},
        )
    async with Store(url) as store:
        node = await store.node("n1")
    assert node is not None
    assert node.update_lock_since == since
    assert node.update_lock_reason == "install failed"
    assert node.installed == {"tg-base": "1.2"}
    assert node.lb == "in"


async def test_one_active_run_per_node(store: Store) -> None:
    first = await store.create_run(kind="download", node="n1", target="n1", actor="alice")
    with pytest.raises(NodeBusyError) as info:
        await store.create_run(kind="auto-update", node="n1", target="c1", actor="bob")
    assert f"node n1 is busy with run #{first}" in str(info.value)
    await store.begin_step(first, "fetch")
    await store.end_step(first, "fetch", detail="3 packages")
    await store.finish_run(first, status="succeeded")
    second = await store.create_run(kind="auto-update", node="n1", target="c1", actor="bob")
    assert second > first
    run = await store.run(first)
    assert run is not None and run.status == "succeeded" and run.finished_at is not None
    steps = await store.steps(first)
    assert [(s.name, s.status, s.detail) for s in steps] == [("fetch", "done", "3 packages")]


async def test_active_runs_of_other_owners_are_read_without_this_instances_own(
    store: Store,
) -> None:
    """What another instance may have left (the leader looks every quarter of
    ``leader.takeover``): active runs owned by someone else or by nobody, not this
    instance's own (an update time of 10,000 nodes has that many in flight)."""
    mine = await store.create_run(kind="download", node="n1", target="n1", actor="a", owner="me")
    theirs = await store.create_run(
        kind="download", node="n2", target="n2", actor="a", owner="gone"
    )
    nobodys = await store.create_run(kind="download", node="n3", target="n3", actor="a")
    done = await store.create_run(kind="download", node="solo", target="solo", actor="a")
    await store.finish_run(done, status="succeeded")
    active = ("queued", "running")
    others = await store.runs(statuses=active, limit=100, not_owner="me")
    assert [r.id for r in others] == [nobodys, theirs]
    every = await store.runs(statuses=active, limit=100)
    assert [r.id for r in every] == [nobodys, theirs, mine]


async def test_cluster_slots_hold_the_limit_under_concurrency(store: Store) -> None:
    results = await asyncio.gather(
        *(
            store.try_take_slot(cluster="c1", node=n, limit=2, run_id=None)
            for n in ("n1", "n2", "n3")
        )
    )
    assert sorted(r for r in results if r is not None) == [0, 1]
    assert results.count(None) == 1
    holders = {s.node for s in await store.slots("c1")}
    assert len(holders) == 2
    # a holder asking again gets its own slot back (after a restart, say)
    holder = next(iter(holders))
    again = await store.try_take_slot(cluster="c1", node=holder, limit=2, run_id=None)
    assert again is not None
    waiting = ({"n1", "n2", "n3"} - holders).pop()
    await store.wait_for_slot(cluster="c1", node=waiting, run_id=None)
    assert await store.slot_queue("c1") == [waiting]
    assert await store.release_slot(cluster="c1", node=holder)
    assert await store.try_take_slot(cluster="c1", node=waiting, limit=2, run_id=None) is not None
    assert await store.slot_queue("c1") == []


async def test_slots_hold_across_two_store_instances(url: str) -> None:
    async with Store(url) as one, Store(url) as two:
        await one.sync_nodes([("n1", "c1", "sandbox"), ("n2", "c1", "sandbox")])
        a = await one.try_take_slot(cluster="c1", node="n1", limit=1, run_id=None)
        b = await two.try_take_slot(cluster="c1", node="n2", limit=1, run_id=None)
    assert a == 0
    assert b is None


async def test_outbox_idempotency_and_retry(store: Store) -> None:
    assert await store.enqueue(
        key="ev1:email:a@x",
        channel="email",
        recipient="a@x",
        subject="Hotfix HF-1",
        payload={"id": "HF-1"},
    )
    assert not await store.enqueue(key="ev1:email:a@x", channel="email", recipient="a@x")
    now = datetime.now(UTC)
    (item,) = await store.due_outbox(now=now)
    await store.outbox_result(
        item.id, status="pending", error="421 try later", retry_at=now + timedelta(seconds=30)
    )
    assert await store.due_outbox(now=now) == []
    (later,) = await store.due_outbox(now=now + timedelta(seconds=31))
    assert later.attempts == 1 and later.last_error == "421 try later"
    await store.outbox_result(item.id, status="sent")
    (sent,) = await store.outbox(statuses=["sent"])
    assert sent.sent_at is not None and sent.attempts == 2


async def test_outbox_claims_in_due_order_marks_and_settles(store: Store) -> None:
    now = datetime.now(UTC)
    items = [
        {"key": f"k{i}", "channel": "email", "recipient": f"r{i}@x", "payload": {"n": i}}
        for i in range(6)
    ]
    items[4]["not_before"] = now + timedelta(hours=1)  # not due yet
    await store.enqueue_many(items)
    await store.enqueue_many([{"key": "c0", "channel": "call", "recipient": "+1"}])
    now = datetime.now(UTC)
    lease = now + timedelta(seconds=60)
    first = await store.claim_outbox(channel="email", now=now, lease_until=lease, limit=2)
    assert [i.key for i in first] == ["k0", "k1"]
    assert all(i.status == "sending" and i.payload["n"] == n for n, i in enumerate(first))
    # k0's transmission may begin; k1's sender dies before it: its lease runs out
    await store.settle_outbox([], transmitting=[first[0].id])
    later = now + timedelta(seconds=61)
    again = await store.claim_outbox(
        channel="email", now=later, lease_until=later + timedelta(seconds=60), limit=10
    )
    # due longest (k1's lease ran out at 60 s) first; k0 is never taken again; k4 is not due
    assert [i.key for i in again] == ["k1", "k2", "k3", "k5"]
    await store.settle_outbox(
        [
            {"id": again[0].id, "status": "sent"},
            {"id": again[1].id, "status": "sent"},
            {"id": again[2].id, "status": "pending", "attempted": False, "retry_at": later},
            {"id": again[3].id, "status": "failed", "error": "550 no"},
        ],
        [{"actor": "notify", "source": "system", "action": "notification sent", "target": "t"}],
        transmitting=[again[0].id, again[1].id, again[2].id],
    )
    rows = {r.key: r for r in await store.outbox(limit=10)}
    assert (rows["k0"].status, rows["k0"].transmitting) == ("sending", True)
    assert (rows["k1"].status, rows["k1"].attempts, rows["k1"].transmitting) == ("sent", 1, True)
    assert rows["k1"].sent_at is not None
    assert (rows["k3"].status, rows["k3"].attempts, rows["k3"].transmitting) == (
        "pending",
        0,
        False,
    )
    assert rows["k3"].next_attempt_at == later
    assert (rows["k5"].status, rows["k5"].last_error) == ("failed", "550 no")
    assert [i.key for i in await store.transmitting_outbox()] == ["k0"]
    await store.mark_transmitting([again[3].id])  # settled already: not marked
    rows = {r.key: r for r in await store.outbox(limit=10)}
    assert (rows["k5"].status, rows["k5"].transmitting) == ("failed", False)
    (audit,) = await store.audit_log()
    assert (audit.action, audit.target) == ("notification sent", "t")
    taken = await store.claim_outbox(channel="call", now=later, lease_until=lease, limit=10)
    assert [i.key for i in taken] == ["c0"]


async def queue_emails(store: Store, count: int) -> tuple[datetime, datetime]:
    """E-mails ``k0`` ... queued; now, and a lease that runs out a minute later."""
    await store.enqueue_many(
        [{"key": f"k{i}", "channel": "email", "recipient": f"r{i}@x"} for i in range(count)]
    )
    now = datetime.now(UTC)
    return now, now + timedelta(seconds=60)


async def test_outbox_queues_each_key_once_whoever_queues_it(store: Store) -> None:
    def item(i: int, recipient: str = "new@x") -> dict[str, object]:
        return {"key": f"k{i}", "channel": "email", "recipient": recipient}

    assert await store.enqueue_many([item(1, "first@x"), item(3, "first@x")]) == ["k1", "k3"]
    # keys queued before are left as they are; a key given twice is queued once (the
    # first); more rows than one INSERT takes
    count = ENQUEUE_ROWS + 20
    given = [item(i) for i in range(count)] + [item(0, "twice@x")]
    fresh = await store.enqueue_many(given)
    assert fresh == [f"k{i}" for i in range(count) if i not in (1, 3)]
    rows = {r.key: r for r in await store.outbox(limit=count + 10)}
    assert len(rows) == count
    assert rows["k1"].recipient == rows["k3"].recipient == "first@x"
    assert rows["k0"].recipient == "new@x"
    # two callers at the same moment with overlapping keys (two connections on
    # PostgreSQL): each key queued once, by one of them, and neither fails
    first, second = await asyncio.gather(
        store.enqueue_many([item(i) for i in range(count, count + 60)]),
        store.enqueue_many([item(i) for i in range(count + 30, count + 90)]),
    )
    assert sorted(first + second) == sorted(f"k{i}" for i in range(count, count + 90))
    assert len(await store.outbox(limit=count + 200)) == count + 90


async def test_outbox_queues_texts_numbers_and_times_exactly(store: Store) -> None:
    # SQLite's INSERT is the driver's own, its parameters made by the store (times as
    # SQLAlchemy writes them, the payload as JSON): NaN and NUL characters (which
    # PostgreSQL stores neither of), non-ASCII text and times read back as they were given
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    payload = {"name": "Jörg “J” ✓", "vars": {"n": [1, 2.5, None, True, -0.0]}, "e": {}}
    items: list[dict[str, Any]] = [
        {"key": "plain", "channel": "email", "recipient": "a@x", "subject": "Grüße ✓"},
        {"key": "later", "channel": "email", "recipient": "b@x", "not_before": later},
        {"key": "full", "channel": "email", "recipient": "c@x", "payload": payload},
    ]
    if store.dialect == "sqlite":
        items.insert(1, {"key": "nan", "channel": "email", "recipient": "d@x",
                         "payload": {"x": float("nan")}})  # fmt: skip
        items.append({"key": "nul", "channel": "email", "recipient": "e@x",
                      "subject": "a\x00b", "payload": {"t": "c\x00d"}})  # fmt: skip
    assert await store.enqueue_many(items) == [i["key"] for i in items]
    rows = {r.key: r for r in await store.outbox(limit=10)}
    assert rows["plain"].subject == "Grüße ✓" and rows["plain"].payload == {}
    assert rows["full"].payload == payload
    assert rows["later"].next_attempt_at == later
    assert rows["plain"].created_at == rows["later"].created_at
    assert abs(rows["plain"].created_at - now) < timedelta(seconds=60)
    if store.dialect == "sqlite":
        assert rows["nan"].payload["x"] != rows["nan"].payload["x"]  # NaN
        assert rows["nul"].subject == "a\x00b" and rows["nul"].payload == {"t": "c\x00d"}
    # due ones are taken in the order they were queued, the later one not yet
    claimed = await store.claim_outbox(
        channel="email", now=datetime.now(UTC), lease_until=later, limit=10
    )
    assert [c.key for c in claimed] == [i["key"] for i in items if i["key"] != "later"]


async def test_outbox_settles_a_batch_of_sent_items_with_their_markers_and_audit(
    store: Store,
) -> None:
    # the common outcome of a batch: sent, with the markers of the items after it; on
    # PostgreSQL one statement that commits on its own, on SQLite one transaction
    now, lease = await queue_emails(store, 5)
    k0, k1, k2, _k3 = await store.claim_outbox(channel="email", now=now, lease_until=lease, limit=4)
    audits = [
        {"actor": "notify", "source": "system", "action": "notification sent", "target": "t"},
        {"actor": "notify", "source": "system", "action": "notification sent", "detail": "d"},
    ]
    await store.settle_outbox(
        [{"id": k0.id, "status": "sent"}, {"id": k1.id, "status": "sent"}],
        audits,
        transmitting=[k0.id, k1.id, k2.id],
    )
    rows = {r.key: r for r in await store.outbox(limit=10)}
    for key in ("k0", "k1"):
        row = rows[key]
        assert (row.status, row.attempts, row.transmitting, row.last_error) == (
            "sent",
            1,
            True,
            None,
        )
        assert row.sent_at is not None and row.sent_at >= now
    assert (rows["k2"].status, rows["k2"].transmitting, rows["k2"].sent_at) == (
        "sending",
        True,
        None,
    )
    assert (rows["k3"].status, rows["k3"].transmitting) == ("sending", False)
    assert (rows["k4"].status, rows["k4"].transmitting) == ("pending", False)
    # a marker for an item no longer sending changes nothing; a batch without audit records
    await store.settle_outbox(
        [{"id": k2.id, "status": "sent"}], transmitting=[rows["k4"].id, k1.id]
    )
    rows = {r.key: r for r in await store.outbox(limit=10)}
    assert (rows["k2"].status, rows["k2"].attempts) == ("sent", 1)
    assert (rows["k4"].status, rows["k4"].transmitting) == ("pending", False)
    assert (rows["k1"].status, rows["k1"].attempts) == ("sent", 1)
    records = sorted(await store.audit_log(), key=lambda a: a.id)
    assert [(a.action, a.target, a.detail, a.run_id) for a in records] == [
        ("notification sent", "t", "", None),
        ("notification sent", None, "d", None),
    ]
    assert all(a.at >= now for a in records)


async def test_outbox_claims_at_once_take_each_item_once_within_their_limits(
    store: Store,
) -> None:
    now, lease = await queue_emails(store, 50)
    claims = await asyncio.gather(
        *(
            store.claim_outbox(channel="email", now=now, lease_until=lease, limit=12)
            for _ in range(5)
        )
    )
    assert all(len(claim) <= 12 for claim in claims)
    taken = [item.key for claim in claims for item in claim]
    assert len(taken) == len(set(taken)) == 50


async def test_a_maintenance_start_is_marked_once_and_survives_reopen(
    url: str, store: Store
) -> None:
    start = datetime(2026, 12, 1, 21, 0, tzinfo=UTC)
    window = await store.open_maintenance(
        node="n1",
        start=start,
        reason="Kernel",
        origin="manual",
        disable_logon=False,
        created_by="alice",
    )
    assert window.started_at is None
    at = start + timedelta(seconds=3)
    assert await store.mark_started([window.id], at) == {window.id}
    assert await store.mark_started([window.id], at + timedelta(seconds=1)) == set()
    async with Store(url) as reopened:
        (stored,) = await reopened.maintenance("n1")
        assert stored.started_at == at
        assert await reopened.mark_started([window.id], at) == set()
    other = await store.open_maintenance(
        node="n2",
        start=start,
        reason="Disk",
        origin="manual",
        disable_logon=False,
        created_by="alice",
    )
    await store.end_maintenance("n2", by="bob", reason="cancelled")
    assert await store.mark_started([other.id], at) == set()  # ended: never announced


async def test_many_maintenance_starts_are_marked_together(store: Store) -> None:
    """``mark_started`` marks every open window not yet started, past the limit of one
    statement's parameters (1,000 ids each), and names only the windows it marked."""
    start = datetime(2026, 12, 1, 21, 0, tzinfo=UTC)
    windows = [
        await store.open_maintenance(
            node=f"n{i}",
            start=start,
            reason="Kernel",
            origin="scheduled-update",
            disable_logon=False,
            created_by="tgops",
        )
        for i in range(1205)
    ]
    at = start + timedelta(seconds=1)
    assert await store.mark_started([windows[0].id], at) == {windows[0].id}
    await store.end_maintenance("n1", by="bob", reason="cancelled")
    ids = [w.id for w in windows]
    marked = await store.mark_started(ids, at)
    assert marked == set(ids[2:])
    assert await store.mark_started(ids, at + timedelta(seconds=1)) == set()
    assert await store.mark_started([], at) == set()
    rows = {w.node: w for w in await store.maintenance()}
    assert rows["n1204"].started_at == at and "n1" not in rows


async def test_maintenance_audit_schedules_hotfixes(store: Store) -> None:
    start = datetime(2026, 12, 1, 21, 0, tzinfo=UTC)
    await store.open_maintenance(
        node="n1",
        start=start,
        reason="Kernel",
        origin="manual",
        disable_logon=True,
        created_by="alice",
    )
    replaced = await store.open_maintenance(
        node="n1",
        start=start,
        reason="Kernel 2",
        origin="manual",
        disable_logon=False,
        created_by="bob",
    )
    (open_window,) = await store.maintenance("n1")
    assert open_window.id == replaced.id and open_window.reason == "Kernel 2"
    ended = await store.end_maintenance("n1", by="bob", reason="cancelled")
    assert ended is not None
    assert await store.maintenance("n1") == []
    assert await store.end_maintenance("n1", by="bob", reason="cancelled") is None

    await store.audit(
        actor="alice", source="slack", action="command", target="n1", detail="download n1"
    )
    (entry,) = await store.audit_log(targets=["n1"])
    assert (entry.actor, entry.source, entry.detail) == ("alice", "slack", "download n1")

    await store.set_schedule(
        node="n1", kind="update", days="mon-fri", start="03:00", end=None, by="alice"
    )
    assert await store.disable_schedule(node="n1", kind="update", by="bob")
    assert not await store.disable_schedule(node="n1", kind="update", by="bob")
    (sched,) = await store.schedules("n1")
    assert not sched.enabled and sched.updated_by == "bob"

    assert await store.select_hotfixes("n1", ["HF-1", "HF-2"], by="alice") == ["HF-1", "HF-2"]
    assert await store.select_hotfixes("n1", ["HF-2"], by="alice") == []
    assert await store.unselect_hotfixes("n1", ["HF-1", "HF-9"]) == ["HF-1"]
    assert await store.selected_hotfixes() == {"n1": ["HF-2"]}

    assert await store.mark_announced("HF-2", channel="stable", urgency="urgent")
    assert not await store.mark_announced("HF-2", channel="stable", urgency="urgent")


async def test_every_schedule_change_leaves_a_new_mark_seen_by_another_store(url: str) -> None:
    """An instance notices schedule changes (also another instance's) by one row's mark."""
    async with Store(url) as one, Store(url) as other:
        await one.sync_nodes([("n1", "c1", "sandbox")])
        assert await other.schedules_mark() is None  # nothing scheduled yet
        await one.set_schedule(
            node="n1", kind="update", days="mon", start="03:00", end=None, by="alice"
        )
        first = await other.schedules_mark()
        assert first is not None
        await one.set_schedule(
            node="n1", kind="update", days="mon", start="04:00", end=None, by="alice"
        )
        second = await other.schedules_mark()
        assert second not in (None, first)
        assert await one.disable_schedule(node="n1", kind="update", by="bob")
        third = await other.schedules_mark()
        assert third not in (None, first, second)
        # nothing changed: the same mark
        assert not await one.disable_schedule(node="n1", kind="update", by="bob")
        assert await other.schedules_mark() == third


async def test_schedules_of_many_nodes_are_set_and_switched_off_together(store: Store) -> None:
    """One transaction for all nodes: each keeps its calendar UID, each gets its record."""
    audit = store.audit_entry(
        actor="alice", source="slack", action="schedule on", detail="mon 03:00"
    )
    names = ["n1", "n2", "n3"]
    await store.set_schedules(
        names, kind="update", days="mon", start="03:00", end=None, by="alice", audit=audit
    )
    uids = {s.node: s.uid for s in await store.schedules()}
    assert sorted(uids) == names and None not in uids.values()
    await store.set_schedules(names, kind="update", days="tue", start="04:00", end=None, by="bob")
    again = await store.schedules()
    assert {s.node: s.uid for s in again} == uids  # the same calendar events, changed
    assert {(s.days, s.start, s.updated_by) for s in again} == {("tue", "04:00", "bob")}
    records = await store.audit_log(targets=names)
    assert sorted(r.target or "" for r in records if r.action == "schedule on") == names
    assert await store.disable_schedule(node="n2", kind="update", by="bob")
    off = await store.disable_schedules(["n3", "n2", "n1", "solo"], kind="update", by="bob")
    assert off == ["n3", "n1"]  # in the order given; n2 was off already, solo had none
    assert not any(s.enabled for s in await store.schedules())


async def test_migration_0003_gives_existing_windows_and_schedules_a_calendar_uid(
    url: str,
) -> None:
    start = datetime(2030, 1, 2, 3, 0, tzinfo=UTC)
    async with Store(url) as store:
        for node in ("n1", "n2"):
            await store.open_maintenance(
                node=node,
                start=start,
                reason="r",
                origin="manual",
                disable_logon=False,
                created_by="t",
            )
            await store.set_schedule(
                node=node, kind="update", days="daily", start="03:00", end=None, by="t"
            )

        async with store.engine.begin() as conn:
            await conn.run_sync(downgrade_to, "0002")
    async with Store(url) as store:  # migrated to the head again at opening
        uids = [w.uid for w in await store.maintenance()]
        uids += [s.uid for s in await store.schedules()]
        assert len(uids) == 4
        assert all(uid is not None and str(uuid.UUID(uid)) == uid for uid in uids)
        assert len(set(uids)) == 4
        # a schedule set again keeps its UID
        before = {s.node: s.uid for s in await store.schedules()}
        await store.set_schedule(
            node="n1", kind="update", days="mon-fri", start="04:00", end=None, by="t"
        )
        after = {s.node: s.uid for s in await store.schedules()}
        assert after == before


async def test_the_run_steps_index_orders_a_runs_steps_and_migrates_both_ways(url: str) -> None:
    """A run's latest step is read through the index on (run_id, id): on PostgreSQL an
    index on run_id alone left the planner walking the whole table backwards along the
    primary key (migration 0005)."""

    def run_steps_index(connection: Connection) -> list[str | None]:
        found = inspect(connection).get_indexes("run_steps")
        return next(i["column_names"] for i in found if i["name"] == "ix_run_steps_run")

    async with Store(url) as store:
        async with store.engine.connect() as conn:
            assert await conn.run_sync(run_steps_index) == ["run_id", "id"]
        async with store.engine.begin() as conn:
            await conn.run_sync(downgrade_to, "0004")
        async with store.engine.connect() as conn:
            assert await conn.run_sync(run_steps_index) == ["run_id"]
    async with Store(url) as store, store.engine.connect() as conn:  # migrated again
        assert await conn.run_sync(run_steps_index) == ["run_id", "id"]


async def test_open_and_recently_ended_windows_are_found_by_index_and_migrate_both_ways(
    url: str,
) -> None:
    """Windows are kept after they end, so the reads of the open ones (every reminder
    tick, ``status``) and of those ended since a time (the calendar feed) must not read
    the whole history: with 3,000 ended windows (PostgreSQL's statistics gathered), both
    stores plan them through the index on ``ended_at`` (migration 0006), not a scan."""

    start = datetime(2026, 1, 1, 3, tzinfo=UTC)
    ended = [
        {
            "node": f"n{i % 1000}",
            "start": start + timedelta(days=i // 1000),
            "reason": "update",
            "origin": "scheduled-update",
            "disable_logon": False,
            "created_by": "t",
            "created_at": start,
            "ended_at": start + timedelta(days=i // 1000, minutes=20),
            "ended_by": "t",
            "end_reason": "done",
        }
        for i in range(3000)
    ]
    async with Store(url) as store:
        async with store.engine.begin() as conn:
            await conn.execute(insert(t.maintenance), ended)
        for node in ("n1", "n2"):
            await store.open_maintenance(
                node=node,
                start=datetime.now(UTC) + timedelta(hours=1),
                reason="update",
                origin="manual",
                disable_logon=False,
                created_by="t",
            )
        postgres = store.engine.dialect.name == "postgresql"
        if postgres:  # as its autovacuum does; tgops gathers no statistics on SQLite
            async with store.engine.begin() as conn:
                await conn.exec_driver_sql("ANALYZE")
        with statements_with_parameters(store.engine) as sent:
            assert [w.node for w in await store.maintenance()] == ["n1", "n2"]
            assert await store.maintenance_called_off(datetime.now(UTC)) == []
        explain = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
        async with store.engine.connect() as conn:
            for statement, params in sent:
                rows = await conn.exec_driver_sql(explain + statement, params)
                plan = " / ".join(str(row[0] if postgres else row[-1]) for row in rows)
                assert "SCAN maintenance" not in plan and "Seq Scan" not in plan, plan
                assert "ix_maintenance_ended" in plan, plan
            assert "ix_maintenance_ended" in await conn.run_sync(index_names, "maintenance")
        async with store.engine.begin() as conn:
            await conn.run_sync(downgrade_to, "0005")
        async with store.engine.connect() as conn:
            assert "ix_maintenance_ended" not in await conn.run_sync(index_names, "maintenance")
    async with Store(url) as store, store.engine.connect() as conn:  # migrated again
        assert "ix_maintenance_ended" in await conn.run_sync(index_names, "maintenance")


async def test_a_claim_reads_only_the_items_it_takes_and_the_index_migrates_both_ways(
    url: str,
) -> None:
    """A claim of 100 of 2,000 due e-mails (another channel's and items in delivery
    among them; no statistics gathered, as after a burst) reads its items through the
    index on (status, channel, next_attempt_at, id) in the order it takes them
    (migration 0008): on PostgreSQL no step of the plan reads more than the 100 rows
    taken (the index without channel and id made it read and sort every due item, per
    claim), on SQLite the index is used; the claim takes the first 100 by due time."""

    def too_many(node: dict[str, Any], limit: int) -> list[str]:
        found = [] if node.get("Actual Rows", 0) <= limit else [node["Node Type"]]
        for child in node.get("Plans", []):
            found += too_many(child, limit)
        return found

    async with Store(url) as store:
        now, lease = await queue_emails(store, 2000)
        await store.enqueue_many(
            [{"key": f"c{i}", "channel": "call", "recipient": f"+49{i}"} for i in range(300)]
        )
        first = await store.claim_outbox(channel="email", now=now, lease_until=lease, limit=100)
        assert [i.key for i in first] == [f"k{i}" for i in range(100)]
        with statements_with_parameters(store.engine) as sent:
            taken = await store.claim_outbox(channel="email", now=now, lease_until=lease, limit=100)
        assert [i.key for i in taken] == [f"k{i}" for i in range(100, 200)]
        [(statement, params)] = sent
        async with store.engine.connect() as conn:
            if store.engine.dialect.name == "postgresql":
                rows = await conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params
                )
                plan = rows.scalar_one()[0]["Plan"]
                assert too_many(plan, 100) == [], plan
                assert "ix_outbox_claim" in str(plan), plan
                await conn.rollback()  # EXPLAIN ANALYZE ran the claim
            else:
                rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                plan = " / ".join(str(row[-1]) for row in rows)
                assert "ix_outbox_claim" in plan, plan
            assert "ix_outbox_claim" in await conn.run_sync(index_names, "outbox")
        async with store.engine.begin() as conn:
            await conn.run_sync(downgrade_to, "0007")
        async with store.engine.connect() as conn:
            assert await conn.run_sync(index_names, "outbox") >= {"ix_outbox_due"}
            assert "ix_outbox_claim" not in await conn.run_sync(index_names, "outbox")
    async with Store(url) as store, store.engine.connect() as conn:  # migrated again
        indexes = await conn.run_sync(index_names, "outbox")
        assert "ix_outbox_claim" in indexes and "ix_outbox_due" not in indexes
