"""Every step of a run says what it did, once, as it happens (an event, which the demo's
console prints) and in `log` (L13): waiting for a slot, slot taken, drained, notice sent,
sessions ended, installed what, rebooted, verified, undrained."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from core import events as ev
from core.model import PackageKind
from tests.fleet import fleet, run_ids

BERLIN = ZoneInfo("Europe/Berlin")


def _lines(f: object, run_id: int) -> list[str]:
    events = f.events.events  # type: ignore[attr-defined]
    return [e.text for e in events if isinstance(e, ev.RunStepDone) and e.run_id == run_id]


async def test_a_cluster_update_tells_each_step_on_the_console_and_in_the_log(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        # tg1 fails after leaving load balancing: it keeps the cluster's only slot
        f.fault("tg1", {"install": "disk full"})
        assert (await f.run("auto-update tg1 --yes"))["runs"]["tg1"].status == "failed"
        f.login("tg2", "alice", "bob")
        reply = await f.api.command("auto-update tg2 --yes")
        assert reply["ok"], reply["text"]
        (run_id,) = run_ids(reply["text"])
        waiting = "waiting for a slot of c1 behind 1 node (tg1)"
        await f.events.wait_for(lambda e: isinstance(e, ev.RunStepDone) and e.text == waiting)
        assert (await f.api.command("remove-lock tg1"))["ok"]  # frees the slot
        (run,) = await f.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error

        lines = _lines(f, run_id)
        assert lines == [
            "downloaded and staged tg-base 1.0",
            waiting,
            "slot taken (1 of 1 of cluster c1)",
            "drained (out of load balancing)",
            "notice sent to the logged-in users (2 sessions)",
            "sessions ended (2)",
            "installed tg-base 1.0",
            "services restarted",
            "verified (the post-update check passed)",
            "undrained (back in load balancing)",
            "slot of cluster c1 freed",
        ]
        # the same lines, in order, in the audit log of the node
        log = (await f.api.command("log tg2 100"))["text"].splitlines()
        mine = [x for x in log if " tgops (lifecycle) " in x and f"tg2 run #{run_id}: " in x]
        assert [x.split(f"tg2 run #{run_id}: ", 1)[1] for x in mine] == lines
        assert any(f"tgops (lifecycle) drain tg2 run #{run_id}: drained" in x for x in mine)


async def test_a_restart_says_rebooted_and_verified(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        restart = (await f.run("restart solo1 --yes"))["runs"]["solo1"]
        done = await f.events.wait_for(
            lambda e: isinstance(e, ev.RunFinished) and e.run_id == restart.id
        )
        assert isinstance(done, ev.RunFinished) and done.message == "solo1 restarted"
        assert _lines(f, restart.id) == [
            "notice sent to the logged-in users (0 sessions)",
            "sessions ended (0)",
            "rebooted",
            "verified (the post-update check passed)",
        ]


async def test_a_scheduled_update_that_reboots_says_what_it_installed(tmp_path: Path) -> None:
    async with fleet(
        tmp_path,
        sections={"maintenance": {"notice_lead": "4s", "reminder_interval": "1s"}},
        updates={"download_lead": "2s", "update_grace": "30s"},
    ) as f:
        f.repo.add("tg-kernel", "6.1", kind=PackageKind.CORE)
        at = (datetime.now(BERLIN) + timedelta(seconds=4)).strftime("%H:%M:%S")
        assert (await f.api.command(f"schedule update solo1 on daily {at}"))["ok"]
        done = await f.finished("solo1")
        assert done.outcome == "succeeded", done.message
        # the outcome says what was installed, not only that the node restarted
        assert done.message == "installed tg-base 1.0, tg-kernel 6.1; rebooted"
        assert _lines(f, done.run_id) == [
            "downloaded and staged tg-base 1.0, tg-kernel 6.1",
            "notice sent to the logged-in users (0 sessions)",
            "sessions ended (0)",
            "installed tg-base 1.0, tg-kernel 6.1",
            "rebooted",
            "verified (the post-update check passed)",
        ]
        ended = await f.events.wait_for(
            lambda e: isinstance(e, ev.MaintenanceEnded) and e.node == "solo1"
        )
        assert isinstance(ended, ev.MaintenanceEnded) and ended.reason == "scheduled update done"
