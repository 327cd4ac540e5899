"""`tgops check-versions` (the Nagios plugin) as Nagios runs it: a separate process.

The store is prepared by the real service (sandbox nodes, a signed repository on loopback)
and its commands; the plugin reads it while the service runs and after it stopped.
Assertions are the plugin's exit code and output, as the monitoring system sees them.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.nagios import Range, RangeError
from core.model import PackageKind
from tests.databases import POSTGRES_URL, reset_postgres
from tests.fleet import fleet
from tests.ports import free_port
from tests.service import fleet_toml, running, settings_for

ROOT = Path(__file__).parent.parent
PLUGIN = [sys.executable, "-m", "bot.cli", "check-versions"]
PERF_ITEM = re.compile(r"^[a-z_]+=\d+(;[0-9:~@]*){0,4}$")
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    @property
    def status(self) -> str:
        """The status line without its perfdata."""
        return self.lines[0].split(" | ")[0]

    @property
    def perfdata(self) -> dict[str, str]:
        _, _, perf = self.lines[0].partition(" | ")
        items = perf.split()
        assert all(PERF_ITEM.match(item) for item in items), perf
        return dict(item.split("=", 1) for item in items)


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("TGOPS_")}


async def plugin(*args: str, config: Path | None = None) -> Result:
    """Run the plugin as Nagios does and collect what it printed."""
    command = [*PLUGIN, *(["--config", str(config)] if config else []), *args]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Result(code=process.returncode, stdout=out.decode(), stderr=err.decode())


async def test_ok_pending_updates_thresholds_and_service_down(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        # the service fetched and stored the channel's manifest when it started
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
        result = await plugin(config=f.config)
        assert result.code == OK
        assert result.lines[0] == (
            "TGOPS OK - 4 nodes, 4 pending updates, 0 pending hotfixes | "
            "pending_updates=4;;;0 pending_hotfixes=0;;;0 nodes_warning_flag=0;0;;0;4 "
            "nodes_locked=0;;0;0;4 nodes_restart_required=0;0;;0;4"
        )
        assert "pending as of channel stable's manifest generated" in result.lines[1]

        result = await plugin("-w", "3", config=f.config)
        assert result.code == WARNING
        assert result.status.startswith("TGOPS WARNING - pending updates 4 (warning: 3); 4 nodes")
        assert result.perfdata["pending_updates"] == "4;3;;0"
        result = await plugin("-w", "3", "-c", "3", config=f.config)
        assert result.code == CRITICAL
        assert result.status.startswith("TGOPS CRITICAL - pending updates 4 (critical: 3)")
        assert result.perfdata["pending_updates"] == "4;3;3;0"
        result = await plugin("-w", "4", "-c", "10", config=f.config)
        assert result.code == OK  # 4 is not above 4
        result = await plugin("--warning", "10:", config=f.config)
        assert result.code == WARNING  # "10:" alerts below 10
        result = await plugin("--node", "tg1", config=f.config)
        assert result.status == "TGOPS OK - 1 node, 1 pending update, 0 pending hotfixes"
        assert result.perfdata["nodes_locked"] == "0;;0;0;1"
        result = await plugin("--node", "c1", config=f.config)
        assert result.status == "TGOPS OK - 3 nodes, 3 pending updates, 0 pending hotfixes"

        # a hotfix selected for tg2 becomes pending with the next verified manifest
        f.repo.add("tg-browser", "1.0.1", hotfix="HF-7", summary="fixes video playback")
        assert (await f.api.command("hotfixes select tg2 HF-7"))["ok"]
        assert await f.outcomes("download tg2") == {"tg2": "succeeded"}
        result = await plugin("--node", "tg2", config=f.config)
        assert result.status == "TGOPS OK - 1 node, 1 pending update, 1 pending hotfix"
        assert result.perfdata["pending_hotfixes"] == "1;;;0"
        assert (await plugin(config=f.config)).perfdata["pending_hotfixes"] == "1;;;0"

        assert await f.outcomes("auto-update solo1") == {"solo1": "succeeded"}
        result = await plugin("--node", "solo1", config=f.config)
        assert result.status == "TGOPS OK - 1 node, 0 pending updates, 0 pending hotfixes"

    # the service is down: the plugin still answers from the store alone
    result = await plugin("-w", "2", config=tmp_path / "tgops.toml")
    assert result.code == WARNING
    assert result.status.startswith("TGOPS WARNING - pending updates 3 (warning: 2); 4 nodes")


async def test_the_service_saves_the_manifest_for_the_plugin(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
    # stopped without being asked to save: its event subscriber did
    result = await plugin(config=tmp_path / "tgops.toml")
    assert result.code == OK, result.stdout
    assert result.status == "TGOPS OK - 4 nodes, 4 pending updates, 0 pending hotfixes"
    assert result.lines[1].startswith("pending as of channel stable's manifest generated ")


async def test_warning_flag_restart_required_and_update_lock(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.server.fail_next(100, status=503)
        assert await f.outcomes("download solo1") == {"solo1": "failed"}
        result = await plugin(config=f.config)
        assert result.code == WARNING, result.stdout
        assert result.status.startswith("TGOPS WARNING - Update download failed: solo1; 4 nodes")
        assert result.lines[1].startswith(
            "solo1: WARNING: Update download failed (warning flag since "
        )
        assert "2 attempts" in result.lines[1]
        assert result.perfdata["nodes_warning_flag"] == "1;0;;0;4"
        f.server.reset()

        f.repo.add("tg-kernel", "6.1", kind=PackageKind.CORE)
        assert await f.outcomes("auto-update tg1 --yes") == {"tg1": "succeeded"}
        result = await plugin(config=f.config)
        assert result.code == WARNING
        assert result.status.startswith(
            "TGOPS WARNING - Update download failed: solo1; restart required: tg1; 4 nodes"
        )
        assert "tg1: WARNING: restart required (core update installed; `restart tg1`)" in (
            result.lines
        )
        assert result.perfdata["nodes_restart_required"] == "1;0;;0;4"

        f.fault("tg2", '{"install": "disk full"}')
        assert await f.outcomes("auto-update tg2 --yes") == {"tg2": "failed"}
        result = await plugin(config=f.config)
        assert result.code == CRITICAL
        assert result.status.startswith(
            "TGOPS CRITICAL - update lock: tg2; Update download failed: solo1; "
            "restart required: tg1; 4 nodes"
        )
        (lock_line,) = [line for line in result.lines if line.startswith("tg2: ")]
        assert lock_line.startswith("tg2: CRITICAL: update lock since ")
        assert "disk full" in lock_line
        assert result.perfdata["nodes_locked"] == "1;;0;0;4"
        assert (await plugin("--node", "tg3", config=f.config)).code == OK
        assert (await plugin("--node", "tg1", config=f.config)).code == WARNING

        # back to OK as the admins clear each state
        assert (await f.api.command("remove-lock tg2"))["ok"]
        assert await f.outcomes("restart tg1 --yes") == {"tg1": "succeeded"}
        result = await plugin(config=f.config)
        assert result.code == WARNING
        assert result.status.startswith("TGOPS WARNING - Update download failed: solo1; 4 nodes")
        assert await f.outcomes("download solo1") == {"solo1": "succeeded"}
        result = await plugin(config=f.config)
        assert result.code == OK, result.stdout
        assert result.perfdata["nodes_warning_flag"] == "0;0;;0;4"


async def test_missing_sqlite_file_is_unknown_and_not_created(tmp_path: Path) -> None:
    config = tmp_path / "tgops.toml"
    database = tmp_path / "var" / "state.db"
    config.write_text(fleet_toml(tmp_path, database_url=f"sqlite+aiosqlite:///{database}"))
    result = await plugin(config=config)
    assert result.code == UNKNOWN
    assert result.lines == [
        f"TGOPS UNKNOWN - store sqlite+aiosqlite:///{database} not readable: {database}: "
        "no such file (has `tgops serve` run with this database_url?)"
    ]
    assert not database.parent.exists()
    database.parent.mkdir()
    assert (await plugin(config=config)).code == UNKNOWN
    assert list(database.parent.iterdir()) == []

    database.write_bytes(b"")  # a file, but no tgops schema in it
    result = await plugin(config=config)
    assert result.code == UNKNOWN
    assert result.status.endswith("no tgops schema in it; start `tgops serve` once to create it")


async def test_node_configured_but_not_in_the_store(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, cluster_nodes=1)):
        pass
    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path, cluster_nodes=2))
    result = await plugin(config=config)
    assert result.code == UNKNOWN
    assert result.status == (
        "TGOPS UNKNOWN - node tg2 is configured but not in the store; start `tgops serve` "
        "once with this configuration so that it registers the node"
    )
    assert (await plugin("--node", "tg1", config=config)).code == OK
    result = await plugin("--node", "nosuch", config=config)
    assert result.code == UNKNOWN
    assert "'nosuch' is neither a configured node nor a cluster (known: c1, tg1, tg2" in (
        result.status
    )


async def test_postgresql_not_reachable_is_unknown(tmp_path: Path) -> None:
    config = tmp_path / "tgops.toml"
    port = free_port()  # nothing listens there any more
    url = f"postgresql+asyncpg://tgops:s3cret@127.0.0.1:{port}/tgops"
    config.write_text(fleet_toml(tmp_path, database_url=url))
    result = await plugin(config=config)
    assert result.code == UNKNOWN
    assert len(result.lines) == 1
    assert result.status.startswith(
        f"TGOPS UNKNOWN - store postgresql+asyncpg://tgops:***@127.0.0.1:{port}/tgops not "
        "readable: "
    )
    assert "s3cret" not in result.stdout + result.stderr


async def test_timeout_is_unknown(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, never answer: a database that hangs

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "tgops.toml"
    url = f"postgresql+asyncpg://tgops@127.0.0.1:{port}/tgops"
    config.write_text(fleet_toml(tmp_path, database_url=url))
    try:
        began = time.monotonic()
        result = await plugin("-t", "1", config=config)
        assert time.monotonic() - began < 15
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert result.code == UNKNOWN
    assert result.lines == ["TGOPS UNKNOWN - no answer within 1s (-t); is the database overloaded?"]


async def test_help_version_and_usage_errors(tmp_path: Path) -> None:
    result = await plugin("-h")
    assert result.code == OK
    assert result.stdout.startswith("usage: tgops check-versions [-h] [--config CONFIG] [--node N]")
    for option in ("-t SECONDS", "-w PENDING", "-c PENDING", "-V, --version", "Exit codes"):
        assert option in result.stdout
    result = await plugin("-V")
    assert (result.code, result.stdout) == (OK, "tgops check-versions 0.1.0\n")

    config = tmp_path / "tgops.toml"
    config.write_text(fleet_toml(tmp_path))
    for args, reason in [
        (["-w", "abc"], "argument -w/--warning: 'abc' is not a Nagios threshold range"),
        (["-c", "5:1"], "argument -c/--critical: '5:1' is not a Nagios threshold range"),
        (["-t", "0"], "argument -t/--timeout: '0' is not a number of seconds"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]:
        result = await plugin(*args, config=config)
        assert result.code == UNKNOWN, args
        assert result.status.startswith("TGOPS UNKNOWN - "), args
        assert reason in result.status, args

    config.write_text("timezone = 'Mars/Olympus'\n")
    result = await plugin(config=config)
    assert result.code == UNKNOWN
    assert result.status.startswith("TGOPS UNKNOWN - config: timezone: 'Mars/Olympus' is not")


@pytest.mark.parametrize(
    ("text", "alerting", "quiet"),
    [
        ("10", [-1, 11, 100], [0, 5, 10]),
        ("10:", [0, 9], [10, 11, 1000]),
        ("~:10", [11], [-5, 0, 10]),
        ("10:20", [9, 21], [10, 15, 20]),
        ("@10:20", [10, 15, 20], [9, 21]),
        ("0", [1], [0]),
    ],
)
def test_threshold_ranges(text: str, alerting: list[int], quiet: list[int]) -> None:
    threshold = Range.parse(text)
    assert [v for v in alerting if not threshold.alerts(v)] == []
    assert [v for v in quiet if threshold.alerts(v)] == []


@pytest.mark.parametrize("text", ["", "@", "x", "5:1", "1:2:3", "nan", "~"])
def test_bad_threshold_ranges(text: str) -> None:
    with pytest.raises(RangeError, match="is not a Nagios threshold range"):
        Range.parse(text)


@pytest.mark.postgres
@pytest.mark.skipif(POSTGRES_URL is None, reason="no initdb: install Debian package postgresql")
async def test_postgresql_store(tmp_path: Path) -> None:
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    async with fleet(tmp_path, database_url=POSTGRES_URL) as f:
        f.fault("solo1", '{"install": "disk full"}')
        assert await f.outcomes("auto-update solo1") == {"solo1": "failed"}
        result = await plugin(config=f.config)
        assert result.code == CRITICAL, result.stdout
        assert result.status.startswith("TGOPS CRITICAL - update lock: solo1; 4 nodes")
    result = await plugin("--node", "tg1", config=tmp_path / "tgops.toml")
    assert result.code == OK, result.stdout
