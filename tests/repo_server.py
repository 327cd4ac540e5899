"""A static update-repository server on 127.0.0.1 whose misbehaviour is switchable at run time.

Use it as an async context manager::

    async with serve_repo(root) as server:
        server.url                        # "http://127.0.0.1:PORT/", serves ``root``
        server.fail_next(2, status=503)   # the next 2 requests answer 503
        server.cut_after(1000)            # the next body is cut off after 1000 bytes
        server.ignore_range = True        # answer 200 with the whole file to Range requests
        server.stall(5.0, after=0)        # the next body stalls 5 s (or until the server stops)
        server.trickle(0.5)               # the next body comes one byte every 0.5 s
        server.hold()                     # requests wait before answering until release()
        server.requests["pool/x.deb"]     # requests per path (paths relative to root)
        server.bytes_sent["pool/x.deb"]   # body bytes sent per path (a well-behaved answer is
                                          # sent with sendfile and counted once complete)
        server.ranges["pool/x.deb"]       # the Range header of every request (None: no Range)
        server.headers["pool/x.deb"]      # all request headers, one dict per request
        server.statuses["pool/x.deb"]     # the status answered to every request (200, 304, ...)
        server.ignore_validators = True   # answer 200 to If-None-Match / If-Modified-Since
        await server.wait_requests("pool/x.deb", 2)

Every knob takes an optional ``path`` (relative to root) to act on that path only.
Files are served with a strong ETag, Last-Modified, ``Range`` (one range) and ``If-Range``,
and answer ``304 Not Modified`` to ``If-None-Match`` (or, without it, ``If-Modified-Since``).
The ETag of a small file (up to 1 MiB: manifests, signatures) includes a digest of its
content, so that a file rewritten within one tick of the file system's clock with the same
size still gets a new one; larger files are named by modification time and size only.
``GET /__stats__`` answers the counters as JSON, for tests that run the server in another
process: ``python -m tests.repo_server DIR [--port N]`` prints the URL and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import hashlib
import os
import re
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 256 * 1024
_DIGESTED = 1 << 20


@dataclass(slots=True, kw_only=True)
class _Rule:
    """One pending misbehaviour: applies to ``count`` more matching requests."""

    count: int
    path: str | None
    status: int = 0
    after: int = 0
    seconds: float = 0.0

    def matches(self, path: str) -> bool:
        return self.count > 0 and (self.path is None or self.path == path)


class RepoServer:
    """The running server: its ``url``, its counters and its misbehaviour knobs."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = ""
        self.ignore_range = False
        self.ignore_validators = False
        self.requests: Counter[str] = Counter()
        self.statuses: defaultdict[str, list[int]] = defaultdict(list)
        self.bytes_sent: Counter[str] = Counter()
        self.ranges: defaultdict[str, list[str | None]] = defaultdict(list)
        self.headers: defaultdict[str, list[dict[str, str]]] = defaultdict(list)
        self.active = 0
        self.max_active = 0
        self._failures: list[_Rule] = []
        self._cuts: list[_Rule] = []
        self._stalls: list[_Rule] = []
        self._trickles: list[_Rule] = []
        self._gate: asyncio.Event | None = None
        self._closing = asyncio.Event()
        self._changed = asyncio.Condition()

    # -- knobs ---------------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503, *, path: str | None = None) -> None:
        """Answer the next ``count`` (matching) requests with ``status`` and no body."""
        self._failures.append(_Rule(count=count, path=path, status=status))

    def cut_after(self, nbytes: int, *, count: int = 1, path: str | None = None) -> None:
        """Close the connection after ``nbytes`` of body in the next ``count`` responses."""
        self._cuts.append(_Rule(count=count, path=path, after=nbytes))

    def stall(
        self, seconds: float, *, after: int = 0, count: int = 1, path: str | None = None
    ) -> None:
        """Send ``after`` body bytes, then go silent for ``seconds`` (ended early by close)."""
        self._stalls.append(_Rule(count=count, path=path, after=after, seconds=seconds))

    def trickle(self, seconds: float, *, count: int = 1, path: str | None = None) -> None:
        """Send the next ``count`` bodies one byte every ``seconds`` (ended early by close)."""
        self._trickles.append(_Rule(count=count, path=path, seconds=seconds))

    def hold(self) -> None:
        """Make every request wait (counted as active) until ``release()``."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def reset(self) -> None:
        """Forget every counter and knob."""
        self.ignore_range = False
        self.ignore_validators = False
        self.requests.clear()
        self.statuses.clear()
        self.bytes_sent.clear()
        self.ranges.clear()
        self.headers.clear()
        self.max_active = self.active
        self._failures.clear()
        self._cuts.clear()
        self._stalls.clear()
        self._trickles.clear()
        self.release()

    async def wait_requests(self, path: str, count: int, within: float = 10.0) -> None:
        """Wait until ``path`` was requested ``count`` times (at most ``within`` seconds)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: self.requests[path] >= count)

    async def wait_active(self, count: int, within: float = 10.0) -> None:
        """Wait until ``count`` requests are being answered at once."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: self.active >= count)

    def stats(self) -> dict[str, object]:
        return {
            "requests": dict(self.requests),
            "bytes_sent": dict(self.bytes_sent),
            "ranges": dict(self.ranges),
            "statuses": dict(self.statuses),
            "active": self.active,
            "max_active": self.max_active,
        }

    # -- serving -------------------------------------------------------------------------

    @staticmethod
    def _take(rules: list[_Rule], path: str) -> _Rule | None:
        for rule in rules:
            if rule.matches(path):
                rule.count -= 1
                return rule
        return None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/__stats__":
            return web.json_response(self.stats())
        rel = request.path.lstrip("/")
        self.requests[rel] += 1
        self.ranges[rel].append(request.headers.get("Range"))
        self.headers[rel].append(dict(request.headers))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await self._notify()
        try:
            gate = self._gate
            if gate is not None:
                closing = asyncio.ensure_future(self._closing.wait())
                opened = asyncio.ensure_future(gate.wait())
                await asyncio.wait({closing, opened}, return_when=asyncio.FIRST_COMPLETED)
                closing.cancel()
                opened.cancel()
            return await self._answer(request, rel)
        finally:
            self.active -= 1
            await self._notify()

    async def _answer(self, request: web.Request, rel: str) -> web.StreamResponse:
        failure = self._take(self._failures, rel)
        if failure is not None:
            return web.Response(status=failure.status, text=f"injected failure {failure.status}\n")
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return web.Response(status=404, text="not found\n")
        st = target.stat()
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        if size <= _DIGESTED:
            digest = hashlib.sha256(target.read_bytes()).hexdigest()[:16]
            etag = f'"{st.st_mtime_ns:x}-{size:x}-{digest}"'
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        headers = {
            "ETag": etag,
            "Last-Modified": last_modified,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if not self.ignore_validators and _not_modified(request, etag, st.st_mtime):
            return web.Response(status=304, headers=headers)
        start, end, status = 0, size, 200
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if wanted and not self.ignore_range and if_range in (None, etag, last_modified):
            parsed = _parse_range(wanted, size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{size}"
                return web.Response(status=416, headers=headers)
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        cut = self._take(self._cuts, rel)
        stall = self._take(self._stalls, rel)
        trickle = self._take(self._trickles, rel)
        sent = 0
        try:
            if cut is None and stall is None and trickle is None and end > start:
                # well-behaved: zero-copy like a production web server (counted when complete)
                assert request.transport is not None
                with target.open("rb") as handle:
                    await asyncio.get_running_loop().sendfile(
                        request.transport, handle, start, end - start
                    )
                self.bytes_sent[rel] += end - start
                await response.write_eof()
                return response
            with target.open("rb") as handle:
                handle.seek(start)
                while True:
                    if stall is not None and sent >= stall.after:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(stall.seconds):
                                await self._closing.wait()
                        stall = None
                    if cut is not None and sent >= cut.after:
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    if sent >= end - start:
                        break
                    limit = end - start - sent
                    for rule in (cut, stall):
                        if rule is not None:
                            limit = min(limit, rule.after - sent)
                    if trickle is not None:
                        limit = 1
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(trickle.seconds):
                                await self._closing.wait()
                        if self._closing.is_set():
                            assert request.transport is not None
                            request.transport.close()
                            return response
                    data = handle.read(min(_CHUNK, limit))
                    if not data:  # the file shrank while being served
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    await response.write(data)
                    sent += len(data)
                    self.bytes_sent[rel] += len(data)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away (e.g. after its read timeout)
        return response

    async def prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        """Counts the status before the headers go out (so that it is there once the
        client has the answer)."""
        if request.path != "/__stats__":
            self.statuses[request.path.lstrip("/")].append(response.status)

    async def _close(self) -> None:
        self._closing.set()
        self.release()


def _not_modified(request: web.Request, etag: str, mtime: float) -> bool:
    """Whether the request's validators still match (RFC 9110: If-None-Match, when present,
    decides alone; If-Modified-Since compares whole seconds)."""
    none_match = request.headers.get("If-None-Match")
    if none_match is not None:
        tags = {t.strip().removeprefix("W/") for t in none_match.split(",")}
        return "*" in tags or etag in tags
    since = request.headers.get("If-Modified-Since")
    if since is None:
        return False
    try:
        when = email.utils.parsedate_to_datetime(since)
    except (TypeError, ValueError):
        return False
    return int(mtime) <= int(when.timestamp())


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single byte range, or None if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return (0, size)  # not a form we understand: whole file (RFC 9110 allows ignoring)
    first, last = match.group(1), match.group(2)
    if first == "":
        length = int(last)
        return (max(0, size - length), size) if length else None
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        return None
    return (start, end)


@contextlib.asynccontextmanager
async def serve_repo(root: Path, *, port: int = 0) -> AsyncIterator[RepoServer]:
    """Serve ``root`` on 127.0.0.1 (a free port unless given) for the block's duration."""
    server = RepoServer(root)
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    app.on_response_prepare.append(server.prepared)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sockets = runner.addresses
    server.url = f"http://127.0.0.1:{sockets[0][1]}/"
    try:
        yield server
    finally:
        await server._close()
        await runner.cleanup()


async def _main(root: Path, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve_repo(root, port=port) as server:
        print(server.url, flush=True)  # the parent process reads the URL
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="serve an update repository on 127.0.0.1")
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0")))
    args = parser.parse_args()
    asyncio.run(_main(args.root, args.port))
