"""Limits of the HTTP server's connections: slow or idle clients cannot exhaust the service.

* A new connection must send its first request's headers within ``http.header_timeout``;
  a kept-alive connection without a new request is closed after ``http.idle_timeout``
  (aiohttp's keep-alive timer).
* At most ``http.max_connections`` connections are served at once. A new connection beyond
  that closes the longest-idle one (no request being handled); when every connection is busy
  it is answered 503 at once. Each is logged at most once a minute.
* ``accept()`` failures (no file descriptors left) are logged at most once a minute
  instead of once per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

QUIET_PERIOD = 60.0
"""Seconds between two log lines about the same connection trouble."""
FILE_LIMIT = 65536
"""The soft limit of open files that `tgops serve` asks for (at most the hard limit)."""

_BUSY_BODY = b'{"ok": false, "text": "too many connections; try again in a second"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


class _Throttled:
    """A log line that is written at most once per ``QUIET_PERIOD``."""

    def __init__(self) -> None:
        self._last = -QUIET_PERIOD
        self.suppressed = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < QUIET_PERIOD:
            self.suppressed += 1
            return False
        self._last = now
        return True


class _Busy(asyncio.Protocol):
    """A connection beyond the limit while every other one is busy: 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_BUSY)
        transport.close()


class ConnectionLimits:
    """The protocol factory of the server (wraps aiohttp's ``web.Server``) and the
    middleware that tells it which connections are handling a request."""

    def __init__(self, *, limit: int, header_timeout: float) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self._server: web.Server | None = None
        self._busy: dict[Any, int] = {}
        """Requests being handled per connection (``RequestHandler``)."""
        self._started: set[Any] = set()
        """Connections that sent a request (pruned of closed ones on each new connection)."""
        self._evicted = _Throttled()
        self._refused = _Throttled()

    def bind(self, server: web.Server) -> None:
        self._server = server

    def middleware(self) -> Middleware:
        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            protocol = request.protocol
            self._started.add(protocol)
            self._busy[protocol] = self._busy.get(protocol, 0) + 1
            try:
                return await handler(request)
            finally:
                self._busy[protocol] -= 1
                if not self._busy[protocol]:
                    del self._busy[protocol]

        return track

    def __call__(self) -> asyncio.Protocol:
        server = self._server
        assert server is not None, "ConnectionLimits.bind(server) first"
        connections = server.connections
        self._started.intersection_update(connections)
        live = [h for h in connections if h.transport is not None]
        if len(live) >= self.limit:
            idle = next((h for h in live if not self._busy.get(h)), None)
            if idle is None:
                if self._refused.due():
                    log.warning(
                        "HTTP: all %d connections (http.max_connections) are busy; new ones "
                        "are answered 503 (%d more since the last line)",
                        self.limit,
                        self._refused.suppressed,
                    )
                return _Busy()
            if self._evicted.due():
                log.warning(
                    "HTTP: %d connections open (http.max_connections); the longest-idle ones "
                    "are closed for new ones (%d more since the last line)",
                    len(live),
                    self._evicted.suppressed,
                )
            idle.force_close()
        handler = server()
        asyncio.get_running_loop().call_later(self.header_timeout, self._deadline, handler)
        return handler

    def _deadline(self, handler: RequestHandler) -> None:
        """The header deadline of a new connection: closed unless a request came."""
        if handler not in self._started and handler.transport is not None:
            handler.force_close()


class LimitedSite(web.TCPSite):
    """A ``TCPSite`` whose connections go through ``ConnectionLimits``."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, *, limits: ConnectionLimits
    ) -> None:
        super().__init__(runner, host, port, backlog=1024)
        self._limits = limits

    @property
    def bound_port(self) -> int:
        server = self._server
        assert isinstance(server, asyncio.base_events.Server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._limits.bind(server)
        self._server = await asyncio.get_running_loop().create_server(
            self._limits, self._host, self._port, backlog=self._backlog
        )


_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@contextmanager
def quiet_accept_errors() -> Iterator[None]:
    """While inside: the event loop's "accept() out of system resource" reports are logged
    at most once a minute (asyncio retries the accept a second later by itself)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    throttle = _Throttled()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ValueError) and "_start_serving" in str(context.get("message")):
            # asyncio retries accept() a second after such a failure, once per failed
            # attempt; a retry due after the server was closed finds no socket: nothing lost
            log.debug("HTTP: an accept() retry after the server closed: %s", exc)
            return
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            if throttle.due():
                log.error(
                    "HTTP: cannot accept connections: %s (%d more since the last line); "
                    "raise the open-files limit (ulimit -n) or lower http.max_connections",
                    exc.strerror,
                    throttle.suppressed,
                )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


def raise_file_limit(wanted: int = FILE_LIMIT) -> int:
    """Raise the soft limit of open files towards ``wanted`` (never above the hard limit);
    the limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
            return soft
        return target
    return soft
