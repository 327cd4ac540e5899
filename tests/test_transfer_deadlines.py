"""Transfers have overall deadlines (a repository that trickles one byte every half second
cannot hold a fetch forever), and commands someone waits for make one attempt or use the
last verified manifest instead of waiting through the scheduled retry policy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.errors import DownloadError
from core.repository.cache import Downloader
from tests.debs import build_deb
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, running, settings_for

MANIFEST = "channels/stable.json"


async def test_a_trickling_package_transfer_ends_at_its_deadline(tmp_path: Path) -> None:
    root = tmp_path / "files"
    root.mkdir()
    deb = build_deb(root, "tg-base", "1.0")
    data = deb.read_bytes()
    async with (
        serve_repo(root) as server,
        Downloader(tmp_path / "cache", connect_timeout=1, read_timeout=1, min_rate=1024) as dl,
    ):
        server.trickle(0.3)
        with pytest.raises(DownloadError, match="took longer than") as caught:
            await dl.fetch(
                server.url + deb.name,
                package="tg-base 1.0",
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
            )
        assert caught.value.transient  # the next attempt resumes
        assert "updates.min_transfer_rate" in str(caught.value)


async def test_a_trickling_manifest_ends_at_its_deadline_after_one_attempt(
    tmp_path: Path,
) -> None:
    repo = Repo(tmp_path)
    repo.root.mkdir(parents=True)  # no channel yet: the service starts without a manifest
    async with serve_repo(repo.root) as server:
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            updates={"manifest_timeout": "1s", "download_attempts": 5},
        )
        async with running(settings) as (_, api):
            repo.add("tg-base", "1.0")
            server.trickle(0.3, count=100, path=MANIFEST)
            before = server.requests[MANIFEST]
            reply = await api.command("hotfixes", ADMIN_TOKEN)
            assert reply["ok"] is False
            assert "did not arrive within 1s" in reply["text"]
            assert server.requests[MANIFEST] == before + 1  # one attempt, not 5


async def test_an_interactive_command_uses_the_last_verified_manifest(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-vnc", "3.2", hotfix="HF-7", summary="Fixes a crash.")
    async with serve_repo(repo.root) as server:
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            updates={"download_attempts": 5, "retry_delay": "10s"},
        )
        async with running(settings) as (_, api):
            assert "HF-7" in (await api.command("hotfixes", ADMIN_TOKEN))["text"]
            server.reset()
            server.fail_next(100, status=503)  # the repository is down
            reply = await api.command("hotfixes", ADMIN_TOKEN)
            assert reply["ok"] and "HF-7" in reply["text"]
            reply = await api.command("hotfixes select solo1 HF-7", ADMIN_TOKEN)
            assert reply["ok"], reply["text"]
            assert server.requests[MANIFEST] == 2  # one attempt each, no retries
