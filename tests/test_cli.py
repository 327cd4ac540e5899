"""The `tgops` command line, run as a user runs it: separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.service import ADMIN_TOKEN, fleet_toml

TGOPS = [sys.executable, "-m", "bot.cli"]
ROOT = Path(__file__).parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TGOPS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_version_and_help() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("tgops ")
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "tg", "config"):
        assert command in result.stdout


def test_config_check_masks_secrets_and_reports_problems(tmp_path: Path) -> None:
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path))
    result = run(
        "config",
        "check",
        "--config",
        str(config),
        env={"TGOPS_SLACK__BOT_TOKEN": "xoxb-very-secret"},
    )
    assert result.returncode == 0, result.stderr
    assert '"bot_token": "********"' in result.stdout
    assert "xoxb-very-secret" not in result.stdout + result.stderr
    assert "admin-token-for-tests" not in result.stdout
    assert "configuration OK" in result.stderr

    config.write_text(fleet_toml(tmp_path) + '[maintenance]\nnotice_lead = "soon"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[updates]\ndownload_attempts = "many"\nchanel = "x"\n')
    result = run("config", "check", "--config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tgops: config: updates.download_attempts: ")
    assert lines[1].startswith("tgops: config: updates.chanel: unknown key")
    assert "Traceback" not in result.stderr

    result = run("config", "check", env={"TGOPS_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 2
    assert result.stderr.strip() == f"tgops: config: {tmp_path / 'missing.toml'}: no such file"


def test_config_check_refuses_what_serve_would_refuse(tmp_path: Path) -> None:
    """Command templates and the key file are checked by `config check` as by `serve`."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'database_url = "sqlite+aiosqlite:///{tmp_path}/s.db"\n'
        '[[nodes]]\nname = "h1"\ndriver = "local"\n'
        'commands.frob = "x"\ncommands.announce = "wall {msg}"\n'
    )
    result = run("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "nodes.h1.commands.frob: unknown command key; accepted keys: dpkg" in result.stderr
    assert "nodes.h1.commands.announce: unknown placeholder {msg}" in result.stderr
    assert "configuration OK" not in result.stderr

    bad.write_text(
        f'database_url = "sqlite+aiosqlite:///{tmp_path}/s.db"\n'
        f'[updates]\npublic_key_file = "{tmp_path}/no.pub"\n'
    )
    result = run("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tgops: config: updates.public_key_file: cannot read {tmp_path}/no.pub "
        "(No such file or directory)"
    )


@pytest.mark.slow
def test_serve_answers_tg_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path).replace("port = 0", f"port = {port}"))
    ready = tmp_path / "ready"
    server = subprocess.Popen(
        [*TGOPS, "serve", "--config", str(config), "--ready-file", str(ready)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "the service did not start within 30 s"
            time.sleep(0.05)
        result = run("tg", "--config", str(config), "status")
        assert result.returncode == 0, result.stderr
        for node in ("tg1", "tg2", "tg3", "solo1"):
            assert node in result.stdout
        result = run(
            "tg", "--config", str(config), "--token-name", "viewer", "logon", "disable", "tg1"
        )
        assert result.returncode == 1
        assert "needs role maint" in result.stdout
        result = run("tg", "--config", str(config), "--token-name", "nobody", "status")
        assert result.returncode == 2 and "no token named 'nobody'" in result.stderr
        result = run("tg", "--config", str(config), "frobnicate")
        assert result.returncode == 1 and "Usage: help [COMMAND]" in result.stdout
        result = run("tg", "--config", str(config), "--json", "nodes")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["ok"] is True and "tg1" in answer["text"]
        result = run("tg", "--config", str(config), "--json", "frobnicate")
        assert result.returncode == 1
        assert json.loads(result.stdout)["ok"] is False
        config.write_text(config.read_text().replace(ADMIN_TOKEN, "not-the-token"))
        result = run("tg", "--config", str(config), "status")
        assert result.returncode == 2
        assert "the service does not accept token 'admin'" in result.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=10)[0]
    assert server.returncode == 0, output
    assert "stopping" in output
    assert "Traceback" not in output


def test_tg_without_a_service_says_so(tmp_path: Path) -> None:
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path).replace("port = 0", f"port = {free_port()}"))
    result = run("tg", "--config", str(config), "status")
    assert result.returncode == 3  # 2 is kept for usage errors
    assert "cannot reach the service" in result.stderr and "tgops serve" in result.stderr
    result = run("tg", "--config", str(config), "--json", "status")
    assert result.returncode == 3
    assert result.stdout == ""


