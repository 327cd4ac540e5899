"""Malformed and hostile requests against the real HTTP server of a running service: each
is answered 4xx with a message, none gets a 500 or leaves a traceback in the log, and every
authenticated command lands in the audit log (cut when long)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest

from core.store.base import AUDIT_DETAIL_LIMIT
from tests.events import until
from tests.fake_slack import fake_slack
from tests.service import ADMIN_TOKEN, VIEWER_TOKEN, running, settings_for

SECRET = "signing-secret-for-tests"


def slack_headers(body: bytes, timestamp: str, secret: str = SECRET) -> dict[str, str]:
    base = b"v0:" + timestamp.encode() + b":" + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records with a traceback (aiohttp logs one with each 500)."""
    return [r.getMessage() for r in caplog.records if r.exc_info is not None]


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, token: str = VIEWER_TOKEN
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.text()


async def test_api_bodies_that_crashed_are_answered_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (service, api):
        url = f"{api.base}/api/v1/command"
        # a lone surrogate: a command that cannot be understood, recorded as "rejected"
        status, text = await post(api.session, url, b'{"text": "\\ud800 status"}')
        assert status == 200, text
        assert json.loads(text)["ok"] is False
        [record] = await service.store.audit_log(limit=1)
        assert (record.actor, record.action) == ("token:viewer", "rejected")
        assert record.detail.startswith("\ufffd status")

        # a lone surrogate inside a command that is understood
        status, text = await post(api.session, url, b'{"text": "help \\udfff"}')
        assert status == 200 and json.loads(text)["ok"] is False, text

        # a number of 5,000 digits, as JSON and as the N of `log`
        status, text = await post(api.session, url, b'{"text": ' + b"9" * 5000 + b"}")
        assert status == 400 and "not JSON" in json.loads(text)["text"], text
        reply = await api.command("log " + "9" * 5000, VIEWER_TOKEN)
        assert reply["ok"] is False and "N must be between 1 and 1000" in reply["text"]

        # 30,000 nested lists
        status, text = await post(api.session, url, b"[" * 30_000 + b"]" * 30_000)
        assert status == 400 and "nested too deeply" in json.loads(text)["text"], text

        # a body that is not UTF-8
        status, text = await post(api.session, url, b'{"text": "\xff\xfe"}')
        assert status == 400 and "not JSON" in json.loads(text)["text"], text

        # a long command: answered, and recorded cut at the limit with a mark
        long = "status " + "x" * 50_000
        reply = await api.command(long, ADMIN_TOKEN)
        assert reply["ok"] is False
        [record] = await service.store.audit_log(limit=1)
        assert record.detail.startswith("status xxx")
        assert len(record.detail) < AUDIT_DETAIL_LIMIT + 100
        assert record.detail.endswith("more characters]") and "[cut: " in record.detail

        # the service still answers
        assert (await api.command("nodes", VIEWER_TOKEN))["ok"] is True
    assert tracebacks(caplog) == []


async def test_slack_requests_that_crashed_are_answered_4xx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.http")
    async with fake_slack() as fake:
        sections = {
            "slack": {
                "bot_token": "xoxb-test-token",
                "signing_secret": SECRET,
                "api_url": fake.api_url,
            },
            "roles": {"viewer": ["*"]},
        }
        settings = settings_for(tmp_path, sections=sections)
        async with running(settings) as (_, api):
            url = f"{api.base}/slack/events"
            form = urlencode({"command": "/tg", "text": "status", "user_id": "U1"}).encode()

            headers = slack_headers(form, "abc")  # signed, but the timestamp is no number
            async with api.session.post(url, data=form, headers=headers) as response:
                assert response.status == 401
                assert "number of seconds" in await response.text()

            body = b"command=%2Ftg&text=\xff\xfe"  # signed, not UTF-8
            headers = slack_headers(body, str(int(time.time())))
            async with api.session.post(url, data=body, headers=headers) as response:
                assert response.status == 400
                assert "not UTF-8" in await response.text()

            # a client that goes away in the middle of its body
            port = int(api.base.rsplit(":", 1)[1])
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            stamp = str(int(time.time()))
            head = (
                f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"X-Slack-Request-Timestamp: {stamp}\r\nX-Slack-Signature: v0=00\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
            )
            writer.write(head.encode() + b"command=%2Ftg&te")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

            async def went_away() -> bool:  # the server's side shows only in its log
                return any("went away before its body" in r.getMessage() for r in caplog.records)

            await until(went_away, within=10)

            # the real thing still works
            headers = slack_headers(form, str(int(time.time())))
            async with api.session.post(url, data=form, headers=headers) as response:
                assert response.status == 200
    assert tracebacks(caplog) == []


async def test_slow_bodies_get_408_and_large_ones_413(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, environ={"TGOPS_HTTP__BODY_TIMEOUT": "0.5s"})
    async with running(settings) as (_, api):
        port = int(api.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            "POST /api/v1/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {VIEWER_TOKEN}\r\nContent-Length: 100\r\n\r\n"
        )
        writer.write(head.encode() + b'{"text": ')
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        assert status_line.split()[1] == b"408"
        writer.close()

        status, text = await post(api.session, f"{api.base}/api/v1/command", b" " * 70_000)
        assert status == 413 and "larger than" in text
