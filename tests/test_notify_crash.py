"""Crash safety of notifications (L15): the service process is killed with SIGKILL while
e-mails wait in the outbox; after a restart they are sent, each exactly once."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from core.store import OutboxRecord, Store
from tests.notify_env import notify_settings, outbox_rows, wait_until
from tests.service import MAINT_TOKEN
from tests.smtp_server import smtp_server

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def service_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    ready = config.parent / "ready"
    ready.unlink(missing_ok=True)
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "serve", "--config", str(config),
            "--ready-file", str(ready),
            cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_until(
            lambda: ready.exists() or proc.returncode is not None, within=30, what="ready"
        )
        if proc.returncode is not None:
            raise AssertionError(await asyncio.to_thread(log.read_text))
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await proc.wait()


async def command(port: int, text: str) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.post(
            f"http://127.0.0.1:{port}/api/v1/command",
            json={"text": text},
            headers={"Authorization": f"Bearer {MAINT_TOKEN}"},
        ) as response,
    ):
        body = await response.json()
        assert body["ok"], body


async def test_mails_queued_at_sigkill_are_sent_once_after_restart(tmp_path: Path) -> None:
    port = free_port()
    async with smtp_server() as smtp:
        await smtp.stop()  # the SMTP server is down: the mails stay queued
        settings = notify_settings(
            tmp_path,
            smtp={"host": "127.0.0.1", "port": smtp.port, "timeout": "1s"},
            notify={"users_list": "users@example.org", "retry_base": "3s", "retry_max": "3s"},
        )
        config = tmp_path / "tgops.toml"
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        start = (datetime.now(UTC) + timedelta(days=9)).strftime("%Y-%m-%d 10:00")
        async with Store(settings.database_url) as store:

            async def tried_once() -> list[OutboxRecord] | None:
                rows = await outbox_rows(store)
                waiting = len(rows) == 3 and all(
                    r.status == "pending" and r.attempts == 1 for r in rows
                )
                return rows if waiting else None

            async with service_process(config, tmp_path / "service.log") as proc:
                for node in ("tg1", "tg2", "solo1"):
                    await command(port, f"maintenance schedule {node} {start} Rack move")
                rows = await wait_until(tried_once, what="3 mails queued, tried once")
                assert all("127.0.0.1" in (r.last_error or "") for r in rows)
                proc.send_signal(signal.SIGKILL)
                async with asyncio.timeout(10):
                    await proc.wait()
            assert await tried_once() is not None  # nothing changed while it was dead
            await smtp.start()
            async with service_process(config, tmp_path / "service.log"):
                await smtp.wait_messages(3)

                async def all_sent() -> bool:
                    return all(r.status == "sent" for r in await outbox_rows(store))

                await wait_until(all_sent, what="all sent")
            # stopped again: nothing more was sent
            subjects = sorted(m.message["Subject"] for m in smtp.messages)
            assert subjects == [
                f"[tgops] Maintenance of {node} on {start}: Rack move"
                for node in ("solo1", "tg1", "tg2")
            ]
            assert [r.attempts for r in await outbox_rows(store)] == [2, 2, 2]
