"""The service's HTTP server (aiohttp): liveness, the JSON API, and the routes others add."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import ClientError, web
from aiohttp.typedefs import Handler, Middleware

from bot.commands import CommandService
from bot.grammar import allowed
from core import __version__
from core.errors import TgopsError
from core.model import Actor, Role
from core.settings import Settings

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024

HealthInfo = Callable[[], Awaitable[dict[str, Any]]]


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"ok": False, "text": text}, status=status)


class ApiAuth:
    """Bearer tokens of ``[api.tokens.NAME]``, each with its roles (L11)."""

    def __init__(self, settings: Settings) -> None:
        self._tokens = [
            (name, tok.token.get_secret_value().encode(), frozenset(tok.roles))
            for name, tok in settings.api.tokens.items()
        ]

    def actor(self, request: web.Request) -> Actor | None:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        presented = given.strip().encode()
        found: Actor | None = None
        for name, token, roles in self._tokens:
            # compare against every token so timing does not tell which one matched
            if hmac.compare_digest(presented, token):
                found = Actor(name=f"token:{name}", source="api", roles=_with_viewer(roles))
        return found


def read_body_first(deadline: float) -> Middleware:
    """Every request body is read before its handler runs: within ``deadline`` seconds
    (else 408) and ``MAX_BODY`` bytes (else 413); a client that goes away in the middle
    of its body is logged in one line and gets no answer. Handlers then read it from
    memory."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(deadline):
                    await request.read()
            except TimeoutError:
                return _error(408, f"the body did not arrive within {deadline:g}s")
            except web.HTTPRequestEntityTooLarge:
                return _error(413, f"body larger than {MAX_BODY} bytes")
            except (ConnectionError, ClientError) as exc:
                log.info(
                    "%s %s: the client went away before its body was complete (%s)",
                    request.method,
                    request.path,
                    exc.__class__.__name__,
                )
                return _error(400, "the body was not complete")
        return await handler(request)

    return middleware


def _with_viewer(roles: frozenset[Role]) -> frozenset[Role]:
    return roles | {Role.VIEWER} if roles else roles


def build_app(
    *,
    settings: Settings,
    commands: CommandService,
    health: HealthInfo | None = None,
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The app; ``middlewares`` go first (before the body is read)."""
    auth = ApiAuth(settings)
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[*middlewares, read_body_first(settings.http.body_timeout)],
    )

    async def healthz(_: web.Request) -> web.Response:
        body: dict[str, Any] = {"ok": True, "version": __version__}
        if health is not None:
            body.update(await health())
        return web.json_response(body)

    async def status(request: web.Request) -> web.Response:
        actor = auth.actor(request)
        if actor is None:
            return _error(401, "missing or unknown bearer token (Authorization: Bearer TOKEN)")
        if not allowed(actor.roles, Role.VIEWER):
            return _error(403, "the status needs role viewer; this token has no role")
        target = request.query.get("target")
        try:
            cache = settings.http.status_cache  # the endpoint dashboards and scripts poll
            body = await commands.status_json(target, max_age=cache)
            return web.Response(body=body, content_type="application/json", charset="utf-8")
        except TgopsError as exc:
            return _error(400, str(exc))

    async def command(request: web.Request) -> web.Response:
        actor = auth.actor(request)
        if actor is None:
            return _error(401, "missing or unknown bearer token (Authorization: Bearer TOKEN)")
        raw = await request.read()  # read (bounded in size and time) by ``read_body_first``
        try:
            body = json.loads(raw)
        except ValueError as exc:  # not UTF-8, not JSON, or a number beyond 4300 digits
            return _error(400, f'body is not JSON ({exc.__class__.__name__}); send {{"text": "…"}}')
        except RecursionError:
            return _error(400, 'body is nested too deeply; send {"text": "…"}')
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return _error(
                400, 'body must be a JSON object with a string "text", e.g. {"text": "status"}'
            )
        unknown = sorted(set(body) - {"text"})
        if unknown:
            return _error(400, f'unknown key(s) {", ".join(unknown)}; only "text" is accepted')
        reply = await commands.execute(body["text"], actor)
        return web.json_response({"ok": reply.ok, "text": reply.text})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/command", command)
    return app
