"""Conditional manifest requests: a kept verified manifest is asked for with its ETag, a
``304 Not Modified`` reuses it (freshness still checked), a changed manifest or signature is
downloaded and verified again; against the static repository server of the tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.nagios import saved_manifest
from core.errors import ManifestRefusedError, ManifestSignatureError
from core.lifecycle.engine import MANIFESTS_KV
from core.repository.cache import Downloader
from core.repository.client import HttpRepository
from core.repository.freshness import Freshness
from core.repository.manifest import load_public_key
from core.repository.publish import keygen, public_key_path
from tests.repo_server import RepoServer, serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, running, settings_for

MANIFEST = "channels/stable.json"
SIGNATURE = MANIFEST + ".sig"


class Clock:
    """The time the freshness check sees (moved by the test)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path)
    repo.add("tg-base", "2.0")
    return repo


@pytest.fixture
async def server(repo: Repo) -> AsyncIterator[RepoServer]:
    async with serve_repo(repo.root) as running_server:
        yield running_server


@pytest.fixture
async def downloader(tmp_path: Path) -> AsyncIterator[Downloader]:
    async with Downloader(tmp_path / "cache", connect_timeout=2, read_timeout=2) as running_one:
        yield running_one


def client(
    url: str, public_key: str, downloader: Downloader, clock: Clock | None = None
) -> HttpRepository:
    freshness = Freshness(now=clock or Clock())
    return HttpRepository(url, load_public_key(public_key), downloader, freshness=freshness)


async def test_a_second_request_is_conditional_and_reuses_the_verified_manifest(
    repo: Repo, server: RepoServer, downloader: Downloader
) -> None:
    http = client(server.url, repo.public_key, downloader)
    first = await http.manifest("stable")
    sent = server.bytes_sent[MANIFEST]
    second = await http.manifest("stable")

    assert server.statuses[MANIFEST] == [200, 304]
    etag = server.headers[MANIFEST][0].get("If-None-Match")
    assert etag is None  # nothing kept yet: a plain request
    assert server.headers[MANIFEST][1]["If-None-Match"].startswith('"')
    assert server.bytes_sent[MANIFEST] == sent  # no body the second time
    assert server.statuses[SIGNATURE] == [200, 200]  # the signature is compared every time
    assert second is first
    assert (http.downloaded, http.not_modified) == (1, 1)


async def test_a_changed_manifest_is_downloaded_and_verified_again(
    repo: Repo, server: RepoServer, downloader: Downloader
) -> None:
    http = client(server.url, repo.public_key, downloader)
    await http.manifest("stable")
    repo.add("tg-base", "2.1")
    changed = await http.manifest("stable")
    assert server.statuses[MANIFEST] == [200, 200]
    assert [p.version for p in changed.packages] == ["2.0", "2.1"]
    assert http.downloaded == 2

    # changed bytes under the old signature: verified, and refused
    path = repo.root / MANIFEST
    path.write_bytes(path.read_bytes().replace(b"2.1", b"2.9"))
    with pytest.raises(ManifestSignatureError, match="channel stable: the manifest signature"):
        await http.manifest("stable")
    assert server.statuses[MANIFEST] == [200, 200, 200]


async def test_a_changed_signature_alone_makes_the_manifest_verified_again(
    repo: Repo, server: RepoServer, downloader: Downloader
) -> None:
    http = client(server.url, repo.public_key, downloader)
    await http.manifest("stable")
    (repo.root / SIGNATURE).write_bytes(b"AAAA" * 22 + b"\n")
    with pytest.raises(ManifestSignatureError):
        await http.manifest("stable")
    # 304 for the manifest, then the new signature needed its bytes: fetched in full
    assert server.statuses[MANIFEST] == [200, 304, 200]
    assert http.not_modified == 0


async def test_an_expired_manifest_is_refused_after_a_304(
    repo: Repo, server: RepoServer, downloader: Downloader
) -> None:
    clock = Clock()
    http = client(server.url, repo.public_key, downloader, clock)
    manifest = await http.manifest("stable")
    assert manifest.expires is not None
    clock.now = datetime.fromisoformat(manifest.expires) + timedelta(minutes=1)
    with pytest.raises(ManifestRefusedError, match="expired at"):
        await http.manifest("stable")
    assert server.statuses[MANIFEST] == [200, 304]
    with pytest.raises(ManifestRefusedError, match="expired at"):
        await http.manifest("stable")  # and every time after
    assert server.statuses[MANIFEST] == [200, 304, 304]


