"""A fake of Slack on 127.0.0.1: its Web API, response URLs and Socket Mode, and a user.

``FakeSlack`` records every call (``chat.postMessage``, ``chat.update``, ``views.open``,
``views.publish``, ``chat.postEphemeral``, ``auth.test``, posts to response URLs, …) and lets
a test await the Nth call of a method, bounded in time. ``fail_next`` makes the next calls
of a method (optionally only those whose body matches) answer an HTTP error (``429`` with
``Retry-After``, ``500``, a gateway's ``502`` HTML page). Socket Mode:
``apps.connections.open`` hands out a WebSocket on the same server; ``send_envelope``
pushes a request over it and ``wait_ack`` returns the app's acknowledgement.

``SlackUser`` sends what Slack sends to the app's request URL: slash commands, block
actions, view submissions and events, signed with the signing secret (v0 signatures).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from aiohttp import web

WAIT = 20.0


@dataclass
class Call:
    method: str
    body: dict[str, Any]
    headers: dict[str, str]
    status: int = 200
    path: str = ""
    answer: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The message's text and every text inside its blocks, as a user reads them."""
        parts = [str(self.body.get("text") or "")]

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                if isinstance(value.get("text"), str):
                    parts.append(value["text"])
                for key, item in value.items():
                    if key != "text" or not isinstance(item, str):
                        walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        walk(self.body.get("blocks") or self.body.get("view", {}).get("blocks") or [])
        return "\n".join(parts)


@dataclass
class _Failure:
    method: str
    status: int
    retry_after: int | None
    count: int
    where: Callable[[dict[str, Any]], bool] | None = None
    html: bool = False


@dataclass
class FakeSlack:
    base: str = ""
    calls: list[Call] = field(default_factory=list)
    failures: list[_Failure] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def api_url(self) -> str:
        return f"{self.base}/api/"

    def response_url(self, name: str = "") -> str:
        return f"{self.base}/respond/{name or uuid.uuid4().hex}"

    def fail_next(self, method: str, status: int, *, retry_after: int | None = None,
                  count: int = 1, where: Callable[[dict[str, Any]], bool] | None = None,
                  html: bool = False) -> None:  # fmt: skip
        """The next ``count`` calls of ``method`` (whose body matches ``where``) answer
        ``status``: Slack's JSON error, or with ``html`` a gateway's HTML page."""
        self.failures.append(_Failure(method, status, retry_after, count, where, html))

    def of(self, method: str) -> list[Call]:
        """Answered calls (status 200) of one method, in order."""
        return [c for c in self.calls if c.method == method and c.status == 200]

    async def wait_for(
        self,
        method: str,
        count: int = 1,
        *,
        where: Callable[[Call], bool] | None = None,
        within: float = WAIT,
    ) -> list[Call]:
        """Wait until ``count`` answered calls of ``method`` (matching ``where``) arrived."""

        def matching() -> list[Call]:
            return [c for c in self.of(method) if where is None or where(c)]

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(matching()) >= count)
        return matching()

    async def _record(self, call: Call) -> None:
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    def _failure(self, method: str, body: dict[str, Any]) -> _Failure | None:
        for rule in self.failures:
            if (
                rule.method == method
                and rule.count > 0
                and (rule.where is None or rule.where(body))
            ):
                rule.count -= 1
                return rule
        return None

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        raw = await request.text()
        if request.content_type == "application/json":
            data = json.loads(raw or "{}")
            return data if isinstance(data, dict) else {}
        return dict(parse_qsl(raw))

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        body = await self._body(request)
        headers = dict(request.headers)
        failure = self._failure(method, body)
        if failure is not None:
            await self._record(Call(method, body, headers, failure.status))
            extra = {"Retry-After": str(failure.retry_after)} if failure.retry_after else {}
            if failure.html:
                return web.Response(
                    status=failure.status,
                    text=f"<html><body><h1>{failure.status}</h1></body></html>",
                    content_type="text/html",
                    headers=extra,
                )
            return web.json_response(
                {"ok": False, "error": "ratelimited" if failure.status == 429 else "fatal_error"},
                status=failure.status,
                headers=extra,
            )
        if headers.get("Authorization", "") not in {"Bearer xoxb-test-token", "Bearer xapp-test"}:
            await self._record(Call(method, body, headers, 200))
            return web.json_response({"ok": False, "error": "invalid_auth"})
        answer: dict[str, Any] = {"ok": True}
        if method in {"chat.postMessage", "chat.update"}:
            ts = body.get("ts") or f"{1_700_000_000 + next(self._ts)}.000100"
            answer.update(channel=body.get("channel"), ts=ts)
        elif method == "chat.postEphemeral":
            answer["message_ts"] = f"{1_700_000_000 + next(self._ts)}.000200"
        elif method in {"views.open", "views.publish"}:
            answer["view"] = {"id": f"V{next(self._ts)}", **(body.get("view") or {})}
        elif method == "auth.test":
            answer.update(user_id="UBOT", team="fake", team_id="T1", bot_id="B1")
        elif method == "apps.connections.open":
            answer["url"] = self.base.replace("http://", "ws://") + "/socket"
        await self._record(Call(method, body, headers, 200, answer=answer))
        return web.json_response(answer)

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        failure = self._failure("response_url", body)
        status = failure.status if failure is not None else 200
        await self._record(
            Call("response_url", body, dict(request.headers), status, path=request.path)
        )
        if failure is not None:
            extra = {"Retry-After": str(failure.retry_after)} if failure.retry_after else {}
            return web.Response(status=status, text="expired_url", headers=extra)
        return web.Response(text="ok")

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        async with self._changed:
            self._changed.notify_all()
        await ws.send_json({"type": "hello", "num_connections": 1})
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                async with self._changed:
                    self.acks.append(json.loads(message.data))
                    self._changed.notify_all()
        return ws

    async def send_envelope(self, kind: str, payload: dict[str, Any]) -> str:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: bool(self.sockets))
        envelope_id = uuid.uuid4().hex
        await self.sockets[-1].send_json(
            {
                "envelope_id": envelope_id,
                "type": kind,
                "payload": payload,
                "accepts_response_payload": kind != "events_api",
            }
        )
        return envelope_id

    async def wait_ack(self, envelope_id: str) -> dict[str, Any]:
        def found() -> list[dict[str, Any]]:
            return [a for a in self.acks if a.get("envelope_id") == envelope_id]

        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: bool(found()))
        return found()[0]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_post("/respond/{name}", self._respond)
        app.router.add_get("/socket", self._socket)
        return app


