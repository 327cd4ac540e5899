"""The durable outbox of notifications: enqueued, claimed, sent or retried, never lost."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import TextClause

from core.store import tables as t
from core.store.base import StoreBase, audit_values, record_of, utcnow
from core.store.records import OutboxRecord
from core.store.sqlite import KEEP_CHANGES

_o = t.outbox.c
_TAKEABLE_BY_STATUS = (
    _o.status == "pending",
    and_(_o.status == "sending", _o.transmitting.is_(False)),
)
"""Pending; or claimed by a sender whose lease may run out, its transmission not begun.
A claim reads each in the order of ``ix_outbox_claim`` (``_due_branches``)."""
_TAKEABLE = or_(*_TAKEABLE_BY_STATUS)
_CLAIMED = (
    _o.id,
    _o.key,
    _o.recipient,
    _o.subject,
    _o.payload,
    _o.attempts,
    _o.last_error,
    _o.created_at,
)
_IN_TRANSMISSION = and_(_o.status == "sending", _o.transmitting.is_(True))
# The statements of every outcome write, built once (their compiled form is cached too);
# ``ids`` is a list of item ids
_BY_IDS = _o.id.in_(bindparam("ids", expanding=True))
_MARK = (
    update(t.outbox)
    .where(_BY_IDS)
    # the status is tested per row found by its id: as a condition of its own, SQLite
    # would look for the ids among all items ``sending`` (ix_outbox_claim)
    .values(transmitting=case((_o.status == "sending", True), else_=_o.transmitting))
)
_SENT = (
    update(t.outbox)
    .where(_BY_IDS)
    .values(
        status="sent",
        last_error=None,
        attempts=_o.attempts + 1,
        sent_at=bindparam("now", type_=_o.sent_at.type),
    )
)
_RELEASED = (
    update(t.outbox)
    .where(_BY_IDS)
    .values(
        status="pending",
        last_error=None,
        next_attempt_at=bindparam("due", type_=_o.next_attempt_at.type),
        transmitting=False,
    )
)
_AUDIT = insert(t.audit)
_SETTLE_PG = text(
    """
    WITH settled AS (
        UPDATE outbox SET
            transmitting = CASE WHEN id = ANY(CAST(:marks AS BIGINT[])) AND status = 'sending'
                THEN true ELSE transmitting END,
            status = CASE WHEN id = ANY(CAST(:sent AS BIGINT[])) THEN 'sent' ELSE status END,
            last_error = CASE WHEN id = ANY(CAST(:sent AS BIGINT[])) THEN NULL ELSE last_error END,
            attempts = CASE WHEN id = ANY(CAST(:sent AS BIGINT[])) THEN attempts + 1
                ELSE attempts END,
            sent_at = CASE WHEN id = ANY(CAST(:sent AS BIGINT[])) THEN CAST(:now AS TIMESTAMPTZ)
                ELSE sent_at END
        WHERE id = ANY(CAST(:ids AS BIGINT[]))
    )
    INSERT INTO audit (at, actor, source, action, target, detail, run_id)
    SELECT * FROM unnest(
        CAST(:at AS TIMESTAMPTZ[]), CAST(:actor AS VARCHAR[]), CAST(:source AS VARCHAR[]),
        CAST(:action AS VARCHAR[]), CAST(:target AS VARCHAR[]), CAST(:detail AS TEXT[]),
        CAST(:run_id AS BIGINT[])
    )
    """
)
"""``settle_outbox`` on PostgreSQL when every outcome is "sent": the ``transmitting``
markers, the outcomes and the audit records in one statement, which commits on its own
(one round trip where a transaction was five: BEGIN, three statements, COMMIT). One
UPDATE sets both marker and outcome, reading the row as it was (a row may be updated only
once per statement): a row is marked only while ``sending``, as ``_MARK`` before
``_SENT`` does in the transaction."""
ENQUEUE_ROWS = 100
"""Rows of one INSERT of ``enqueue_many`` on SQLite (each with its seven parameters): each
INSERT is a trip to SQLite's thread, and the event loop is free between them."""
_ENQUEUE_PG = text(
    """
    INSERT INTO outbox (
        key, channel, recipient, subject, payload, status, attempts, next_attempt_at,
        created_at
    )
    SELECT key, channel, recipient, subject, payload, 'pending', 0, due, CAST(:now AS TIMESTAMPTZ)
    FROM unnest(
        CAST(:key AS VARCHAR[]), CAST(:channel AS VARCHAR[]), CAST(:recipient AS VARCHAR[]),
        CAST(:subject AS TEXT[]), CAST(:payload AS JSON[]), CAST(:due AS TIMESTAMPTZ[])
    ) AS given (key, channel, recipient, subject, payload, due)
    ON CONFLICT (key) DO NOTHING
    RETURNING key
    """
)
"""``enqueue_many`` on PostgreSQL: every row in one statement, each column one array
parameter (as ``_SETTLE_PG``'s audit records), where a multi-row INSERT binds and
converts nine parameters per row (10,000 rows: 0.15 s of the event loop against 0.07 s,
JSON encoding included)."""
_AUDIT_COLUMNS = ("at", "actor", "source", "action", "target", "detail", "run_id")


