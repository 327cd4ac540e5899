"""Phone calls and SMS through Twilio: the outbox channels ``call`` and ``sms``.

The twilio library's async client (``AsyncTwilioHttpClient``, aiohttp) talks to the REST
API; its base URL is the ``base_url`` of the library's ``api`` domain, set from
``twilio.api_url`` so that a proxy or a test fake can stand in for api.twilio.com. The
library is given its settings explicitly and never reads ``TWILIO_*`` variables.

A call carries its TwiML inline: it says the message and asks to press 1
(``<Gather numDigits="1" action="{http.public_url}/twilio/voice/gather">``); Twilio reports
the call's progress to ``{http.public_url}/twilio/status``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from core.settings import TwilioSettings
from core.store import OutboxRecord
from notify.calls import CallRegistry
from notify.errors import (
    DeliveryError,
    MessageComposeError,
    TwilioApiError,
    TwilioNotConfiguredError,
    TwilioUnreachableError,
)
from notify.i18n import translator
from notify.outbox import Begin, Outcome, Report
from notify.render import Renderer

log = logging.getLogger(__name__)

GATHER_PATH = "/twilio/voice/gather"
STATUS_PATH = "/twilio/status"
GATHER_SECONDS = 10
"""How long a call waits for a key after the message was said, per prompt."""
CALL_EVENTS = ["initiated", "ringing", "answered", "completed"]
_NO_ENVIRONMENT = {"TGOPS_TWILIO": "settings are passed explicitly"}
"""A non-empty mapping: the twilio client reads ``os.environ`` when given an empty one."""


VOICES = {"de": "de-DE"}
"""Twilio's ``<Say language>`` per language (English: Twilio's default voice, as before)."""


def _say(parent: Any, text: str, language: str) -> None:
    voice = VOICES.get(language)
    if voice is None:
        parent.say(text)
    else:
        parent.say(text, language=voice)


def prompt_twiml(speech: str, action: str, *, prefix: str = "", language: str = "en") -> str:
    """Say ``speech`` and wait for one key (twice), posting it to ``action``."""
    t = translator(language)
    response = VoiceResponse()
    for attempt in range(2):
        gather = response.gather(num_digits=1, action=action, method="POST", timeout=GATHER_SECONDS)
        _say(gather, f"{prefix}{speech}" if attempt == 0 else speech, language)
    _say(response, t._("No key was pressed. Goodbye."), language)
    response.hangup()
    return str(response)


def say_twiml(text: str, language: str = "en") -> str:
    response = VoiceResponse()
    _say(response, text, language)
    response.hangup()
    return str(response)


class _HttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """twilio's aiohttp client, sending the credentials as an ``Authorization`` header:
    the parent wraps them in ``aiohttp.BasicAuth``, deprecated since aiohttp 3.14
    (DeprecationWarning on every request). The header is never logged by the parent."""

    async def request(  # noqa: PLR0917  (the parent's signature, called positionally)
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (the parent's parameter)
        allow_redirects: bool = False,
    ) -> Any:
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            headers = {**(headers or {}), "Authorization": f"Basic {token}"}
        return await super().request(
            method, url, params, data, headers, None, timeout, allow_redirects
        )


class Twilio:
    """``async with Twilio(settings)``: calls and SMS over Twilio's REST API."""

    def __init__(self, settings: TwilioSettings) -> None:
        self.settings = settings
        self._http: _HttpClient | None = None
        self._client: Any = None

    def missing(self) -> list[str]:
        s = self.settings
        return [
            name
            for name, value in (
                ("account_sid", s.account_sid),
                ("auth_token", s.auth_token),
                ("from_number", s.from_number),
            )
            if not value
        ]

    async def __aenter__(self) -> Self:
        s = self.settings
        if self.missing():
            return self
        assert s.auth_token is not None
        self._http = _HttpClient(timeout=s.timeout)
        self._client = Client(
            username=s.account_sid,
            password=s.auth_token.get_secret_value(),
            account_sid=s.account_sid,
            http_client=self._http,
            environment=_NO_ENVIRONMENT,
        )
        self._client.api.base_url = s.api_url.rstrip("/")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await asyncio.shield(self._http.close())
            self._http = None
            self._client = None

    def _account(self) -> Any:
        missing = self.missing()
        if missing or self._client is None:
            raise TwilioNotConfiguredError(missing or ["account_sid"])
        return self._client.api.v2010.accounts(self.settings.account_sid)

    async def _request(self, what: str, create: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self.settings.timeout + 1):
                return await create(**kwargs)
        except TwilioRestException as exc:
            raise TwilioApiError(int(exc.status), exc.code, str(exc.msg)) from exc
        except TwilioServiceException as exc:
            raise TwilioApiError(int(exc.status), exc.code, str(exc.detail or exc.title)) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            cause = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "")
            raise TwilioUnreachableError(
                self.settings.api_url, f"{what}: {cause or type(exc).__name__}"
            ) from exc

    async def call(
        self, *, to: str, twiml: str, status_callback: str, ring_seconds: int
    ) -> tuple[str, str]:
        """Place a call; returns its SID and status."""
        account = self._account()
        call = await self._request(
            "call",
            account.calls.create_async,
            to=to,
            from_=self.settings.from_number,
            twiml=twiml,
            status_callback=status_callback,
            status_callback_event=CALL_EVENTS,
            status_callback_method="POST",
            timeout=ring_seconds,
        )
        return str(call.sid), str(call.status or "queued")

    async def sms(self, *, to: str, body: str, status_callback: str) -> str:
        """Send an SMS; returns its SID."""
        account = self._account()
        message = await self._request(
            "SMS",
            account.messages.create_async,
            to=to,
            from_=self.settings.from_number,
            body=body,
            status_callback=status_callback,
        )
        return str(message.sid)


