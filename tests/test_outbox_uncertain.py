"""A message whose SMTP DATA had begun when the service was killed is not sent again: after
a restart it is "delivery uncertain" in the outbox and the audit log, and the admins are
told. The sink holds the message's DATA unanswered while the service gets SIGKILL."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.store import Store
from tests.notify_env import audit_rows, notify_settings, outbox_rows, wait_until
from tests.smtp_server import smtp_server
from tests.test_notify_crash import command, free_port, service_process

pytestmark = pytest.mark.slow

USERS = "users@example.org"
ADMIN = "admin@example.org"


async def test_a_mail_killed_during_data_is_not_sent_twice(tmp_path: Path) -> None:
    port = free_port()
    async with smtp_server() as smtp:
        smtp.hold = asyncio.Event()
        settings = notify_settings(
            tmp_path,
            smtp={"host": "127.0.0.1", "port": smtp.port, "timeout": "20s"},
            notify={"users_list": USERS, "admin_emails": [ADMIN]},
        )
        config = tmp_path / "tgops.toml"
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        start = (datetime.now(UTC) + timedelta(days=9)).strftime("%Y-%m-%d 10:00")
        subject = f"[tgops] Maintenance of solo1 on {start}: Rack move"
        async with Store(settings.database_url) as store:
            try:
                async with service_process(config, tmp_path / "service.log") as proc:
                    await command(port, f"maintenance schedule solo1 {start} Rack move")
                    async with asyncio.timeout(20):
                        await smtp.holding.wait()  # the whole message is at the server
                    (row,) = await outbox_rows(store)
                    assert (row.status, row.transmitting) == ("sending", True)
                    proc.send_signal(signal.SIGKILL)
                    async with asyncio.timeout(10):
                        await proc.wait()
            finally:
                smtp.hold.set()  # the server takes the message after all
            (received,) = await smtp.wait_messages(1)
            assert received.rcpt_tos == [USERS]

            async with service_process(config, tmp_path / "service.log"):
                # the admins are told, and the users' mail is not sent again
                await smtp.wait_messages(2)

                async def settled() -> list[str] | None:
                    statuses = [r.status for r in await outbox_rows(store)]
                    return statuses if "pending" not in statuses else None

                await wait_until(settled, what="the admin alert sent")
                await asyncio.sleep(1.0)  # time to (wrongly) send the users' mail again
            assert [m.message["Subject"] for m in smtp.to(USERS)] == [subject]
            (alert,) = smtp.to(ADMIN)
            assert alert.message["Subject"].startswith("[tgops] Delivery uncertain: e-mail")
            assert USERS in alert.message.get_body(("plain",)).get_content()
            users_row, alert_row = await outbox_rows(store)
            assert (users_row.recipient, users_row.status) == (USERS, "uncertain")
            assert "the service stopped while it was being transmitted" in (
                users_row.last_error or ""
            )
            assert (alert_row.recipient, alert_row.status) == (ADMIN, "sent")
            (audit,) = await audit_rows(store, "delivery uncertain")
            assert audit.detail.startswith(f"e-mail “{subject}” to ")
            assert "not sent again" in audit.detail