class OutboxStore(StoreBase):
    """The durable outbox of notifications: enqueued, claimed, sent or retried, never lost."""

    async def enqueue(
        self,
        *,
        key: str,
        channel: str,
        recipient: str,
        subject: str = "",
        payload: Mapping[str, Any] | None = None,
        not_before: datetime | None = None,
    ) -> bool:
        """Queue one notification; ``False`` when its idempotency key is already queued."""
        item = {
            "key": key,
            "channel": channel,
            "recipient": recipient,
            "subject": subject,
            "payload": payload,
            "not_before": not_before,
        }
        return bool(await self.enqueue_many([item]))

    async def due_outbox(self, *, now: datetime, limit: int = 100) -> list[OutboxRecord]:
        query = (
            select(t.outbox)
            .where(t.outbox.c.status == "pending", t.outbox.c.next_attempt_at <= now)
            .order_by(t.outbox.c.next_attempt_at, t.outbox.c.id)
            .limit(limit)
        )
        return await self._all(query, OutboxRecord)

    async def outbox(
        self, *, statuses: Sequence[str] | None = None, limit: int = 100
    ) -> list[OutboxRecord]:
        query = select(t.outbox).order_by(t.outbox.c.id.desc()).limit(limit)
        if statuses is not None:
            query = query.where(t.outbox.c.status.in_(list(statuses)))
        return await self._all(query, OutboxRecord)

    async def outbox_result(
        self,
        outbox_id: int,
        *,
        status: str,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "status": status,
            "last_error": error,
            "attempts": t.outbox.c.attempts + 1,
        }
        if status == "sent":
            values["sent_at"] = utcnow()
        if retry_at is not None:
            values["next_attempt_at"] = retry_at
        async with self.transaction() as conn:
            await conn.execute(update(t.outbox).where(t.outbox.c.id == outbox_id).values(**values))

    async def enqueue_many(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        """Queue several notifications in one transaction; returns the keys newly queued.

        Each item has ``key``, ``channel``, ``recipient`` and optionally ``subject``,
        ``payload`` and ``not_before``; keys already queued are left as they are.
        """
        if not items:
            return []
        now = utcnow()
        rows: dict[str, dict[str, Any]] = {}  # by key, the first of a key given twice
        for item in items:
            key = str(item["key"])
            if key not in rows:
                rows[key] = {
                    "key": key,
                    "channel": item["channel"],
                    "recipient": item["recipient"],
                    "subject": item.get("subject", ""),
                    "payload": dict(item.get("payload") or {}),
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": item.get("not_before") or now,
                    "created_at": now,
                }
        values = list(rows.values())
        fresh: set[str] = set()
        if self.dialect == "postgresql":
            params = {
                "now": now,
                "key": list(rows),
                "payload": [json.dumps(row["payload"]) for row in values],
                "due": [t.stored_utc(row["next_attempt_at"]) for row in values],
            }
            for column in ("channel", "recipient", "subject"):
                params[column] = [row[column] for row in values]
            async with self.single_statement() as conn:
                fresh.update(str(r[0]) for r in await conn.execute(_ENQUEUE_PG, params))
            return [key for key in rows if key in fresh]
        # SQLite: the driver's own statement, its parameters made here (SQLAlchemy's
        # INSERT processed each of nine per row: two to three times the CPU per row,
        # bench/RESULTS.md, "Twenty-fifth pass")
        stamp = _sqlite_datetime()
        stamps: dict[datetime, str] = {}
        created = stamp(now)
        async with self.transaction() as conn:
            for start in range(0, len(values), ENQUEUE_ROWS):
                chunk = values[start : start + ENQUEUE_ROWS]
                flat: list[Any] = []
                for row in chunk:
                    due = row["next_attempt_at"]
                    if due not in stamps:
                        stamps[due] = stamp(due)
                    flat += (
                        row["key"],
                        row["channel"],
                        row["recipient"],
                        row["subject"],
                        json.dumps(row["payload"]),
                        stamps[due],
                        created,
                    )
                sql = _enqueue_sqlite(len(chunk))
                result = await conn.exec_driver_sql(sql, tuple(flat))
                fresh.update(str(r[0]) for r in result)
        return [key for key in rows if key in fresh]

    async def claim_outbox(
        self, *, channel: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxRecord]:
        """Take due notifications of a channel for delivery (status ``sending``).

        Due are pending ones whose time has come and ``sending`` ones whose lease ran out
        (their sender died) unless their transmission had begun (``transmitting``: those
        are never sent again). Until ``lease_until`` no one else takes them.
        """
        params = {"now": now, "lease": lease_until}
        if self.dialect == "sqlite":
            claim = _claim_sqlite(channel, limit)
        else:
            claim = _claim_postgresql(channel, limit)
        async with self.single_statement() as conn:
            rows = (await conn.execute(claim, params)).all()
        return sorted(
            (
                OutboxRecord(
                    id=r[0],
                    key=r[1],
                    recipient=r[2],
                    subject=r[3],
                    payload=r[4],
                    attempts=r[5],
                    last_error=r[6],
                    created_at=r[7],
                    channel=channel,
                    status="sending",
                    next_attempt_at=lease_until,
                    sent_at=None,
                    transmitting=False,
                )
                for r in rows
            ),
            key=lambda r: r.id,
        )

    async def release_outbox(self, *, now: datetime) -> int:
        """Make every notification in delivery (``sending``) due again at once; how many.
        Only for a store a single instance uses (SQLite): it took them itself before it
        stopped, so nobody else is sending them. Those whose transmission may have begun
        (``transmitting``) are left for ``transmitting_outbox``/``settle_uncertain``."""
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.outbox)
                .where(t.outbox.c.status == "sending", t.outbox.c.transmitting.is_(False))
                .values(status="pending", next_attempt_at=now)
            )
        return int(result.rowcount or 0)

    async def mark_transmitting(self, ids: Sequence[int]) -> None:
        """Record that the transmission of these claimed notifications may begin (an
        e-mail's DATA): from now on they are never sent again automatically."""
        if not ids:
            return
        async with self.single_statement() as conn:
            await conn.execute(_MARK, {"ids": list(ids)})

    async def transmitting_outbox(
        self, *, channel: str | None = None, now: datetime | None = None
    ) -> list[OutboxRecord]:
        """Notifications whose transmission may have begun and that were never settled:
        all of them, or (``now``) those whose sender's lease has run out."""
        query = select(t.outbox).where(_IN_TRANSMISSION)
        if channel is not None:
            query = query.where(t.outbox.c.channel == channel)
        if now is not None:
            query = query.where(t.outbox.c.next_attempt_at <= now)
        return await self._all(query.order_by(t.outbox.c.id), OutboxRecord)

    async def settle_uncertain(
        self, audits: Mapping[int, Mapping[str, Any]], *, error: str
    ) -> list[int]:
        """Mark notifications still in transmission as ``uncertain`` (not sent again) with
        an audit record each (``audits``: id → arguments of ``audit``), in one transaction;
        the ids this call settled (another instance may have been first)."""
        if not audits:
            return []
        now = utcnow()
        async with self.transaction() as conn:
            done = [
                int(r[0])
                for r in await conn.execute(
                    update(t.outbox)
                    .where(t.outbox.c.id.in_(list(audits)), _IN_TRANSMISSION)
                    .values(status="uncertain", last_error=error)
                    .returning(t.outbox.c.id)
                )
            ]
            if done:
                await conn.execute(_AUDIT, [_audit_row(now, audits[i]) for i in done])
        return done

    async def next_outbox_due(self, *, channel: str) -> datetime | None:
        """When the next pending (or leased) notification of a channel is due."""
        async with self.reading() as conn:
            value = (
                await conn.execute(
                    select(func.min(t.outbox.c.next_attempt_at)).where(
                        t.outbox.c.channel == channel, _TAKEABLE
                    )
                )
            ).scalar_one_or_none()
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    async def outbox_item(self, key: str) -> OutboxRecord | None:
        async with self.reading() as conn:
            row = (await conn.execute(select(t.outbox).where(t.outbox.c.key == key))).first()
        return None if row is None else record_of(OutboxRecord, row)

    async def settle_outbox(
        self,
        results: Sequence[Mapping[str, Any]],
        audits: Sequence[Mapping[str, Any]] = (),
        *,
        transmitting: Sequence[int] = (),
    ) -> None:
        """Record delivery outcomes and their audit records in one transaction, and first
        mark the claimed items ``transmitting`` (see ``mark_transmitting``). An item that
        is pending again was not transmitted: its mark is cleared.

        Each result has ``id``, ``status`` (pending, sent, failed), optional ``error``,
        ``retry_at`` (next attempt), and ``attempted`` (default true: counts an attempt).
        Each audit record has the arguments of ``audit``.
        """
        now = utcnow()
        sent = [
            r["id"]
            for r in results
            if r["status"] == "sent" and r.get("attempted", True) and r.get("retry_at") is None
        ]
        released: dict[datetime, list[int]] = {}  # not tried, by when due again
        for r in results:
            if (
                r["status"] == "pending"
                and not r.get("attempted", True)
                and r.get("error") is None
                and r.get("retry_at") is not None
            ):
                released.setdefault(r["retry_at"], []).append(r["id"])
        done = set(sent).union(*released.values())
        if self.dialect == "postgresql" and not released and all(r["id"] in done for r in results):
            rows = [_audit_row(now, a) for a in audits]
            params: dict[str, Any] = {
                "marks": list(transmitting),
                "sent": sent,
                "ids": [*transmitting, *sent],
                "now": now,
            }
            for column in _AUDIT_COLUMNS:
                params[column] = [row[column] for row in rows]
            sql, names = _driver_form(self.engine.dialect, _SETTLE_PG)
            async with self.single_statement() as conn:
                await conn.exec_driver_sql(sql, tuple(params[name] for name in names))
            return
        async with self.transaction() as conn:
            # SQLite: the statements below go in the commit's trip (core.store.sqlite)
            await conn.execution_options(**KEEP_CHANGES)
            if transmitting:
                await conn.execute(_MARK, {"ids": list(transmitting)})
            if sent:  # the common case in one statement
                await conn.execute(_SENT, {"ids": sent, "now": now})
            for retry_at, ids in released.items():  # one statement for all of them
                await conn.execute(_RELEASED, {"ids": ids, "due": retry_at})
            for result in results:
                if result["id"] in done:
                    continue
                values: dict[str, Any] = {
                    "status": result["status"],
                    "last_error": result.get("error"),
                }
                if result.get("attempted", True):
                    values["attempts"] = t.outbox.c.attempts + 1
                if result["status"] == "sent":
                    values["sent_at"] = now
                if result["status"] == "pending":
                    values["transmitting"] = False
                if result.get("retry_at") is not None:
                    values["next_attempt_at"] = result["retry_at"]
                await conn.execute(
                    update(t.outbox).where(t.outbox.c.id == result["id"]).values(**values)
                )
            if audits:
                await conn.execute(_AUDIT, [_audit_row(now, a) for a in audits])

    async def cancel_outbox(self, key: str, *, reason: str) -> bool:
        """Fail a notification that is still waiting (not being sent); ``False`` otherwise."""
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.outbox)
                .where(t.outbox.c.key == key, t.outbox.c.status == "pending")
                .values(status="failed", last_error=reason)
            )
        return bool(result.rowcount)

    async def outbox_counts(self) -> dict[tuple[str, str], int]:
        """Notifications in the outbox per (channel, status)."""
        query = select(t.outbox.c.channel, t.outbox.c.status, func.count()).group_by(
            t.outbox.c.channel, t.outbox.c.status
        )
        async with self.reading() as conn:
            rows = (await conn.execute(query)).all()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


