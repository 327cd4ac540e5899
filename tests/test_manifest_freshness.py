"""Manifest freshness end to end: a replayed older manifest (rollback) and an expired one
are refused, the last good manifest stays in use, log, status, check-versions and the
admins (once) are told; publish writes generated_at and expires and re-signs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.repository.manifest import load_public_key, verify_manifest
from core.repository.publish import load_signing_key, publish
from tests.debs import build_deb
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, VIEWER_TOKEN, running, settings_for
from tests.smtp_server import smtp_server

ROOT = Path(__file__).parent.parent
ADMINS = "admins@ops.example.org"


def channel_files(repo: Repo) -> tuple[Path, Path]:
    manifest = repo.root / "channels" / "stable.json"
    return manifest, manifest.with_name("stable.json.sig")


def pending(status: dict[str, object], node: str = "solo1") -> list[str]:
    nodes = status["nodes"]
    assert isinstance(nodes, list)
    [entry] = [n for n in nodes if n["name"] == node]
    return [f"{p['name']} {p['version']}" for p in entry["pending"]]


async def test_a_replayed_older_manifest_is_refused_and_reported_once(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "2.0")
    manifest, signature = channel_files(repo)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(manifest, old / "stable.json")
    shutil.copy(signature, old / "stable.json.sig")
    async with serve_repo(repo.root) as server, smtp_server() as smtp:
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            sections={
                "smtp": {"host": "127.0.0.1", "port": smtp.port, "sender": "tgops@x.example"},
                "notify": {"admin_emails": [ADMINS], "retry_base": "0.1s"},
            },
        )
        async with running(settings) as (_, api):
            assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
            repo.add("tg-base", "2.1")
            assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
            assert pending(await api.status(VIEWER_TOKEN)) == ["tg-base 2.1"]

            # a mirror serves the older, correctly signed manifest again
            shutil.copy(old / "stable.json", manifest)
            shutil.copy(old / "stable.json.sig", signature)
            for _ in range(3):
                reply = await api.command("hotfixes", ADMIN_TOKEN)
                assert reply["ok"], reply["text"]  # the last good manifest is used
            status = await api.status(VIEWER_TOKEN)
            assert pending(status) == ["tg-base 2.1"]
            assert "rollback refused" in status["manifest_problems"]["stable"]
            text = (await api.command("status", VIEWER_TOKEN))["text"]
            assert "!! Manifest refused: channel stable: rollback refused" in text
            log = (await api.command("log 50", VIEWER_TOKEN))["text"]
            assert log.count("manifest refused") == 1
            assert "stays in use" in log

            [mail] = await smtp.wait_messages(1)
            assert "Manifest of channel stable refused" in str(mail.message["Subject"])

            check = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "bot.cli", "check-versions", "--config",
                 str(tmp_path / "tgops.toml")],
                capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                env={k: v for k, v in os.environ.items() if not k.startswith("TGOPS_")},
            )  # fmt: skip
            assert "manifest of channel stable refused: rollback refused" in check.stdout
            assert check.returncode in {1, 2}, check.stdout

            # the repository is fixed: a newer manifest is accepted and the problem is gone
            repo.add("tg-base", "2.2")
            assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
            status = await api.status(VIEWER_TOKEN)
            assert "manifest_problems" not in status
            assert pending(status) == ["tg-base 2.2"]
            log = (await api.command("log 50", VIEWER_TOKEN))["text"]
            assert "manifest accepted" in log
        assert len(smtp.messages) == 1  # the admins were told once


def sign_expired(repo: Repo) -> None:
    """Re-sign the channel's manifest with an ``expires`` in the past (a frozen mirror)."""
    manifest, signature = channel_files(repo)
    document = json.loads(manifest.read_text())
    document["generated_at"] = (datetime.now(UTC) - timedelta(days=40)).isoformat()
    document["expires"] = (datetime.now(UTC) - timedelta(days=10)).isoformat()
    body = json.dumps(document).encode()
    manifest.write_bytes(body)
    key = load_signing_key(repo.key)
    signature.write_bytes(base64.b64encode(key.sign(body)) + b"\n")


async def test_an_expired_manifest_is_refused(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "2.0")
    sign_expired(repo)
    async with serve_repo(repo.root) as server:
        settings = settings_for(tmp_path, repository_url=server.url, public_key=repo.public_key)
        async with running(settings) as (_, api):
            reply = await api.command("hotfixes", ADMIN_TOKEN)
            assert reply["ok"] is False
            assert "expired at" in reply["text"] and "tgops publish" in reply["text"]
            status = await api.status(VIEWER_TOKEN)
            assert "expired at" in status["manifest_problems"]["stable"]

            # the vendor re-signs: accepted again
            publish(repo.root, "stable", repo.key, [])
            assert (await api.command("hotfixes", ADMIN_TOKEN))["ok"]
            assert "manifest_problems" not in await api.status(VIEWER_TOKEN)


def test_publish_writes_the_validity_and_re_signs_without_files(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    deb = build_deb(repo.debs, "tg-base", "1.0")
    first = publish(repo.root, "stable", repo.key, [deb])
    manifest, signature = channel_files(repo)
    key = load_public_key(repo.public_key)
    before = verify_manifest("stable", manifest.read_bytes(), signature.read_bytes(), key)
    assert before.expires == first.expires
    assert before.expires is not None
    validity = datetime.fromisoformat(before.expires) - datetime.fromisoformat(before.generated_at)
    assert validity == timedelta(days=30)

    cli = subprocess.run(
        [sys.executable, "-m", "bot.cli", "publish", "--repo", str(repo.root), "--channel",
         "stable", "--key", str(repo.key), "--valid-for", "90d"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TGOPS_")},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "re-signed" in cli.stdout and "valid until" in cli.stdout
    after = verify_manifest("stable", manifest.read_bytes(), signature.read_bytes(), key)
    assert after.packages == before.packages
    assert after.generated_at > before.generated_at
    assert after.expires is not None
    validity = datetime.fromisoformat(after.expires) - datetime.fromisoformat(after.generated_at)
    assert validity == timedelta(days=90)