class CallChannel:
    """Outbox channel ``call``: one call per item, its TwiML rendered from the payload."""

    name = "call"
    batch_size = 10
    parallel = 1

    def __init__(
        self,
        twilio: Twilio,
        *,
        renderer: Renderer,
        registry: CallRegistry,
        public_url: str,
        ring_seconds: int,
    ) -> None:
        self.twilio = twilio
        self.renderer = renderer
        self.registry = registry
        self.base = public_url.rstrip("/")
        self.ring_seconds = ring_seconds
        self.lease = max(60.0, 4 * twilio.settings.timeout * self.batch_size)

    def describe(self, item: OutboxRecord) -> str:
        name = item.payload.get("name")
        return f"call to {name} ({item.recipient})" if name else f"call to {item.recipient}"

    def speech(self, item: OutboxRecord) -> str:
        try:
            return self.renderer.text(
                str(item.payload["template"]),
                item.payload.get("vars", {}),
                str(item.payload.get("language") or "en"),
            ).strip()
        except Exception as exc:
            raise MessageComposeError(self.describe(item), f"{type(exc).__name__}: {exc}") from exc

    async def deliver(self, items: Sequence[OutboxRecord], report: Report, begin: Begin) -> None:
        for item in items:
            try:
                twiml = prompt_twiml(
                    self.speech(item),
                    self.base + GATHER_PATH,
                    language=str(item.payload.get("language") or "en"),
                )
                sid, status = await self.twilio.call(
                    to=item.recipient,
                    twiml=twiml,
                    status_callback=self.base + STATUS_PATH,
                    ring_seconds=self.ring_seconds,
                )
            except DeliveryError as exc:
                if not report(Outcome(item=item, error=exc)):
                    return
                continue
            await self.registry.placed(item, sid, status)
            log.info("%s placed: %s", self.describe(item), sid)
            if not report(Outcome(item=item, detail=f"call {sid}")):
                return


class SmsChannel:
    """Outbox channel ``sms``: one SMS per item, its text rendered from the payload."""

    name = "sms"
    batch_size = 10
    parallel = 1

    def __init__(self, twilio: Twilio, *, renderer: Renderer, public_url: str) -> None:
        self.twilio = twilio
        self.renderer = renderer
        self.base = public_url.rstrip("/")
        self.lease = max(60.0, 4 * twilio.settings.timeout * self.batch_size)

    def describe(self, item: OutboxRecord) -> str:
        name = item.payload.get("name")
        return f"SMS to {name} ({item.recipient})" if name else f"SMS to {item.recipient}"

    async def deliver(self, items: Sequence[OutboxRecord], report: Report, begin: Begin) -> None:
        for item in items:
            try:
                try:
                    body = self.renderer.text(
                        str(item.payload["template"]),
                        item.payload.get("vars", {}),
                        str(item.payload.get("language") or "en"),
                    ).strip()
                except Exception as exc:
                    raise MessageComposeError(
                        self.describe(item), f"{type(exc).__name__}: {exc}"
                    ) from exc
                sid = await self.twilio.sms(
                    to=item.recipient, body=body, status_callback=self.base + STATUS_PATH
                )
            except DeliveryError as exc:
                if not report(Outcome(item=item, error=exc)):
                    return
                continue
            if not report(Outcome(item=item, detail=f"message {sid}")):
                return
