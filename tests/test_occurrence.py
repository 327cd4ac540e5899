"""The runs of one command or one scheduled update time start together: one look at the
repository and the nodes, maintenance opened for all at once (users told on time however
slow the preparation of the others is), late preparation shown."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.fleet import fleet
from tests.test_schedule import soon, wall_time

MANIFEST = "channels/stable.json"


async def _sleep_until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()))


async def test_a_command_fetches_the_manifest_once_for_all_its_runs(tmp_path: Path) -> None:
    async with fleet(tmp_path, cluster_nodes=3, max_parallel=3) as f:
        f.server.reset()
        outcomes = await f.outcomes("auto-update c1 --yes")
        assert outcomes == {"tg1": "succeeded", "tg2": "succeeded", "tg3": "succeeded"}
        assert f.server.requests[MANIFEST] == 1
        assert f.server.requests[MANIFEST + ".sig"] == 1
        for node in ("tg1", "tg2", "tg3"):
            assert f.state(node)["installed"] == {"tg-base": "1.0"}


async def test_one_update_time_fetches_the_manifest_once_for_all_its_nodes(
    tmp_path: Path,
) -> None:
    async with fleet(
        tmp_path,
        cluster_nodes=3,
        max_parallel=3,
        sections={"maintenance": {"notice_lead": "2s", "reminder_interval": "0.5s"}},
        updates={"download_lead": "2s", "update_grace": "30s"},
    ) as f:
        f.server.reset()
        at = soon(4)
        assert (await f.api.command(f"schedule update all on daily {at}"))["ok"]
        for node in ("tg1", "tg2", "tg3", "solo1"):
            event = await f.finished(node)
            assert event.outcome == "succeeded", (node, event.message)
        # every node planned against the same verified manifest, fetched once
        assert f.server.requests[MANIFEST] == 1
        assert f.server.requests[MANIFEST + ".sig"] == 1
        log = (await f.api.command("log tg2 40"))["text"]
        assert "maintenance scheduled tg2" in log
        assert "maintenance ended tg2: scheduled update done" in log


async def test_users_are_told_on_time_while_the_preparation_is_slow(tmp_path: Path) -> None:
    async with fleet(
        tmp_path,
        cluster_nodes=2,
        max_parallel=1,
        sections={
            "maintenance": {
                "notice_lead": "4s",
                "reminder_interval": "0.5s",
                "lb_drain_lead": "2s",
            }
        },
        updates={"download_lead": "6s", "update_grace": "30s"},
    ) as f:
        for node in ("tg1", "tg2"):
            f.login(node, "alice")
            f.fault(node, {"delay": {"stage": 6}})  # staging ends only about at S
        at = soon(8)
        assert (await f.api.command(f"schedule update c1 on daily {at}"))["ok"]
        s_time = wall_time(at)
        # S - notice_lead has passed, the nodes are still staging: their users are told
        await _sleep_until(s_time - timedelta(seconds=2.6))
        for node in ("tg1", "tg2"):
            status = await f.node_status(node)
            assert status["run"] is not None and status["run"]["step"] == "download", status
            assert status["maintenance"] is not None
            assert status["maintenance"]["origin"] == "scheduled-update"
            notices = [m for m in f.messages(node) if f"Maintenance of {node}" in m]
            assert notices, f.messages(node)
        # S - lb_drain_lead has passed: the late preparation is shown and logged
        await _sleep_until(s_time - timedelta(seconds=1.2))
        plan = (await f.api.command("plan c1"))["text"]
        assert "tg1: preparation late: run #" in plan, plan
        assert "still at step download" in plan
        text = (await f.api.command("status c1"))["text"]
        assert "!! Preparation late: tg1 (still at download, due by" in text, text
        late = (await f.node_status("tg1"))["preparation_late"]
        assert late["step"] == "download" and late["due"] <= s_time.isoformat()
        for node in ("tg1", "tg2"):
            event = await f.finished(node, within=60)
            assert event.outcome == "succeeded", (node, event.message)
        log = (await f.api.command("log tg1 60"))["text"]
        assert "preparation late tg1" in log, log
        assert "it leaves load balancing and installs once it is staged" in log
        for node in ("tg1", "tg2"):
            assert f.state(node)["installed"] == {"tg-base": "1.0"}
