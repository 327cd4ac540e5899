"""Crash safety (L15): the service is killed with SIGKILL in the middle of a run."""

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
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, fleet_toml

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def service_process(config: Path, tmp_path: Path) -> AsyncIterator[Process]:
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    with (tmp_path / "service.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "serve",
            "--config",
            str(config),
            "--ready-file",
            str(ready),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with asyncio.timeout(30):
            while not ready.exists():
                assert proc.returncode is None, (tmp_path / "service.log").read_text()
                await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await proc.wait()


async def api(session: aiohttp.ClientSession, port: int, text: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if text is None:
        async with session.get(f"http://127.0.0.1:{port}/api/v1/status", headers=headers) as r:
            return await r.json()
    async with session.post(
        f"http://127.0.0.1:{port}/api/v1/command", json={"text": text}, headers=headers
    ) as r:
        return await r.json()


async def node(session: aiohttp.ClientSession, port: int, name: str) -> dict[str, Any]:
    status = await api(session, port)
    found: dict[str, Any] = next(n for n in status["nodes"] if n["name"] == name)
    return found


async def wait_for(
    session: aiohttp.ClientSession, port: int, name: str, check: Any
) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            state = await node(session, port, name)
            if check(state):
                return state
            await asyncio.sleep(0.1)


async def test_kill_during_install_ends_the_run_failed_with_the_lock(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    port = free_port()
    async with serve_repo(repo.root) as server, aiohttp.ClientSession() as session:
        config = tmp_path / "tgops.toml"
        config.write_text(
            fleet_toml(tmp_path, repository_url=server.url, public_key=repo.public_key).replace(
                "port = 0", f"port = {port}"
            )
        )
        (tmp_path / "nodes" / "tg1").mkdir(parents=True)
        (tmp_path / "nodes" / "tg1" / "faults.json").write_text(
            json.dumps({"delay": {"install": 60}})
        )
        async with service_process(config, tmp_path) as proc:
            reply = await api(session, port, "auto-update tg1 --yes")
            assert reply["ok"], reply
            run_id = int(reply["text"].split("#")[1].split()[0])
            await wait_for(
                session,
                port,
                "tg1",
                lambda n: n["run"] is not None and n["run"]["step"] == "install",
            )
            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await proc.wait()
        (tmp_path / "nodes" / "tg1" / "faults.json").write_text("{}")
        async with service_process(config, tmp_path):
            tg1 = await node(session, port, "tg1")
            assert tg1["run"] is None
            assert tg1["update_lock"] is not None
            reason = tg1["update_lock"]["reason"]
            assert f"run #{run_id} (auto-update) failed at step install" in reason
            assert "interrupted by a restart of tgops" in reason
            assert tg1["lb"] == "drained"
            assert "stays out of load balancing until `remove-lock`" in reason
            status = await api(session, port)
            assert status["clusters"][0]["updating"] == ["tg1"]
            log = (await api(session, port, "log tg1 30"))["text"]
            assert "update lock set" in log
            reply = await api(session, port, "remove-lock tg1")
            assert "back in load balancing" in reply["text"]
            tg1 = await node(session, port, "tg1")
            assert tg1["lb"] == "in" and tg1["update_lock"] is None


async def test_kill_during_download_resumes_the_run(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    port = free_port()
    async with serve_repo(repo.root) as server, aiohttp.ClientSession() as session:
        config = tmp_path / "tgops.toml"
        config.write_text(
            fleet_toml(tmp_path, repository_url=server.url, public_key=repo.public_key).replace(
                "port = 0", f"port = {port}"
            )
        )
        server.hold()
        async with service_process(config, tmp_path) as proc:
            reply = await api(session, port, "auto-update solo1 --yes")
            run_id = int(reply["text"].split("#")[1].split()[0])
            await wait_for(
                session,
                port,
                "solo1",
                lambda n: n["run"] is not None and n["run"]["step"] == "download",
            )
            await server.wait_active(1)
            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await proc.wait()
        server.release()
        async with service_process(config, tmp_path):
            solo = await wait_for(session, port, "solo1", lambda n: n["run"] is None)
            log = (await api(session, port, "log solo1 30"))["text"]
            assert solo["installed"] == {"tg-base": "1.0"}, log
            assert solo["update_lock"] is None
            log = (await api(session, port, "log solo1 30"))["text"]
            assert f"run resumed solo1 run #{run_id}" in log
