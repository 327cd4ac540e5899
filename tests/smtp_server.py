"""A real SMTP server (aiosmtpd) on 127.0.0.1 in the test's event loop, with knobs.

    async with smtp_server(tls="starttls", ca=ca, auth={"tgops": "pw"}) as server:
        server.port                      # where it listens (kept across stop/start)
        server.messages                  # every accepted message: envelope and parsed mail
        await server.wait_messages(3)    # until 3 were accepted (bounded)
        server.refuse_sender = "550 5.7.1 sender rejected"   # answer every MAIL FROM so
        server.refuse_recipients["x@example.org"] = "550 5.1.1 no such user"
        server.refuse_content["y@example.org"] = "554 5.7.1 rejected"  # at the end of DATA
        server.drop_at = {2}             # close the connection at the 2nd MAIL FROM
        smtp_server(pipelining=True)     # PIPELINING offered; server.reads (record_reads)
        server.hold = asyncio.Event()    # a message is taken, its reply waits until set
        await server.holding.wait()      # (a message is being held)
        await server.stop(); await server.start()   # down (connections cut), up again

``tls``: "none", "starttls" (offered and required before AUTH and MAIL) or "implicit".
Run ``python -m tests.smtp_server PORT [--pipelining] [--reply-delay MS]`` for a sink in
its own process that accepts and discards everything (the e-mail benchmark uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import email
import email.policy
import signal
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

Tls = Literal["none", "starttls", "implicit"]
WAIT = 20.0
"""Longest wait for messages to arrive."""


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: EmailMessage
    session: int
    mail_options: list[str] = field(default_factory=list)


@dataclass
class _Handler:
    server: SmtpServer

    async def handle_EHLO(
        self, smtp: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.server.pipelining:  # before the last line ("250 HELP")
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, smtp: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        srv = self.server
        srv.mail_commands += 1
        if srv.mail_commands in srv.drop_at:
            smtp.transport.close()
            return "421 4.3.0 closing (test)"
        if srv.refuse_sender is not None:
            return srv.refuse_sender
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, smtp: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal = self.server.refuse_recipients.get(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
        srv = self.server
        for rcpt in envelope.rcpt_tos:
            if rcpt in srv.refuse_content:
                return srv.refuse_content[rcpt]
        hold = srv.hold is not None and not srv.hold.is_set()
        if srv.discard:
            srv.count += 1
            return "250 OK"
        raw = bytes(envelope.original_content or envelope.content)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        srv.messages.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=raw,
                message=parsed,
                session=id(session),
                mail_options=list(envelope.mail_options),
            )
        )
        srv.count += 1
        async with srv.changed:
            srv.changed.notify_all()
        if hold and srv.hold is not None:
            # the message is here (a real server may have queued it); the reply waits
            srv.holding.set()
            async with asyncio.timeout(WAIT * 3):
                await srv.hold.wait()
        return "250 2.0.0 accepted"


@dataclass
class SmtpServer:
    tls: Tls = "none"
    context: ssl.SSLContext | None = None
    auth: Mapping[str, str] | None = None
    port: int = 0
    discard: bool = False
    pipelining: bool = False
    """Offer PIPELINING (RFC 2920) in the EHLO reply, as Postfix and Exim do."""
    reads: list[bytes] = field(default_factory=list)
    """What the server read from its connections, one entry per read (``record_reads``)."""
    record_reads: bool = False
    reply_delay: float = 0.0
    """Seconds every reply takes to reach the client, as over a network with that round
    trip (replies are held back, not the server: several in flight wait together)."""
    messages: list[Received] = field(default_factory=list)
    count: int = 0
    mail_commands: int = 0
    connections: int = 0
    max_open: int = 0
    logins: list[str] = field(default_factory=list)
    refuse_sender: str | None = None
    refuse_recipients: dict[str, str] = field(default_factory=dict)
    refuse_content: dict[str, str] = field(default_factory=dict)
    """Recipient -> the reply to the end of a message to it (instead of taking it)."""
    drop_at: set[int] = field(default_factory=set)
    hold: asyncio.Event | None = None
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _server: asyncio.Server | None = None
    _open: set[Any] = field(default_factory=set)
    _all_closed: asyncio.Event = field(default_factory=asyncio.Event)

    def _authenticate(
        self, smtp: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword) and self.auth is not None:
            user, password = data.login.decode(), data.password.decode()
            if self.auth.get(user) == password:
                self.logins.append(user)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def _protocol(self) -> SMTP:
        server = self
        kwargs: dict[str, Any] = {"hostname": "tgops-test-smtp", "data_size_limit": 10_000_000}
        if self.tls == "starttls":
            kwargs |= {"tls_context": self.context, "require_starttls": True}
        if self.auth is not None:
            kwargs |= {
                "authenticator": self._authenticate,
                "auth_required": True,
                "auth_require_tls": self.tls != "none",
            }

        class Tracked(SMTP):  # type: ignore[misc]
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if self not in server._open:  # called again after STARTTLS
                    server.connections += 1
                    server._open.add(self)
                    server.max_open = max(server.max_open, len(server._open))
                if server.reply_delay and isinstance(transport, asyncio.WriteTransport):
                    _delay_writes(transport, server.reply_delay)
                super().connection_made(transport)

            def data_received(self, data: bytes) -> None:
                if server.record_reads:
                    server.reads.append(bytes(data))
                super().data_received(data)

            def connection_lost(self, exc: Exception | None) -> None:
                server._open.discard(self)
                if not server._open:
                    server._all_closed.set()
                super().connection_lost(exc)

        return Tracked(_Handler(self), **kwargs)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            "127.0.0.1",
            self.port,
            ssl=self.context if self.tls == "implicit" else None,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is None:
            return
        self._server.close()
        for protocol in list(self._open):
            if protocol.transport is not None:
                protocol.transport.close()
        await self._server.wait_closed()
        self._server = None
        if self._open:
            self._all_closed.clear()
            async with asyncio.timeout(5):
                await self._all_closed.wait()

    async def wait_messages(self, count: int) -> list[Received]:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: len(self.messages) >= count)
        return self.messages

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address in m.rcpt_tos]


@asynccontextmanager
async def smtp_server(
    *,
    tls: Tls = "none",
    context: ssl.SSLContext | None = None,
    auth: Mapping[str, str] | None = None,
    pipelining: bool = False,
) -> AsyncIterator[SmtpServer]:
    server = SmtpServer(tls=tls, context=context, auth=auth, pipelining=pipelining)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _delay_writes(transport: asyncio.WriteTransport, delay: float) -> None:
    """Make what is written on ``transport`` leave ``delay`` seconds later, in order."""
    loop = asyncio.get_running_loop()
    write, close = transport.write, transport.close
    waiting: collections.deque[tuple[float, bytes | None]] = collections.deque()

    def flush() -> None:
        now = loop.time()
        while waiting and waiting[0][0] <= now:
            data = waiting.popleft()[1]
            if data is None:  # closed after what was written before
                close()
            elif not transport.is_closing():
                write(data)
        if waiting:
            loop.call_at(waiting[0][0], flush)

    def later(data: bytes | None) -> None:
        waiting.append((loop.time() + delay, data))
        if len(waiting) == 1:
            loop.call_at(waiting[0][0], flush)

    transport.write = lambda data: later(bytes(data))  # type: ignore[method-assign]
    transport.close = lambda: later(None)  # type: ignore[method-assign]


async def _sink(port: int, pipelining: bool, reply_delay: float) -> None:
    server = SmtpServer(port=port, discard=True, pipelining=pipelining, reply_delay=reply_delay)
    await server.start()
    print(server.port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(TimeoutError):
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="an SMTP sink on 127.0.0.1 (discards mail)")
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--pipelining", action="store_true", help="offer PIPELINING")
    parser.add_argument(
        "--reply-delay", type=float, default=0.0, help="milliseconds each reply is held back"
    )
    arguments = parser.parse_args()
    asyncio.run(_sink(arguments.port, arguments.pipelining, arguments.reply_delay / 1000))
