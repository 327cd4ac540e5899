"""E-mail over SMTP (aiosmtplib): the outbox channel ``email``.

One connection per batch of due e-mails, up to ``smtp.connections`` batches at once
(plain, STARTTLS or implicit TLS; AUTH when a username is set; every command bounded by
``smtp.timeout``). Each message has a text and an HTML part rendered from
``notify/templates`` (``notify/mime.py`` puts it together), and ``Message-ID``, ``Date``,
``From``, ``To`` headers; Message-ID and Date come from the outbox item, so a message sent
again after a crash is the same message.

Failures: no session (connect, TLS, greeting, login) → every item of the batch is retried
later; the server refusing one message (MAIL, RCPT, DATA) → 4xx retried, 5xx final, and
the connection goes on with the next; the connection lost mid-batch → the message in
flight is retried if its content had not begun to go out, the untried rest is released
for the next connection.

No duplicates: before a message's DATA the outbox records it as ``transmitting``
(``begin``); from then on it is never sent again. The connection lost or a timeout once
the content is under way (the server may have taken the message) makes it "delivery
uncertain"; before that (the server has not answered DATA with 354) the server cannot
have taken it.

With a server that offers PIPELINING (RFC 2920) a message's content and the next
message's MAIL, RCPT and DATA are one write, one exchange per message
(``notify/smtp_session.py`` reads the replies however they arrive).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus
from jinja2 import TemplateError

from core.errors import ConfigError
from core.settings import SmtpSettings
from core.store import OutboxRecord
from notify import mime
from notify.errors import (
    DeliveryError,
    DeliveryUncertainError,
    MarkerNotRecordedError,
    MessageComposeError,
    SmtpConnectionLostError,
    SmtpNotConfiguredError,
    SmtpRefusedError,
    SmtpUnavailableError,
)
from notify.outbox import Begin, Outcome, Report
from notify.render import Renderer
from notify.smtp_session import SmtpSession

log = logging.getLogger(__name__)

_TAKEN = (SMTPStatus.completed, SMTPStatus.will_forward)
"""Replies to RCPT that take the recipient."""
LEASE_FACTOR = 10
"""A claimed batch may take ``LEASE_FACTOR * smtp.timeout`` (then the rest is retried)."""


class EmailChannel:
    name = "email"

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        renderer: Renderer,
        batch_size: int = 100,
        sender_name: str = "tgops",
    ) -> None:
        self.settings = settings
        self.renderer = renderer
        self.batch_size = batch_size
        self.sender_name = sender_name
        self.parallel = settings.connections
        self.lease = max(60.0, LEASE_FACTOR * settings.timeout)
        self._tls: ssl.SSLContext | None = None
        if settings.ca_file is not None and (settings.starttls or settings.use_tls):
            try:
                self._tls = ssl.create_default_context(cafile=str(settings.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    [f"smtp.ca_file: {settings.ca_file} is not a readable PEM file ({exc})"]
                ) from exc
        self._local_hostname: str | None = None
        # ASCII: checked with the settings
        self._mail_from = b"MAIL FROM:" + quote_address(settings.sender).encode("ascii")

    def describe(self, item: OutboxRecord) -> str:
        name = item.payload.get("name")
        to = f"{name} ({item.recipient})" if name else item.recipient
        return f"e-mail “{item.subject}” to {to}"

    # -- composing -----------------------------------------------------------------------

    def compose(self, item: OutboxRecord) -> bytes:
        """The message of an outbox item, as sent."""
        payload = item.payload
        try:
            rendered = self.renderer.email(
                str(payload["template"]),
                payload.get("vars", {}),
                str(payload.get("language") or "en"),
            )
            name = payload.get("name")
            return mime.compose(
                key=item.key,
                sender=self.settings.sender,
                sender_name=self.sender_name,
                recipient=item.recipient,
                name=None if name is None else str(name),
                subject=item.subject,
                date=item.created_at,
                text=rendered.text,
                html=rendered.html,
                thread=None if payload.get("thread") is None else str(payload["thread"]),
            )
        except (KeyError, TemplateError, TypeError, ValueError) as exc:
            raise MessageComposeError(self.describe(item), str(exc)) from exc

    # -- sending -------------------------------------------------------------------------

    async def _hostname(self) -> str:
        """The EHLO name, looked up once (``socket.getfqdn`` may ask DNS: off the loop)."""
        if self._local_hostname is None:
            try:
                async with asyncio.timeout(self.settings.timeout):
                    self._local_hostname = await asyncio.to_thread(socket.getfqdn)
            except TimeoutError:
                self._local_hostname = socket.gethostname()
        return self._local_hostname

    def _client(self, hostname: str, local_hostname: str) -> aiosmtplib.SMTP:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.username is not None:
            kwargs["username"] = s.username
            kwargs["password"] = "" if s.password is None else s.password.get_secret_value()
        return aiosmtplib.SMTP(
            hostname=hostname,
            port=s.port,
            use_tls=s.use_tls,
            start_tls=s.starttls,
            timeout=s.timeout,
            tls_context=self._tls,
            local_hostname=local_hostname,
            **kwargs,
        )

    async def deliver(self, items: Sequence[OutboxRecord], report: Report, begin: Begin) -> None:
        s = self.settings
        if s.host is None:
            error = SmtpNotConfiguredError()
            for item in items:
                if not report(Outcome(item=item, error=error)):
                    return
            return
        client = self._client(s.host, await self._hostname())
        try:
            # connect: TCP, greeting, EHLO, STARTTLS, AUTH, EHLO; each bounded by smtp.timeout
            async with asyncio.timeout(s.timeout * 7):
                await client.connect()
                await self._greet(client)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            unavailable = SmtpUnavailableError(s.host, s.port, _cause(exc))
            log.warning("%s", unavailable)
            for item in items:
                if not report(Outcome(item=item, error=unavailable)):
                    return
            return
        transport = client.transport
        assert isinstance(transport, asyncio.Transport)
        session = SmtpSession(transport, timeout=s.timeout)
        try:
            await self._send_all(session, client.supports_extension, items, report, begin)
        finally:
            await self._quit(session)
            client.close()  # aiosmtplib's own state (its reader no longer sees the connection)

    async def _greet(self, client: aiosmtplib.SMTP) -> None:
        """EHLO (HELO when the server does not know EHLO) unless the connection has done
        it (STARTTLS, AUTH): the commands below are written without aiosmtplib's checks."""
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not client.is_connected:
                    raise
                await client.helo()

    async def _send_all(
        self,
        session: SmtpSession,
        supports: Callable[[str], bool],
        items: Sequence[OutboxRecord],
        report: Report,
        begin: Begin,
    ) -> None:
        """Send the batch in order. The next message is composed while the server answers
        the current one (SMTP waits for each reply), so composing stays off the path.
        With PIPELINING, a message's content goes in one write with the next message's
        envelope (RFC 2920 lets the content open a group): one exchange per message."""
        size, pipelining = supports("size"), supports("pipelining")
        prepared: dict[int, _Wire | DeliveryError] = {}

        def prepare(index: int) -> _Wire | DeliveryError | None:
            if index >= len(items):
                return None
            if index not in prepared:
                prepared[index] = self._prepare(items[index])
            return prepared[index]

        ahead: _Envelope | None = None  # the next message's, to go behind the content
        for index, item in enumerate(items):
            current = prepare(index)
            prepared.pop(index, None)
            envelope, ahead = ahead, None
            if isinstance(current, DeliveryError):
                outcome, go_on = Outcome(item=item, error=current), True
            else:
                assert current is not None
                if envelope is None:
                    envelope = _Envelope(begin(item), pipelined=pipelining)
                behind: tuple[_Envelope, _Wire] | None = None
                nxt = prepare(index + 1) if pipelining else None
                if isinstance(nxt, _Wire):
                    ahead = _Envelope(begin(items[index + 1]), pipelined=True)
                    behind = (ahead, nxt)

                def meanwhile(index: int = index) -> None:
                    prepare(index + 1)
                    prepare(index + 2)

                outcome, go_on = await self._send_one(
                    session, item, current, envelope, size=size, behind=behind, meanwhile=meanwhile
                )
            reported = report(outcome)
            if not reported or not go_on or not session.open:
                if ahead is not None:
                    await self._give_up(
                        session, items[index + 1], ahead, report, stopping=not reported
                    )
                return  # the rest is released (and goes over a new connection)

    async def _give_up(
        self,
        session: SmtpSession,
        item: OutboxRecord,
        envelope: _Envelope,
        report: Report,
        *,
        stopping: bool,
    ) -> None:
        """The batch ends before ``item``, whose marker was requested and whose envelope
        may have gone behind the previous content: it is released (not tried), or, when
        its envelope went and the connection broke, the connection counts as lost for it.
        A server that got its envelope may wait for its content: hang up, not QUIT."""
        s = self.settings
        assert s.host is not None
        if envelope.written:
            session.close()
        await _drop(envelope.marked)
        if envelope.written and not stopping:
            cause = "the connection ended before this message's content"
            report(Outcome(item=item, error=SmtpConnectionLostError(s.host, s.port, cause)))
        else:
            report(Outcome(item=item, released=True))

    def _prepare(self, item: OutboxRecord) -> _Wire | DeliveryError:
        try:
            return _Wire(item.recipient, self.compose(item))
        except DeliveryError as exc:
            return exc

    async def _send_one(
        self,
        session: SmtpSession,
        item: OutboxRecord,
        wire: _Wire,
        envelope: _Envelope,
        *,
        size: bool,
        behind: tuple[_Envelope, _Wire] | None,
        meanwhile: Callable[[], None],
    ) -> tuple[Outcome, bool]:
        """Send one message; the outcome, and whether the connection is still usable.
        The commands are written as aiosmtplib's ``mail``, ``rcpt`` and ``data`` write
        them, with what they compute per message done once (addresses quoted, the
        message's lines ended and dot-stuffed when it was composed). With PIPELINING,
        MAIL, RCPT and DATA go as one group (or went already, behind the previous
        message's content: ``envelope.replies`` holds what came back), and ``behind``,
        the next message's envelope, goes in one write with this one's content.
        ``meanwhile`` runs while the server answers. DATA is written only once the
        message's marker is stored (a group holds it when the marker is stored already,
        as it mostly is: markers are written ahead); once the content has begun, a broken
        connection leaves the delivery uncertain."""
        s = self.settings
        assert s.host is not None
        got: list[SMTPResponse] = []
        try:
            await self._envelope(session, item, wire, envelope, size=size, meanwhile=meanwhile)
            data = wire.data
            count = 1
            if behind is not None:
                group, replies = behind[0].commands(self._mail_from, behind[1], size=size)
                data, count = data + group, count + replies
            await session.exchange(data, count, meanwhile, into=got)
        except MarkerNotRecordedError as exc:
            await self._reset(session)
            return Outcome(item=item, error=exc), False
        except aiosmtplib.SMTPRecipientRefused as exc:
            await self._reset(session)
            error = SmtpRefusedError("recipient", exc.code, exc.message)
            return Outcome(item=item, error=error), session.open
        except aiosmtplib.SMTPSenderRefused as exc:
            await self._reset(session)
            error = SmtpRefusedError("sender", exc.code, exc.message)
            return Outcome(item=item, error=error), session.open
        except aiosmtplib.SMTPResponseException as exc:
            # a reply to DATA: the server did not take the message (4xx: try again)
            await self._reset(session)
            error = SmtpRefusedError("message", exc.code, exc.message)
            return Outcome(item=item, error=error), session.open
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            session.close()
            if envelope.in_data and not got:
                uncertain = DeliveryUncertainError(
                    f"SMTP server {s.host}:{s.port}: {_cause(exc)} during DATA"
                )
                return Outcome(item=item, uncertain=True, error=uncertain), False
            if not envelope.in_data:
                lost = SmtpConnectionLostError(s.host, s.port, _cause(exc))
                return Outcome(item=item, error=lost), False
            # the reply to this content was read; the error came with the next message's
            # envelope behind it, which the batch settles (``_give_up``): this one's
            # outcome is its reply, below
        finally:
            await _drop(envelope.marked)
        if behind is not None:
            behind[0].replies.extend(got[1:])
        reply = got[0]
        if reply.code != SMTPStatus.completed:
            # refused at its end: the transaction is over (no RSET: the next one's
            # envelope may be under way behind it); 4xx is tried again
            error = SmtpRefusedError("message", reply.code, reply.message)
            return Outcome(item=item, error=error), session.open
        return Outcome(item=item), session.open

    async def _envelope(
        self,
        session: SmtpSession,
        item: OutboxRecord,
        wire: _Wire,
        envelope: _Envelope,
        *,
        size: bool,
        meanwhile: Callable[[], None],
    ) -> None:
        """MAIL, RCPT and DATA, until the server waits for the content (or raises)."""
        s = self.settings
        replies = envelope.replies
        if not envelope.written:
            group, count = envelope.commands(self._mail_from, wire, size=size)
            await session.exchange(group, count, meanwhile, into=replies)
        if (
            len(replies) == 3
            and replies[2].code == SMTPStatus.start_input
            and (replies[0].code != SMTPStatus.completed or replies[1].code not in _TAKEN)
        ):
            # DATA taken without a sender or recipient (RFC 2920 says it must not be):
            # the server waits for content it must not get, so hang up
            session.close()
        # replies are checked in order; one missing follows a 421 or a lost connection
        if not replies:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        if replies[0].code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(replies[0].code, replies[0].message, s.sender)
        if len(replies) < 2:
            await session.exchange(wire.rcpt, into=replies)
        if replies[1].code not in _TAKEN:
            raise aiosmtplib.SMTPRecipientRefused(
                replies[1].code, replies[1].message, item.recipient
            )
        if len(replies) < 3:
            await envelope.marked
            await session.exchange(b"DATA\r\n", into=replies)
        if replies[2].code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(replies[2].code, replies[2].message)
        envelope.in_data = True

    async def _reset(self, session: SmtpSession) -> None:
        """RSET after a refusal, so the connection goes on with the next message."""
        if not session.open:
            return
        try:
            (reply,) = await session.exchange(b"RSET\r\n")
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            session.close()
            return
        if reply.code != SMTPStatus.completed:
            session.close()

    async def _quit(self, session: SmtpSession) -> None:
        if not session.open:
            return
        try:
            await session.exchange(b"QUIT\r\n")  # bounded by smtp.timeout
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            session.close()


