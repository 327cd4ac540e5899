"""The HTTP API of `tgops serve`: tokens, roles, the command endpoint, status, health."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from tests.databases import POSTGRES_URL, reset_postgres
from tests.events import until
from tests.service import ADMIN_TOKEN, MAINT_TOKEN, VIEWER_TOKEN, running, settings_for

BERLIN = ZoneInfo("Europe/Berlin")


async def test_health_status_and_commands(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (service, api):
        async with api.session.get(f"{api.base}/healthz") as response:
            assert response.status == 200
            health = await response.json()
        assert health["ok"] is True and health["nodes"] == 4

        status = await api.status(VIEWER_TOKEN)
        assert [n["name"] for n in status["nodes"]] == ["tg1", "tg2", "tg3", "solo1"]
        tg1 = status["nodes"][0]
        assert tg1["cluster"] == "c1" and tg1["driver"] == "sandbox" and tg1["lb"] == "in"
        assert tg1["logon"] == "enabled" and tg1["sessions"] == 0
        assert tg1["update_lock"] is None and tg1["warning_flag"] is None
        assert tg1["schedules"] == {"download": None, "update": None}
        assert tg1["hotfixes"] == {"always": False, "selected": []}
        assert status["nodes"][3]["cluster"] is None and status["nodes"][3]["lb"] is None
        assert status["clusters"] == [
            {"name": "c1", "max_parallel_updates": 1, "updating": [], "waiting": []}
        ]
        # additions to the basic schema: which instance answers, which one leads
        assert status["instance"] == service.instance == health["instance"]
        assert status["leader"] == service.instance  # SQLite: the one instance leads

        reply = await api.command("status", VIEWER_TOKEN)
        assert reply["ok"] is True
        for name in ("tg1", "tg2", "tg3", "solo1"):
            assert name in reply["text"]
        assert reply["text"].splitlines()[-1] == f"instance {service.instance} (the leader)"

        reply = await api.command("nodes", VIEWER_TOKEN)
        assert "solo1" in reply["text"] and "single system" in reply["text"]


@pytest.mark.skipif(POSTGRES_URL is None, reason="no initdb: install Debian package postgresql")
@pytest.mark.postgres
async def test_a_follower_names_itself_and_the_leader(tmp_path: Path) -> None:
    assert POSTGRES_URL is not None
    await reset_postgres(POSTGRES_URL)
    settings = settings_for(
        tmp_path, database_url=POSTGRES_URL, sections={"leader": {"takeover": "2s"}}
    )
    async with running(settings) as (a, a_api):

        async def a_leads() -> bool:
            return a.election.is_leader

        await until(a_leads, within=20)
        async with running(settings) as (b, b_api):
            assert b.election.is_leader is False
            for api in (a_api, b_api):
                async with api.session.get(f"{api.base}/healthz") as response:
                    health = await response.json()
                status = await api.status(VIEWER_TOKEN)
                assert status["instance"] == health["instance"]
                assert status["leader"] == a.instance
            text = (await b_api.command("status", VIEWER_TOKEN))["text"]
            assert text.splitlines()[-1] == f"instance {b.instance}; leader: {a.instance}"
            text = (await a_api.command("status", VIEWER_TOKEN))["text"]
            assert text.splitlines()[-1] == f"instance {a.instance} (the leader)"
            async with aiohttp.ClientSession() as session:
                for service, leads in ((a, 1.0), (b, 0.0)):
                    async with session.get(f"http://127.0.0.1:{service.port}/metrics") as resp:
                        metrics = await resp.text()
                    assert f'tgops_leader{{tgops_instance="{service.instance}"}} {leads}' in metrics


async def test_maintenance_reply_and_status_header_in_local_time(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, sections={"maintenance": {"notice_lead": "2h", "reminder_interval": "20s"}}
    )
    async with running(settings) as (_, api):
        tomorrow = (datetime.now(BERLIN) + timedelta(days=1)).strftime("%Y-%m-%d")
        # the reply names the zone (CET or CEST) of the time it shows
        zone = datetime.fromisoformat(f"{tomorrow} 22:00").replace(tzinfo=BERLIN).tzname()
        reply = await api.command(f"maintenance schedule tg1 {tomorrow} 22:00 Kernel update")
        assert reply == {
            "ok": True,
            "text": f"Maintenance scheduled on tg1 at {tomorrow} 22:00 {zone}: Kernel update. "
            "Users get notices from 2h before, every 20s.",
        }
        text = (await api.command("status", VIEWER_TOKEN))["text"]
        assert text.splitlines()[0] == f"-- Maintenance tg1 at {tomorrow} 22:00: Kernel update"


async def test_roles_are_enforced_and_refusals_name_the_role(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as (_, api):
        reply = await api.command("logon disable tg1", VIEWER_TOKEN)
        assert reply == {"ok": False, "text": "`logon` needs role maint; you have: viewer."}
        reply = await api.command("download tg1", MAINT_TOKEN)
        assert reply["ok"] is False and "needs role update" in reply["text"]
        reply = await api.command("logon disable tg1", MAINT_TOKEN)
        assert reply == {"ok": True, "text": "Logon disabled on tg1."}
        status = await api.status()
        assert status["nodes"][0]["logon"] == "disabled"
        # the sandbox node itself records it
        state = (tmp_path / "nodes" / "tg1" / "state.json").read_text()
        assert '"logon_enabled": false' in state.replace(" ", "").replace(":false", ": false")

        help_viewer = (await api.command("help", VIEWER_TOKEN))["text"]
        assert "status" in help_viewer and "logon" not in help_viewer
        log = (await api.command("log tg1", VIEWER_TOKEN))["text"]
        assert "token:maint (api) logon tg1: logon disabled" in log


async def test_bad_requests(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path)) as (_, api):
        url = f"{api.base}/api/v1/command"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with api.session.post(url, json={"text": "status"}) as response:
            assert response.status == 401
            assert "bearer token" in (await response.json())["text"]
        async with api.session.post(
            url, json={"text": "status"}, headers={"Authorization": "Bearer wrong"}
        ) as response:
            assert response.status == 401
        async with api.session.get(f"{api.base}/api/v1/status") as response:
            assert response.status == 401
        async with api.session.post(url, data=b"{not json", headers=auth) as response:
            assert response.status == 400
            assert "not JSON" in (await response.json())["text"]
        async with api.session.post(url, json=["status"], headers=auth) as response:
            assert response.status == 400
            assert 'string "text"' in (await response.json())["text"]
        async with api.session.post(url, json={"text": "x", "yes": 1}, headers=auth) as response:
            assert response.status == 400
            assert "unknown key(s) yes" in (await response.json())["text"]
        reply = await api.command("frobnicate tg1")
        assert reply["ok"] is False
        assert reply["text"].startswith("unknown command 'frobnicate'")
        assert "Usage: help [COMMAND]" in reply["text"]
        reply = await api.command("download nosuchnode")
        assert reply["ok"] is False
        assert "'nosuchnode' is neither a node nor a cluster" in reply["text"]
        reply = await api.command("warning-flag clear tg1")
        assert reply["ok"] is False and "only a complete download clears" in reply["text"]
        # L13: a command that was not understood is in the audit log too
        log = (await api.command("log 50"))["text"]
        assert "token:admin (api) rejected: frobnicate tg1 (unknown command 'frobnicate'" in log


async def test_state_persists_across_restarts(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (_, api):
        assert (await api.command("logon disable solo1"))["ok"]
    async with running(settings) as (_, api):
        log = (await api.command("log solo1"))["text"]
        assert "logon disable solo1" in log
        status = await api.status()
        assert status["nodes"][3]["logon"] == "disabled"


async def test_a_broken_node_does_not_stop_the_service(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    (tmp_path / "nodes").mkdir(parents=True, exist_ok=True)
    (tmp_path / "nodes" / "tg1").write_text("a file, not a directory")
    async with running(settings) as (_, api):
        status = await api.status()
        tg1 = status["nodes"][0]
        assert tg1["reachable"] is False
        assert "node tg1: status failed" in tg1["error"]
        assert status["nodes"][1]["reachable"] is True
        text = (await api.command("status tg1"))["text"]
        assert "UNREACHABLE: node tg1: status failed" in text
        reply = await api.command("logon disable tg1")
        assert reply["ok"] is False and "node tg1: set_logon failed" in reply["text"]