@asynccontextmanager
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    runner = web.AppRunner(fake.app(), handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    fake.base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield fake
    finally:
        for ws in fake.sockets:
            await ws.close()
        await runner.cleanup()


# -- what Slack sends to the app -----------------------------------------------------------


def signature(secret: str, timestamp: str, body: str) -> str:
    base = f"v0:{timestamp}:{body}".encode()
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


@dataclass
class Answer:
    status: int
    text: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.text) if self.text else None


@dataclass
class SlackUser:
    """Posts signed requests to the app's ``/slack/events`` as a given Slack user."""

    url: str
    secret: str
    session: aiohttp.ClientSession
    fake: FakeSlack
    user: str = "U0VIEWER"
    channel: str = "CCMD"

    def as_user(self, user: str) -> SlackUser:
        return SlackUser(self.url, self.secret, self.session, self.fake, user, self.channel)

    async def post(
        self,
        body: str,
        content_type: str,
        *,
        timestamp: str | None = None,
        sign_with: str | None = None,
    ) -> Answer:
        ts = timestamp or str(int(time.time()))
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": signature(sign_with or self.secret, ts, body),
        }
        started = time.perf_counter()
        async with self.session.post(self.url, data=body.encode(), headers=headers) as response:
            text = await response.text()
        return Answer(response.status, text, time.perf_counter() - started)

    def command_body(self, text: str, response_url: str) -> dict[str, str]:
        return {
            "token": "legacy",
            "team_id": "T1",
            "team_domain": "fake",
            "channel_id": self.channel,
            "channel_name": "ops-commands",
            "user_id": self.user,
            "user_name": self.user.lower(),
            "command": "/tg",
            "text": text,
            "api_app_id": "A1",
            "response_url": response_url,
            "trigger_id": f"trigger.{uuid.uuid4().hex[:8]}",
        }

    async def slash(self, text: str, *, response_url: str | None = None, **kwargs: Any) -> Answer:
        url = response_url or self.fake.response_url()
        form = urlencode(self.command_body(text, url))
        return await self.post(form, "application/x-www-form-urlencoded", **kwargs)

    async def command(self, text: str) -> Call:
        """`/tg TEXT` and the reply posted to its response URL."""
        url = self.fake.response_url()
        answer = await self.slash(text, response_url=url)
        assert answer.status == 200, answer.text
        path = urlsplit(url).path
        calls = await self.fake.wait_for("response_url", where=lambda c: c.path == path)
        return calls[-1]

    async def interaction(self, payload: dict[str, Any]) -> Answer:
        form = urlencode({"payload": json.dumps(payload)})
        return await self.post(form, "application/x-www-form-urlencoded")

    async def click(self, message: Call, *, response_url: str | None = None) -> Answer:
        """Click the first button of a message (as Slack sends it after its confirm dialog)."""
        button = next(
            e
            for b in message.body["blocks"]
            if b["type"] == "actions"
            for e in b["elements"]
            if e["type"] == "button"
        )
        return await self.interaction(
            {
                "type": "block_actions",
                "team": {"id": "T1", "domain": "fake"},
                "user": {"id": self.user, "username": self.user.lower(), "team_id": "T1"},
                "api_app_id": "A1",
                "container": {"type": "message", "is_ephemeral": True},
                "channel": {"id": self.channel, "name": "ops-commands"},
                "response_url": response_url or self.fake.response_url(),
                "trigger_id": f"trigger.{uuid.uuid4().hex[:8]}",
                "actions": [
                    {
                        "type": "button",
                        "action_id": button["action_id"],
                        "block_id": "tg_confirm",
                        "value": button["value"],
                        "action_ts": str(time.time()),
                    }
                ],
            }
        )

    async def submit(self, view: dict[str, Any], values: dict[str, Any]) -> Answer:
        """Submit a modal with these ``state.values``."""
        return await self.interaction(
            {
                "type": "view_submission",
                "team": {"id": "T1", "domain": "fake"},
                "user": {"id": self.user, "username": self.user.lower(), "team_id": "T1"},
                "api_app_id": "A1",
                "view": {
                    **view,
                    "id": "V1",
                    "team_id": "T1",
                    "state": {"values": values},
                },
            }
        )

    async def event(self, event: dict[str, Any], **kwargs: Any) -> Answer:
        body = json.dumps(
            {
                "token": "legacy",
                "team_id": "T1",
                "api_app_id": "A1",
                "type": "event_callback",
                "event_id": f"Ev{uuid.uuid4().hex[:8]}",
                "event_time": int(time.time()),
                "event": event,
            }
        )
        return await self.post(body, "application/json", **kwargs)