def _audit_row(now: datetime, a: Mapping[str, Any]) -> dict[str, Any]:
    return audit_values(
        at=now,
        actor=a["actor"],
        source=a["source"],
        action=a["action"],
        target=a.get("target"),
        detail=a.get("detail", ""),
        run_id=a.get("run_id"),
    )


def _due_branches(channel: str, limit: int, *, lock: bool) -> Any:
    """The first ``limit`` due items (id, next_attempt_at) of a channel's pending ones
    and of its ``sending`` ones whose lease ran out, each read in the order of
    ``ix_outbox_claim`` (with one condition on both statuses, SQLite and PostgreSQL read
    and sort every due item, per claim: quadratic in the queue), as one UNION ALL;
    ``lock``: each branch locks what it reads (``FOR UPDATE SKIP LOCKED``: another
    instance's claim takes others). Parameter ``now``."""
    branches = []
    for taken in _TAKEABLE_BY_STATUS:
        branch = (
            select(_o.id, _o.next_attempt_at)
            .where(
                taken,
                _o.channel == channel,
                _o.next_attempt_at <= bindparam("now", type_=_o.next_attempt_at.type),
            )
            .order_by(_o.next_attempt_at, _o.id)
            .limit(limit)
        )
        if lock:
            branch = branch.with_for_update(skip_locked=True)
        part = branch.subquery()
        branches.append(select(part.c.id, part.c.next_attempt_at))
    return union_all(*branches).subquery()


