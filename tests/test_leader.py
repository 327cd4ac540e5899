"""Several instances: leader election on PostgreSQL, fail-over, one instance on SQLite."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from bot.service import Service
from core.leader import SecondInstanceError
from tests.databases import POSTGRES_URL, reset_postgres
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, fleet_toml, settings_for

ROOT = Path(__file__).parent.parent
BERLIN = ZoneInfo("Europe/Berlin")
needs_postgres = pytest.mark.skipif(
    POSTGRES_URL is None, reason="TGOPS_TEST_DATABASE_URL is not set"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_second_instance_on_sqlite_refuses_to_start(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with Service(settings):
        with pytest.raises(SecondInstanceError) as info:
            async with Service(settings):
                pass
    text = str(info.value)
    assert "another tgops instance" in text and "SQLite supports one instance" in text
    assert "use PostgreSQL" in text
    async with Service(settings):  # the first one is gone: this one starts
        pass


@asynccontextmanager
async def instance(config: Path, name: str, tmp_path: Path) -> AsyncIterator[tuple[Process, int]]:
    ready = tmp_path / f"ready-{name}"
    port = free_port()
    text = config.read_text().replace("port = 0", f"port = {port}")
    own = tmp_path / f"tgops-{name}.toml"
    own.write_text(text)
    with (tmp_path / f"{name}.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "serve",
            "--config",
            str(own),
            "--ready-file",
            str(ready),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with asyncio.timeout(30):
            while not ready.exists():  # noqa: ASYNC110  (a file another process writes)
                assert proc.returncode is None, (tmp_path / f"{name}.log").read_text()
                await asyncio.sleep(0.05)
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await proc.wait()


async def health(session: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
        body: dict[str, Any] = await response.json()
        return body


async def status(session: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    async with session.get(
        f"http://127.0.0.1:{port}/api/v1/status",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        body: dict[str, Any] = await response.json()
        return body


async def command(session: aiohttp.ClientSession, port: int, text: str) -> dict[str, Any]:
    async with session.post(
        f"http://127.0.0.1:{port}/api/v1/command",
        json={"text": text},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        body: dict[str, Any] = await response.json()
        return body


@needs_postgres
@pytest.mark.slow
@pytest.mark.postgres
async def test_leader_killed_during_a_scheduled_update_another_takes_over(
    tmp_path: Path,
) -> None:
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server, aiohttp.ClientSession() as session:
        config = tmp_path / "tgops.toml"
        config.write_text(
            fleet_toml(
                tmp_path,
                database_url=POSTGRES_URL,
                repository_url=server.url,
                public_key=repo.public_key,
                max_parallel=1,
                updates={"download_lead": "2s", "update_grace": "6s"},
                sections={
                    "maintenance": {
                        "notice_lead": "3s",
                        "reminder_interval": "0.5s",
                        "lb_drain_lead": "1s",
                    },
                    "leader": {"takeover": "2s"},
                },
            )
        )
        # installs take a while, so that the leader dies in the middle of the rollout
        for node in ("tg1", "tg2", "tg3"):
            (tmp_path / "nodes" / node).mkdir(parents=True)
            (tmp_path / "nodes" / node / "faults.json").write_text(
                json.dumps({"delay": {"install": 1.5}})
            )
        async with instance(config, "a", tmp_path) as (a, port_a):
            assert (await health(session, port_a))["is_leader"] is True
            async with instance(config, "b", tmp_path) as (_, port_b):
                b_health = await health(session, port_b)
                assert b_health["is_leader"] is False
                assert b_health["leader"] == (await health(session, port_a))["instance"]
                at = (datetime.now(BERLIN) + timedelta(seconds=4)).strftime("%H:%M:%S")
                # a command on the follower: stored, so the leader's timers pick it up
                reply = await command(session, port_b, f"schedule update c1 on daily {at}")
                assert reply["ok"], reply["text"]
                # wait until the first node installs, then kill the leader
                async with asyncio.timeout(30):
                    while True:
                        steps = [
                            n["run"]["step"]
                            for n in (await status(session, port_b))["nodes"]
                            if n["run"] is not None
                        ]
                        if "install" in steps:
                            break
                        await asyncio.sleep(0.05)
                a.send_signal(signal.SIGKILL)
                await a.wait()
                async with asyncio.timeout(20):
                    while not (await health(session, port_b))["is_leader"]:
                        await asyncio.sleep(0.1)
                async with asyncio.timeout(60):
                    while any(n["run"] for n in (await status(session, port_b))["nodes"]):
                        await asyncio.sleep(0.2)
                log = (await command(session, port_b, "log c1 200"))["text"]
                state = await status(session, port_b)
        nodes = {n["name"]: n for n in state["nodes"] if n["cluster"] == "c1"}
        # every node ends updated, or locked with the reason, or skipped untouched because
        # the locked node keeps its cluster slot (L12); none is lost or done twice
        locked = [n for n, node in nodes.items() if node["update_lock"] is not None]
        assert len(locked) <= 1, log
        for name, node in nodes.items():
            assert node["run"] is None, name
            if name in locked:
                assert "interrupted by a restart of tgops" in node["update_lock"]["reason"]
                assert node["lb"] == "drained"
            elif node["installed"]:
                assert node["installed"] == {"tg-base": "1.0"}, (name, log)
                assert node["lb"] == "in" and node["maintenance"] is None, name
            else:
                assert locked, (name, log)
                assert node["lb"] == "in" and node["maintenance"] is None, name
                assert f"no slot of cluster c1 became free in time (held by {locked[0]})" in log
        assert state["clusters"][0]["updating"] == locked
        assert state["clusters"][0]["waiting"] == []
        installs = [
            line
            for line in log.splitlines()
            if "scheduled-update done" in line or "run scheduled-update" in line
        ]
        started = [line for line in installs if "run scheduled-update" in line]
        assert len(started) == 3, log  # one run per node: the new leader did not start more
