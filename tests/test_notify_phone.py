"""Urgent hotfixes end to end (L8, L14): a signed repository on loopback publishes a hotfix,
the real service announces it by e-mail (aiosmtpd) and escalates it by phone through a fake
of Twilio's REST API; Twilio's side of the webhooks is played by signed requests to the
service's real endpoints.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twilio.request_validator import RequestValidator

from bot.service import Service
from core import events as ev
from core.settings import Settings
from tests.fake_twilio import FROM_NUMBER, FakeTwilio, fake_twilio
from tests.notify_env import PUBLIC_URL, audit_rows, notify_settings, outbox_rows, wait_until
from tests.repo_server import RepoServer, serve_repo
from tests.repository import Repo
from tests.service import Api, running
from tests.smtp_server import SmtpServer, smtp_server

ALICE = {
    "name": "Alice",
    "email": "alice@example.org",
    "phone": "+4917000000001",
    "clusters": ["c1"],
}
BOB = {"name": "Bob", "email": "bob@example.org", "phone": "+4917000000002"}
CAROL = {
    "name": "Carol",
    "email": "carol@example.org",
    "phone": "+4917000000003",
    "clusters": ["elsewhere"],
}
DAVE = {"name": "Dave", "phone": "+4917000000004"}
FRANK = {"name": "Frank", "email": "frank@example.org"}
ADMIN = "admin@example.org"
GATHER = f"{PUBLIC_URL}/twilio/voice/gather"
STATUS = f"{PUBLIC_URL}/twilio/status"


@dataclass
class World:
    root: Path
    repo: Repo
    repo_server: RepoServer
    smtp: SmtpServer
    twilio: FakeTwilio
    settings: Settings

    def publish_urgent(self, hotfix: str = "HF-7", summary: str = "Fixes a VNC crash.") -> None:
        self.repo.add("tg-vnc", "2.0-1", hotfix=hotfix, urgency="urgent", summary=summary)


@asynccontextmanager
async def world(
    tmp_path: Path, contacts: list[dict[str, Any]], **escalation: Any
) -> AsyncIterator[World]:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with (
        serve_repo(repo.root) as repo_server,
        smtp_server() as smtp,
        fake_twilio() as twilio,
    ):
        twilio.public_url = PUBLIC_URL
        settings = notify_settings(
            tmp_path,
            smtp={"host": "127.0.0.1", "port": smtp.port},
            twilio_url=twilio.url,
            escalation={"call_rounds": 2, "ack_wait": "20s", **escalation},
            notify={"admin_emails": [ADMIN]},
            contacts=contacts,
            repository_url=repo_server.url,
            public_key=repo.public_key,
            poll_interval="0.2s",
        )
        yield World(tmp_path, repo, repo_server, smtp, twilio, settings)


@asynccontextmanager
async def service_of(w: World) -> AsyncIterator[tuple[Service, Api, list[ev.Event]]]:
    async with running(w.settings) as (service, api):
        seen: list[ev.Event] = []

        async def collect(event: ev.Event) -> None:
            if isinstance(event, ev.HotfixAcknowledged | ev.HotfixPublished):
                seen.append(event)

        service.bus.subscribe("test", collect)
        yield service, api, seen


async def escalation(service: Service, hotfix: str) -> dict[str, Any]:
    row = await service.store.escalation(hotfix)
    assert row is not None
    return row


async def escalation_ended(service: Service, hotfix: str) -> bool:
    row = await service.store.escalation(hotfix)
    return (
        row is not None
        and row["status"] != "running"
        and hotfix not in service.notifier.escalations.active()
    )


async def test_urgent_hotfix_mail_call_and_acknowledgement(tmp_path: Path) -> None:
    contacts = [ALICE, BOB, CAROL, DAVE, FRANK]
    async with world(tmp_path, contacts) as w, service_of(w) as (s, api, seen):
        w.publish_urgent()
        mails = await w.smtp.wait_messages(3)  # Alice (cluster c1), Bob, Frank; not Carol
        assert sorted(m.rcpt_tos[0] for m in mails) == [
            "alice@example.org",
            "bob@example.org",
            "frank@example.org",
        ]
        mail = w.smtp.to("alice@example.org")[0].message
        assert mail["To"] == "Alice <alice@example.org>"
        assert mail["Subject"] == (
            "[tgops] URGENT hotfix HF-7 for tg-vnc 2.0-1: Fixes a VNC crash."
        )
        text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "It concerns these systems: tg1, tg2, tg3." in text  # Alice: cluster c1 only
        assert "/tg hotfixes select T HF-7" in text
        assert "phone contacts are called" in text

        (call,) = await w.twilio.wait_calls(1)
        assert call.to == ALICE["phone"] and call.from_ == FROM_NUMBER
        (gather,) = call.gathers()[:1]
        assert gather.attrib["numDigits"] == "1" and gather.attrib["action"] == GATHER
        assert "Hotfix HF-7 for tg-vnc, version 2.0-1" in call.speech
        assert call.speech.endswith("Fixes a VNC crash. Press 1 to acknowledge.")
        assert call.status_callback == STATUS
        assert call.events == ["initiated", "ringing", "answered", "completed"]

        status, body = await w.twilio.report(call, "in-progress", s.port or 0)
        assert status == 204
        status, body = await w.twilio.press(call, "5", s.port or 0)
        assert status == 200
        assert "<Say>You pressed 5. Hello Alice" in body and 'numDigits="1"' in body
        assert (await escalation(s, "HF-7"))["status"] == "running"
        status, _ = await w.twilio.press(call, "1", s.port or 0, signature="bm90IGEgc2lnbmF0dXJl")
        assert status == 403
        assert (await escalation(s, "HF-7"))["status"] == "running"

        status, body = await w.twilio.press(call, "1", s.port or 0)
        assert status == 200
        assert "Thank you, Alice. Hotfix HF-7 is acknowledged." in body
        row = await escalation(s, "HF-7")
        assert row["status"] == "acknowledged" and row["acknowledged_by"] == "Alice"
        assert row["acknowledged_at"] is not None and row["call_sid"] == call.sid
        await wait_until(lambda: any(isinstance(e, ev.HotfixAcknowledged) for e in seen))
        ack = next(e for e in seen if isinstance(e, ev.HotfixAcknowledged))
        assert (ack.hotfix_id, ack.by, ack.phone) == ("HF-7", "Alice", ALICE["phone"])
        published = [e for e in seen if isinstance(e, ev.HotfixPublished)]
        assert [(e.hotfix_id, e.urgency) for e in published] == [("HF-7", "urgent")]

        status, body = await w.twilio.press(call, "1", s.port or 0)  # pressed again
        assert "already acknowledged by Alice" in body
        await wait_until(lambda: escalation_ended(s, "HF-7"), what="escalation ended")
        assert len(w.twilio.calls) == 1 and w.twilio.sms == []

        log = (await api.command("log 50"))["text"]
        assert "Alice (phone) hotfix acknowledged HF-7: Alice (+4917000000001) pressed 1" in log
        assert "notify (system) escalation started HF-7" in log
        assert "notification failed HF-7: hotfix HF-7: contact Dave has no e-mail address" in log
        assert "contact Frank has urgent_calls but no phone number: not called" in log
        assert "notification sent HF-7: call to Alice (+4917000000001) (call CA" in log
        assert "Carol" not in log


async def test_no_answer_sms_next_contact_and_exhaustion(tmp_path: Path) -> None:
    async with (
        world(tmp_path, [ALICE, BOB], ack_wait="1s") as w,
        service_of(w) as (s, _, _),
    ):
        w.publish_urgent("HF-9", summary="")
        port = s.port or 0
        calls = await w.twilio.wait_calls(1)
        await w.twilio.report(calls[0], "no-answer", port)
        calls = await w.twilio.wait_calls(2)
        assert calls[1].to == BOB["phone"]
        (sms,) = await w.twilio.wait_sms(1)
        assert sms.to == ALICE["phone"] and sms.from_ == FROM_NUMBER
        assert sms.body.startswith("tgops: URGENT hotfix HF-9 (tg-vnc 2.0-1): no summary.")
        assert sms.status_callback == STATUS
        await w.twilio.report(calls[1], "busy", port)
        calls = await w.twilio.wait_calls(3)  # round 2
        assert calls[2].to == ALICE["phone"]
        await w.twilio.report(calls[2], "in-progress", port)
        await w.twilio.report(calls[2], "completed", port)  # answered, but no 1: no SMS
        calls = await w.twilio.wait_calls(4)
        assert calls[3].to == BOB["phone"]
        # Bob's phone rings past ack_wait without a final status: not reached, SMS
        await wait_until(lambda: escalation_ended(s, "HF-9"), what="exhausted")
        assert [c.to for c in w.twilio.calls] == [ALICE["phone"], BOB["phone"]] * 2
        assert [m.to for m in w.twilio.sms] == [ALICE["phone"], BOB["phone"], BOB["phone"]]
        assert (await escalation(s, "HF-9"))["status"] == "exhausted"
        (exhausted,) = await audit_rows(s.store, "escalation exhausted")
        assert exhausted.detail == (
            "urgent hotfix HF-9 not acknowledged: nobody pressed 1: 2 round(s) through 2 "
            "phone contact(s)"
        )
        alert = await wait_until(lambda: w.smtp.to(ADMIN), what="admin alert")
        assert alert[0].message["Subject"] == (
            "[tgops] Urgent hotfix HF-9 was not acknowledged by phone"
        )
        failed = [r.detail for r in await audit_rows(s.store, "notification failed")]
        assert "call to Alice (+4917000000001): no-answer" in failed
        assert "call to Bob (+4917000000002): busy" in failed


async def test_twilio_errors_retried_or_reported(tmp_path: Path) -> None:
    broken = {"name": "Eve", "email": "eve@example.org", "phone": "12345"}
    async with (
        world(tmp_path, [broken, BOB], ack_wait="20s") as w,
        service_of(w) as (s, _, _),
    ):
        w.twilio.fail_next(1, status=500, message="Internal Server Error")
        w.publish_urgent("HF-11")
        # Eve: a 500 (retried), then 400 for her number (final), her SMS 400 too; then Bob
        (call,) = await w.twilio.wait_calls(1)
        assert call.to == BOB["phone"]
        assert [status for status, _ in w.twilio.rejected] == [500, 400, 400]
        failed = await wait_until(
            lambda: audit_rows(s.store, "notification failed"), what="failures"
        )
        details = [r.detail for r in failed]
        assert (
            "call to Eve (12345): Twilio answered HTTP 400: Twilio error 21211: Unable to "
            "create record: Invalid 'To' Phone Number: 12345"
        ) in details
        assert any(d.startswith("SMS to Eve (12345): Twilio answered HTTP 400") for d in details)

        async def call_items() -> dict[str, Any] | None:
            calls = {r.recipient: r for r in await outbox_rows(s.store) if r.channel == "call"}
            return calls if calls[BOB["phone"]].status == "sent" else None

        calls = await wait_until(call_items, what="Bob's call recorded")
        assert (calls["12345"].status, calls["12345"].attempts) == ("failed", 2)
        assert (calls[BOB["phone"]].status, calls[BOB["phone"]].attempts) == ("sent", 1)
        _, body = await w.twilio.press(call, "1", s.port or 0)
        assert "Thank you, Bob" in body


async def test_webhooks_refuse_bad_signatures_and_unknown_calls(tmp_path: Path) -> None:
    async with world(tmp_path, [BOB]) as w, service_of(w) as (s, _, _):
        port = s.port or 0
        params = {"CallSid": "CA" + "9" * 32, "Digits": "1", "To": BOB["phone"]}
        assert (await w.twilio.webhook(GATHER, params, port, signature=""))[0] == 403
        wrong_url = RequestValidator(w.twilio.auth_token).compute_signature(
            f"http://127.0.0.1:{port}/twilio/voice/gather", params
        )
        assert (await w.twilio.webhook(GATHER, params, port, signature=wrong_url))[0] == 403
        other_token = RequestValidator("another-token").compute_signature(GATHER, params)
        assert (await w.twilio.webhook(GATHER, params, port, signature=other_token))[0] == 403
        assert await audit_rows(s.store, "unknown call") == []

        status, body = await w.twilio.webhook(GATHER, params, port)
        assert status == 200
        assert "<Say>This call is not known to tgops. Goodbye.</Say><Hangup />" in body
        status, _ = await w.twilio.webhook(
            STATUS, {"CallSid": "CA" + "8" * 32, "CallStatus": "completed"}, port
        )
        assert status == 204
        unknown = [r.detail for r in await audit_rows(s.store, "unknown call")]
        assert unknown[0].startswith("key '1' pressed on call CA999")
        assert "which tgops did not place; the caller was told so" in unknown[0]
        assert unknown[1].startswith("status 'completed' of call CA888")

        status, _ = await w.twilio.webhook(
            STATUS,
            {
                "MessageSid": "SM1",
                "MessageStatus": "undelivered",
                "To": "+491",
                "ErrorCode": "30003",
            },
            port,
        )
        assert status == 204
        (row,) = await audit_rows(s.store, "notification failed")
        assert row.detail == "SMS SM1 to +491: undelivered (Twilio error 30003)"


async def test_escalation_continues_after_a_restart(tmp_path: Path) -> None:
    three = [ALICE, BOB, {**CAROL, "clusters": ["*"]}]
    async with world(tmp_path, three) as w:
        async with service_of(w) as (s, _, _):
            w.publish_urgent("HF-12")
            calls = await w.twilio.wait_calls(1)
            await w.twilio.report(calls[0], "no-answer", s.port or 0)
            calls = await w.twilio.wait_calls(2)
            assert calls[1].to == BOB["phone"]
            await w.twilio.wait_sms(1)
        # stopped while Bob's phone rings; started again:
        async with service_of(w) as (s, _, _):
            await wait_until(lambda: "HF-12" in s.notifier.escalations.active(), what="resumed")
            await w.twilio.report(calls[1], "no-answer", s.port or 0)
            calls = await w.twilio.wait_calls(3)
            assert [c.to for c in calls] == [ALICE["phone"], BOB["phone"], CAROL["phone"]]
            await w.twilio.wait_sms(2)
            _, body = await w.twilio.press(calls[2], "1", s.port or 0)
            assert "Thank you, Carol" in body
            await wait_until(lambda: escalation_ended(s, "HF-12"), what="ended")
            assert len(w.twilio.calls) == 3
            assert [m.to for m in w.twilio.sms] == [ALICE["phone"], BOB["phone"]]
            assert len(w.smtp.messages) == 3  # the hotfix e-mails, once each
            assert (await escalation(s, "HF-12"))["acknowledged_by"] == "Carol"


async def test_hotfixes_announced_once_across_restarts(tmp_path: Path) -> None:
    async with world(tmp_path, [ALICE, {**BOB, "urgent_calls": False}]) as w:
        w.repo.add("tg-old", "1.1", hotfix="HF-1", summary="Older fix")  # before the first start
        path = "channels/stable.json"
        async with service_of(w) as (first, _, _):
            await w.smtp.wait_messages(2)
            assert {m.message["Subject"] for m in w.smtp.messages} == {
                "[tgops] Hotfix HF-1 for tg-old 1.1: Older fix"
            }
            # (the watch may announce before a test subscriber listens: ask the store)
            assert await first.store.announced(["HF-1"]) == {"HF-1"}
        before = w.repo_server.requests[path]
        async with service_of(w) as (s, _, seen):
            await w.repo_server.wait_requests(path, before + 3)  # it polled, more than once
            assert len(w.smtp.messages) == 2 and seen == []
            w.repo.add("tg-vnc", "2.0-2", hotfix="HF-2", summary="Newer fix")
            await w.smtp.wait_messages(4)
            now = w.repo_server.requests[path]
            await w.repo_server.wait_requests(path, now + 3)
            assert len(w.smtp.messages) == 4
            assert [e.hotfix_id for e in seen if isinstance(e, ev.HotfixPublished)] == ["HF-2"]
            assert w.twilio.calls == []  # normal urgency: no calls
            keys = sorted(r.key for r in await outbox_rows(s.store))
            assert keys == [
                "hotfix:stable:HF-1:email:alice@example.org",
                "hotfix:stable:HF-1:email:bob@example.org",
                "hotfix:stable:HF-2:email:alice@example.org",
                "hotfix:stable:HF-2:email:bob@example.org",
            ]


async def test_existing_hotfixes_can_be_left_unannounced_at_first_start(tmp_path: Path) -> None:
    async with world(tmp_path, [BOB]) as w:
        w.repo.add("tg-old", "1.1", hotfix="HF-1", urgency="urgent", summary="Old")
        settings = w.settings.model_copy(
            update={
                "notify": w.settings.notify.model_copy(update={"announce_existing_hotfixes": False})
            }
        )
        async with running(settings) as (s, _):
            path = "channels/stable.json"
            await w.repo_server.wait_requests(path, 2)
            w.repo.add("tg-new", "1.2", hotfix="HF-2", summary="New")
            (mail,) = await w.smtp.wait_messages(1)
            assert "HF-2" in mail.message["Subject"]
            now = w.repo_server.requests[path]
            await w.repo_server.wait_requests(path, now + 2)
            assert len(w.smtp.messages) == 1 and w.twilio.calls == []
            assert await s.store.announced(["HF-1", "HF-2"]) == {"HF-1", "HF-2"}


async def test_urgent_hotfix_without_twilio_is_mailed_and_the_gap_recorded(
    tmp_path: Path,
) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as repo_server, smtp_server() as smtp:
        settings = notify_settings(
            tmp_path,
            smtp={"host": "127.0.0.1", "port": smtp.port},
            contacts=[BOB],
            repository_url=repo_server.url,
            public_key=repo.public_key,
            poll_interval="0.2s",
        )
        async with running(settings) as (service, _):
            repo.add("tg-vnc", "2.0-1", hotfix="HF-3", urgency="urgent", summary="Fix")
            (mail,) = await smtp.wait_messages(1)
            assert mail.rcpt_tos == [BOB["email"]]
            (row,) = await wait_until(
                lambda: audit_rows(service.store, "notification failed"), what="the gap"
            )
            assert row.detail == (
                "hotfix HF-3: twilio.account_sid, twilio.auth_token, twilio.from_number not "
                "configured: nobody phoned"
            )
            assert await service.store.escalation("HF-3") is None
            status, _ = await FakeTwilio(public_url=PUBLIC_URL).webhook(
                STATUS, {"CallSid": "CA1", "CallStatus": "busy"}, service.port or 0
            )
            assert status == 403  # no auth token: no webhook can be verified
