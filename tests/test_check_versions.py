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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.nagios import Range, RangeError
from core.lifecycle.heartbeat import HEARTBEAT_KEY, HEARTBEAT_KV
from core.model import PackageKind
from core.store import Store
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
        assert result.lines[0].startswith(
            "TGOPS OK - 4 nodes, 4 pending updates, 0 pending hotfixes | "
            "pending_updates=4;;;0 pending_hotfixes=0;;;0 nodes_warning_flag=0;0;;0;4 "
            "nodes_locked=0;;0;0;4 nodes_restart_required=0;0;;0;4 "
            "nodes_unreachable=0;0;;0;4 heartbeat_age_seconds="
        )
        perfdata = result.perfdata
        assert perfdata["heartbeat_age_seconds"].endswith(";;120;0")
        assert perfdata["manifest_age_seconds"].endswith(";;2700;0")  # 3 x 15m
        assert perfdata["urgent_hotfixes_pending"] == "0;0;;0"
        assert perfdata["urgent_hotfix_age_seconds"] == "0;;86400;0"
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


# -- the service's signs of life, unreachable nodes, urgent hotfixes ---------------------

QUICK = {"leader": {"heartbeat": "0.5s", "node_check": "0.5s"}}


async def plugin_until(
    check: Callable[[Result], bool], *args: str, config: Path, within: float = 30.0
) -> Result:
    """Run the plugin until ``check`` holds (bounded: the service works at its own pace)."""
    deadline = time.monotonic() + within
    while True:
        result = await plugin(*args, config=config)
        if check(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.3)


async def test_a_stopped_service_and_a_stale_heartbeat_are_critical(tmp_path: Path) -> None:
    async with fleet(tmp_path, sections=QUICK) as f:
        result = await plugin("--max-age", "1m", config=f.config)
        assert result.code == OK, result.stdout
        assert int(result.perfdata["heartbeat_age_seconds"].split(";")[0]) <= 60
        assert result.perfdata["heartbeat_age_seconds"].endswith(";;60;0")
        result = await plugin("-v", config=f.config)
        assert any(
            line.startswith(f"service: instance {f.service.instance} leads, heartbeat ")
            for line in result.lines
        ), result.stdout
    config = tmp_path / "tgops.toml"

    # the service is stopped: its heartbeat ages and the check turns CRITICAL
    await asyncio.sleep(1.2)
    result = await plugin("--max-age", "1s", config=config)
    assert result.code == CRITICAL, result.stdout
    assert re.match(
        r"TGOPS CRITICAL - tgops service not running: last heartbeat \d+s ago "
        r"\(--max-age 1s\); 4 nodes, 4 pending updates, 0 pending hotfixes$",
        result.status,
    ), result.status
    assert result.perfdata["heartbeat_age_seconds"].endswith(";;1;0")

    # a heartbeat written long ago (a crashed service) against the default --max-age
    database = f"sqlite+aiosqlite:///{tmp_path}/state.db"
    written = datetime.now(UTC) - timedelta(minutes=10)
    async with Store(database) as store:
        await store.kv_set(
            HEARTBEAT_KV,
            HEARTBEAT_KEY,
            {"instance": "gone", "at": written.isoformat(), "interval": 15},
        )
    result = await plugin(config=config)
    assert result.code == CRITICAL
    assert result.status.startswith(
        "TGOPS CRITICAL - tgops service not running: last heartbeat 10m"
    ), result.status
    assert result.status.endswith(
        " ago (--max-age 2m); 4 nodes, 4 pending updates, 0 pending hotfixes"
    )
    assert result.perfdata["heartbeat_age_seconds"].startswith("60")

    # no heartbeat at all: a store of a tgops that never wrote one
    async with Store(database) as store:
        await store.kv_delete(HEARTBEAT_KV, HEARTBEAT_KEY)
    result = await plugin(config=config)
    assert result.code == CRITICAL
    assert result.status.startswith(
        "TGOPS CRITICAL - tgops service not running: no heartbeat in the store"
    )
    assert "heartbeat_age_seconds" not in result.perfdata


async def test_a_manifest_not_fetched_for_three_poll_intervals_is_critical(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path, sections=QUICK, updates={"poll_interval": "1s"}) as f:
        result = await plugin(config=f.config)
        assert result.code == OK, result.stdout
        assert result.perfdata["manifest_age_seconds"].endswith(";;3;0")
        # the repository stops answering: every poll fails from now on
        f.server.fail_next(100_000, status=503)
        result = await plugin_until(lambda r: r.code == CRITICAL, config=f.config)
        assert result.code == CRITICAL, result.stdout
        assert re.match(
            r"TGOPS CRITICAL - manifest of channel stable not fetched for \d+s \(more than "
            r"3 x updates.poll_interval 1s\); is the update repository reachable\?; 4 nodes",
            result.status,
        ), result.status
        # it answers again: the next poll clears it
        f.server.reset()
        result = await plugin_until(lambda r: r.code == OK, config=f.config)
        assert result.code == OK, result.stdout


