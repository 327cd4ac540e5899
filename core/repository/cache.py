"""The content cache of package files: resumable downloads, verified before they count.

Files live in ``cache_dir`` under their SHA-256. ``<sha256>.deb`` is complete and verified
(size and SHA-256); nothing else ever gets that name. ``<sha256>.part`` is a partial
transfer and ``<sha256>.etag`` its validator; both are kept across attempts and restarts so
that the next attempt resumes with ``Range`` and ``If-Range``. A file wanted by several
callers at once is transferred once; at most ``max_parallel`` transfers run at a time.

The body is streamed (bounded memory). Over plain HTTP with a ``Content-Length`` (a
repository's usual answer), aiohttp reads the status and headers and a worker thread then
takes the body straight from the connection's socket into the file (``splice`` on Linux:
the bytes never pass through the process), while another thread hashes it from the page
cache right behind; the connection is closed afterwards instead of being reused. Otherwise
(HTTPS, a chunked answer, ``splice=False``) the event loop receives and worker threads hash,
write and flush (``partial.PartialFile``). Either way SHA-256 costs no throughput where a
second core is free (bench/RESULTS.md, "Download (issue 3)" and "Staging (issue 15)").
``file://`` URLs work too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit
from urllib.request import url2pathname

import aiohttp

from core.errors import DownloadError, DownloadMismatchError, PackageNotFoundError
from core.repository.conditional import Validators
from core.repository.partial import CHUNK_SIZE, SPLICE, PartialFile

if TYPE_CHECKING:
    from core.settings import UpdatesSettings

log = logging.getLogger(__name__)

Progress = Callable[[int, int], Awaitable[None]]
"""``await progress(done, total)`` after every chunk (bytes)."""

MANIFEST_LIMIT = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_IDENTITY = {"Accept-Encoding": "identity"}


def is_transient_status(status: int) -> bool:
    """HTTP statuses worth retrying: request timeout, too many requests, server errors."""
    return status in (408, 429) or 500 <= status <= 599


def _status_error(package: str, url: str, status: int) -> DownloadError:
    if status in (404, 410):
        return PackageNotFoundError(package, url)
    if is_transient_status(status):
        return DownloadError(package, f"HTTP {status} from {url}", transient=True)
    return DownloadError(
        package, f"HTTP {status} from {url}; check updates.repository_url", transient=False
    )


def _network_error(package: str, url: str, exc: BaseException, timeouts: str) -> DownloadError:
    if isinstance(exc, aiohttp.InvalidURL):
        return DownloadError(package, f"invalid URL {url}", transient=False)
    if isinstance(exc, TimeoutError):
        return DownloadError(package, f"{url} timed out ({timeouts})", transient=True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return DownloadError(package, f"transfer from {url} cut off ({exc})", transient=True)
    return DownloadError(package, f"{url}: {exc or type(exc).__name__}", transient=True)


def _check_digest(package: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise DownloadMismatchError(package, "SHA-256", expected, actual)


def _local_path(url: str) -> Path:
    return Path(url2pathname(urlsplit(url).path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetched:
    """A small file read in full, with the validators the server sent with it."""

    body: bytes
    validators: Validators


@dataclass(slots=True)
class _Waiters:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0


class Downloader:
    """Downloads package files into the content cache; use as ``async with``.

    Without ``session`` it opens (and closes) its own ``aiohttp.ClientSession``.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        session: aiohttp.ClientSession | None = None,
        max_parallel: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        manifest_timeout: float = 60.0,
        min_rate: float = 64 * 1024,
        chunk_size: int = CHUNK_SIZE,
        splice: bool = SPLICE,
    ) -> None:
        self.cache_dir = cache_dir
        self.splice = splice
        """Take a plain HTTP body straight from the socket (see the module's docstring);
        False: always through the event loop."""
        self._read_timeout = read_timeout
        self._session = session
        self._own_session = session is None
        self._slots = asyncio.Semaphore(max_parallel)
        self._chunk = chunk_size
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._timeouts = f"connect timeout {connect_timeout:g}s, read timeout {read_timeout:g}s"
        self._waiters: dict[str, _Waiters] = {}
        self.manifest_timeout = manifest_timeout
        """Overall deadline of one manifest (or signature) transfer."""
        self.min_rate = min_rate
        """Bytes per second a package transfer must average at least: a file gets
        ``connect + read timeout + size / min_rate`` seconds in all."""
        self._base = connect_timeout + read_timeout

    @classmethod
    def from_settings(
        cls, updates: UpdatesSettings, *, session: aiohttp.ClientSession | None = None
    ) -> Downloader:
        return cls(
            updates.cache_dir,
            session=session,
            max_parallel=updates.max_parallel_downloads,
            connect_timeout=updates.connect_timeout,
            read_timeout=updates.read_timeout,
            manifest_timeout=updates.manifest_timeout,
            min_rate=updates.min_transfer_rate,
        )

    async def __aenter__(self) -> Self:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self._own_session and self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False, read_bufsize=self._chunk
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the Downloader as `async with Downloader(...)`")
        return self._session

    def path_for(self, sha256: str) -> Path:
        """Where the verified file with this SHA-256 lives in the cache (present or not)."""
        if not _SHA256.match(sha256):
            raise ValueError(f"{sha256!r} is not a SHA-256 (64 lower-case hex digits)")
        return self.cache_dir / f"{sha256}.deb"

    def cached(self, sha256: str, size: int) -> Path | None:
        """The verified cached file, or None."""
        final = self.path_for(sha256)
        try:
            return final if final.stat().st_size == size else None
        except FileNotFoundError:
            return None

    def partial_size(self, sha256: str) -> int:
        """Bytes of a partial transfer kept for resume (0 when none)."""
        try:
            return (self.cache_dir / f"{sha256}.part").stat().st_size
        except FileNotFoundError:
            return 0

    @contextlib.asynccontextmanager
    async def _exclusive(self, sha256: str) -> AsyncIterator[None]:
        waiters = self._waiters.setdefault(sha256, _Waiters())
        waiters.count += 1
        try:
            async with waiters.lock:
                yield
        finally:
            waiters.count -= 1
            if waiters.count == 0:
                del self._waiters[sha256]

    async def fetch(
        self,
        url: str,
        *,
        package: str,
        sha256: str,
        size: int,
        progress: Progress | None = None,
    ) -> Path:
        """The verified file from the cache, transferring (or resuming) it when missing.

        Raises ``DownloadError`` (``transient`` says whether a retry may help).
        """
        final = self.path_for(sha256)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(
                package,
                f"cannot use the cache directory {self.cache_dir} ({exc.strerror}); "
                "check updates.cache_dir",
                transient=False,
            ) from exc
        if self.cached(sha256, size) is None:
            async with self._exclusive(sha256):
                if self.cached(sha256, size) is None:
                    final.unlink(missing_ok=True)  # a wrong size under the final name: refetch
                    async with self._slots:
                        await self._transfer(url, package, sha256, size, progress)
                    return final
        # in the cache already: no lock (many runs take the same file at once)
        if progress is not None:
            await progress(size, size)
        return final

    async def _transfer(
        self, url: str, package: str, sha256: str, size: int, progress: Progress | None
    ) -> None:
        part = self.cache_dir / f"{sha256}.part"
        meta = self.cache_dir / f"{sha256}.etag"
        sink = PartialFile(part, size, package=package)
        try:
            try:
                offset = await sink.open()
            except OSError as exc:
                raise DownloadError(
                    package,
                    f"cannot use the cache file {part} ({exc.strerror}); check updates.cache_dir",
                    transient=False,
                ) from exc
            if offset < size:
                if offset:
                    log.info("%s: resuming at byte %d of %d", package, offset, size)
                if url.startswith("file://"):
                    await self._receive_local(url, package, sink, progress)
                else:
                    deadline = self._base + (size - offset) / self.min_rate
                    try:
                        async with asyncio.timeout(deadline):
                            await self._receive(url, package, sink, meta, progress)
                    except TimeoutError as exc:
                        raise DownloadError(
                            package,
                            f"transfer from {url} took longer than {deadline:.0f}s (at least "
                            f"{self.min_rate / 1024:g} KiB/s: updates.min_transfer_rate); "
                            f"stopped after {sink.done} of {size} bytes, the next attempt "
                            "resumes there",
                            transient=True,
                        ) from exc
            if sink.done < size:
                raise DownloadError(
                    package,
                    f"transfer from {url} cut off after {sink.done} of {size} bytes "
                    "(the next attempt resumes there)",
                    transient=True,
                )
            _check_digest(package, sha256, await sink.finish())
            await sink.aclose()
            os.replace(part, self.cache_dir / f"{sha256}.deb")
            _fsync_dir(self.cache_dir)
            meta.unlink(missing_ok=True)
            log.info(
                "%s: downloaded and verified (%d bytes, %d of them from the socket straight "
                "into the file)",
                package,
                size,
                sink.received,
            )
        except DownloadMismatchError:
            await sink.aclose()
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise
        finally:
            await sink.aclose()
            if sink.done == 0:  # nothing to resume from: leave no empty partial file behind
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)

    async def _receive(
        self,
        url: str,
        package: str,
        sink: PartialFile,
        meta: Path,
        progress: Progress | None,
    ) -> None:
        headers = dict(_IDENTITY)
        offset = sink.done
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = _read_validator(meta, url)
            if validator is not None:
                headers["If-Range"] = validator
        try:
            async with self.session.get(
                url,
                headers=headers,
                timeout=self._timeout,
                auto_decompress=False,
                read_bufsize=self._chunk,
            ) as response:
                await self._accept(response, url, package, sink, offset)
                _write_validator(meta, url, response.headers)
                announced = response.content_length
                if announced is not None and sink.done + announced != sink.size:
                    raise DownloadMismatchError(
                        package, "size", f"{sink.size} bytes", f"{sink.done + announced} bytes"
                    )
                sock = _raw_body_socket(response) if self.splice else None
                if sock is None:
                    await self._stream(response.content, package, sink, progress)
                else:
                    await self._take_body(response, sock, package, sink, progress)
        except aiohttp.ClientPayloadError as exc:
            raise DownloadError(
                package,
                f"transfer from {url} cut off after {sink.done} of {sink.size} bytes "
                "(the next attempt resumes there)",
                transient=True,
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(package, url, exc, self._timeouts) from exc

    async def _accept(
        self,
        response: aiohttp.ClientResponse,
        url: str,
        package: str,
        sink: PartialFile,
        offset: int,
    ) -> None:
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            start = int(match.group(1)) if match else -1
            if start != offset:
                await sink.restart()
                raise DownloadError(
                    package,
                    f"{url} answered a range from byte {start} to a request from byte "
                    f"{offset}; the partial file was discarded",
                    transient=True,
                )
        elif response.status == 200:
            if offset:
                log.info("%s: %s ignored the Range request; starting over", package, url)
                await sink.restart()
        elif response.status == 416:
            await sink.restart()
            raise DownloadError(
                package,
                f"{url} refused to resume at byte {offset} (HTTP 416); the partial file was "
                "discarded",
                transient=True,
            )
        else:
            raise _status_error(package, url, response.status)

    async def _stream(
        self,
        content: aiohttp.StreamReader,
        package: str,
        sink: PartialFile,
        progress: Progress | None,
    ) -> None:
        reported = sink.done
        async for data in content.iter_chunked(self._chunk):
            if sink.done + len(data) > sink.size:
                raise DownloadMismatchError(
                    package, "size", f"{sink.size} bytes", f"more than {sink.size} bytes"
                )
            await sink.append(data)
            if progress is not None and sink.done - reported >= self._chunk:
                reported = sink.done
                await progress(sink.done, sink.size)
        if progress is not None:
            await progress(sink.done, sink.size)

    async def _take_body(
        self,
        response: aiohttp.ClientResponse,
        sock: int,
        package: str,
        sink: PartialFile,
        progress: Progress | None,
    ) -> None:
        """The body from the connection's socket into the file, past aiohttp: what aiohttp
        has received already is appended first, then it stops reading and a thread takes
        the rest (``PartialFile.receive_from``). The connection is closed afterwards."""
        connection = response.connection
        assert connection is not None
        assert connection.protocol is not None
        try:
            head = response.content.read_nowait(-1)
            connection.protocol.pause_reading()  # from here on the socket is ours
            if sink.done + len(head) > sink.size:
                raise DownloadMismatchError(
                    package, "size", f"{sink.size} bytes", f"more than {sink.size} bytes"
                )
            if head:
                await sink.append(head)
            await sink.receive_from(sock, read_timeout=self._read_timeout, progress=progress)
        finally:
            response.close()  # aiohttp did not see the body: the connection cannot be reused
        if progress is not None:
            await progress(sink.done, sink.size)

    async def _receive_local(
        self, url: str, package: str, sink: PartialFile, progress: Progress | None
    ) -> None:
        path = _local_path(url)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError as exc:
            raise PackageNotFoundError(package, url) from exc
        except OSError as exc:
            raise DownloadError(package, f"{path}: {exc.strerror}", transient=False) from exc
        try:
            await asyncio.to_thread(handle.seek, sink.done)
            while data := await asyncio.to_thread(handle.read, self._chunk):
                if sink.done + len(data) > sink.size:
                    raise DownloadMismatchError(
                        package, "size", f"{sink.size} bytes", f"more than {sink.size} bytes"
                    )
                await sink.append(data)
                if progress is not None:
                    await progress(sink.done, sink.size)
        except OSError as exc:
            raise DownloadError(package, f"{path}: {exc.strerror}", transient=True) from exc
        finally:
            handle.close()

    async def read(self, url: str, *, package: str, limit: int = MANIFEST_LIMIT) -> bytes:
        """A small file (a manifest) in memory; ``package`` names it in errors."""
        fetched = await self.read_if_changed(url, package=package, limit=limit)
        assert fetched is not None  # no validators sent: never "not modified"
        return fetched.body

    async def read_if_changed(
        self,
        url: str,
        *,
        package: str,
        limit: int = MANIFEST_LIMIT,
        validators: Validators | None = None,
    ) -> Fetched | None:
        """A small file in memory with its validators, or None when the server answers
        ``304 Not Modified`` to the conditional request made with ``validators``
        (``file://`` URLs are always read)."""
        if url.startswith("file://"):
            body = await asyncio.to_thread(_read_local, url, package, limit)
            return Fetched(body=body, validators=Validators())
        try:
            async with asyncio.timeout(self.manifest_timeout):
                return await self._read(url, package, limit, validators or Validators())
        except TimeoutError as exc:
            raise DownloadError(
                package,
                f"{url} did not arrive within {self.manifest_timeout:g}s "
                "(updates.manifest_timeout)",
                transient=True,
            ) from exc

    async def _read(
        self, url: str, package: str, limit: int, validators: Validators
    ) -> Fetched | None:
        headers = {**_IDENTITY, **validators.request_headers()}
        try:
            async with self.session.get(
                url, headers=headers, timeout=self._timeout, auto_decompress=False
            ) as response:
                if response.status == 304 and validators:
                    return None
                if response.status != 200:
                    raise _status_error(package, url, response.status)
                body = bytearray()
                async for data in response.content.iter_chunked(self._chunk):
                    body += data
                    if len(body) > limit:
                        raise DownloadError(
                            package, f"{url} is larger than {limit} bytes", transient=False
                        )
                answered = Validators.from_headers(response.headers)
                return Fetched(body=bytes(body), validators=answered)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(package, url, exc, self._timeouts) from exc


def _raw_body_socket(response: aiohttp.ClientResponse) -> int | None:
    """The socket a response's body can be taken from as raw bytes, or None: plain TCP (not
    TLS), a ``Content-Length`` and no transfer coding."""
    connection = response.connection
    if connection is None or connection.protocol is None or connection.transport is None:
        return None
    if response.content_length is None or "Transfer-Encoding" in response.headers:
        return None
    transport = connection.transport
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else None


def _read_local(url: str, package: str, limit: int) -> bytes:
    path = _local_path(url)
    try:
        with path.open("rb") as handle:
            body = handle.read(limit + 1)
    except FileNotFoundError as exc:
        raise PackageNotFoundError(package, url) from exc
    except OSError as exc:
        raise DownloadError(package, f"{path}: {exc.strerror}", transient=False) from exc
    if len(body) > limit:
        raise DownloadError(package, f"{path} is larger than {limit} bytes", transient=False)
    return body


def _read_validator(meta: Path, url: str) -> str | None:
    """The ``If-Range`` value saved with a partial file fetched from ``url``."""
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    etag, modified = data.get("etag"), data.get("last_modified")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag  # If-Range accepts strong validators only
    return modified if isinstance(modified, str) and modified else None


def _write_validator(meta: Path, url: str, headers: Mapping[str, str]) -> None:
    data = {"url": url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, meta)
