"""Several instances: leader election on PostgreSQL, fail-over, one instance on SQLite."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from bot.service import Service
from core.lifecycle.leader import SecondInstanceError
from tests.databases import POSTGRES_URL, reset_postgres
from tests.events import until
from tests.processes import service_process
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import fleet_toml, settings_for
from tests.smtp_server import smtp_server

BERLIN = ZoneInfo("Europe/Berlin")


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


@pytest.mark.skipif(POSTGRES_URL is None, reason="no initdb: install Debian package postgresql")
@pytest.mark.slow
@pytest.mark.postgres
async def test_leader_killed_during_a_scheduled_update_another_takes_over(
    tmp_path: Path,
) -> None:
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with (
        serve_repo(repo.root) as server,
        smtp_server() as mail,
        aiohttp.ClientSession() as session,
    ):
        config = tmp_path / "tgops.toml"
        config.write_text(
            fleet_toml(
                tmp_path,
                database_url=POSTGRES_URL,
                repository_url=server.url,
                public_key=repo.public_key,
                max_parallel=1,
                updates={"download_lead": "3s"},
                sections={
                    "maintenance": {
                        "notice_lead": "3s",
                        "reminder_interval": "0.5s",
                        "lb_drain_lead": "2s",
                    },
                    "leader": {"takeover": "2s"},
                    "smtp": {"host": "127.0.0.1", "port": mail.port},
                    "notify": {"users_list": "users@example.org"},
                },
            )
        )
        # installs take a while, so that the rollout is still going on after the fail-over
        for node in ("tg1", "tg2", "tg3"):
            (tmp_path / "nodes" / node).mkdir(parents=True)
            (tmp_path / "nodes" / node / "faults.json").write_text(
                json.dumps({"delay": {"install": 1.5}})
            )
        async with service_process(config, tmp_path, session, name="a") as a:

            async def a_leads() -> bool:
                return bool((await a.health())["is_leader"])

            await until(a_leads, within=20)
            async with service_process(config, tmp_path, session, name="b") as b:
                b_health = await b.health()
                assert b_health["is_leader"] is False
                assert b_health["leader"] == (await a.health())["instance"]
                at = (datetime.now(BERLIN) + timedelta(seconds=5)).strftime("%H:%M:%S")
                # a command on the follower: stored, so the leader's timers pick it up
                reply = await b.command(f"schedule update c1 on daily {at}")
                assert reply["ok"], reply["text"]

                async def out_of_load_balancing() -> bool:
                    # the first node has left load balancing and waits for the update time
                    nodes = (await b.status())["nodes"]
                    return any(n["run"] and n["run"]["step"] in {"logon", "wait"} for n in nodes)

                async def b_leads() -> bool:
                    return bool((await b.health())["is_leader"])

                async def all_done() -> bool:
                    return not any(n["run"] for n in (await b.status())["nodes"])

                await until(out_of_load_balancing)
                await a.kill()  # the leader dies in the middle of the scheduled update
                await until(b_leads, within=20)
                await until(all_done, within=60)
                log = (await b.command("log c1 200"))["text"]
                state = await b.status()
        nodes = {n["name"]: n for n in state["nodes"] if n["cluster"] == "c1"}
        # the new leader resumed the runs where they stood: every node is updated once,
        # back in load balancing, out of maintenance; no slot is left taken
        for name, node in nodes.items():
            assert node["run"] is None, name
            assert node["update_lock"] is None, (name, log)
            assert node["installed"] == {"tg-base": "1.0"}, (name, log)
            assert node["lb"] == "in" and node["maintenance"] is None, name
        assert state["clusters"][0]["updating"] == []
        assert state["clusters"][0]["waiting"] == []
        assert "run resumed" in log
        succeeded = [line for line in log.splitlines() if "run scheduled-update succeeded" in line]
        assert len(succeeded) == 3, log  # each node's update done once
        started = [line for line in log.splitlines() if "run scheduled-update tg" in line]
        assert len(started) == 3, log  # one run per node: the new leader did not start more
        # the users' list heard of each maintenance (scheduled, ended) at most once, although
        # two instances and a leader change were involved
        subjects = [str(m.message["Subject"]) for m in mail.messages]
        assert subjects, "no maintenance announcement was mailed"
        assert len(subjects) == len(set(subjects)), subjects
        assert any("tg" in s for s in subjects), subjects