_LEASE = bindparam("lease", type_=_o.next_attempt_at.type)


@functools.lru_cache(maxsize=32)
def _claim_sqlite(channel: str, limit: int) -> Any:
    """The claim on SQLite: the ``limit`` first of ``_due_branches`` taken by their ids.
    The statement is atomic and SQLite has one writer: nobody can take them in between.
    Built once per channel and size; parameters ``now`` and ``lease`` (the new lease);
    reads back the columns of ``_CLAIMED``."""
    both = _due_branches(channel, limit, lock=False)
    chosen = select(both.c.id).order_by(both.c.next_attempt_at, both.c.id).limit(limit)
    return (
        update(t.outbox)
        .where(_o.id.in_(chosen.scalar_subquery()))
        .values(status="sending", next_attempt_at=_LEASE)
        .returning(*_CLAIMED)
    )


@functools.lru_cache(maxsize=32)
def _claim_postgresql(channel: str, limit: int) -> Any:
    """The claim on PostgreSQL, one statement that commits on its own (one round trip;
    a transaction of a SELECT and an UPDATE was four). Of ``_due_branches``, locked,
    the ``limit`` first are chosen in a CTE
    evaluated once (``MATERIALIZED``: as a subquery of the UPDATE, PostgreSQL may run the
    choice again for every row, skipping the rows the statement has just taken, and so
    take more than ``limit``) and taken by their ids (``= ANY``: through the primary key,
    where a join to the CTE could be planned as a hash over the whole table); a row
    locked but not chosen is free again when the statement ends. Built once per channel
    and size; parameters ``now`` and ``lease``; reads back the columns of ``_CLAIMED``."""
    both = _due_branches(channel, limit, lock=True)
    chosen = (
        select(both.c.id)
        .order_by(both.c.next_attempt_at, both.c.id)
        .limit(limit)
        .cte("chosen")
        .prefix_with("MATERIALIZED")
    )
    return (
        update(t.outbox)
        .where(_o.id == func.any(func.array(select(chosen.c.id).scalar_subquery())))
        .values(status="sending", next_attempt_at=_LEASE)
        .returning(*_CLAIMED)
    )


