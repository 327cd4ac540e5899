"""The content cache against a real (misbehaving) HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.errors import (
    DownloadError,
    DownloadFailedError,
    DownloadMismatchError,
    PackageNotFoundError,
)
from core.repository.cache import Downloader
from core.repository.partial import SPLICE
from core.repository.retry import AttemptOutcome, RetryPolicy, is_transient
from tests.repo_server import RepoServer, serve_repo

SIZE = 3 * 1024 * 1024 + 12345  # a few chunks and a ragged end


class Blob:
    def __init__(self, root: Path, name: str, size: int = SIZE) -> None:
        self.rel = f"pool/{name}"
        self.data = os.urandom(size)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.size = size
        path = root / self.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def blob(root: Path) -> Blob:
    return Blob(root, "tg-base_1.0_all.deb")


@pytest.fixture
async def server(root: Path, blob: Blob) -> AsyncIterator[RepoServer]:
    async with serve_repo(root) as running:
        yield running


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


BODY_PATHS = [
    pytest.param(
        True, id="socket-to-file", marks=pytest.mark.skipif(not SPLICE, reason="no splice")
    ),
    pytest.param(False, id="event-loop"),
]
"""Both ways a body is received: past aiohttp, by a thread from the socket into the file
(the default where ``splice`` exists), and through the event loop."""


@pytest.fixture(params=BODY_PATHS)
async def downloader(cache: Path, request: pytest.FixtureRequest) -> AsyncIterator[Downloader]:
    async with Downloader(
        cache, connect_timeout=2, read_timeout=0.5, splice=request.param
    ) as running:
        yield running


async def fetch(downloader: Downloader, server: RepoServer, blob: Blob, **wrong: int | str) -> Path:
    return await downloader.fetch(
        server.url + blob.rel,
        package="tg-base 1.0",
        sha256=str(wrong.get("sha256", blob.sha256)),
        size=int(wrong.get("size", blob.size)),
    )


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def cache_names(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


async def test_a_download_lands_verified_under_its_sha256(
    downloader: Downloader, server: RepoServer, blob: Blob, cache: Path
) -> None:
    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))

    path = await downloader.fetch(
        server.url + blob.rel,
        package="tg-base 1.0",
        sha256=blob.sha256,
        size=blob.size,
        progress=progress,
    )
    assert path == cache / f"{blob.sha256}.deb"
    assert path.read_bytes() == blob.data
    assert cache_names(cache) == [f"{blob.sha256}.deb"]
    assert seen[-1] == (blob.size, blob.size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert server.headers[blob.rel][0]["Accept-Encoding"] == "identity"
    # the second time it comes from the cache
    assert await fetch(downloader, server, blob) == path
    assert server.requests[blob.rel] == 1


async def test_the_body_takes_the_path_chosen(
    downloader: Downloader, server: RepoServer, blob: Blob, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="core.repository.cache")
    threads: set[str] = set()

    async def progress(done: int, total: int) -> None:
        threads.update(t.name for t in threading.enumerate())

    server.stall(0.3, after=1_000_000)  # underway long enough to be seen (read timeout 0.5 s)
    await downloader.fetch(
        server.url + blob.rel,
        package="tg-base 1.0",
        sha256=blob.sha256,
        size=blob.size,
        progress=progress,
    )
    assert ("tgops-download-receive" in threads) is downloader.splice
    assert "tgops-download-hash" in threads
    [line] = [r.getMessage() for r in caplog.records if "downloaded and verified" in r.message]
    received = int(line.split(" of them from the socket")[0].rsplit(" ", 1)[1])
    # what aiohttp had read with the headers was handed over, the rest came from the socket
    assert (0 < received <= blob.size) if downloader.splice else (received == 0)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ({"size": SIZE - 1}, f"size mismatch: the manifest says {SIZE - 1} bytes, the download"),
        ({"size": SIZE + 1}, "size mismatch"),
        ({"sha256": "0" * 64}, "SHA-256 mismatch: the manifest says 0000"),
    ],
)
async def test_a_file_that_differs_from_the_manifest_is_deleted(
    downloader: Downloader,
    server: RepoServer,
    blob: Blob,
    wrong: dict[str, int | str],
    message: str,
) -> None:
    with pytest.raises(DownloadMismatchError, match=message) as caught:
        await fetch(downloader, server, blob, **wrong)
    assert caught.value.transient
    assert "package tg-base 1.0" in str(caught.value)
    assert cache_names(downloader.cache_dir) == []  # neither a final nor a partial file is left


async def test_a_cut_transfer_resumes_where_it_stopped(
    downloader: Downloader, server: RepoServer, blob: Blob, cache: Path
) -> None:
    server.cut_after(1_000_000)
    with pytest.raises(DownloadError, match="cut off after 1000000 of") as caught:
        await fetch(downloader, server, blob)
    assert caught.value.transient
    assert downloader.partial_size(blob.sha256) == 1_000_000
    assert not (cache / f"{blob.sha256}.deb").exists()
    sent_before = server.bytes_sent[blob.rel]

    path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data
    assert server.ranges[blob.rel] == [None, "bytes=1000000-"]
    etag = server.headers[blob.rel][1]["If-Range"]
    assert etag.startswith('"')
    assert server.bytes_sent[blob.rel] - sent_before == blob.size - 1_000_000
    assert cache_names(cache) == [f"{blob.sha256}.deb"]


async def test_a_server_ignoring_range_makes_a_clean_restart(
    downloader: Downloader, server: RepoServer, blob: Blob
) -> None:
    server.cut_after(2_000_000)
    with pytest.raises(DownloadError):
        await fetch(downloader, server, blob)
    server.ignore_range = True
    path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data
    assert server.ranges[blob.rel] == [None, "bytes=2000000-"]
    assert server.bytes_sent[blob.rel] == 2_000_000 + blob.size


async def test_a_changed_file_on_the_server_is_fetched_whole(
    downloader: Downloader, server: RepoServer, blob: Blob, root: Path
) -> None:
    server.cut_after(1_000_000)
    with pytest.raises(DownloadError):
        await fetch(downloader, server, blob)
    target = root / blob.rel
    stamp = target.stat().st_mtime_ns + 5_000_000_000
    os.utime(target, ns=(stamp, stamp))  # new ETag: If-Range no longer matches
    path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data
    assert server.bytes_sent[blob.rel] == 1_000_000 + blob.size


async def test_a_corrupt_partial_file_is_caught_and_refetched(
    downloader: Downloader, server: RepoServer, blob: Blob, cache: Path
) -> None:
    put(cache / f"{blob.sha256}.part", b"\0" * 500_000)  # a wrong prefix
    with pytest.raises(DownloadMismatchError, match="SHA-256 mismatch"):
        await fetch(downloader, server, blob)
    assert cache_names(cache) == []
    path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data


async def test_an_overlong_partial_file_is_started_afresh(
    downloader: Downloader, server: RepoServer, blob: Blob, cache: Path
) -> None:
    put(cache / f"{blob.sha256}.part", b"\0" * (blob.size + 10))
    path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data
    assert server.ranges[blob.rel] == [None]


async def test_a_wrong_size_under_the_final_name_is_refetched(
    downloader: Downloader, server: RepoServer, blob: Blob, cache: Path
) -> None:
    put(cache / f"{blob.sha256}.deb", b"truncated")
    path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data


async def test_not_found_is_final_and_not_retried(
    downloader: Downloader, server: RepoServer, blob: Blob
) -> None:
    outcomes: list[AttemptOutcome] = []
    policy = RetryPolicy(attempts=5, delay=0, on_attempt=outcomes.append)
    with pytest.raises(
        DownloadFailedError, match=r"not found at http://127\.0\.0\.1:\d+/pool/x"
    ) as e:
        await policy.run(
            lambda: downloader.fetch(
                server.url + "pool/x.deb", package="x 1", sha256=blob.sha256, size=1
            ),
            describe="package x 1",
        )
    assert isinstance(e.value.last_cause, PackageNotFoundError)
    assert not e.value.exhausted
    assert str(e.value).endswith("(not retried: another attempt would fail the same way)")
    assert server.requests["pool/x.deb"] == 1
    assert outcomes == ["fatal"]


async def test_server_errors_are_retried_within_the_policy(
    downloader: Downloader, server: RepoServer, blob: Blob
) -> None:
    server.fail_next(2, status=503)
    outcomes: list[AttemptOutcome] = []
    failures: list[tuple[int, str]] = []
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    async def failed(attempt: int, error: BaseException) -> None:
        failures.append((attempt, str(error)))

    policy = RetryPolicy(attempts=3, delay=7, sleep=sleep, on_attempt=outcomes.append)
    path = await policy.run(
        lambda: fetch(downloader, server, blob),
        describe="package tg-base 1.0",
        on_attempt_failed=failed,
    )
    assert path.read_bytes() == blob.data
    assert server.requests[blob.rel] == 3
    assert outcomes == ["transient", "transient", "ok"]
    assert delays == [7, 7]
    assert [a for a, _ in failures] == [1, 2]
    assert "HTTP 503" in failures[0][1]


async def test_the_policy_gives_up_after_its_attempts(
    downloader: Downloader, server: RepoServer, blob: Blob, caplog: pytest.LogCaptureFixture
) -> None:
    server.fail_next(10, status=502)
    policy = RetryPolicy(attempts=3, delay=0)
    with pytest.raises(
        DownloadFailedError, match="gave up after 3 attempts; last error: HTTP 502"
    ) as e:
        await policy.run(lambda: fetch(downloader, server, blob), describe="package tg-base 1.0")
    assert e.value.exhausted
    assert server.requests[blob.rel] == 3
    logged = [r.getMessage() for r in caplog.records if r.name == "core.repository.retry"]
    assert len(logged) == 3
    assert "attempt 1 of 3 failed" in logged[0]
    assert logged[-1].endswith("giving up")


@pytest.mark.parametrize("status", [408, 429, 500, 504])
async def test_transient_statuses(
    downloader: Downloader, server: RepoServer, blob: Blob, status: int
) -> None:
    server.fail_next(1, status=status)
    with pytest.raises(DownloadError) as caught:
        await fetch(downloader, server, blob)
    assert is_transient(caught.value)


async def test_a_client_error_status_is_final(
    downloader: Downloader, server: RepoServer, blob: Blob
) -> None:
    server.fail_next(1, status=403)
    with pytest.raises(DownloadError, match="HTTP 403") as caught:
        await fetch(downloader, server, blob)
    assert not is_transient(caught.value)


async def test_a_stalled_server_times_out(
    downloader: Downloader, server: RepoServer, blob: Blob, cache: Path
) -> None:
    server.stall(60, after=500_000)
    with pytest.raises(DownloadError, match=r"timed out \(connect timeout 2s, read timeout 0.5s\)"):
        await fetch(downloader, server, blob)
    assert downloader.partial_size(blob.sha256) == 500_000  # kept for resume
    assert not (cache / f"{blob.sha256}.deb").exists()


async def test_a_server_silent_before_its_headers_times_out(
    downloader: Downloader, server: RepoServer, blob: Blob
) -> None:
    server.hold()
    with pytest.raises(DownloadError, match="timed out") as caught:
        await fetch(downloader, server, blob)
    assert caught.value.transient


async def test_a_refused_connection_is_transient(
    downloader: Downloader, root: Path, blob: Blob
) -> None:
    async with serve_repo(root) as gone:
        url = gone.url
    with pytest.raises(DownloadError) as caught:
        await downloader.fetch(url + blob.rel, package="p 1", sha256=blob.sha256, size=1)
    assert caught.value.transient


async def test_one_file_wanted_by_many_is_transferred_once(
    downloader: Downloader, server: RepoServer, blob: Blob
) -> None:
    paths = await asyncio.gather(*(fetch(downloader, server, blob) for _ in range(6)))
    assert len(set(paths)) == 1
    assert server.requests[blob.rel] == 1


async def test_parallel_transfers_are_bounded(root: Path, cache: Path) -> None:
    blobs = [Blob(root, f"p{i}_1.0_all.deb", size=100_000) for i in range(5)]
    async with serve_repo(root) as server, Downloader(cache, max_parallel=2) as downloader:
        server.hold()
        transfers = asyncio.gather(*(fetch(downloader, server, b) for b in blobs))
        await server.wait_active(2)
        server.release()
        paths = await transfers
    assert [p.read_bytes() for p in paths] == [b.data for b in blobs]
    assert server.max_active == 2


async def test_file_urls_work_too(blob: Blob, root: Path, cache: Path) -> None:
    async with Downloader(cache) as downloader:
        path = await downloader.fetch(
            (root / blob.rel).as_uri(), package="p 1", sha256=blob.sha256, size=blob.size
        )
        assert path.read_bytes() == blob.data
        with pytest.raises(PackageNotFoundError):
            await downloader.fetch(
                (root / "pool/none.deb").as_uri(), package="p 1", sha256="1" * 64, size=1
            )
        with pytest.raises(DownloadMismatchError):
            await downloader.fetch(
                (root / blob.rel).as_uri(), package="p 1", sha256="2" * 64, size=blob.size
            )
    assert cache_names(cache) == [f"{blob.sha256}.deb"]


async def test_a_downloader_needs_async_with(cache: Path) -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await Downloader(cache).read("http://127.0.0.1:1/x", package="x")
    with pytest.raises(ValueError, match="SHA-256"):
        Downloader(cache).path_for("nope")


@pytest.mark.parametrize("splice", BODY_PATHS)
async def test_a_cancelled_download_keeps_what_arrived(
    server: RepoServer, blob: Blob, cache: Path, splice: bool
) -> None:
    server.stall(60, after=500_000)
    arrived = asyncio.Event()
    reported: list[int] = []

    async def progress(done: int, total: int) -> None:
        reported.append(done)
        if done >= 400_000:
            arrived.set()

    async with Downloader(cache, chunk_size=64 * 1024, splice=splice) as downloader:
        transfer = asyncio.create_task(
            downloader.fetch(
                server.url + blob.rel,
                package="tg-base 1.0",
                sha256=blob.sha256,
                size=blob.size,
                progress=progress,
            )
        )
        async with asyncio.timeout(10):
            await arrived.wait()
        transfer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await transfer
        kept = downloader.partial_size(blob.sha256)
        assert reported[-1] <= kept <= 500_000  # everything handed over was written
        path = await fetch(downloader, server, blob)
    assert path.read_bytes() == blob.data
    assert server.ranges[blob.rel] == [None, f"bytes={kept}-"]


async def test_an_unusable_cache_dir_is_a_clear_error(
    server: RepoServer, blob: Blob, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    put(not_a_dir, b"")
    async with Downloader(tmp_path / "other") as working:
        downloader = Downloader(not_a_dir / "cache", session=working.session)
        with pytest.raises(DownloadError, match="cannot use the cache directory") as caught:
            await fetch(downloader, server, blob)
    assert not caught.value.transient


async def test_the_policy_names_transient_errors_only() -> None:
    calls: list[int] = []

    async def buggy() -> None:
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await RetryPolicy(attempts=3, delay=0).run(buggy, describe="x")
    assert calls == [1]
    assert is_transient(TimeoutError())
    assert is_transient(ConnectionResetError())
    assert not is_transient(ValueError())
    assert not is_transient(DownloadError("p", "HTTP 403", transient=False))
    with pytest.raises(ValueError, match="at least one attempt"):
        RetryPolicy(attempts=0)
