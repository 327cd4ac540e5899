"""Crash safety (L15): the service is killed with SIGKILL in the middle of a run."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.events import until
from tests.processes import Remote, service_process
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import fleet_toml

pytestmark = pytest.mark.slow


@asynccontextmanager
async def _restarted_after_kill(
    tmp_path: Path, *, command: str, step: str, operation: str
) -> AsyncIterator[tuple[Remote, int]]:
    """Start the service, send ``command``, kill it (SIGKILL) once tg1's run is at ``step``
    (its ``operation`` held by a delay, taken away again afterwards), start it again: the
    second service and the run's id."""
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server, aiohttp.ClientSession() as session:
        config = tmp_path / "tgops.toml"
        config.write_text(
            fleet_toml(tmp_path, repository_url=server.url, public_key=repo.public_key)
        )
        faults = tmp_path / "nodes" / "tg1" / "faults.json"
        faults.parent.mkdir(parents=True)
        faults.write_text(json.dumps({"delay": {operation: 60}}))
        async with service_process(config, tmp_path, session) as first:
            reply = await first.command(command)
            assert reply["ok"], reply
            run_id = int(reply["text"].split("#")[1].split()[0])

            async def there() -> bool:
                run = (await first.node("tg1"))["run"]
                return run is not None and run["step"] == step

            await until(there)
            await first.kill()
        faults.write_text("{}")
        async with service_process(config, tmp_path, session) as second:
            yield second, run_id


async def test_kill_during_install_ends_the_run_failed_with_the_lock(tmp_path: Path) -> None:
    # the whole cluster: tg1 takes the one slot, tg2 and tg3 wait for it
    async with _restarted_after_kill(
        tmp_path, command="auto-update c1 --yes", step="install", operation="install"
    ) as (second, run_id):
        tg1 = await second.node("tg1")
        assert tg1["run"] is None
        assert tg1["update_lock"] is not None
        reason = tg1["update_lock"]["reason"]
        assert f"run #{run_id} (auto-update) failed at step install" in reason
        assert "interrupted by a restart of tgops" in reason
        assert tg1["lb"] == "drained"
        assert "stays out of load balancing until `remove-lock`" in reason
        status = await second.status()
        assert status["clusters"][0]["updating"] == ["tg1"]
        # the rollout stopped at its failed node, also across the restart
        for name in ("tg2", "tg3"):

            async def ended(name: str = name) -> bool:
                return (await second.node(name))["run"] is None

            await until(ended)
            node = await second.node(name)
            assert node["installed"] == {} and node["lb"] == "in", node
        assert (await second.status())["clusters"][0]["waiting"] == []
        log = (await second.command("log c1 60"))["text"]
        assert "rollout stopped: tg1 failed" in log
        log = (await second.command("log tg1 30"))["text"]
        assert "update lock set" in log
        reply = await second.command("remove-lock tg1")
        assert "back in load balancing" in reply["text"]
        tg1 = await second.node("tg1")
        assert tg1["lb"] == "in" and tg1["update_lock"] is None


async def test_kill_during_download_resumes_the_run(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server, aiohttp.ClientSession() as session:
        config = tmp_path / "tgops.toml"
        config.write_text(
            fleet_toml(tmp_path, repository_url=server.url, public_key=repo.public_key)
        )
        server.hold()
        async with service_process(config, tmp_path, session) as first:
            reply = await first.command("auto-update solo1 --yes")
            run_id = int(reply["text"].split("#")[1].split()[0])

            async def downloading() -> bool:
                run = (await first.node("solo1"))["run"]
                return run is not None and run["step"] == "download"

            await until(downloading)
            await server.wait_active(1)
            await first.kill()
        server.release()
        async with service_process(config, tmp_path, session) as second:

            async def finished() -> bool:
                return (await second.node("solo1"))["run"] is None

            await until(finished)
            solo = await second.node("solo1")
            log = (await second.command("log solo1 30"))["text"]
            assert solo["installed"] == {"tg-base": "1.0"}, log
            assert solo["update_lock"] is None
            assert f"run resumed solo1 run #{run_id}" in log


async def test_kill_during_verify_resumes_the_run(tmp_path: Path) -> None:
    """The post-update check only reads: a run killed in it (its start written with the
    run's next record, or already) checks again after the restart and ends succeeded."""
    async with _restarted_after_kill(
        tmp_path, command="auto-update tg1 --yes", step="verify", operation="post_check"
    ) as (second, run_id):

        async def finished() -> bool:
            return (await second.node("tg1"))["run"] is None

        await until(finished)
        tg1 = await second.node("tg1")
        log = (await second.command("log tg1 40"))["text"]
        assert tg1["installed"] == {"tg-base": "1.0"}, log
        assert tg1["update_lock"] is None and tg1["lb"] == "in", log
        assert f"run resumed tg1 run #{run_id}" in log
        assert (await second.status())["clusters"][0]["updating"] == []