async def test_a_server_that_ignores_the_validators_still_works(
    repo: Repo, server: RepoServer, downloader: Downloader
) -> None:
    server.ignore_validators = True
    http = client(server.url, repo.public_key, downloader)
    await http.manifest("stable")
    await http.manifest("stable")
    repo.add("tg-base", "2.1")
    changed = await http.manifest("stable")
    assert server.statuses[MANIFEST] == [200, 200, 200]
    assert "If-None-Match" in server.headers[MANIFEST][1]
    assert [p.version for p in changed.packages] == ["2.0", "2.1"]
    assert (http.downloaded, http.not_modified) == (3, 0)


async def test_if_modified_since_is_used_without_an_etag(
    repo: Repo, server: RepoServer, downloader: Downloader
) -> None:
    http = client(server.url, repo.public_key, downloader)
    first = await http.manifest("stable")
    kept = http.verified["stable"]
    # a repository that sends Last-Modified only
    http.verified["stable"] = type(kept)(
        manifest=kept.manifest,
        validators=type(kept.validators)(last_modified=kept.validators.last_modified),
        signature=kept.signature,
        key=kept.key,
    )
    assert await http.manifest("stable") is first
    headers = server.headers[MANIFEST][1]
    assert "If-None-Match" not in headers
    assert headers["If-Modified-Since"].endswith("GMT")
    assert server.statuses[MANIFEST] == [200, 304]


async def test_a_manifest_kept_for_another_key_is_verified_again(
    repo: Repo, server: RepoServer, downloader: Downloader, tmp_path: Path
) -> None:
    http = client(server.url, repo.public_key, downloader)
    await http.manifest("stable")
    other = tmp_path / "other.key"
    keygen(other)
    public = load_public_key(public_key_path(other).read_text())
    again = HttpRepository(server.url, public, downloader, verified=http.verified)
    with pytest.raises(ManifestSignatureError):
        await again.manifest("stable")
    assert "If-None-Match" not in server.headers[MANIFEST][1]
    assert server.statuses[MANIFEST] == [200, 200]


async def test_file_repositories_read_the_manifest_every_time(
    repo: Repo, downloader: Downloader
) -> None:
    http = client(repo.root.as_uri(), repo.public_key, downloader)
    await http.manifest("stable")
    repo.add("tg-base", "2.1")
    changed = await http.manifest("stable")
    assert [p.version for p in changed.packages] == ["2.0", "2.1"]
    assert (http.downloaded, http.not_modified) == (2, 0)


async def test_the_service_keeps_the_etag_in_the_store_across_a_restart(
    repo: Repo, server: RepoServer, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, repository_url=server.url, public_key=repo.public_key)
    async with running(settings) as (service, api):
        assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
        server.reset()
        assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
        assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
        assert set(server.statuses[MANIFEST]) == {304}
        assert len(server.statuses[MANIFEST]) >= 2
        stored = await service.store.kv_get(MANIFESTS_KV, "stable")
        saved = saved_manifest(stored)  # the Nagios check and check-versions read it as before
        assert saved is not None and [p.version for p in saved.manifest.packages] == ["2.0"]
        assert stored["conditional"]["etag"] == server.headers[MANIFEST][0]["If-None-Match"]

    server.reset()
    async with running(settings) as (_, api):
        assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
        assert server.statuses[MANIFEST] and set(server.statuses[MANIFEST]) == {304}
        assert "If-None-Match" in server.headers[MANIFEST][0]

        repo.add("tg-base", "2.1")
        server.reset()
        reply = await api.command("hotfixes", ADMIN_TOKEN)
        assert reply["ok"], reply["text"]
        assert server.statuses[MANIFEST][0] == 200
        status = await api.status(ADMIN_TOKEN)
        [node] = [n for n in status["nodes"] if n["name"] == "solo1"]
        assert [p["version"] for p in node["pending"]] == ["2.1"]


async def test_the_service_polls_the_repository_conditionally(
    repo: Repo, server: RepoServer, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path,
        repository_url=server.url,
        public_key=repo.public_key,
        updates={"poll_interval": "0.2s"},
    )
    async with running(settings):
        # the manifest poll and the hotfix watch both ask every 0.2 s: downloaded when they
        # start (both at once, nothing kept yet), then answered 304
        await server.wait_requests(MANIFEST, 8, within=30)
        statuses = server.statuses[MANIFEST]
        assert statuses[0] == 200 and statuses.count(200) <= 2, statuses
        assert statuses[-4:] == [304] * 4, statuses
        assert all("If-None-Match" in h for h in server.headers[MANIFEST][-4:])
