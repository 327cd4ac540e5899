"""Settings: TOML plus environment overrides, one line per problem naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.durations import format_duration, parse_duration
from core.errors import ConfigError
from core.settings import load_settings, masked

EXAMPLE = Path(__file__).parent.parent / "config" / "tgops.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tgops.toml"
    path.write_text(text)
    return path


def problems(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return info.value.problems


def test_example_config_is_valid_and_documents_every_section() -> None:
    settings = load_settings(EXAMPLE, {})
    assert [n.name for n in settings.nodes] == ["tg1", "tg2", "tg3", "single"]
    assert settings.clusters["cluster-a"].max_parallel_updates == 1
    text = EXAMPLE.read_text()
    for key in (
        "notice_lead",
        "reminder_interval",
        "lb_drain_lead",
        "download_attempts",
        "retry_delay",
        "download_lead",
        "always_install_hotfixes",
        "public_key_file",
        "signing_secret",
        "app_token",
        "starttls",
        "use_tls",
        "call_rounds",
        "ack_wait",
        "sms_fallback",
        "urgent_calls",
        "max_parallel_updates",
        "lb_drain",
        "lb_undrain",
        "key_file",
        "commands.",
    ):
        assert key in text, key


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("0.5s", 0.5), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("45", 45)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "1h 30m", "-5", "m15", "1.5.2s"])
def test_bad_durations_are_named(text: str, tmp_path: Path) -> None:
    path = write(tmp_path, f'[maintenance]\nnotice_lead = "{text}"\n')
    (line,) = problems(path)
    assert line.startswith("maintenance.notice_lead: ")
    assert "1h30m" in line


def test_format_duration_round_trips() -> None:
    for seconds in (0, 1, 59, 60, 3600, 5400, 86399, 0.5):
        assert parse_duration(format_duration(seconds)) == seconds


def test_environment_overrides_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[slack]\nbot_token = "from-file"\n[updates]\ndownload_attempts = 4\n')
    settings = load_settings(
        path,
        {
            "TGOPS_SLACK__BOT_TOKEN": "xoxb-from-env",
            "TGOPS_MAINTENANCE__NOTICE_LEAD": "1h30m",
            "TGOPS_TEST_DATABASE_URL": "ignored: test variables are not config",
        },
    )
    assert settings.slack.bot_token is not None
    assert settings.slack.bot_token.get_secret_value() == "xoxb-from-env"
    assert settings.maintenance.notice_lead == 5400
    assert settings.updates.download_attempts == 4


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'timezone = "UTC"\n')
    assert load_settings(None, {"TGOPS_CONFIG": str(path)}).timezone == "UTC"


def test_unknown_keys_are_errors_with_their_name(tmp_path: Path) -> None:
    path = write(tmp_path, '[updates]\nchanel = "stable"\n[slak]\nx = 1\n')
    lines = problems(path, {"TGOPS_MAINTENANCE__NOTICE_LAED": "1h", "TGOPS_FOO": "1"})
    assert (
        "updates.chanel: unknown key (see config/tgops.example.toml for every accepted key)"
        in lines
    )
    assert any(line.startswith("slak: unknown key") for line in lines)
    assert "environment TGOPS_FOO: unknown key" in lines
    assert any(line.startswith("maintenance.notice_laed: unknown key") for line in lines)


def test_one_line_per_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'timezone = "Mars/Olympus"\n'
        '[http]\nport = "eighty"\n'
        "[updates]\ndownload_attempts = 0\n"
        "[smtp]\nstarttls = true\nuse_tls = true\n",
    )
    lines = problems(path)
    assert len(lines) == 4, lines
    assert any(
        line.startswith("timezone: 'Mars/Olympus' is not an IANA time zone") for line in lines
    )
    assert any(line.startswith("http.port: ") and "'eighty'" in line for line in lines)
    assert any(line.startswith("updates.download_attempts: ") for line in lines)
    assert any(line.startswith("smtp: starttls and use_tls exclude each other") for line in lines)


def test_a_sender_address_that_is_not_ascii_is_named(tmp_path: Path) -> None:
    """Such a sender could not be sent (MAIL FROM, the From header): `tgops config check`
    says so, not the first e-mail."""
    (line,) = problems(write(tmp_path, '[smtp]\nsender = "jö@example.org"\n'))
    assert line == (
        "smtp.sender: is not a plain ASCII e-mail address (user@example.org); "
        "internationalized addresses are not supported (got 'jö@example.org')"
    )


def test_malformed_toml_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[http\nport = 1\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path / "nope.toml")
    assert line == f"{tmp_path / 'nope.toml'}: no such file"


def test_node_references_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, '[[nodes]]\nname = "n1"\ncluster = "clster"\nroot = "x"\n')
    (line,) = problems(path)
    assert line == "nodes[0].cluster: cluster 'clster' is not declared; add [clusters.clster]"
    path = write(
        tmp_path,
        '[[nodes]]\nname = "n2"\ndriver = "ssh"\n[[nodes]]\nname = "n3"\ndriver = "telnet"\n',
    )
    lines = problems(path)
    assert any(line.startswith("nodes[0]: ") and "needs host" in line for line in lines)
    assert any(line.startswith("nodes[1].driver: ") for line in lines)
    # a real cluster node must be able to leave load balancing
    path = write(
        tmp_path, '[clusters.c1]\n[[nodes]]\nname = "n4"\ncluster = "c1"\ndriver = "local"\n'
    )
    (line,) = problems(path)
    assert line.startswith("clusters.c1: node n4 (local driver) leaves load balancing")
    assert line.endswith(
        "set lb_drain and lb_undrain (command templates with {node}) or haproxy_socket"
    )


def test_secrets_are_masked_and_never_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[slack]\nbot_token = "xoxb-secret"\n[api.tokens.a]\ntoken = "tok-secret"\n'
        '[smtp]\npassword = "pw-secret"\nport = "x"\n',
    )
    lines = problems(path)
    assert not any("-secret" in line for line in lines)
    path = write(
        tmp_path,
        '[slack]\nbot_token = "xoxb-secret"\n[api.tokens.a]\ntoken = "tok-secret"\n'
        '[smtp]\npassword = "pw-secret"\n',
    )
    data = masked(load_settings(path, {}))
    assert data["slack"]["bot_token"] == "********"
    assert data["api"]["tokens"]["a"]["token"] == "********"
    assert data["smtp"]["password"] == "********"
    for secret in ("xoxb-secret", "tok-secret", "pw-secret"):
        assert secret not in repr(data)


def test_secrets_from_files_and_a_secrets_directory(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        '[api.tokens.admin]\ntoken = "from-the-file"\nroles = ["update"]\n'
        '[smtp]\nhost = "mail.example.org"\n',
    )
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "tgops_smtp__password").write_text("smtp-pass\n")
    (secrets / "TGOPS_TWILIO__AUTH_TOKEN").write_text("twilio-token")
    (secrets / "tgops_slack__bot_token").write_text("from-the-directory")
    (secrets / "other-service-password").write_text("not ours")  # ignored
    bot_token = tmp_path / "bot_token"
    bot_token.write_text("xoxb-from-a-file\r\n")
    admin = tmp_path / "admin"
    admin.write_text("admin-from-a-file\n")
    database = tmp_path / "database_url"
    database.write_text(f"sqlite+aiosqlite:///{tmp_path}/state.db\n")
    env = {
        "TGOPS_SECRETS_DIR": str(secrets),
        "TGOPS_SLACK__BOT_TOKEN_FILE": str(bot_token),  # wins over the directory
        "TGOPS_API__TOKENS__ADMIN__TOKEN_FILE": str(admin),
        "TGOPS_DATABASE_URL_FILE": str(database),
    }
    settings = load_settings(config, env)
    assert settings.slack.bot_token is not None
    assert settings.slack.bot_token.get_secret_value() == "xoxb-from-a-file"
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "smtp-pass"
    assert settings.twilio.auth_token is not None
    assert settings.twilio.auth_token.get_secret_value() == "twilio-token"
    assert settings.api.tokens["admin"].token.get_secret_value() == "admin-from-a-file"
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path}/state.db"
    # the variable itself wins over the directory
    direct = load_settings(config, {**env, "TGOPS_SMTP__PASSWORD": "direct"})
    assert direct.smtp.password is not None
    assert direct.smtp.password.get_secret_value() == "direct"
    # a non-secret key keeps its own meaning of _FILE (updates.public_key_file)
    keyed = load_settings(config, {"TGOPS_UPDATES__PUBLIC_KEY_FILE": str(tmp_path / "k.pub")})
    assert keyed.updates.public_key_file == tmp_path / "k.pub"


def test_secret_file_problems_are_named(tmp_path: Path) -> None:
    config = write(tmp_path, "")
    found = problems(
        config,
        {
            "TGOPS_SMTP__PASSWORD_FILE": str(tmp_path / "nowhere"),
            "TGOPS_SLACK__APP_TOKEN": "xapp-1",
            "TGOPS_SLACK__APP_TOKEN_FILE": str(config),
            "TGOPS_SECRETS_DIR": str(tmp_path / "no-dir"),
        },
    )
    assert found == [
        f"environment TGOPS_SECRETS_DIR: cannot read {tmp_path}/no-dir (No such file or directory)",
        "environment TGOPS_SLACK__APP_TOKEN_FILE: give TGOPS_SLACK__APP_TOKEN or "
        "TGOPS_SLACK__APP_TOKEN_FILE, not both",
        f"environment TGOPS_SMTP__PASSWORD_FILE: cannot read {tmp_path}/nowhere "
        "(No such file or directory)",
    ]
