"""Small holes closed: Debian architecture syntax in publish, control characters kept
from terminals and mails, quoted placeholders refused, Slack requests of another
workspace refused."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pytest

from bot.demo.debbuild import DPKG_DEB
from core.errors import NotADebError
from core.printable import printable
from core.repository.publish import keygen, publish
from tests.fake_slack import fake_slack
from tests.service import MAINT_TOKEN, VIEWER_TOKEN, fleet_toml, running, settings_for

ROOT = Path(__file__).parent.parent
SECRET = "signing-secret-for-tests"


def odd_deb(directory: Path, arch: str) -> Path:
    """A real .deb whose control file names ``arch`` (dpkg-deb only warns about it)."""
    root = directory / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: tg-odd\nVersion: 1.0\nArchitecture: {arch}\n"
        "Maintainer: tgops <tgops@example.invalid>\nDescription: odd\n"
    )
    out = directory / "odd.deb"
    subprocess.run(
        [DPKG_DEB, "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.parametrize("arch", ["amd64 $(id)", "x/../../channels/evil", "AMD64"])
def test_publish_refuses_an_architecture_debian_would_not_accept(tmp_path: Path, arch: str) -> None:
    key = tmp_path / "repo.key"
    keygen(key)
    deb = odd_deb(tmp_path, arch)
    repo = tmp_path / "repo"
    with pytest.raises(NotADebError, match="is not a Debian architecture"):
        publish(repo, "stable", key, [deb])
    assert not (repo / "channels" / "stable.json").exists()
    assert not (repo / "channels" / "evil.deb").exists()
    assert not (repo / "pool").exists() or list((repo / "pool").iterdir()) == []

    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "publish", "--repo", str(repo), "--channel",
         "stable", "--key", str(key), str(deb)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TGOPS_")},
    )  # fmt: skip
    assert result.returncode != 0
    assert "is not a Debian architecture" in result.stderr
    assert "Traceback" not in result.stderr


async def test_control_characters_never_reach_the_users(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (_, api):
        day = (datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(days=1)).strftime("%Y-%m-%d")
        reason = "Kernel\x1b[2J\x1b]0;owned\x07 update\x9b31m now"
        reply = await api.command(f"maintenance schedule solo1 {day} 22:00 '{reason}'", MAINT_TOKEN)
        assert reply["ok"], reply["text"]
        for text in (
            reply["text"],
            (await api.command("maintenance", MAINT_TOKEN))["text"],
            (await api.command("status solo1", VIEWER_TOKEN))["text"],
            (await api.command("log 5", VIEWER_TOKEN))["text"],
        ):
            assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
            assert "Kernel[2J]0;owned update31m now" in text


def test_a_quoted_placeholder_is_refused_by_config_check(tmp_path: Path) -> None:
    extra = (
        '[[nodes]]\nname = "tg-local"\ndriver = "local"\n'
        'commands = { announce = "wall \\"{message}\\"", disconnect = "kill \'{id}\'" }\n'
    )
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path, cluster_nodes=0, singles=0, extra=extra))
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "config", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TGOPS_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert "commands.announce: placeholder {message} is inside quotes" in result.stderr
    assert "commands.disconnect: placeholder {id} is inside quotes" in result.stderr


def _signed(body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(SECRET.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256)
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": f"v0={digest.hexdigest()}",
        "Content-Type": "application/x-www-form-urlencoded",
    }


async def test_slack_requests_of_another_workspace_are_refused(tmp_path: Path) -> None:
    async with fake_slack() as fake:
        sections = {
            "slack": {
                "bot_token": "xoxb-test-token",
                "signing_secret": SECRET,
                "api_url": fake.api_url,
                "team_id": "T1",
            },
            "roles": {"viewer": ["*"]},
        }
        settings = settings_for(tmp_path, sections=sections)
        async with running(settings) as (_, api):
            url = f"{api.base}/slack/events"
            for team, expected in (("T666", 403), ("T1", 200)):
                body = urlencode(
                    {
                        "command": "/tg",
                        "text": "help",
                        "team_id": team,
                        "user_id": "U1",
                        "response_url": fake.response_url(),
                    }
                ).encode()
                async with api.session.post(url, data=body, headers=_signed(body)) as response:
                    assert response.status == expected, await response.text()


def test_printable_removes_control_characters_and_keeps_the_rest() -> None:
    # the fast path (text Python calls printable) and the search give one answer
    assert printable("Kernel\x1b[2J update\x07 now\x9b") == "Kernel[2J update now"
    assert printable("line one\nline\ttwo\r\n") == "line one\nline\ttwo\n"
    assert printable("lone \ud800 surrogate") == "lone \ufffd surrogate"
    plain = "e-mail “[tgops] Hotfix HF-1” to Jörg Müller (jm@example.org) ✓"
    assert printable(plain) is plain
    # a character Python does not call printable but that is no control character stays
    assert printable("a\u2028b\u00a0c") == "a\u2028b\u00a0c"
