"""HttpRepository: a repository built with ``publish`` and served on 127.0.0.1."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.errors import (
    ChannelNameError,
    ManifestError,
    ManifestFetchError,
    ManifestSignatureError,
    PackageNotFoundError,
    UnknownChannelError,
    UnsafePathError,
)
from core.lifecycle.pending import pending_packages
from core.model import PackageKind
from core.repository.cache import Downloader
from core.repository.client import HttpRepository
from core.repository.manifest import PackageEntry, load_public_key
from core.repository.publish import keygen, load_signing_key, public_key_path, publish
from core.repository.retry import RetryPolicy
from tests.debs import build_deb
from tests.repo_server import RepoServer, serve_repo


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    root: Path
    key: Path
    debs: dict[str, Path]


@pytest.fixture
def published(tmp_path: Path) -> Published:
    root = tmp_path / "repo"
    key = tmp_path / "signing.key"
    keygen(key)
    out = tmp_path / "debs"
    out.mkdir()
    debs = {
        "base": build_deb(out, "tg-base", "1:2.0-1"),
        "web": build_deb(out, "tg-web", "3.1~rc1"),
        "vnc": build_deb(out, "tg-vnc", "1.0+hf1"),
    }
    publish(root, "stable", key, [debs["base"], debs["web"]])
    publish(root, "stable", key, [debs["vnc"]], hotfix_id="HF-1", urgency="urgent")
    publish(root, "oldstable", key, [debs["base"]])
    return Published(root=root, key=key, debs=debs)


@pytest.fixture
async def server(published: Published) -> AsyncIterator[RepoServer]:
    async with serve_repo(published.root) as running:
        yield running


@pytest.fixture
async def downloader(tmp_path: Path) -> AsyncIterator[Downloader]:
    async with Downloader(tmp_path / "cache", connect_timeout=2, read_timeout=1) as running:
        yield running


def repository(url: str, published: Published, downloader: Downloader) -> HttpRepository:
    public = load_public_key(public_key_path(published.key).read_text())
    return HttpRepository(url, public, downloader)


@pytest.fixture
def repo(server: RepoServer, published: Published, downloader: Downloader) -> HttpRepository:
    return repository(server.url, published, downloader)


def resign(published: Published, channel: str, body: bytes) -> None:
    """Write ``body`` as the channel's manifest with a valid signature (a hostile repo)."""
    signing = load_signing_key(published.key)
    manifest = published.root / "channels" / f"{channel}.json"
    manifest.write_bytes(body)
    manifest.with_name(manifest.name + ".sig").write_bytes(base64.b64encode(signing.sign(body)))


async def test_manifest_and_packages_round_trip(
    repo: HttpRepository, published: Published, server: RepoServer
) -> None:
    manifest = await repo.manifest("stable")
    assert [(p.name, p.version, p.kind) for p in manifest.packages] == [
        ("tg-base", "1:2.0-1", PackageKind.REGULAR),
        ("tg-vnc", "1.0+hf1", PackageKind.HOTFIX),
        ("tg-web", "3.1~rc1", PackageKind.REGULAR),
    ]
    wanted = pending_packages(
        manifest, {"tg-base": "2.5"}, selected_hotfixes={"HF-1"}, always_hotfixes=False
    )
    assert [p.name for p in wanted] == ["tg-base", "tg-vnc", "tg-web"]
    for entry in wanted:
        path = await repo.download(entry)
        assert path.read_bytes() == published.debs[entry.name.removeprefix("tg-")].read_bytes()
    # the epoch's ':' is '%3a' in the pool file name, percent-encoded once more in the URL
    assert server.requests["pool/tg-base_1%3a2.0-1_all.deb"] == 1


async def test_a_tampered_manifest_is_rejected_before_parsing(
    repo: HttpRepository, published: Published
) -> None:
    manifest = published.root / "channels" / "stable.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"urgent"', b'"normal"'))
    with pytest.raises(ManifestSignatureError, match="channel stable: the manifest signature"):
        await repo.manifest("stable")


async def test_a_missing_signature_is_rejected(repo: HttpRepository, published: Published) -> None:
    (published.root / "channels" / "stable.json.sig").unlink()
    with pytest.raises(ManifestError, match=r"not signed \(channels/stable\.json\.sig is missing"):
        await repo.manifest("stable")


async def test_an_unknown_channel_is_named_with_the_url(
    repo: HttpRepository, server: RepoServer
) -> None:
    with pytest.raises(UnknownChannelError) as caught:
        await repo.manifest("testing")
    assert str(caught.value).startswith(f"unknown channel testing at {server.url}")


async def test_channel_names_are_checked_before_asking(
    repo: HttpRepository, server: RepoServer
) -> None:
    with pytest.raises(ChannelNameError):
        await repo.manifest("../secret")
    assert sum(server.requests.values()) == 0


async def test_signed_but_malformed_json_is_a_manifest_error(
    repo: HttpRepository, published: Published
) -> None:
    resign(published, "stable", b'{"channel": "stable", "packages": [')
    with pytest.raises(ManifestError, match="not JSON"):
        await repo.manifest("stable")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "pool/../../x.deb"])
async def test_a_signed_entry_leaving_the_repository_is_rejected(
    repo: HttpRepository, published: Published, path: str
) -> None:
    body = json.loads((published.root / "channels" / "stable.json").read_bytes())
    body["packages"][0]["path"] = path
    resign(published, "stable", json.dumps(body).encode())
    with pytest.raises(ManifestError, match="leaves the repository"):
        await repo.manifest("stable")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "http://evil.example/x.deb", "."])
async def test_download_rechecks_confinement(
    repo: HttpRepository, server: RepoServer, path: str
) -> None:
    manifest = await repo.manifest("stable")
    # an entry that never went through validation (e.g. built in code)
    evil = PackageEntry.model_construct(**{**manifest.packages[0].model_dump(), "path": path})
    with pytest.raises(UnsafePathError, match="leaves the repository"):
        await repo.download(evil)
    assert set(server.requests) == {"channels/stable.json", "channels/stable.json.sig"}


async def test_a_file_missing_from_the_pool_is_reported(
    repo: HttpRepository, published: Published
) -> None:
    manifest = await repo.manifest("oldstable")
    (published.root / manifest.packages[0].path).unlink()
    with pytest.raises(PackageNotFoundError, match=r"package tg-base 1:2\.0-1: not found at"):
        await repo.download(manifest.packages[0])


async def test_a_flaky_manifest_fetch_is_retried(repo: HttpRepository, server: RepoServer) -> None:
    server.fail_next(1, status=503, path="channels/stable.json")
    with pytest.raises(ManifestFetchError, match="channel stable: manifest not fetched: HTTP 503"):
        await repo.manifest("stable")
    server.fail_next(2, status=503, path="channels/stable.json")
    policy = RetryPolicy(attempts=3, delay=0)
    manifest = await policy.run(lambda: repo.manifest("stable"), describe="channel stable")
    assert manifest.channel == "stable"


async def test_a_file_url_repository_works(published: Published, downloader: Downloader) -> None:
    repo = repository(published.root.as_uri(), published, downloader)
    manifest = await repo.manifest("stable")
    path = await repo.download(manifest.packages[0])
    assert path.read_bytes() == published.debs["base"].read_bytes()
    with pytest.raises(UnknownChannelError):
        await repo.manifest("testing")


def test_a_repository_url_must_be_http_or_file(published: Published, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        repository("ftp://example.invalid/", published, Downloader(tmp_path))