def test_keygen_and_publish(tmp_path: Path) -> None:
    from tests.debs import build_deb  # noqa: PLC0415

    key = tmp_path / "repo.key"
    result = run("keygen", "--out", str(key))
    assert result.returncode == 0, result.stderr
    assert (key.stat().st_mode & 0o777) == 0o600
    public = (tmp_path / "repo.key.pub").read_text().strip()
    assert f'updates.public_key = "{public}"' in result.stdout
    result = run("keygen", "--out", str(key))
    assert result.returncode == 1 and "never overwrites a key" in result.stderr

    base = build_deb(tmp_path, "tg-base", "2.0")
    fix = build_deb(tmp_path, "tg-browser", "1.0.1")
    repo = tmp_path / "repo"
    args = ["publish", "--repo", str(repo), "--channel", "stable", "--key", str(key)]
    result = run(*args, str(base))
    assert result.returncode == 0, result.stderr
    assert "added tg-base 2.0 regular -> pool/tg-base_2.0_all.deb" in result.stdout
    result = run(*args, str(base))
    assert "unchanged tg-base 2.0 (already published)" in result.stdout
    assert "nothing changed" in result.stdout
    result = run(*args, "--hotfix", "HF-1", "--urgency", "urgent", "--summary", "video", str(fix))
    assert "added tg-browser 1.0.1 hotfix HF-1 (urgent)" in result.stdout
    manifest = (repo / "channels" / "stable.json").read_text()
    assert '"urgency": "urgent"' in manifest.replace('":"', '": "')
    result = run(*args, "--urgency", "urgent", str(fix))
    assert result.returncode == 2 and "--urgency needs --hotfix ID" in result.stderr
    other = build_deb(tmp_path / "other", "tg-base", "2.0", {"usr/share/x": b"different"})
    result = run(*args, str(other))
    assert result.returncode == 1 and "tg-base" in result.stderr
    assert "Traceback" not in result.stderr
    # a large file shows its progress (a line per quarter when stderr is no terminal)
    large = build_deb(
        tmp_path / "large", "tg-kernel", "6.1", {"boot/vmlinuz": os.urandom(9 * 1024 * 1024)}
    )
    result = run(*args, "--kind", "core", str(large))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    percents = [int(line.removeprefix(f"{large.name}: ").removesuffix("%")) for line in lines]
    assert percents == sorted(percents) and len(percents) >= 3, lines
    assert percents[-1] == 100


def complete(line: str) -> list[str]:
    """What bash offers for the word being typed at the end of ``line``."""
    script = run("completion", "bash")
    assert script.returncode == 0, script.stderr
    words = line.split(" ")
    program = (
        script.stdout
        + f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        + f"COMP_CWORD={len(words) - 1}\n"
        + "_tgops\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    result = subprocess.run(
        ["/bin/bash", "--norc", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return sorted(w for w in result.stdout.splitlines() if w)


def test_completion_scripts() -> None:
    assert "serve" in complete("tgops ")
    assert complete("tgops check-v") == ["check-versions"]
    assert complete("tgops check-versions --max") == ["--max-age"]
    assert complete("tgops tg --js") == ["--json"]
    assert complete("tgops tg main") == ["maintenance"]
    assert complete("tgops tg maintenance ") == ["cancel", "new", "schedule"]
    assert complete("tgops config ") == ["check"]
    assert complete("tgops config check --c") == ["--config"]
    assert complete("tgops serve --") == ["--config", "--help", "--quiet", "--verbose"]
    zsh = run("completion", "zsh")
    assert zsh.returncode == 0
    assert zsh.stdout.startswith("#compdef tgops\n")
    assert "bashcompinit" in zsh.stdout and "complete -F _tgops tgops" in zsh.stdout
    bad = run("completion", "fish")
    assert bad.returncode == 2
    assert "invalid choice: 'fish' (choose from" in bad.stderr
