"""E-mail through the durable outbox, against a real SMTP server (aiosmtpd) on loopback.

The service runs for real; mails are caused the way users cause them (maintenance
commands, failing runs) and checked as received by the SMTP server and in `/tg log`.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import re
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trustme
from jinja2 import UndefinedError

from bot.demo.demo import mail_subject
from core.clock import ManualClock
from core.errors import ConfigError
from core.events import UpdateLockSet, WarningFlagSet
from core.settings import SmtpSettings
from core.store import OutboxRecord, Store
from notify.email import EmailChannel
from notify.errors import MessageComposeError
from notify.outbox import Outcome
from notify.render import Renderer
from tests.notify_env import SENDER, audit_rows, notify_settings, outbox_rows, wait_until
from tests.repository import Repo
from tests.service import MAINT_TOKEN, running
from tests.smtp_server import smtp_server

USERS = "users@example.org"
ADMIN = "admin@example.org"


def future(days: int = 30) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%d 10:00")


async def settled(store: Store) -> list[OutboxRecord] | None:
    """Every queued notification sent or failed: the rows, else None."""
    rows = await outbox_rows(store)
    return rows if all(r.status in {"sent", "failed"} for r in rows) else None


def smtp(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, **extra}


async def test_maintenance_mails_to_the_users_list_with_proper_headers(tmp_path: Path) -> None:
    async with smtp_server() as server:
        settings = notify_settings(tmp_path, smtp=smtp(server.port), notify={"users_list": USERS})
        async with running(settings) as (service, api):
            when = future()
            reply = await api.command(
                f"maintenance schedule tg1 {when} Kernel & <driver> update", MAINT_TOKEN
            )
            assert reply["ok"], reply["text"]
            (received,) = await server.wait_messages(1)
            await wait_until(lambda: settled(service.store), what="settled")
            msg = received.message
            assert received.mail_from == SENDER and received.rcpt_tos == [USERS]
            assert msg["To"] == USERS
            assert email.utils.parseaddr(msg["From"]) == ("tgops", SENDER)
            assert msg["Subject"] == (
                f"[tgops] Maintenance of tg1 on {when}: Kernel & <driver> update"
            )
            assert re.fullmatch(r"<[0-9a-f]{40}@ops\.example\.org>", msg["Message-ID"])
            sent_at = email.utils.parsedate_to_datetime(msg["Date"])
            assert abs((sent_at - datetime.now(UTC)).total_seconds()) < 60
            assert msg.get_content_type() == "multipart/alternative"
            text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
            assert "maintenance of tg1 (cluster c1) is scheduled" in text
            assert f"Start:   {when} (Europe/Berlin)" in text
            assert "Reason:  Kernel & <driver> update" in text
            assert "Kernel &amp; &lt;driver&gt; update" in html  # escaped in HTML only

            reply = await api.command("maintenance cancel tg1", MAINT_TOKEN)
            assert reply["ok"], reply["text"]
            _, ended = await server.wait_messages(2)
            await wait_until(lambda: settled(service.store), what="settled")
            assert ended.message["Subject"] == "[tgops] Maintenance of tg1 has ended"
            assert "has ended (cancelled); tg1 is available again" in (
                ended.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            )
            assert ended.message["Message-ID"] != msg["Message-ID"]

            log = (await api.command("log tg1 50"))["text"]
            assert "notify (system) notification sent tg1: e-mail “[tgops] Maintenance" in log
            assert f"to {USERS}" in log
            rows = await outbox_rows(service.store)
            assert [(r.status, r.attempts) for r in rows] == [("sent", 1), ("sent", 1)]


async def test_maintenance_start_is_mailed_once_also_across_a_restart(tmp_path: Path) -> None:
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    start = clock.now() + timedelta(days=1)
    when = start.astimezone(ZoneInfo("Europe/Berlin")).strftime("%Y-%m-%d %H:%M:%S")
    shown = when.removesuffix(":00")
    async with smtp_server() as server:
        settings = notify_settings(tmp_path, smtp=smtp(server.port), notify={"users_list": USERS})
        async with running(settings, clock=clock) as (service, api):
            reply = await api.command(f"maintenance schedule tg1 {when} Rack move", MAINT_TOKEN)
            assert reply["ok"], reply["text"]
            await server.wait_messages(1)
            await clock.set(start + timedelta(seconds=5))
            service.maintenance.changed()
            _, started = await server.wait_messages(2)
            await wait_until(lambda: settled(service.store), what="settled")
            assert started.message["Subject"] == "[tgops] Maintenance of tg1 has started: Rack move"
            text = started.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert "the maintenance of tg1 (cluster c1) has started" in text
            assert f"Start:   {shown} (Europe/Berlin)" in text
            assert "Reason:  Rack move" in text
        async with running(settings, clock=clock) as (service, api):
            await service.maintenance.tick()  # the start passed before: not announced again
            reply = await api.command("maintenance cancel tg1", MAINT_TOKEN)
            assert reply["ok"], reply["text"]
            *_, ended = await server.wait_messages(3)
            await wait_until(lambda: settled(service.store), what="settled")
            assert ended.message["Subject"] == "[tgops] Maintenance of tg1 has ended"
            log = (await api.command("log tg1 50"))["text"]
            subjects = [r.subject for r in await outbox_rows(service.store)]
        assert len(server.messages) == 3
        assert log.count("maintenance (system) maintenance started tg1: Rack move") == 1
        assert subjects.count("[tgops] Maintenance of tg1 has started: Rack move") == 1


async def test_starttls_with_auth_and_admin_alert_for_a_failed_run(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    repo = Repo(tmp_path)  # a key, but the repository is not served: downloads fail
    async with smtp_server(tls="starttls", context=context, auth={"tgops": "s3cret"}) as server:
        settings = notify_settings(
            tmp_path,
            smtp=smtp(
                server.port,
                starttls=True,
                username="tgops",
                password="s3cret",
                ca_file=str(tmp_path / "ca.pem"),
            ),
            notify={"admin_emails": [ADMIN, "second@example.org"]},
            public_key=repo.public_key,
        )
        async with running(settings) as (_, api):
            reply = await api.command("download solo1")
            assert reply["ok"], reply["text"]
            received = await server.wait_messages(4)  # warning flag and failed run, to 2
            assert server.logins == ["tgops"] * server.connections
            by_subject: dict[str, list[str]] = {}
            for r in received:
                by_subject.setdefault(r.message["Subject"], []).append(r.rcpt_tos[0])
            flag, run = sorted(by_subject, key=lambda s: "Warning" not in s)
            assert flag == "[tgops] Warning flag set on solo1: update download failed"
            assert re.fullmatch(r"\[tgops\] Run #\d+ \(download\) on solo1 failed", run)
            assert all(sorted(v) == [ADMIN, "second@example.org"] for v in by_subject.values())
            mail = next(r.message for r in received if r.message["Subject"] == run)
            body = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert "System:  solo1" in body and "127.0.0.1:9" in body
            assert "/tg log solo1" in body
            assert len({r.message["Message-ID"] for r in received}) == 4


async def test_implicit_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with smtp_server(tls="implicit", context=context) as server:
        settings = notify_settings(
            tmp_path,
            smtp=smtp(server.port, use_tls=True, ca_file=str(tmp_path / "ca.pem")),
            notify={"users_list": USERS},
        )
        async with running(settings) as (_, api):
            reply = await api.command(
                f"maintenance schedule solo1 {future()} Disk swap", MAINT_TOKEN
            )
            assert reply["ok"], reply["text"]
            (received,) = await server.wait_messages(1)
            assert "Maintenance of solo1" in received.message["Subject"]


async def test_untrusted_certificate_is_retried_then_reported(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    async with smtp_server(tls="implicit", context=context) as server:
        settings = notify_settings(
            tmp_path,
            smtp=smtp(server.port, use_tls=True),  # system CAs do not know the test CA
            notify={"users_list": USERS, "max_attempts": 3},
        )
        async with running(settings) as (service, api):
            await api.command(f"maintenance schedule solo1 {future()} Disk swap", MAINT_TOKEN)
            (failed,) = await wait_until(
                lambda: audit_rows(service.store, "notification failed"), what="failure"
            )
            assert "gave up after 3 attempts" in failed.detail
            assert "CERTIFICATE_VERIFY_FAILED" in failed.detail or "certificate" in failed.detail
            assert server.count == 0


async def test_no_smtp_host_fails_with_a_clear_reason(tmp_path: Path) -> None:
    settings = notify_settings(tmp_path, notify={"users_list": USERS})
    async with running(settings) as (service, api):
        await api.command(f"maintenance schedule tg2 {future()} New disks", MAINT_TOKEN)
        (row,) = await wait_until(
            lambda: audit_rows(service.store, "notification failed"), what="failure"
        )
        assert row.target == "tg2"
        assert "smtp.host is not configured" in row.detail
        (item,) = await outbox_rows(service.store)
        assert item.status == "failed" and item.attempts == 1
        assert "smtp.host is not configured" in (item.last_error or "")
        log = (await api.command("log tg2"))["text"]
        assert "notification failed tg2: e-mail “[tgops] Maintenance of tg2" in log
        assert "smtp.host is not configured" in log


async def test_server_down_then_up_delivers_exactly_once(tmp_path: Path) -> None:
    async with smtp_server() as server:
        await server.stop()
        settings = notify_settings(
            tmp_path, smtp=smtp(server.port), notify={"users_list": USERS, "max_attempts": 100}
        )
        async with running(settings) as (service, api):
            for node in ("tg1", "tg2", "tg3"):
                reply = await api.command(
                    f"maintenance schedule {node} {future()} Power work", MAINT_TOKEN
                )
                assert reply["ok"]

            async def retried() -> bool:
                rows = await outbox_rows(service.store)
                return len(rows) == 3 and all(r.attempts >= 2 for r in rows)

            await wait_until(retried, what="3 items tried at least twice")
            rows = await outbox_rows(service.store)
            assert all(r.status in {"pending", "sending"} for r in rows)
            assert "127.0.0.1" in (rows[0].last_error or "")
            await server.start()
            await server.wait_messages(3)

            rows = await wait_until(lambda: settled(service.store), what="all settled")
            assert {r.status for r in rows} == {"sent"}
            assert sorted(m.message["Subject"].split()[3] for m in server.messages) == [
                "tg1",
                "tg2",
                "tg3",
            ]
            assert len(server.messages) == 3
            assert len(await audit_rows(service.store, "notification sent")) == 3


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_sender_refused_for_good_and_for_now(tmp_path: Path, pipelining: bool) -> None:
    async with smtp_server(pipelining=pipelining) as server:
        server.refuse_sender = "550 5.7.1 sender not allowed"
        settings = notify_settings(tmp_path, smtp=smtp(server.port), notify={"users_list": USERS})
        async with running(settings) as (service, api):
            await api.command(f"maintenance schedule tg1 {future()} One", MAINT_TOKEN)
            (failed,) = await wait_until(
                lambda: audit_rows(service.store, "notification failed"), what="failure"
            )
            assert "refused the sender (550 5.7.1 sender not allowed); check smtp.sender" in (
                failed.detail
            )
            server.refuse_sender = "451 4.7.1 greylisted, try again"
            await api.command(f"maintenance schedule tg2 {future()} Two", MAINT_TOKEN)

            async def retried() -> Any:
                rows = await outbox_rows(service.store)
                return len(rows) == 2 and rows[1].attempts >= 1 and rows[1].status != "sent"

            await wait_until(retried, what="a transient refusal")
            server.refuse_sender = None
            (received,) = await server.wait_messages(1)
            assert "tg2" in received.message["Subject"]
            rows = await wait_until(lambda: settled(service.store), what="all settled")
            assert [r.status for r in rows] == ["failed", "sent"]
            assert rows[1].attempts >= 2


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_connection_dropped_mid_batch_loses_and_repeats_nothing(
    tmp_path: Path, pipelining: bool
) -> None:
    async with smtp_server(pipelining=pipelining) as server:
        server.drop_at = {3}
        settings = notify_settings(
            tmp_path,
            smtp=smtp(server.port),
            notify={"admin_emails": [f"admin{i}@example.org" for i in range(8)]},
        )
        async with running(settings) as (service, _):
            await service.bus.publish(WarningFlagSet(node="tg1", reason="download failed"))
            await server.wait_messages(8)

            await wait_until(lambda: settled(service.store), what="all settled")
            rcpts = sorted(m.rcpt_tos[0] for m in server.messages)
            assert rcpts == sorted(f"admin{i}@example.org" for i in range(8))
            assert server.connections >= 2  # the batch went on over a new connection
            rows = await outbox_rows(service.store)
            assert sorted(r.attempts for r in rows) == [1] * 7 + [2]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_refused_recipient_does_not_stop_the_batch(tmp_path: Path, pipelining: bool) -> None:
    async with smtp_server(pipelining=pipelining) as server:
        server.refuse_recipients["bad@example.org"] = "550 5.1.1 no such user"
        settings = notify_settings(
            tmp_path,
            smtp=smtp(server.port),
            notify={"admin_emails": ["a@example.org", "bad@example.org", "c@example.org"]},
        )
        async with running(settings) as (service, _):
            await service.bus.publish(UpdateLockSet(node="solo1", reason="install failed"))
            await server.wait_messages(2)
            (failed,) = await wait_until(
                lambda: audit_rows(service.store, "notification failed"), what="failure"
            )
            assert "to bad@example.org" in failed.detail
            assert "refused the recipient (550 5.1.1 no such user); check the address" in (
                failed.detail
            )
            assert server.connections == 1
            assert "solo1 is locked against updates" in server.messages[0].message["Subject"]


async def test_mails_queued_when_the_service_stops_are_sent_once_after_restart(
    tmp_path: Path,
) -> None:
    async with smtp_server() as server:
        await server.stop()
        settings = notify_settings(
            tmp_path, smtp=smtp(server.port), notify={"users_list": USERS, "retry_base": "1s"}
        )
        async with running(settings) as (service, api):
            for node in ("tg1", "solo1"):
                await api.command(f"maintenance schedule {node} {future()} Move", MAINT_TOKEN)

            async def tried() -> bool:
                rows = await outbox_rows(service.store)
                return len(rows) == 2 and all(r.attempts == 1 for r in rows)

            await wait_until(tried, what="both tried once")
        await server.start()
        async with running(settings) as (service, _):
            await server.wait_messages(2)
            rows = await wait_until(lambda: settled(service.store), what="settled")
            assert [(r.status, r.attempts) for r in rows] == [("sent", 2), ("sent", 2)]
        assert len(server.messages) == 2


def record(**overrides: Any) -> OutboxRecord:
    now = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    values: dict[str, Any] = {
        "id": 1,
        "key": "ev1:email:jo@example.org",
        "channel": "email",
        "recipient": "jo@example.org",
        "subject": "[tgops] Wartung von tg1: Kernel & <Treiber> für Überlänge " + "x" * 80,
        "payload": {
            "template": "maintenance",
            "name": 'Jörg "Jo" Müller, Betrieb',
            "target": "tg1",
            "vars": {
                "event": "ended",
                "node": "tg1",
                "cluster": None,
                "timezone": "Europe/Berlin",
                "reason": "fertig ✓ =3D . \r\n.",
                "by": "x",
            },
        },
        "status": "sending",
        "attempts": 0,
        "next_attempt_at": now,
        "last_error": None,
        "created_at": now,
        "sent_at": None,
    }
    return OutboxRecord(**(values | overrides))


def test_composed_mail_parses_back_exactly() -> None:
    channel = EmailChannel(
        SmtpSettings(host="127.0.0.1", sender=SENDER), renderer=Renderer(), batch_size=10
    )
    item = record()
    raw = channel.compose(item)
    assert raw.isascii() and b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == item.subject
    assert msg["To"].addresses[0].display_name == 'Jörg "Jo" Müller, Betrieb'
    assert msg["To"].addresses[0].addr_spec == "jo@example.org"
    assert msg["Date"].datetime == item.created_at
    assert (
        msg["Message-ID"]
        == channel.compose(item).split(b"Message-ID: ")[1].split(b"\r")[0].decode()
    )
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    text = text.replace("\r\n", "\n")  # canonical CRLF line ends of text/plain
    assert "has ended (fertig ✓ =3D . \n.); tg1 is available again" in text
    assert "fertig ✓ =3D" in msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert channel.compose(item) == raw  # the same message after a retry


def test_bodies_come_back_exactly_as_7bit_or_quoted_printable() -> None:
    channel = EmailChannel(
        SmtpSettings(host="127.0.0.1", sender=SENDER), renderer=Renderer(), batch_size=10
    )
    reasons = {  # reason: transfer encoding of the text part
        "x" * 75 + " \n" + "y" * 74 + "\t\n" + "z" * 200: "7bit",  # whitespace at line ends
        "=" * 30 + "é" * 30 + " ✓.\n.\n..\nFrom here\rCR alone\r\nend \t": "quoted-printable",
        "": "7bit",
        ".\n..\nFrom here\rCR alone\r\nend \t": "7bit",
        "w" * 999: "quoted-printable",  # longer than a line may be
        "--=_tgops_0123 looks like a boundary": "quoted-printable",
        "a NUL \0 byte": "quoted-printable",
    }
    for reason, encoding in reasons.items():
        vars_ = {**record().payload["vars"], "reason": reason}
        raw = channel.compose(record(payload={**record().payload, "vars": vars_}))
        assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        part = msg.get_body(("plain",))
        assert part is not None
        assert part["Content-Transfer-Encoding"] == encoding, reason
        body = part.get_payload().encode("ascii")  # as sent
        longest = max(len(line) for line in body.split(b"\r\n"))
        assert longest <= (76 if encoding == "quoted-printable" else 998)  # RFC 2045 6.7, 5322
        assert len(msg.get_payload()) == 2  # type: ignore[arg-type]  (no part split by a body)
        text = part.get_content()
        expected = reason.replace("\r\n", "\n").replace("\r", "\n")
        assert f"has ended ({expected}); tg1 is available again" in text.replace("\r\n", "\n")


async def test_lines_starting_with_a_dot_arrive_as_composed() -> None:
    """The channel writes MAIL, RCPT and DATA itself on aiosmtplib's connection: a body
    line that is a lone dot (which would end DATA) or starts with one arrives unchanged,
    and the message's size is declared."""
    async with smtp_server() as server:
        channel = EmailChannel(
            SmtpSettings(host="127.0.0.1", port=server.port, sender=SENDER),
            renderer=Renderer(),
            batch_size=10,
        )
        payload = record().payload
        items = [
            record(
                id=n + 1,
                key=f"ev{n}:email:jo@example.org",
                payload={**payload, "vars": {**payload["vars"], "reason": reason}},
            )
            for n, reason in enumerate(["x\n.\n..\n.hidden line\nend", "plain"])
        ]
        outcomes: list[Outcome] = []

        def report(outcome: Outcome) -> bool:
            outcomes.append(outcome)
            return True

        async def begin(item: OutboxRecord) -> None:
            return None

        # a message that cannot be composed fails alone; the one after it still goes
        bad = record(id=3, key="ev3:email:bad", recipient="jö@example.org")
        await channel.deliver([items[0], bad, items[1]], report, begin)
        assert [(o.item.id, o.sent) for o in outcomes] == [(1, True), (3, False), (2, True)]
        assert isinstance(outcomes[1].error, MessageComposeError)
        received = await server.wait_messages(2)
        composed = [channel.compose(item) for item in items]
        assert b"\r\n.\r\n..\r\n.hidden line\r\n" in composed[0]  # sent as 7bit
        assert [m.data for m in received] == composed
        assert [m.mail_options for m in received] == [[f"SIZE={len(c)}"] for c in composed]
        assert [m.rcpt_tos for m in received] == [["jo@example.org"]] * 2
        assert server.connections == 1


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_a_server_offering_pipelining_gets_one_write_per_message(
    tmp_path: Path, pipelining: bool
) -> None:
    """RFC 2920: to a server that offers PIPELINING, and only to such a server, a
    message's content goes in one write with the next message's MAIL, RCPT and (its
    marker stored) DATA; the first message's envelope goes alone."""
    admins = [f"admin{i}@example.org" for i in range(6)]
    async with smtp_server(pipelining=pipelining) as server:
        server.record_reads = True
        settings = notify_settings(
            tmp_path, smtp=smtp(server.port), notify={"admin_emails": admins}
        )
        async with running(settings) as (service, _):
            await service.bus.publish(WarningFlagSet(node="tg1", reason="download failed"))
            received = await server.wait_messages(6)
            rows = await wait_until(lambda: settled(service.store), what="all settled")
        assert sorted(m.rcpt_tos[0] for m in received) == admins
        assert [r.status for r in rows] == ["sent"] * 6
        envelopes = [r for r in server.reads if b"MAIL FROM:" in r]
        assert len(envelopes) == 6
        alone = [r for r in envelopes if r.startswith(b"MAIL FROM:")]
        behind = [r for r in envelopes if b"\r\n.\r\nMAIL FROM:" in r]
        grouped = [r for r in envelopes if b"\r\nRCPT TO:<" in r]
        with_data = [r for r in grouped if r.endswith(b">\r\nDATA\r\n")]
        if pipelining:
            # the first message's marker is written while its envelope goes (its DATA
            # follows on its own); the markers of the others were written with it
            assert (len(alone), len(behind), len(grouped), len(with_data)) == (1, 5, 6, 5)
        else:
            assert (len(alone), len(behind), len(grouped), len(with_data)) == (6, 0, 0, 0)
        assert server.connections == 1