class _Envelope:
    """A message's MAIL, RCPT and DATA: the request for its ``transmitting`` marker, the
    replies read so far, and whether its content has begun (``in_data``)."""

    __slots__ = ("in_data", "marked", "pipelined", "replies", "written")

    def __init__(self, marker: Awaitable[None], *, pipelined: bool) -> None:
        self.marked = asyncio.ensure_future(marker)
        self.pipelined = pipelined
        self.replies: list[SMTPResponse] = []
        self.written = False
        self.in_data = False

    def commands(self, mail_from: bytes, wire: _Wire, *, size: bool) -> tuple[bytes, int]:
        """What to write and how many replies it brings: MAIL alone, or (pipelined) MAIL,
        RCPT and, with the marker stored, DATA."""
        self.written = True
        mail = mail_from + (b" SIZE=%d\r\n" % wire.size if size else b"\r\n")
        if not self.pipelined:
            return mail, 1
        if _recorded(self.marked):
            return mail + wire.rcpt + b"DATA\r\n", 3
        return mail + wire.rcpt, 2


class _Wire:
    """A message as it goes over the connection: its RCPT command and its DATA content
    (CRLF line ends, lines starting with a dot doubled, the end mark ``.`` appended)."""

    __slots__ = ("data", "rcpt", "size")

    def __init__(self, recipient: str, message: bytes) -> None:
        # ``mime.compose`` has checked the address (plain ASCII) and ended every line with
        # CRLF, the last one too; a message never starts with a dot (its first header)
        self.rcpt = b"RCPT TO:<" + recipient.encode("ascii") + b">\r\n"
        self.size = len(message)
        self.data = message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def _drop(task: asyncio.Future[None]) -> None:
    """Stop a marker request no longer waited for and wait until it has ended (its
    statement is not left running on the store when the store closes); its failure is not
    news then."""
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


def _recorded(marked: asyncio.Future[None]) -> bool:
    """The marker is durable already (its request ended without an error)."""
    return marked.done() and not marked.cancelled() and marked.exception() is None


def _cause(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message.strip()}"
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
