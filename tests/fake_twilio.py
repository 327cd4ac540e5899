"""A fake of Twilio's REST API on 127.0.0.1 (aiohttp), and Twilio's side of the webhooks.

    async with fake_twilio() as twilio:
        twilio.url                       # set as twilio.api_url
        twilio.calls / twilio.sms        # every accepted call / SMS, in order
        twilio.fail_next(1, status=500)  # the next request answers 500 (or 400, 429, ...)
        await twilio.wait_calls(2)       # until 2 calls were placed (bounded)
        await twilio.press(call, "1", port)     # "the callee pressed 1": a signed webhook
        await twilio.report(call, "no-answer", port)   # a signed status callback

Webhooks are signed with twilio's ``RequestValidator`` over the URL the call named (the
service's public URL) and sent to the service on 127.0.0.1, like a reverse proxy would.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "twilio-auth-token-for-tests"
FROM_NUMBER = "+15005550006"
WAIT = 20.0
"""Longest wait for calls or SMS to arrive."""


@dataclass
class FakeCall:
    sid: str
    to: str
    from_: str
    twiml: str
    status_callback: str
    events: list[str]
    params: dict[str, str]

    def gathers(self) -> list[ElementTree.Element]:
        twiml = ElementTree.fromstring(self.twiml)  # noqa: S314  (TwiML of the service under test)
        return list(twiml.iter("Gather"))

    @property
    def action(self) -> str:
        return self.gathers()[0].attrib["action"]

    @property
    def speech(self) -> str:
        say = self.gathers()[0].find("Say")
        return "" if say is None or say.text is None else say.text


@dataclass
class FakeSms:
    sid: str
    to: str
    from_: str
    body: str
    status_callback: str


@dataclass
class _Failure:
    count: int
    status: int
    code: int | None
    message: str


@dataclass
class FakeTwilio:
    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    url: str = ""
    public_url: str = ""
    """The service's public URL: webhooks to it go to 127.0.0.1 with this prefix removed,
    as a reverse proxy in front of the service would do."""
    calls: list[FakeCall] = field(default_factory=list)
    sms: list[FakeSms] = field(default_factory=list)
    requests: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _failures: list[_Failure] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fail_next(
        self, count: int = 1, *, status: int = 500, code: int | None = None, message: str = ""
    ) -> None:
        self._failures.append(
            _Failure(count=count, status=status, code=code, message=message or f"HTTP {status}")
        )

    # -- REST API --------------------------------------------------------------------------

    def _problem(self, request: web.Request) -> web.Response | None:
        self.requests += 1
        auth = aiohttp.BasicAuth.decode(request.headers.get("Authorization", ""))
        if (auth.login, auth.password) != (self.account_sid, self.auth_token):
            return web.json_response(
                {"code": 20003, "message": "Authenticate", "status": 401}, status=401
            )
        if request.match_info["account"] != self.account_sid:
            return web.json_response(
                {"code": 20404, "message": "not found", "status": 404}, status=404
            )
        for failure in self._failures:
            if failure.count > 0:
                failure.count -= 1
                self.rejected.append((failure.status, request.path))
                body: dict[str, Any] = {"message": failure.message, "status": failure.status}
                if failure.code is not None:
                    body["code"] = failure.code
                return web.json_response(body, status=failure.status)
        return None

    def _bad_number(self, request: web.Request, form: dict[str, str]) -> web.Response | None:
        if re.fullmatch(r"\+\d{6,15}", form.get("To", "")):
            return None
        self.rejected.append((400, request.path))
        return web.json_response(
            {
                "code": 21211,
                "message": f"Invalid 'To' Phone Number: {form.get('To', '')}",
                "status": 400,
            },
            status=400,
        )

    async def _calls(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        problem = self._problem(request)
        if problem is not None:
            return problem
        bad = self._bad_number(request, form)
        if bad is not None:
            return bad
        sid = f"CA{next(self._ids):032d}"
        request_params = await request.post()
        call = FakeCall(
            sid=sid,
            to=form["To"],
            from_=form.get("From", ""),
            twiml=form.get("Twiml", ""),
            status_callback=form.get("StatusCallback", ""),
            events=[str(v) for v in request_params.getall("StatusCallbackEvent", [])],
            params=form,
        )
        self.calls.append(call)
        async with self.changed:
            self.changed.notify_all()
        return web.json_response(
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": call.to,
                "from": call.from_,
                "status": "queued",
            },
            status=201,
        )

    async def _messages(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        problem = self._problem(request)
        if problem is not None:
            return problem
        bad = self._bad_number(request, form)
        if bad is not None:
            return bad
        sid = f"SM{next(self._ids):032d}"
        self.sms.append(
            FakeSms(
                sid=sid,
                to=form.get("To", ""),
                from_=form.get("From", ""),
                body=form.get("Body", ""),
                status_callback=form.get("StatusCallback", ""),
            )
        )
        async with self.changed:
            self.changed.notify_all()
        return web.json_response(
            {"sid": sid, "account_sid": self.account_sid, "status": "queued"}, status=201
        )

    async def wait_calls(self, count: int) -> list[FakeCall]:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: len(self.calls) >= count)
        return self.calls

    async def wait_sms(self, count: int) -> list[FakeSms]:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: len(self.sms) >= count)
        return self.sms

    # -- webhooks (Twilio calling the service) ---------------------------------------------

    async def webhook(
        self,
        url: str,
        params: dict[str, str],
        port: int,
        *,
        signature: str | None = None,
    ) -> tuple[int, str]:
        """POST ``params`` to ``url`` (rewritten to 127.0.0.1:port), signed for ``url``."""
        if signature is None:
            signature = RequestValidator(self.auth_token).compute_signature(url, params)
        assert url.startswith(self.public_url), f"{url} is not under {self.public_url}"
        local = f"http://127.0.0.1:{port}/" + url.removeprefix(self.public_url).lstrip("/")
        headers = {"X-Twilio-Signature": signature} if signature else {}
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(local, data=params, headers=headers) as response,
        ):
            return response.status, await response.text()

    async def press(
        self, call: FakeCall, digits: str, port: int, *, signature: str | None = None
    ) -> tuple[int, str]:
        params = {
            "AccountSid": self.account_sid,
            "CallSid": call.sid,
            "From": call.from_,
            "To": call.to,
            "Digits": digits,
            "CallStatus": "in-progress",
        }
        return await self.webhook(call.action, params, port, signature=signature)

    async def report(self, call: FakeCall, status: str, port: int) -> tuple[int, str]:
        params = {
            "AccountSid": self.account_sid,
            "CallSid": call.sid,
            "From": call.from_,
            "To": call.to,
            "CallStatus": status,
        }
        return await self.webhook(call.status_callback, params, port)


@asynccontextmanager
async def fake_twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio()
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account}/Calls.json", fake._calls)
    app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", fake._messages)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    fake.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()
