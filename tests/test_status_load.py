"""Status under load: concurrent requests ask each node once (a local-driver node that
counts how often it is asked), results serve later requests for ``http.status_cache``,
and status needs a role."""

from __future__ import annotations

import asyncio
import json
import shlex
import sqlite3
from pathlib import Path

from bot.commands import ASK_AT_MOST
from tests.service import VIEWER_TOKEN, running, settings_for
from tests.sshd import FakeNode

NOBODY_TOKEN = "token-without-any-role"


def fleet(tmp_path: Path, status_cache: str) -> tuple[Path, str]:
    """A local-driver node whose session listing notes each time it is asked and takes a
    second (so that a burst of requests arrives while it is being asked)."""
    node = FakeNode.create(tmp_path / "node")
    asked = tmp_path / "asked"
    sessions = (
        f"echo asked >> {shlex.quote(str(asked))}; sleep 1; "
        f"cat {node.flags}/sessions/* 2>/dev/null || true"
    )
    commands = ", ".join(
        f"{k} = {json.dumps(v)}" for k, v in node.commands(sessions=sessions).items()
    )
    extra = (
        f'[[nodes]]\nname = "tg-local"\ndriver = "local"\ncommands = {{ {commands} }}\n'
        f'[api.tokens.nobody]\ntoken = "{NOBODY_TOKEN}"\nroles = []\n'
    )
    return asked, extra


def times_asked(asked: Path) -> int:
    return len(asked.read_text().splitlines()) if asked.exists() else 0


async def test_concurrent_status_requests_ask_each_node_once(tmp_path: Path) -> None:
    asked, extra = fleet(tmp_path, "60s")
    settings = settings_for(
        tmp_path / "svc",
        cluster_nodes=0,
        singles=0,
        extra=extra,
        environ={"TGOPS_HTTP__STATUS_CACHE": "60s"},
    )
    async with running(settings) as (_, api):
        before = times_asked(asked)  # the service's own look at start
        replies = await asyncio.gather(
            *(api.status(VIEWER_TOKEN) for _ in range(20)),
            *(api.command("status", VIEWER_TOKEN) for _ in range(20)),
        )
        assert all(r.get("ok", True) for r in replies)
        assert all("tg-local" in json.dumps(r) for r in replies)
        assert times_asked(asked) == before + 1  # one look served all 40
        # within status_cache the API's status is answered from that look
        await api.status(VIEWER_TOKEN)
        assert times_asked(asked) == before + 1
        # a person asking with `status` gets a new look (shared only while it is under way)
        await api.command("status", VIEWER_TOKEN)
        assert times_asked(asked) == before + 2


async def test_without_a_cache_every_status_asks_again(tmp_path: Path) -> None:
    asked, extra = fleet(tmp_path, "0s")
    settings = settings_for(
        tmp_path / "svc",
        cluster_nodes=0,
        singles=0,
        extra=extra,
        environ={"TGOPS_HTTP__STATUS_CACHE": "0s"},
    )
    async with running(settings) as (_, api):
        before = times_asked(asked)
        await api.status(VIEWER_TOKEN)
        await api.status(VIEWER_TOKEN)
        assert times_asked(asked) == before + 2


async def test_status_needs_a_role(tmp_path: Path) -> None:
    asked, extra = fleet(tmp_path, "5s")
    settings = settings_for(tmp_path / "svc", cluster_nodes=0, singles=0, extra=extra)
    async with running(settings) as (_, api):
        before = times_asked(asked)
        headers = {"Authorization": f"Bearer {NOBODY_TOKEN}"}
        async with api.session.get(f"{api.base}/api/v1/status", headers=headers) as response:
            assert response.status == 403
            assert "needs role viewer" in (await response.json())["text"]
        reply = await api.command("status", NOBODY_TOKEN)
        assert reply["ok"] is False and "needs role viewer" in reply["text"]
        assert times_asked(asked) == before  # nobody's request asked no node


async def test_a_node_slower_than_status_wait_is_shown_as_last_seen(tmp_path: Path) -> None:
    asked, extra = fleet(tmp_path, "60s")  # the node takes a second to answer
    settings = settings_for(
        tmp_path / "svc",
        cluster_nodes=0,
        singles=0,
        extra=extra,
        environ={"TGOPS_HTTP__STATUS_CACHE": "60s", "TGOPS_HTTP__STATUS_WAIT": "0.1s"},
    )
    async with running(settings) as (_, api):
        before = times_asked(asked)
        reply = await api.command("status", VIEWER_TOKEN)
        assert reply["ok"], reply
        assert "1 node had not answered yet and is shown as last seen: tg-local" in reply["text"]
        assert "tg-local (single system)" in reply["text"]
        # its answer, once there, serves the API's status (within status_cache): no new ask
        for _ in range(100):
            status = await api.status(VIEWER_TOKEN)
            if "not_answered_yet" not in status:
                break
            assert status["not_answered_yet"] == ["tg-local"]
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the node's answer never arrived")
        assert times_asked(asked) == before + 1


async def test_a_large_fleet_status_shows_the_kept_state_and_does_not_ask_each_node(
    tmp_path: Path,
) -> None:
    many = ASK_AT_MOST + 20
    settings = settings_for(
        tmp_path / "svc",
        cluster_nodes=many,
        singles=0,
        environ={"TGOPS_HTTP__STATUS_CACHE": "0.2s"},
    )
    async with running(settings) as (_, api):
        # tg1 stops answering: a status of the whole fleet does not ask it
        node = tmp_path / "svc" / "nodes" / "tg1"
        node.mkdir(parents=True, exist_ok=True)
        (node / "faults.json").write_text(json.dumps({"unreachable": "switched off"}))
        reply = await api.command("status", VIEWER_TOKEN)
        assert reply["ok"], reply
        heads = [line for line in reply["text"].splitlines() if " (cluster c1): " in line]
        assert len(heads) == many
        assert "UNREACHABLE" not in reply["text"]  # tg1 as last seen
        # a status of the node alone asks it
        one = await api.command("status tg1", VIEWER_TOKEN)
        assert "UNREACHABLE" in one["text"]
        # what the service keeps reaches the large status within status_cache (bounded)
        for _ in range(100):
            status = await api.status(VIEWER_TOKEN)
            tg1 = next(n for n in status["nodes"] if n["name"] == "tg1")
            if tg1["reachable"] is False:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the large status never showed what the service saw")
        reply = await api.command("status", VIEWER_TOKEN)
        assert "tg1 (cluster c1): " in reply["text"] and "UNREACHABLE" in reply["text"]


async def test_a_command_that_only_shows_something_does_not_wait_for_its_record(
    tmp_path: Path,
) -> None:
    """`nodes` (role viewer) answers while another process holds the store's write lock;
    its record is written once the lock is gone, and `log` shows it."""
    settings = settings_for(tmp_path / "svc")
    async with running(settings) as (_, api):
        locker = sqlite3.connect(tmp_path / "svc" / "state.db", timeout=0)
        try:
            locker.execute("BEGIN IMMEDIATE")  # no other writer until the rollback
            reply = await api.command("nodes", VIEWER_TOKEN)
            assert reply["ok"], reply
            assert "tg1" in reply["text"]
            written = locker.execute("SELECT count(*) FROM audit WHERE detail = 'nodes'")
            assert written.fetchone() == (0,)  # answered before its record could be written
        finally:
            locker.rollback()
            locker.close()
        log = await api.command("log", VIEWER_TOKEN)
        assert "viewer (api) command: nodes" in log["text"], log["text"]