@functools.cache
def _driver_form(dialect: Dialect, statement: TextClause) -> tuple[str, tuple[str, ...]]:
    """``statement`` (whose parameters need no conversion: each is cast in its text) as
    the driver takes it, and the names of its parameters in their order there: run with
    ``exec_driver_sql``, a statement is not looked up in SQLAlchemy's cache of compiled
    forms and its parameters not processed (a fifth of the event loop's time for
    ``settle_outbox``'s statement of ten outcomes)."""
    compiled = statement.compile(dialect=dialect)
    return str(compiled), tuple(compiled.positiontup or ())


@functools.lru_cache(maxsize=4)
def _enqueue_sqlite(count: int) -> str:
    """``enqueue_many``'s INSERT of ``count`` rows on SQLite, as the driver takes it:
    seven parameters per row (key, channel, recipient, subject, payload as JSON, due and
    creation time); keys queued already are left out, the keys inserted read back."""
    rows = ",".join(["(?,?,?,?,?,'pending',0,?,?)"] * count)
    return (  # only placeholders are put in: no value reaches the statement's text
        "INSERT INTO outbox (key, channel, recipient, subject, payload, status, attempts,"  # noqa: S608
        f" next_attempt_at, created_at) VALUES {rows}"
        " ON CONFLICT (key) DO NOTHING RETURNING key"
    )


@functools.cache
def _sqlite_datetime() -> Callable[[datetime], str]:
    """How the outbox's datetime columns are written on SQLite (``tables.UTCDateTime``:
    in UTC without the zone, in SQLAlchemy's text form for SQLite), for one aware
    datetime."""
    dialect = sqlite_dialect()
    column = t.UTCDateTime()
    written = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert written is not None

    def stamp(value: datetime) -> str:
        return str(written(column.process_bind_param(value, dialect)))

    return stamp