async def test_an_unreachable_node_is_a_warning_naming_it(tmp_path: Path) -> None:
    async with fleet(tmp_path, sections=QUICK) as f:
        f.fault("tg3", '{"unreachable": "no route to host"}')
        # nobody asks for its status: the leader's node check finds it
        result = await plugin_until(lambda r: r.code != OK, config=f.config)
        assert result.code == WARNING, result.stdout
        assert result.status.startswith("TGOPS WARNING - unreachable: tg3; 4 nodes")
        (line,) = [line for line in result.lines if line.startswith("tg3: ")]
        assert line.startswith("tg3: WARNING: unreachable: ")
        assert "no route to host" in line
        assert result.perfdata["nodes_unreachable"] == "1;0;;0;4"
        assert (await plugin("--node", "tg1", config=f.config)).code == OK
        f.fault("tg3", "{}")
        result = await plugin_until(lambda r: r.code == OK, config=f.config)
        assert result.code == OK, result.stdout
        assert result.perfdata["nodes_unreachable"] == "0;0;;0;4"


async def test_an_urgent_hotfix_not_installed_warns_then_is_critical(tmp_path: Path) -> None:
    async with fleet(tmp_path, sections=QUICK) as f:
        f.repo.add("tg-browser", "1.0.1", hotfix="HF-7", summary="normal one")
        f.repo.add("tg-base", "1.0.1", hotfix="HF-9", urgency="urgent", summary="urgent one")
        f.service.notifier.watch.wake()  # the hotfix watch sees it (and records when)
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}  # manifest saved
        result = await plugin_until(lambda r: r.code != OK, config=f.config)
        assert result.code == WARNING, result.stdout
        assert result.status.startswith(
            "TGOPS WARNING - urgent hotfix pending: HF-9 on tg1, tg2, tg3, solo1; 4 nodes"
        ), result.status
        assert result.perfdata["urgent_hotfixes_pending"] == "1;0;;0"
        assert any(
            line.startswith("urgent hotfix HF-9: not installed on tg1, tg2, tg3, solo1; ")
            for line in result.lines
        )
        # pending longer than --urgent-max-age: CRITICAL
        await asyncio.sleep(1.2)
        result = await plugin("--urgent-max-age", "1s", config=f.config)
        assert result.code == CRITICAL, result.stdout
        assert result.status.startswith(
            "TGOPS CRITICAL - urgent hotfix pending over 1s: HF-9 on tg1, tg2, tg3, solo1; "
        )
        assert result.perfdata["urgent_hotfix_age_seconds"].endswith(";;1;0")

        # installed on three nodes: still pending on the fourth
        assert (await f.api.command("hotfixes always on"))["ok"]
        assert await f.outcomes("auto-update c1 --yes") == {
            "tg1": "succeeded",
            "tg2": "succeeded",
            "tg3": "succeeded",
        }
        result = await plugin(config=f.config)
        assert result.code == WARNING
        assert result.status.startswith("TGOPS WARNING - urgent hotfix pending: HF-9 on solo1;")
        assert await f.outcomes("auto-update solo1 --yes") == {"solo1": "succeeded"}
        result = await plugin(config=f.config)
        assert result.code == OK, result.stdout
        assert result.perfdata["urgent_hotfixes_pending"] == "0;0;;0"


async def test_verbosity_levels(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
        quiet = await plugin(config=f.config)
        one = await plugin("-v", config=f.config)
        two = await plugin("-vv", config=f.config)
        three = await plugin("-v", "-v", "-v", config=f.config)
    assert not any(line.startswith(("service:", "manifest:")) for line in quiet.lines)
    assert any(line.startswith("manifest: channel stable fetched ") for line in one.lines)
    assert not any(line.startswith("settings:") for line in one.lines)
    (settings,) = [line for line in two.lines if line.startswith("settings:")]
    assert "--max-age 2m; --urgent-max-age 24h; -w -; -c -; updates.poll_interval 15m" in settings
    assert "tg1: updates -; hotfixes -" not in two.lines
    assert "tg2: updates tg-base; hotfixes -" in three.lines
    assert {r.code for r in (quiet, one, two, three)} == {OK}
    result = await plugin("--max-age", "0", config=f.config)
    assert result.code == UNKNOWN
    assert "argument --max-age: '0': give a duration above 0" in result.status
    result = await plugin("--urgent-max-age", "soon", config=f.config)
    assert result.code == UNKNOWN
    assert "argument --urgent-max-age: 'soon' is not a duration" in result.status
