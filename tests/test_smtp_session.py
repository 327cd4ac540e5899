"""The SMTP session's reply reader against a scripted server on loopback: replies are
read in order however the server's bytes arrive (several replies in one read, a reply
split over reads, multi-line replies), and a connection that can no longer be trusted is
closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiosmtplib import SMTPReadTimeoutError, SMTPServerDisconnected

from notify.smtp_session import SmtpSession

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


@asynccontextmanager
async def session_with(script: Script, *, reply_timeout: float = 5.0) -> AsyncIterator[SmtpSession]:
    """A session on a connection to a server that runs ``script`` for it."""
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    session = SmtpSession(transport, timeout=reply_timeout)
    try:
        yield session
    finally:
        session.close()
        async with asyncio.timeout(5):
            await done.wait()
        server.close()
        await server.wait_closed()


async def lines(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    async with asyncio.timeout(5):
        return [await reader.readline() for _ in range(count)]


async def test_replies_are_read_in_order_however_they_arrive() -> None:
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.extend(await lines(reader, 3))
        # two replies and the start of a third in one write, the rest later
        writer.write(b"250 2.1.0 OK\r\n250-2.1.5 first line\r\n25")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"0 2.1.5 second line\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        await writer.drain()
        assert await lines(reader, 1) == [b"QUIT\r\n"]
        writer.write(b"221 bye\r\n")
        await writer.drain()

    async with session_with(script) as session:
        group = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        called: list[bool] = []
        replies = await session.exchange(group, 3, lambda: called.append(True))
        assert [(r.code, r.message) for r in replies] == [
            (250, "2.1.0 OK"),
            (250, "2.1.5 first line\n2.1.5 second line"),
            (354, "End data with <CR><LF>.<CR><LF>"),
        ]
        assert called == [True]
        assert b"".join(got) == group
        ((code, _),) = await session.exchange(b"QUIT\r\n")
        assert code == 221


async def test_a_421_reply_ends_the_group_and_closes_the_session() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await lines(reader, 3)
        writer.write(b"250 OK\r\n421 4.3.0 closing\r\n")
        await writer.drain()

    async with session_with(script) as session:
        replies = await session.exchange(b"MAIL FROM:<>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n", 3)
        assert [r.code for r in replies] == [250, 421]
        assert not session.open
        with pytest.raises(SMTPServerDisconnected):
            await session.exchange(b"RSET\r\n")


@pytest.mark.parametrize(
    "answer",
    [b"OK then\r\n", b"2x0 nearly\r\n", b"250" + b"-" * 9000],
    ids=["no-code", "bad-code", "endless-line"],
)
async def test_a_malformed_reply_breaks_the_session(answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await lines(reader, 1)
        writer.write(answer)
        await writer.drain()
        await reader.read()  # until the client hangs up

    async with session_with(script) as session:
        with pytest.raises(SMTPServerDisconnected, match="Malformed SMTP reply"):
            await session.exchange(b"NOOP\r\n")
        assert not session.open


async def test_a_reply_that_does_not_come_times_out_and_closes_the_session() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await lines(reader, 1)
        await reader.read()  # never answers; until the client hangs up

    async with session_with(script, reply_timeout=0.2) as session:
        with pytest.raises(SMTPReadTimeoutError):
            await session.exchange(b"NOOP\r\n")
        assert not session.open


async def test_each_reply_has_the_whole_timeout_and_a_late_one_still_times_out() -> None:
    # every reply comes 0.25 s after its command, 0.75 s for the three: each is waited
    # for 0.4 s at most, not the three together; then one that does not come times out
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await lines(reader, 1)
            await asyncio.sleep(0.25)
            writer.write(b"250 OK\r\n")
            await writer.drain()
        await lines(reader, 1)
        await reader.read()  # never answers; until the client hangs up

    async with session_with(script, reply_timeout=0.4) as session:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(3):
            (reply,) = await session.exchange(b"NOOP\r\n")
            assert reply.code == 250
        assert loop.time() - began > 0.7
        began = loop.time()
        with pytest.raises(SMTPReadTimeoutError):
            async with asyncio.timeout(5):  # a session that never times out fails here
                await session.exchange(b"NOOP\r\n")
        assert loop.time() - began >= 0.4
        assert not session.open


async def test_a_server_that_hangs_up_is_a_lost_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await lines(reader, 1)  # then closes

    async with session_with(script) as session:
        with pytest.raises(SMTPServerDisconnected):
            await session.exchange(b"NOOP\r\n")
        assert not session.open
