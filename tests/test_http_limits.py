"""The HTTP server's connection limits against real sockets: idle and slow clients are
closed, more connections than the cap do not keep status from answering."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.service import VIEWER_TOKEN, running, settings_for

CAP = 16


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (bounded wait). A reset counts
    as a close: the kernel resets a connection closed with unread bytes (a slow client's
    partial headers)."""
    async with asyncio.timeout(20):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def test_more_idle_connections_than_the_cap_and_status_still_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {
        "TGOPS_HTTP__MAX_CONNECTIONS": str(CAP),
        "TGOPS_HTTP__HEADER_TIMEOUT": "1s",
        "TGOPS_HTTP__IDLE_TIMEOUT": "1s",
    }
    settings = settings_for(tmp_path, environ=environ)
    async with running(settings) as (service, api):
        port = service.port
        assert port is not None
        idle = []
        for i in range(CAP * 3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:  # half of them send part of a request's headers, and nothing more
                writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                await writer.drain()
            idle.append((reader, writer))

        # a status request in the middle of it all is answered
        status = await api.status(VIEWER_TOKEN)
        assert [n["name"] for n in status["nodes"]] == ["tg1", "tg2", "tg3", "solo1"]

        # every idle or slow connection is closed by the server, without an answer
        try:
            for reader, _ in idle:
                assert await closed_by_server(reader) == b""
        finally:
            for _, writer in idle:
                writer.close()

        # a kept-alive connection that goes quiet after a request is closed too
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
        await writer.drain()
        answer = await closed_by_server(reader)
        assert answer.startswith(b"HTTP/1.1 200")
        writer.close()

    evictions = [r for r in caplog.records if "longest-idle" in r.getMessage()]
    assert len(evictions) == 1  # at most once a minute, however many were closed


async def test_when_every_connection_is_busy_a_new_one_gets_503(tmp_path: Path) -> None:
    environ = {"TGOPS_HTTP__MAX_CONNECTIONS": "8", "TGOPS_HTTP__BODY_TIMEOUT": "30s"}
    settings = settings_for(tmp_path, environ=environ)
    async with running(settings) as (service, api):
        port = service.port
        assert port is not None
        busy = []
        for _ in range(8):  # each is inside a request: its body has not arrived yet
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /api/v1/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + f"Authorization: Bearer {VIEWER_TOKEN}\r\n".encode()
                + b"Content-Length: 50\r\n\r\n{"
            )
            await writer.drain()
            busy.append((reader, writer))
        await asyncio.sleep(0)  # let the server see them (the answer below is what counts)

        async def refused() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            answer = await closed_by_server(reader)
            writer.close()
            return answer

        answer = b""
        async with asyncio.timeout(20):
            while not answer.startswith(b"HTTP/1.1 503"):
                answer = await refused()
                if answer.startswith(b"HTTP/1.1 200"):
                    await asyncio.sleep(0.05)  # the busy ones were not all seen yet
        assert b"too many connections" in answer
        for _, writer in busy:
            writer.close()

        # with the busy ones gone, requests are served again
        async with asyncio.timeout(20):
            while True:
                async with api.session.get(f"{api.base}/healthz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
