"""The sending part of an SMTP connection, once aiosmtplib has opened it.

aiosmtplib opens the session (TCP, TLS, greeting, EHLO, STARTTLS, AUTH); then
``SmtpSession`` takes the connection's transport over and the outbox writes its commands
itself. It keeps every reply that arrives, in order, however the server's replies come
in (one or several in one read, a reply split over reads), so commands can be written as
a group and their replies read afterwards: SMTP pipelining (RFC 2920), which
aiosmtplib's own reader does not allow (it keeps one reply and drops what comes while
that one is not read).

A reply 421 (the server is closing), a malformed reply, a timeout or a lost connection
close the session: a connection whose replies may be out of step is not used again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from aiosmtplib import (
    SMTPReadTimeoutError,
    SMTPServerDisconnected,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

LONGEST_LINE = 8192
"""A reply line longer than this is not SMTP (RFC 5321 allows 512 octets)."""


class SmtpSession(asyncio.Protocol):
    """Commands written on ``transport``, replies read in order (each waited for
    ``timeout`` seconds at most)."""

    def __init__(self, transport: asyncio.Transport, *, timeout: float) -> None:
        self._transport = transport
        self._timeout = timeout
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._broken: SMTPServerDisconnected | None = None
        self._loop = asyncio.get_running_loop()
        self._deadline = 0.0
        """When the reply being waited for is late (the loop's time)."""
        self._watchdog: asyncio.TimerHandle | None = None
        transport.set_protocol(self)

    @property
    def open(self) -> bool:
        return self._broken is None and not self._transport.is_closing()

    def close(self) -> None:
        if self._broken is None:
            self._broken = SMTPServerDisconnected("Connection closed")
        self._stop_watchdog()
        if not self._transport.is_closing():
            self._transport.close()

    async def exchange(
        self,
        commands: bytes,
        replies: int = 1,
        meanwhile: Callable[[], None] | None = None,
        *,
        into: list[SMTPResponse] | None = None,
    ) -> list[SMTPResponse]:
        """Write ``commands`` (one, or a pipelined group of ``replies`` commands, each
        ending with CRLF) and read their replies, in order, into ``into`` (a new list by
        default), which is returned. ``meanwhile`` runs after the write, while the server
        answers. A 421 reply closes the session and ends the list early; a lost
        connection or a timeout raises (and closes it), the replies read before it are in
        ``into``."""
        if not self.open:
            raise self._broken or SMTPServerDisconnected("Connection lost")
        self._transport.write(commands)
        if meanwhile is not None:
            meanwhile()
        got: list[SMTPResponse] = [] if into is None else into
        for _ in range(replies):
            reply = await self._read()
            got.append(reply)
            if reply.code == SMTPStatus.domain_unavailable:
                self.close()
                break
        return got

    async def _read(self) -> SMTPResponse:
        if not self._replies:
            if self._broken is not None:
                raise self._broken
            waiter = self._loop.create_future()
            self._waiter = waiter
            # each reply is waited for ``timeout`` at most; one timer per session, moved
            # on only when it fires (``_late``), instead of a timer set and cancelled per
            # reply (four per message, about a twentieth of the outbox's CPU per mail)
            self._deadline = self._loop.time() + self._timeout
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(self._deadline, self._late)
            try:
                await waiter
            except TimeoutError as exc:
                self.close()
                raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
            finally:
                self._waiter = None
            if not self._replies:
                raise self._broken or SMTPServerDisconnected("Connection lost")
        return self._replies.popleft()

    def _late(self) -> None:
        """The session's timer: the reply waited for now is late when its deadline has
        passed; otherwise the timer is set for that deadline (a later reply's)."""
        self._watchdog = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next read sets the timer again
        if self._loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._watchdog = self._loop.call_at(self._deadline, self._late)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        try:
            while (reply := self._take_reply()) is not None:
                self._replies.append(reply)
        except ValueError as exc:
            self._broken = SMTPServerDisconnected(f"Malformed SMTP reply: {exc}")
            self._transport.close()
        self._wake()

    def eof_received(self) -> bool:
        if self._broken is None:
            self._broken = SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._broken is None:
            self._broken = SMTPServerDisconnected("Connection lost")
            self._broken.__cause__ = exc
        self._stop_watchdog()
        self._wake()

    def _take_reply(self) -> SMTPResponse | None:
        """The first whole reply in the buffer, taken out of it; None if there is none
        yet. A reply is lines ``NNN-text``, the last one ``NNN text`` (or ``NNN``)."""
        start = 0
        lines: list[str] = []
        while True:
            end = self._buffer.find(b"\n", start)
            if end == -1:
                if len(self._buffer) - start > LONGEST_LINE:
                    raise ValueError(f"a line longer than {LONGEST_LINE} bytes")
                return None
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            if len(line) > LONGEST_LINE:
                raise ValueError(f"a line longer than {LONGEST_LINE} bytes")
            code = line[:3]
            if not code.isdigit():
                raise ValueError(repr(line[:40].decode("utf-8", "replace")))
            lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                del self._buffer[:start]
                return SMTPResponse(int(code), "\n".join(lines))
