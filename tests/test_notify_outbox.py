"""The durable outbox on its own: the real store (SQLite), the real e-mail channel, a real
SMTP server on loopback."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from core.settings import SmtpSettings
from core.store import OutboxRecord, Store, utcnow
from notify.email import EmailChannel
from notify.outbox import MARK_AHEAD, Backoff, Begin, Notification, Outbox, Outcome, Report
from notify.render import Renderer
from tests.notify_env import SENDER, audit_rows, outbox_rows, wait_until
from tests.smtp_server import SmtpServer, smtp_server


def mail(i: int, key: str | None = None) -> Notification:
    return Notification(
        key=key or f"event-{i}:email:user{i}@example.org",
        channel="email",
        recipient=f"user{i}@example.org",
        subject=f"[tgops] Test {i}",
        payload={
            "template": "admin_alert",
            "target": "tg1",
            "vars": {
                "title": f"Test {i}",
                "node": "tg1",
                "at": "2026-01-01 10:00",
                "timezone": "Europe/Berlin",
                "detail": "detail",
                "hint": "hint",
            },
        },
    )


@asynccontextmanager
async def outbox_for(
    tmp_path: Path,
    server: SmtpServer,
    *,
    batch_size: int = 100,
    start: bool = True,
    connections: int = 1,
) -> AsyncIterator[tuple[Outbox, Store]]:
    async with Store(f"sqlite+aiosqlite:///{tmp_path}/outbox.db") as store:
        smtp = SmtpSettings(
            host="127.0.0.1", port=server.port, sender=SENDER, timeout=2.0, connections=connections
        )
        channel = EmailChannel(
            smtp,
            renderer=Renderer(),
            batch_size=batch_size,
        )
        outbox = Outbox(store, [channel], Backoff(base=0.05, cap=0.2, max_attempts=5))
        if not start:
            yield outbox, store
            return
        async with running(outbox):
            yield outbox, store


@asynccontextmanager
async def running(outbox: Outbox) -> AsyncIterator[None]:
    """The outbox's workers run inside the block; stopped (5 s at most) when it ends."""
    task = asyncio.create_task(outbox.run(), name="test-outbox")
    try:
        yield
    finally:
        await outbox.stop(5.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def sent(store: Store, count: int) -> bool:
    rows = await outbox_rows(store)
    return len(rows) == count and all(r.status == "sent" for r in rows)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=10.0, max_attempts=5, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    jittery = Backoff(base=10.0, cap=100.0, max_attempts=5)
    assert all(9.0 <= jittery.delay(1) <= 11.0 for _ in range(100))


async def test_a_key_is_sent_once_however_often_it_is_put(tmp_path: Path) -> None:
    async with smtp_server() as server, outbox_for(tmp_path, server) as (outbox, store):
        assert await outbox.put(mail(1), mail(1)) == [mail(1).key]
        assert await outbox.put(mail(1)) == []
        await server.wait_messages(1)
        await wait_until(lambda: sent(store, 1), what="sent")
        assert await outbox.put(mail(1)) == []  # also after it was sent
        (row,) = await audit_rows(store, "notification sent")
        assert row.detail == "e-mail “[tgops] Test 1” to user1@example.org"
        assert row.target == "tg1" and row.actor == "notify" and row.source == "system"
        assert len(server.messages) == 1


async def test_one_connection_per_batch(tmp_path: Path) -> None:
    async with smtp_server() as server:
        async with outbox_for(tmp_path, server, batch_size=40, start=False) as (outbox, store):
            await outbox.put(*(mail(i) for i in range(100)))
            task = asyncio.create_task(outbox.run(), name="test-outbox")
            try:
                await server.wait_messages(100)
                await wait_until(lambda: sent(store, 100), what="all sent")
            finally:
                await outbox.stop(5.0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert server.connections == 3  # 40 + 40 + 20
        assert server.max_open == 1
        assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(
            f"user{i}@example.org" for i in range(100)
        )


async def test_a_dead_senders_claim_runs_out_and_the_items_go_once(tmp_path: Path) -> None:
    async with smtp_server() as server:
        async with outbox_for(tmp_path, server, start=False) as (outbox, store):
            await outbox.put(*(mail(i) for i in range(3)))
            now = utcnow()
            # another sender took them and died: its lease runs out in 0.5 s
            taken = await store.claim_outbox(
                channel="email", now=now, lease_until=now + timedelta(seconds=0.5), limit=10
            )
            assert [r.status for r in taken] == ["sending"] * 3
            assert (
                await store.claim_outbox(
                    channel="email", now=utcnow(), lease_until=utcnow(), limit=10
                )
                == []
            )  # nobody else takes them meanwhile
            task = asyncio.create_task(outbox.run(), name="test-outbox")
            try:
                await server.wait_messages(3)
                await wait_until(lambda: sent(store, 3), what="sent")
            finally:
                await outbox.stop(5.0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert len(server.messages) == 3
        assert utcnow() - now >= timedelta(seconds=0.5)


async def test_gives_up_after_max_attempts_with_the_last_error(tmp_path: Path) -> None:
    async with smtp_server() as server:
        await server.stop()
        async with outbox_for(tmp_path, server) as (outbox, store):
            await outbox.put(mail(7))
            (failed,) = await wait_until(
                lambda: audit_rows(store, "notification failed"), what="failure"
            )
            assert failed.detail.startswith(
                "e-mail “[tgops] Test 7” to user7@example.org: gave up after 5 attempts; last "
                f"error: SMTP server 127.0.0.1:{server.port} not usable:"
            )
            (row,) = await outbox_rows(store)
            assert (row.status, row.attempts) == ("failed", 5)


async def test_unknown_channel_is_refused(tmp_path: Path) -> None:
    async with smtp_server() as server, outbox_for(tmp_path, server) as (outbox, _):
        with pytest.raises(ValueError, match="no outbox channel 'fax'"):
            await outbox.put(Notification(key="k", channel="fax", recipient="+49"))


async def test_several_connections_at_once(tmp_path: Path) -> None:
    async with smtp_server() as server:
        async with outbox_for(tmp_path, server, batch_size=10, connections=3, start=False) as (
            outbox,
            store,
        ):
            await outbox.put(*(mail(i) for i in range(90)))
            task = asyncio.create_task(outbox.run(), name="test-outbox")
            try:
                await server.wait_messages(90)
                await wait_until(lambda: sent(store, 90), what="all sent")
            finally:
                await outbox.stop(5.0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            # one recorder wrote the outcomes of all three connections, each once
            assert {r.attempts for r in await outbox_rows(store)} == {1}
            audits = await audit_rows(store, "notification sent")
            assert sorted(a.detail for a in audits) == sorted(
                f"e-mail “[tgops] Test {i}” to user{i}@example.org" for i in range(90)
            )
        assert server.connections == 9 and 2 <= server.max_open <= 3
        assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(
            f"user{i}@example.org" for i in range(90)
        )


async def test_outcomes_the_store_refuses_are_not_written_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with smtp_server() as server:
        async with outbox_for(tmp_path, server, batch_size=20, connections=2, start=False) as (
            outbox,
            store,
        ):
            await outbox.put(*(mail(i) for i in range(40)))
            # the database refuses every write that holds the audit record of user0 (first
            # of the first batch); the second batch is sent at the same time, and its
            # outcomes share the recorder with the first batch's
            with sqlite3.connect(tmp_path / "outbox.db") as db:
                db.execute(
                    "CREATE TRIGGER refuse BEFORE INSERT ON audit"
                    " WHEN NEW.detail LIKE '%user0@%'"
                    " BEGIN SELECT RAISE(ABORT, 'refused (test)'); END"
                )
            task = asyncio.create_task(outbox.run(), name="test-outbox")
            try:
                await server.wait_messages(40)

                async def second_batch_recorded() -> bool:
                    rows = await outbox_rows(store)
                    return [r.status for r in rows[20:]] == ["sent"] * 20

                await wait_until(second_batch_recorded, what="the second batch recorded")
            finally:
                await outbox.stop(5.0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            rows = await outbox_rows(store)
            # after the refused write the first batch writes its outcomes itself, with
            # user0's again: refused, so all of it stays claimed (sent again once the lease
            # runs out), none of it recorded by the recorder meanwhile
            assert [(r.status, r.attempts) for r in rows[:20]] == [("sending", 0)] * 20
            assert [r.attempts for r in rows[20:]] == [1] * 20
            audits = await audit_rows(store, "notification sent")
            assert sorted(a.detail for a in audits) == sorted(
                f"e-mail “[tgops] Test {i}” to user{i}@example.org" for i in range(20, 40)
            )
        assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(
            f"user{i}@example.org" for i in range(40)
        )
        assert "outcomes not recorded" in caplog.text


async def test_pipelined_a_refused_message_does_not_disturb_the_next_one(tmp_path: Path) -> None:
    """The next message's envelope goes behind a message's content: when the server
    refuses that content, the next one still goes on the same connection."""
    async with smtp_server(pipelining=True) as server:
        server.refuse_content["user1@example.org"] = "554 5.7.1 content rejected (test)"
        server.record_reads = True
        async with outbox_for(tmp_path, server) as (outbox, store):
            await outbox.put(*(mail(i) for i in range(4)))

            async def settled() -> list[tuple[str, int]] | None:
                rows = [(r.status, r.attempts) for r in await outbox_rows(store)]
                return rows if all(status in {"sent", "failed"} for status, _ in rows) else None

            rows = await wait_until(settled, what="all settled")
        assert rows == [("sent", 1), ("failed", 1), ("sent", 1), ("sent", 1)]
        assert sorted(m.rcpt_tos[0] for m in server.messages) == [
            "user0@example.org",
            "user2@example.org",
            "user3@example.org",
        ]
        assert server.connections == 1
        # user2's envelope went in one write behind user1's refused content
        assert any(
            b"\r\n.\r\nMAIL FROM:" in r and b"<user2@example.org>" in r for r in server.reads
        )


async def test_pipelined_a_stop_releases_the_message_whose_envelope_went_ahead(
    tmp_path: Path,
) -> None:
    """The outbox stops while a message's content is at the server and the next one's
    envelope went behind it: that one is released untried (no attempt counted, not
    uncertain, its marker cleared) and the connection is closed at once rather than
    answered with QUIT (the server may be waiting for its content)."""
    async with smtp_server(pipelining=True) as server:
        server.hold = asyncio.Event()
        async with outbox_for(tmp_path, server, start=False) as (outbox, store):
            await outbox.put(*(mail(i) for i in range(3)))
            task = asyncio.create_task(outbox.run(), name="test-outbox")
            try:
                async with asyncio.timeout(10):
                    await server.holding.wait()  # user0's content is at the server
                stopping = asyncio.create_task(outbox.stop(5.0))
                await asyncio.sleep(0.1)
                server.hold.set()
                async with asyncio.timeout(1.5):  # less than smtp.timeout (2 s)
                    assert await stopping
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            rows = await outbox_rows(store)
        assert [(r.status, r.attempts) for r in rows] == [
            ("sent", 1),
            ("pending", 0),
            ("pending", 0),
        ]
        assert not any(r.transmitting for r in rows[1:])
        assert [m.rcpt_tos[0] for m in server.messages] == ["user0@example.org"]


async def test_a_connection_lost_during_data_is_uncertain_not_sent_again(tmp_path: Path) -> None:
    async with smtp_server() as server, outbox_for(tmp_path, server) as (outbox, store):
        server.hold = asyncio.Event()
        await outbox.put(mail(1), mail(2))
        async with asyncio.timeout(10):
            await server.holding.wait()  # user1's message is at the server, unanswered
        await server.stop()  # the connection breaks before the answer
        server.hold.set()
        await server.start()

        async def settled() -> list[str] | None:
            statuses = [r.status for r in await outbox_rows(store)]
            return statuses if statuses == ["uncertain", "sent"] else None

        await wait_until(settled, what="user1 uncertain, user2 sent")
        (row, _) = await outbox_rows(store)
        assert row.attempts == 1 and "during DATA" in (row.last_error or "")
        (audit,) = await audit_rows(store, "delivery uncertain")
        assert audit.detail.startswith("e-mail “[tgops] Test 1” to user1@example.org: ")
        await asyncio.sleep(0.5)  # backoff is 0.05 s: a retry would have happened
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "user1@example.org",
        "user2@example.org",
    ]


class SteppedChannel:
    """A channel of this test's own: it delivers each batch item by item, as far as the
    test lets it (``allow``), awaiting ``begin`` before each item as e-mail's DATA does."""

    name = "stepped"
    lease = 60.0
    batch_size = 40
    parallel = 2

    def __init__(self) -> None:
        self.allowed: list[int] = []
        self.begun: list[int] = []
        self.batches: list[list[int]] = []
        self._changed = asyncio.Event()

    def describe(self, item: OutboxRecord) -> str:
        return item.key

    def allow(self, batch: int, upto: int) -> None:
        self.allowed[batch] = upto
        self._changed.set()

    async def deliver(self, items: Sequence[OutboxRecord], report: Report, begin: Begin) -> None:
        batch = len(self.batches)
        self.batches.append([item.id for item in items])
        self.allowed.append(0)
        self.begun.append(-1)
        for position, item in enumerate(items):
            while self.allowed[batch] < position:
                self._changed.clear()
                await self._changed.wait()
            await begin(item)
            self.begun[batch] = position
            report(Outcome(item=item))


async def test_batches_sent_at_once_share_their_marker_writes(tmp_path: Path) -> None:
    """Every write of the recorder (outcomes, or one batch's ``transmitting`` markers) tops
    up the markers of each batch being sent to ``MARK_AHEAD`` past the item that batch is
    at, never further: batches sent at once share their writes, and a crash still leaves
    at most ``MARK_AHEAD`` per batch marked that had not begun."""
    channel = SteppedChannel()
    async with Store(f"sqlite+aiosqlite:///{tmp_path}/outbox.db") as store:
        outbox = Outbox(store, [channel], Backoff(base=0.05, cap=0.2, max_attempts=5))
        notes = [
            Notification(key=f"k{i:02d}", channel="stepped", recipient=f"r{i}") for i in range(80)
        ]
        await outbox.put(*notes)

        async def counts() -> list[tuple[int, int]]:
            """(sent, marked ``transmitting``) per batch; a sent item keeps its mark."""
            rows = {r.id: r for r in await outbox_rows(store)}
            return [
                (
                    sum(1 for i in ids if rows[i].status == "sent"),
                    sum(1 for i in ids if rows[i].transmitting),
                )
                for ids in channel.batches
            ]

        async def recorded(first: int, second: int) -> bool:
            return [sent for sent, _ in await counts()] == [first, second]

        async with running(outbox):
            await wait_until(lambda: len(channel.batches) == 2, what="both batches claimed")
            for batch in (0, 1):
                channel.allow(batch, 3)
            await wait_until(lambda: recorded(4, 4), what="both batches' first 4 recorded")
            # the write of those outcomes topped both up from the first 20 (their first
            # begin) to 20 past the item each is at
            assert await counts() == [(4, 3 + MARK_AHEAD), (4, 3 + MARK_AHEAD)]
            channel.allow(0, 11)
            await wait_until(lambda: recorded(12, 4), what="the first batch's 12 recorded")
            assert await counts() == [(12, 11 + MARK_AHEAD), (4, 3 + MARK_AHEAD)]
            for batch in (0, 1):
                channel.allow(batch, 40)
            await wait_until(lambda: sent(store, 80), what="all sent")
        assert {r.attempts for r in await outbox_rows(store)} == {1}
