"""After a SIGKILL in the middle of a delivery, a single-instance (SQLite) service makes
the notifications it was sending due again at its next start, instead of waiting for
their lease (a minute and more) to run out."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.store import Store
from tests.notify_env import notify_settings, outbox_rows, wait_until
from tests.smtp_server import SmtpServer
from tests.test_notify_crash import command, free_port, service_process

pytestmark = pytest.mark.slow


async def test_mails_in_delivery_at_sigkill_go_out_at_the_next_start(tmp_path: Path) -> None:
    port, smtp_port = free_port(), free_port()
    silent = asyncio.Event()

    async def never_greets(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await silent.wait()  # a mail server that accepts and then says nothing
        writer.close()

    hanging = await asyncio.start_server(never_greets, "127.0.0.1", smtp_port)
    settings = notify_settings(
        tmp_path,
        smtp={"host": "127.0.0.1", "port": smtp_port, "timeout": "10s"},
        notify={"users_list": "users@example.org"},
    )
    config = tmp_path / "tgops.toml"
    config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
    start = (datetime.now(UTC) + timedelta(days=9)).strftime("%Y-%m-%d 10:00")
    async with Store(settings.database_url) as store:

        async def in_delivery() -> bool:
            rows = await outbox_rows(store)
            return len(rows) == 1 and rows[0].status == "sending"

        try:
            async with service_process(config, tmp_path / "service.log") as proc:
                await command(port, f"maintenance schedule solo1 {start} Rack move")
                await wait_until(in_delivery, what="the mail in delivery")
                proc.send_signal(signal.SIGKILL)
                async with asyncio.timeout(10):
                    await proc.wait()
        finally:
            silent.set()
            hanging.close()
            await hanging.wait_closed()
        assert await in_delivery()  # its lease runs for a minute more

        smtp = SmtpServer(port=smtp_port)
        await smtp.start()
        try:
            async with service_process(config, tmp_path / "service.log"):

                async def sent() -> bool:
                    return [r.status for r in await outbox_rows(store)] == ["sent"]

                await wait_until(sent, within=20, what="sent at the start, not after the lease")
            assert len(smtp.messages) == 1
        finally:
            await smtp.stop()
