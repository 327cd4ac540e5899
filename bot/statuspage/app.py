"""``GET /status``: the users' maintenance status page, its live updates and its Atom feed.

* ``GET /status`` and ``/status/NODE-OR-CLUSTER``: server-rendered HTML (works without
  JavaScript), in the language of ``?lang=`` or ``Accept-Language`` (else
  ``notify.language``). Answered with a strong ``ETag`` of the body and ``Cache-Control``
  so that a proxy may keep it for ``MAX_AGE`` seconds and revalidate it after; an
  ``If-None-Match`` that matches gets 304.
* ``GET /status/events``: Server-Sent Events; an event ``change`` whenever a maintenance
  window is scheduled, starts or ends or a node's state changes (the page then fetches
  itself again). Without JavaScript the page refreshes every ``statuspage.refresh``
  seconds (``<noscript>`` ``Refresh``); with it, it also looks that often in case an
  event was missed (another instance's change: events are local to each instance).
* ``GET /status/feed.atom``: the windows as an Atom feed.

``statuspage.token`` (when set) is required as ``?token=`` or ``Authorization: Bearer``;
the page's links carry it on. The page's inline style and script are allowed by their
hashes in a ``Content-Security-Policy``; nothing else is loaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from bot.statuspage.view import DAYS, StatusView, System, SystemView, Urls, reason_text
from core import events as ev
from core.errors import StoreError
from core.lifecycle.engine import Engine
from core.lifecycle.scheduler import Scheduler
from core.settings import LANGUAGES, Settings
from notify.i18n import Translator, language_of, locale_name, negotiate, translator
from notify.render import Renderer

log = logging.getLogger(__name__)

MAX_AGE = 10
"""Seconds a browser or proxy may serve the page without asking again."""
BUILD_TIMEOUT = 10.0
"""Longest wait for the store while a page is built."""
STREAM_SHARE = 2
"""Live-update connections held at once: ``http.max_connections // STREAM_SHARE`` (more
are answered 503 and those pages poll), so the API always keeps connections."""
HEARTBEAT = 20.0
"""Seconds between keep-alive comments on an event stream."""
STREAM_LIFETIME = 600.0
"""An event stream is closed after this long; the browser reconnects by itself."""
RETRY_MS = 5000
FEED_ENTRIES = 50
CHANGES = (ev.MaintenanceScheduled, ev.MaintenanceStarted, ev.MaintenanceEnded, ev.NodeStateChanged)


class Bus(Protocol):
    def subscribe(self, name: str, handler: ev.Handler) -> None: ...


@dataclass(frozen=True, slots=True)
class _Asset:
    text: str
    digest: str


def _asset(renderer: Renderer, name: str) -> _Asset:
    text = renderer.render(name, {}).strip()
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return _Asset(text=text, digest=f"'sha256-{digest}'")


class StatusPage:
    """The page's routes; ``subscribe`` hooks it to the event bus for live updates."""

    def __init__(self, *, engine: Engine, scheduler: Scheduler, renderer: Renderer) -> None:
        self.engine = engine
        self.settings: Settings = engine.settings
        self.page = self.settings.statuspage
        self.renderer = renderer
        self.view = StatusView(engine, scheduler, show_versions=self.page.show_versions)
        self.css = _asset(renderer, "statuspage.css")
        self.js = _asset(renderer, "statuspage.js")
        self.csp = (
            "default-src 'none'; "
            f"style-src {self.css.digest}; script-src {self.js.digest}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        self._streams: set[asyncio.Queue[str | None]] = set()
        self.max_streams = max(1, self.settings.http.max_connections // STREAM_SHARE)
        host = urlsplit(self.settings.http.public_url).hostname or "tgops"
        self.tag = f"tag:{host},2026:"

    # -- wiring ------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        if not self.page.enabled:
            return
        app.router.add_get("/status", self.handle_page)
        app.router.add_get("/status/events", self.handle_events)
        app.router.add_get("/status/feed.atom", self.handle_feed)
        app.router.add_get("/status/{system}", self.handle_page)

    def subscribe(self, bus: Bus) -> None:
        if self.page.enabled:
            bus.subscribe("statuspage", self._on_event)

    def close(self) -> None:
        """End every live-update stream (the service stops; browsers reconnect later)."""
        for queue in list(self._streams):
            if queue.full():
                queue.get_nowait()  # the end matters more than one more change
            queue.put_nowait(None)

    async def _on_event(self, event: ev.Event) -> None:
        if not isinstance(event, CHANGES):
            return
        node = getattr(event, "node", "")
        for queue in list(self._streams):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(node)

    # -- which systems ---------------------------------------------------------------------

    def shown(self) -> list[System]:
        """Every system the page shows, in configuration order (clusters first)."""
        wanted = set(self.page.systems)
        every = "*" in wanted
        found = [
            System(name=name, nodes=tuple(self._members(name)), cluster=True)
            for name in self.settings.clusters
            if every or name in wanted
        ]
        found += [
            System(name=node.name, nodes=(node.name,), cluster=False)
            for node in self.settings.nodes
            if node.cluster is None and (every or node.name in wanted)
        ]
        found += [
            System(name=node.name, nodes=(node.name,), cluster=False)
            for node in self.settings.nodes
            if node.cluster is not None
            and not every
            and node.name in wanted
            and node.cluster not in wanted
        ]
        return [s for s in found if s.nodes]

    def _members(self, cluster: str) -> list[str]:
        return [n.name for n in self.settings.nodes if n.cluster == cluster]

    def one(self, name: str) -> System | None:
        """``name`` when the page shows it (a node of a shown cluster counts)."""
        shown = self.shown()
        for system in shown:
            if system.name == name:
                return system
        for system in shown:
            if system.cluster and name in system.nodes:
                return System(name=name, nodes=(name,), cluster=False)
        return None

    # -- requests ----------------------------------------------------------------------------

    def _token(self, request: web.Request) -> str | None:
        """The token given (``None``: none needed); raises 401 when a wrong one or none."""
        secret = self.page.token
        if secret is None:
            return None
        given = request.query.get("token", "")
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        if not given and scheme.lower() == "bearer":
            given = bearer.strip()
        if not hmac.compare_digest(given.encode(), secret.get_secret_value().encode()):
            raise web.HTTPUnauthorized(
                text="this status page needs its token: add ?token=TOKEN to the address "
                "(or send Authorization: Bearer TOKEN)",
                headers={"WWW-Authenticate": 'Bearer realm="status"'},
            )
        return given if "token" in request.query else None

    def _language(self, request: web.Request) -> tuple[str, str | None]:
        """The page's language, and the ``lang`` to carry in links (when asked by ?lang=)."""
        asked = request.query.get("lang")
        default = self.settings.notify.language
        if asked:
            if asked not in LANGUAGES:
                raise web.HTTPBadRequest(
                    text=f"lang={asked!r}: this page speaks {', '.join(LANGUAGES)}"
                )
            return asked, asked
        return negotiate(request.headers.get("Accept-Language"), language_of(default)), None

    def _headers(self, body: bytes, *, private: bool) -> dict[str, str]:
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        scope = "private" if private else "public"
        return {
            "ETag": etag,
            "Cache-Control": f"{scope}, max-age={MAX_AGE}, must-revalidate",
            "Vary": "Accept-Language, Authorization",
        }

    def _answer(
        self, request: web.Request, body: bytes, content_type: str, *, private: bool, **more: str
    ) -> web.Response:
        headers = self._headers(body, private=private) | more
        wanted = request.headers.get("If-None-Match", "")
        if headers["ETag"] in {tag.strip() for tag in wanted.split(",")} or wanted == "*":
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=headers)

    async def handle_page(self, request: web.Request) -> web.Response:
        token = self._token(request)
        language, asked = self._language(request)
        name = request.match_info.get("system")
        if name is None:
            systems = self.shown()
        else:
            system = self.one(name)
            if system is None:
                raise web.HTTPNotFound(
                    text=f"{name!r} is not a system this status page shows; see /status"
                )
            systems = [system]
        t = translator(language)
        urls = Urls(base="", token=token, lang=asked)
        try:
            async with asyncio.timeout(BUILD_TIMEOUT):
                views = await self.view.systems(systems, t, urls)
        except (StoreError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("status page: store not readable: %s", exc)
            raise web.HTTPServiceUnavailable(
                text="the status cannot be read just now; try again in a minute",
                headers={"Retry-After": "30"},
            ) from exc
        page = self._page(
            t, views, name=name, urls=urls, token=token, asked=asked, path=request.path
        )
        html = self.renderer.render("statuspage.html", {"page": page}, language)
        return self._answer(
            request,
            html.encode(),
            "text/html",
            private=token is not None,
            **{"Content-Security-Policy": self.csp, "Content-Language": language},
        )

    def _page(
        self,
        t: Translator,
        views: Sequence[SystemView],
        *,
        name: str | None,
        urls: Urls,
        token: str | None,
        asked: str | None,
        path: str,
    ) -> dict[str, Any]:
        title = self.page.title or t._("Maintenance status")
        if name is not None:
            title = f"{title}: {name}"
        events: dict[str, str] = {}
        if token:
            events["token"] = token
        languages = []
        for code in LANGUAGES:
            params = {"lang": code} | ({"token": token} if token else {})
            languages.append(
                {
                    "code": code,
                    "name": locale_name(code),
                    "url": f"{path}?{urlencode(params)}",
                    "current": code == t.language,
                }
            )
        return {
            "title": title,
            "summary": _summary(views, t),
            "systems": views,
            "scope": name,
            "home_url": f"/status{urls.query()}",
            "languages": languages,
            "days": DAYS,
            "timezone": self.settings.timezone,
            "refresh": int(self.page.refresh),
            "events_url": "/status/events" + (f"?{urlencode(events)}" if events else ""),
            "feed_url": "/status/feed.atom" + urls.query(),
            "css": self.css.text,
            "js": self.js.text,
        }

    async def handle_events(self, request: web.Request) -> web.StreamResponse:
        self._token(request)
        if len(self._streams) >= self.max_streams:
            raise web.HTTPServiceUnavailable(text="too many live connections; the page polls")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)
        self._streams.add(queue)
        try:
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MS}\n: connected\n\n".encode())
            loop = asyncio.get_running_loop()
            ends = loop.time() + STREAM_LIFETIME
            while (left := ends - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(HEARTBEAT, left)):
                        node = await queue.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if node is None:
                    break  # the service stops (the browser reconnects to another instance)
                await response.write(f"event: change\ndata: {node}\n\n".encode())
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self._streams.discard(queue)
        return response

    async def handle_feed(self, request: web.Request) -> web.Response:
        token = self._token(request)
        language, asked = self._language(request)
        t = translator(language)
        urls = Urls(base=self.settings.http.public_url.rstrip("/"), token=token, lang=asked)
        systems = self.shown()
        names = sorted({n for s in systems for n in s.nodes})
        tz = self.settings.tz
        try:
            async with asyncio.timeout(BUILD_TIMEOUT):
                open_ = [w for w in await self.engine.store.maintenance() if w.node in names]
                ended = await self.engine.store.maintenance_history(names, limit=FEED_ENTRIES)
        except (StoreError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("status feed: store not readable: %s", exc)
            raise web.HTTPServiceUnavailable(
                text="the status cannot be read just now; try again in a minute"
            ) from exc
        now = self.engine.clock.now()
        entries = []
        for w in [*open_, *ended][:FEED_ENTRIES]:
            reason = reason_text(w.reason, t)
            start = t.datetime_text(w.start, tz)
            if w.ended_at is not None:
                state, updated = "ended", w.ended_at
                text = t._(
                    "Maintenance of %(node)s from %(start)s took %(duration)s: %(reason)s",
                    node=w.node,
                    start=start,
                    duration=t.duration(w.ended_at - w.start),
                    reason=reason,
                )
            elif w.start <= now:
                state, updated = "now", w.started_at or w.start
                text = t._(
                    "Maintenance of %(node)s since %(start)s: %(reason)s",
                    node=w.node,
                    start=start,
                    reason=reason,
                )
            else:
                state, updated = "planned", w.created_at
                text = t._(
                    "Maintenance of %(node)s planned for %(start)s: %(reason)s",
                    node=w.node,
                    start=start,
                    reason=reason,
                )
            if w.disable_logon and w.ended_at is None:
                text += " " + t._("Logon is disabled during the maintenance.")
            entries.append(
                {
                    "id": f"{self.tag}maintenance-{w.id}",
                    "title": t._("Maintenance of %(node)s: %(reason)s", node=w.node, reason=reason),
                    "updated": _iso(updated),
                    "published": _iso(w.created_at),
                    "url": urls.system(w.node),
                    "state": state,
                    "text": text,
                }
            )
        entries.sort(key=lambda e: e["updated"], reverse=True)
        feed = {
            "title": self.page.title or t._("Maintenance status"),
            "id": f"{self.tag}status",
            "updated": entries[0]["updated"] if entries else _iso(datetime(2026, 1, 1, tzinfo=UTC)),
            "self_url": f"{urls.base}/status/feed.atom{urls.query()}",
            "page_url": f"{urls.base}/status{urls.query()}",
            "entries": entries,
        }
        body = self.renderer.render("statuspage.atom", {"feed": feed}, language).encode()
        return self._answer(request, body, "application/atom+xml", private=token is not None)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _summary(views: Sequence[SystemView], t: Translator) -> str:
    """One sentence: can I work now, and when is the next interruption."""
    down = [v.name for v in views if v.state == "maintenance"]
    partial = [v.name for v in views if v.state == "partial"]
    if down:
        return t._("Maintenance now: %(systems)s.", systems=", ".join(down))
    if partial:
        return t._(
            "Every system is available; some nodes of %(systems)s are in maintenance.",
            systems=", ".join(partial),
        )
    upcoming = [v for v in views if v.next_start is not None]
    if upcoming:
        first = min(upcoming, key=lambda v: v.next_start or datetime.max.replace(tzinfo=UTC))
        return t._(
            "Every system is available. Next maintenance: %(when)s (%(system)s).",
            when=first.next_text,
            system=first.name,
        )
    return t._(
        "Every system is available. No maintenance planned in the next %(days)s days.", days=DAYS
    )