def test_header_injection_and_bad_addresses_are_refused() -> None:
    channel = EmailChannel(
        SmtpSettings(host="127.0.0.1", sender=SENDER), renderer=Renderer(), batch_size=10
    )
    raw = channel.compose(
        record(
            subject="Hello\r\nBcc: victim@example.org",
            payload={**record().payload, "name": "Eve\r\nBcc: victim@example.org"},
        )
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hello Bcc: victim@example.org"
    for bad in ("jo@example.org\r\nBcc: x@example.org", "jö@example.org", "no-at-sign", ""):
        with pytest.raises(MessageComposeError, match="is not a plain ASCII e-mail address"):
            channel.compose(record(recipient=bad))


async def test_an_unreadable_ca_file_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    settings = notify_settings(tmp_path, smtp=smtp(25, starttls=True, ca_file=str(missing)))
    with pytest.raises(ConfigError, match=r"smtp\.ca_file: .*missing\.pem is not a readable PEM"):
        async with running(settings):
            pass


def test_templates_read_keys_of_dicts_and_refuse_missing_ones(tmp_path: Path) -> None:
    (tmp_path / "probe.txt").write_text("{{ hotfix.id }} {{ hotfix.items }} {{ n.real }}")
    (tmp_path / "gap.txt").write_text("{{ hotfix.missing }}")
    renderer = Renderer(tmp_path)
    text = renderer.text("probe", {"hotfix": {"id": "HF-1", "items": "tg-vnc"}, "n": 3})
    assert text == "HF-1 tg-vnc 3"  # a key named like a dict method gives the value
    with pytest.raises(UndefinedError, match="has no attribute 'missing'"):
        renderer.text("gap", {"hotfix": {"id": "HF-1"}})


def _all_defects(msg: email.message.EmailMessage) -> list[object]:
    return [d for part in msg.walk() for d in part.defects]


async def test_the_mails_of_one_window_are_one_thread_and_suppress_auto_replies(
    tmp_path: Path,
) -> None:
    async with smtp_server() as server:
        settings = notify_settings(tmp_path, smtp=smtp(server.port), notify={"users_list": USERS})
        async with running(settings) as (service, api):
            when = future()
            reply = await api.command(f"maintenance schedule tg1 {when} Kernel update", MAINT_TOKEN)
            assert reply["ok"], reply["text"]
            await server.wait_messages(1)
            reply = await api.command("maintenance cancel tg1", MAINT_TOKEN)
            assert reply["ok"], reply["text"]
            # another window later: a thread of its own
            later = future(days=31)
            reply = await api.command(f"maintenance schedule tg1 {later} Disk swap", MAINT_TOKEN)
            assert reply["ok"], reply["text"]
            received = await server.wait_messages(3)
            await wait_until(lambda: settled(service.store), what="settled")
    scheduled, ended, other = (
        email.message_from_bytes(r.data, policy=email.policy.default) for r in received
    )
    for msg in (scheduled, ended, other):
        assert isinstance(msg, email.message.EmailMessage)
        assert _all_defects(msg) == []
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Auto-Response-Suppress"] == "All"
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert '<html lang="en">' in html and '<meta charset="utf-8">' in html
    assert "has ended" in ended["Subject"]
    thread = scheduled["In-Reply-To"]
    assert re.fullmatch(r"<[0-9a-f]{40}@ops\.example\.org>", thread)
    assert scheduled["References"] == ended["In-Reply-To"] == ended["References"] == thread
    assert len({scheduled["Message-ID"], ended["Message-ID"], thread}) == 3
    assert other["In-Reply-To"] == other["References"] != thread


def test_a_subject_in_rfc_2047_words_is_shown_decoded() -> None:
    channel = EmailChannel(
        SmtpSettings(host="127.0.0.1", sender=SENDER), renderer=Renderer(), batch_size=10
    )
    item = record()
    raw = channel.compose(item)
    assert b"Subject: =?utf-8?" in raw
    assert mail_subject(raw) == item.subject
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert _all_defects(msg) == []
