"""Secrets and personal data stay with the owner: masked database passwords, files created
0600, a warning for a readable configuration with secrets, empty secrets refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.smtp import Envelope, Session

from bot.demo.demo import _Mailbox, write_config
from tests.service import fleet_toml, running, settings_for

ROOT = Path(__file__).parent.parent
PASSWORD = "s3cret-db-pw"
PG_URL = f"postgresql+asyncpg://tgops:{PASSWORD}@db.example.org:5432/tgops"


def tgops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("TGOPS_")},
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_config_check_masks_the_database_password_and_warns_about_a_readable_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path, database_url=PG_URL))
    config.chmod(0o644)
    result = tgops("config", "check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert '"database_url": "postgresql+asyncpg://tgops:********@db.example.org:5432/tgops"' in (
        result.stdout
    )
    assert "warning:" in result.stderr and "holds secrets (database_url, api.tokens" in (
        result.stderr
    )
    assert f"chmod 600 {config}" in result.stderr and "mode 0644" in result.stderr

    config.chmod(0o600)
    result = tgops("config", "check", "--config", str(config))
    assert result.returncode == 0 and "warning" not in result.stderr

    # a database URL that is refused is not printed with its password either
    config.write_text(fleet_toml(tmp_path, database_url=f"mysql://tgops:{PASSWORD}@h/db"))
    result = tgops("config", "check", "--config", str(config))
    assert result.returncode == 2
    assert "database_url" in result.stderr and PASSWORD not in result.stderr


def test_empty_secrets_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "tgops.toml"
    extra = '[slack]\nbot_token = "xoxb-1"\nsigning_secret = ""\n[twilio]\nauth_token = "  "\n'
    config.write_text(fleet_toml(tmp_path, extra=extra))
    config.chmod(0o600)
    result = tgops("config", "check", "--config", str(config))
    assert result.returncode == 2
    assert "slack.signing_secret: must not be empty" in result.stderr
    assert "twilio.auth_token: must not be empty" in result.stderr


async def test_the_sqlite_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    settings = settings_for(tmp_path)
    async with running(settings) as (_, api):
        await api.command("status")
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            path = tmp_path / name
            assert path.exists(), name
            assert mode(path) & 0o077 == 0, f"{name}: {mode(path):o}"
    # a database left readable by an earlier version is made private at the next start
    state.chmod(0o644)
    async with running(settings):
        assert mode(state) & 0o077 == 0


async def test_the_demo_writes_its_config_and_mails_privately(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        repo_port=1,
        smtp_port=2,
        phone_port=3,
        http_port=4,
        public_key="k",
        token="demo-token",
        twilio_token="twilio-token",
        timezone="UTC",
    )
    assert mode(path) == 0o600
    path.chmod(0o644)  # an earlier run's file: written private again
    write_config(
        tmp_path,
        repo_port=1,
        smtp_port=2,
        phone_port=3,
        http_port=4,
        public_key="k",
        token="demo-token",
        twilio_token="twilio-token",
        timezone="UTC",
    )
    assert mode(path) == 0o600

    mail = tmp_path / "mail"
    box = _Mailbox(mail, lambda _: None)
    message = EmailMessage()
    message["Subject"] = "Hotfix HF-1"
    message["To"] = "c1@customer.example"
    message.set_content("hello")
    envelope = Envelope()
    envelope.rcpt_tos = ["c1@customer.example"]
    envelope.content = message.as_bytes()
    await box.handle_DATA(None, Session(loop=None), envelope)  # type: ignore[arg-type]
    [stored] = list((mail / "new").iterdir())
    assert mode(stored) == 0o600 and mode(mail) & 0o077 == 0
