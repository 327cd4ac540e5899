"""The time-controlled lifecycle (L4, L5) end to end, with durations of seconds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bot.service import Service
from core import events as ev
from core.clock import ManualClock
from core.localtime import local_text
from core.model import SYSTEM, PackageKind
from tests.events import Recorder
from tests.fleet import fleet
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import VIEWER_TOKEN, running, settings_for

BERLIN = ZoneInfo("Europe/Berlin")
TIMINGS = {
    "maintenance": {"notice_lead": "4s", "reminder_interval": "0.5s", "lb_drain_lead": "1s"},
}
UPDATES = {"download_lead": "2s", "update_grace": "30s"}


def soon(seconds: float) -> str:
    """A wall time ``seconds`` from now in Berlin, as HH:MM:SS."""
    return (datetime.now(BERLIN) + timedelta(seconds=seconds)).strftime("%H:%M:%S")


def wall_time(hhmmss: str) -> datetime:
    """The next occurrence (or the one just passed) of a Berlin wall time, in UTC."""
    now = datetime.now(BERLIN)
    hour, minute, second = (int(x) for x in hhmmss.split(":"))
    when = now.replace(hour=hour, minute=minute, second=second, microsecond=0)
    if when < now - timedelta(hours=12):
        when += timedelta(days=1)
    return when.astimezone(UTC)


def scheduling(**kwargs: Any) -> Any:
    """A fleet whose lifecycle durations are seconds."""
    return fleet(
        kwargs.pop("tmp_path"),
        sections=TIMINGS,
        updates={**UPDATES, **kwargs.pop("updates", {})},
        **kwargs,
    )


async def test_scheduled_update_of_a_cluster_and_a_single_system(tmp_path: Path) -> None:
    async with scheduling(tmp_path=tmp_path, cluster_nodes=2, max_parallel=1) as f:
        f.repo.add("tg-kernel", "6.1", kind=PackageKind.CORE)
        f.login("tg1", "alice")
        f.login("solo1", "bob")
        at = soon(4)
        for target in ("c1", "solo1"):
            reply = await f.api.command(f"schedule update {target} on daily {at}")
            assert reply["ok"], reply["text"]
        listing = (await f.api.command("schedule"))["text"]
        shown = at.removesuffix(":00")  # times are shown with seconds only when set
        assert f"tg1: update on daily {shown}" in listing
        assert f"solo1: update on daily {shown}" in listing
        plan = (await f.api.command("plan"))["text"]
        assert "tg1: takes a slot of c1, leaves load balancing" in plan
        assert "tg2: waits for a slot of c1" in plan
        assert "solo1: logon disabled, sessions ended, install" in plan

        for node in ("tg1", "tg2", "solo1"):
            event = await f.finished(node)
            assert event.outcome == "succeeded", (node, event.message)
        for node in ("tg1", "tg2", "solo1"):
            status = await f.node_status(node)
            assert status["installed"] == {"tg-base": "1.0", "tg-kernel": "6.1"}, node
            assert status["maintenance"] is None, node
            assert status["logon"] == "enabled", node
            assert status["restart_required"] is False, node  # rebooted by the run
            assert f.state(node)["last_reboot"] is not None
        assert (await f.node_status("tg1"))["lb"] == "in"
        notices = [m for m in f.messages("tg1") if "Maintenance of tg1" in m]
        assert notices and "Scheduled update" in notices[0]
        assert any("update of tg1 starts now" in m for m in f.messages("tg1"))
        assert json.loads((f.node("tg1") / "sessions.json").read_text()) == []
        assert json.loads((f.node("solo1") / "sessions.json").read_text()) == []
        log = (await f.api.command("log solo1 60"))["text"]
        assert "scheduler (scheduler) logon solo1: logon disabled" in log
        assert "logon solo1: logon enabled" in log
        assert "maintenance ended solo1: scheduled update done" in log
        # the cluster's nodes took turns: never two out of load balancing at once
        steps1 = {
            s.name: s
            for s in await f.service.store.steps(
                (await f.service.store.runs(node="tg1", limit=1))[0].id
            )
        }
        steps2 = {
            s.name: s
            for s in await f.service.store.steps(
                (await f.service.store.runs(node="tg2", limit=1))[0].id
            )
        }
        # the manual's timeline: nothing happens before its planned time (late is allowed:
        # the machine may be busy): check at S - download_lead, drain at S - lb_drain_lead,
        # sessions ended and install at S
        s_time = wall_time(at)
        for steps in (steps1, steps2):
            assert steps["check"].started_at >= s_time - timedelta(seconds=2)
            assert steps["drain"].started_at >= s_time - timedelta(seconds=1)
            assert steps["disconnect"].started_at >= s_time
            assert steps["install"].started_at >= s_time
        first_drain = min(steps1["drain"].started_at, steps2["drain"].started_at)
        assert first_drain < s_time  # the first node left load balancing before S
        solo = {
            s.name: s
            for s in await f.service.store.steps(
                (await f.service.store.runs(node="solo1", limit=1))[0].id
            )
        }
        assert solo["check"].started_at >= s_time - timedelta(seconds=2)
        assert solo["logon"].finished_at is not None
        assert solo["logon"].finished_at >= s_time  # logon disabled at S, just before install
        assert solo["logon"].finished_at <= solo["install"].started_at
        out1 = (steps1["drain"].started_at, steps1["release"].finished_at)
        out2 = (steps2["drain"].started_at, steps2["release"].finished_at)
        assert out1[1] is not None and out2[1] is not None
        first, second = sorted([out1, out2])
        assert first[1] is not None and second[0] >= first[1]


async def test_no_updates_is_logged_and_nothing_happens(tmp_path: Path) -> None:
    async with scheduling(tmp_path=tmp_path) as f:
        reply = await f.api.command("auto-update solo1")
        ids = [int(w.strip("#,.")) for w in reply["text"].split() if w.startswith("#")]
        await f.service.lifecycle.wait(ids)
        assert (await f.api.command(f"schedule update solo1 on daily {soon(3)}"))["ok"]
        event = await f.finished("solo1")
        assert event.outcome == "skipped" and event.message == "no updates"
        assert (await f.node_status("solo1"))["maintenance"] is None
        assert "no updates solo1" in (await f.api.command("log solo1 20"))["text"]
        assert not [m for m in f.messages("solo1") if "Maintenance" in m]


async def test_download_failing_twice_locks_and_switches_schedules_off(tmp_path: Path) -> None:
    async with scheduling(
        tmp_path=tmp_path, updates={"download_attempts": 10, "retry_delay": "0.05s"}
    ) as f:
        f.server.fail_next(10_000, status=503)
        at = soon(4)
        assert (await f.api.command(f"schedule update tg1 on daily {at}"))["ok"]
        assert (await f.api.command(f"schedule update solo1 on daily {at}"))["ok"]
        assert (await f.api.command("schedule download tg1 on daily 01:00 until 03:00"))["ok"]
        flagged = await f.events.wait_for(
            lambda e: isinstance(e, ev.WarningFlagSet) and e.node == "tg1"
        )
        assert isinstance(flagged, ev.WarningFlagSet)
        for node in ("tg1", "solo1"):
            event = await f.finished(node)
            assert event.outcome == "failed", node
        tg1 = await f.node_status("tg1")
        assert tg1["warning_flag"] is not None
        assert tg1["update_lock"] is not None
        assert "scheduled download failed twice" in tg1["update_lock"]["reason"]
        assert "schedules switched off (download, update)" in tg1["update_lock"]["reason"]
        assert tg1["schedules"] == {"download": None, "update": None}
        assert tg1["maintenance"] is not None  # a cluster node stays in maintenance
        assert tg1["lb"] == "in"  # it never left load balancing
        solo = await f.node_status("solo1")
        assert solo["update_lock"] is not None and solo["maintenance"] is None
        assert solo["logon"] == "enabled"
        # L5: 10 attempts, the flag, 10 more right before S (from S - 10 x retry_delay)
        assert f.server.requests["channels/stable.json"] >= 2 * 10 * 2
        log = (await f.api.command("log tg1 60"))["text"]
        second_round = wall_time(at) - timedelta(seconds=0.5)
        assert "download retried later tg1 " in log
        # shown as times are shown everywhere: seconds only when they are not zero
        assert f"10 more attempts from {local_text(second_round, BERLIN)}" in log
        text = (await f.api.command("status"))["text"]
        assert "!! Update download error: tg1, solo1" in text
        assert "!! Update lock set: tg1, solo1" in text
        # only a maint admin ends the cluster node's maintenance
        refused = await f.api.command("maintenance cancel tg1", VIEWER_TOKEN)
        assert refused["ok"] is False and "needs role maint" in refused["text"]
        assert (await f.api.command("maintenance cancel tg1"))["ok"]


async def test_lock_at_update_time_skips_the_run(tmp_path: Path) -> None:
    async with scheduling(tmp_path=tmp_path) as f:
        assert (await f.api.command(f"schedule update solo1 on daily {soon(4)}"))["ok"]
        await f.events.wait_for(
            lambda e: isinstance(e, ev.MaintenanceScheduled) and e.node == "solo1"
        )
        await f.service.lifecycle.set_lock("solo1", "checked by hand", SYSTEM)
        event = await f.finished("solo1")
        assert event.outcome == "skipped"
        assert "the update lock is in place (checked by hand)" in event.message
        status = await f.node_status("solo1")
        assert status["installed"] == {} and status["maintenance"] is None
        assert status["logon"] == "enabled"


async def test_restart_between_download_and_update(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server:
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            sections=TIMINGS,
            updates={**UPDATES, "download_lead": "3s"},
        )
        async with running(settings) as (service, api):
            events = Recorder(service.bus)
            assert (await api.command(f"schedule update solo1 on daily {soon(5)}"))["ok"]
            await events.wait_for(
                lambda e: isinstance(e, ev.RunProgress) and e.node == "solo1" and e.step == "logon"
            )
        async with running(settings) as (service, api):
            events = Recorder(service.bus)
            done = await events.wait_for(
                lambda e: isinstance(e, ev.RunFinished) and e.node == "solo1"
            )
            assert isinstance(done, ev.RunFinished) and done.outcome == "succeeded"
            status = await api.status()
            solo = next(n for n in status["nodes"] if n["name"] == "solo1")
            assert solo["installed"] == {"tg-base": "1.0"} and solo["maintenance"] is None
            log = (await api.command("log solo1 40"))["text"]
            assert "run resumed solo1" in log


async def test_scheduled_download_stops_at_its_end_time(tmp_path: Path) -> None:
    async with scheduling(tmp_path=tmp_path) as f:
        f.server.stall(30.0)
        start = datetime.now(BERLIN) + timedelta(seconds=2)
        end = start + timedelta(seconds=2)
        reply = await f.api.command(
            f"schedule download tg1 on daily {start:%H:%M:%S} until {end:%H:%M:%S}"
        )
        assert reply["ok"], reply["text"]
        event = await f.finished("tg1")
        assert event.outcome == "cancelled"
        assert "stopped at the end time" in event.message and "partial files are kept" in (
            event.message
        )


async def test_missed_and_late_updates_after_downtime(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    # far from the real date, so that no real timer fires during the test
    clock = ManualClock(datetime(2030, 1, 7, 12, 0, tzinfo=UTC))
    async with serve_repo(repo.root) as server:
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            sections=TIMINGS,
            updates={"update_grace": "10m"},
        )
        async with Service(settings, clock=clock) as service:
            for node in ("tg1", "solo1"):
                reply = await service.commands.execute(
                    f"schedule update {node} on daily 03:00", SYSTEM
                )
                assert reply.ok, reply.text
        # down for two days, back 5 minutes after 03:00 Berlin (02:00 UTC): within grace
        await clock.set(datetime(2030, 1, 9, 2, 5, tzinfo=UTC))
        async with Service(settings, clock=clock) as service:
            log = (await service.commands.execute("log 30", SYSTEM)).text
            assert "scheduled update missed" not in log
            started = [
                r for r in await service.store.runs(limit=10) if r.kind == "scheduled-update"
            ]
            assert {r.node for r in started} == {"tg1", "solo1"}
            await service.lifecycle.wait([r.id for r in started])
            solo = await service.store.node("solo1")
            assert solo is not None and solo.installed == {"tg-base": "1.0"}
        # down again, back an hour after the update time: beyond grace, skipped and logged
        await clock.set(datetime(2030, 1, 11, 3, 0, tzinfo=UTC))
        async with Service(settings, clock=clock) as service:
            log = (await service.commands.execute("log solo1 30", SYSTEM)).text
            assert "scheduled update missed solo1: the update at 2030-01-11 03:00 passed" in log


async def test_dst_change_in_listing_and_plan(tmp_path: Path) -> None:
    clock = ManualClock(datetime(2031, 3, 29, 12, 0, tzinfo=UTC))
    settings = settings_for(tmp_path)
    async with Service(settings, clock=clock) as service:
        reply = await service.commands.execute("schedule update solo1 on daily 02:30", SYSTEM)
        assert reply.ok, reply.text
        # 30 March 2031: the clocks skip 02:00-03:00, so 02:30 happens at 03:30
        assert "solo1: update on daily 02:30 — next 2031-03-30 03:30" in reply.text
        await clock.set(datetime(2031, 10, 25, 12, 0, tzinfo=UTC))
        listing = await service.scheduler.listing()
        # 26 October 2031: 02:30 happens twice; it runs once, at the first (summer time)
        assert "next 2031-10-26 02:30 (download from 2031-10-26 01:30)" in listing


async def test_scheduled_updates_across_both_dst_changes_run_once_at_the_right_instant(
    tmp_path: Path,
) -> None:
    """Runs driven by a settable clock over the DST changes of 2031 in Berlin."""
    clock = ManualClock(datetime(2031, 3, 29, 22, 0, tzinfo=UTC))
    async with fleet(tmp_path, clock=clock, updates={"download_lead": "1h"}) as f:
        assert (await f.api.command("schedule update solo1 on daily 02:30"))["ok"]
        # 30 March: 02:00 becomes 03:00, so 02:30 happens at 03:30 summer time (01:30 UTC);
        # the download starts 1 h before, at 00:30 UTC
        await clock.set(datetime(2031, 3, 30, 0, 29, tzinfo=UTC))
        await f.service.scheduler.catch_up()
        assert await f.service.store.runs(node="solo1") == []  # not yet
        await clock.set(datetime(2031, 3, 30, 0, 31, tzinfo=UTC))
        await f.service.scheduler.catch_up()
        (run,) = await f.service.store.runs(node="solo1")
        assert run.params["at"] == "2031-03-30T01:30:00+00:00"
        await clock.set(datetime(2031, 3, 30, 1, 30, tzinfo=UTC))  # S on the clock
        event = await f.finished("solo1")
        assert event.outcome == "succeeded", event.message
        await f.service.scheduler.catch_up()
        assert len(await f.service.store.runs(node="solo1")) == 1  # once

        f.repo.add("tg-base", "2.0")
        # 26 October: 03:00 summer time becomes 02:00 again, so 02:30 happens twice; the
        # update runs once, at the first (00:30 UTC)
        await clock.set(datetime(2031, 10, 25, 23, 31, tzinfo=UTC))
        await f.service.scheduler.catch_up()
        second = (await f.service.store.runs(node="solo1", limit=1))[0]
        assert second.id != run.id
        assert second.params["at"] == "2031-10-26T00:30:00+00:00"
        await clock.set(datetime(2031, 10, 26, 0, 30, tzinfo=UTC))
        event = await f.events.wait_for(
            lambda e: isinstance(e, ev.RunFinished) and e.run_id == second.id, 40
        )
        assert isinstance(event, ev.RunFinished) and event.outcome == "succeeded", event
        assert (await f.node_status("solo1"))["installed"] == {"tg-base": "2.0"}
        await clock.set(datetime(2031, 10, 26, 1, 31, tzinfo=UTC))  # the second 02:30
        await f.service.scheduler.catch_up()
        assert len(await f.service.store.runs(node="solo1")) == 2


async def test_scheduled_update_failing_before_users_are_touched_locks(tmp_path: Path) -> None:
    """L4: a failed scheduled update sets the update lock and keeps maintenance, also when
    it fails before any session was ended (here: leaving load balancing fails); the node
    goes back into load balancing and its slot is freed."""
    async with scheduling(tmp_path=tmp_path, cluster_nodes=1) as f:
        f.fault("tg1", {"drain": "load balancer unreachable"})
        assert (await f.api.command(f"schedule update tg1 on daily {soon(3)}"))["ok"]
        event = await f.finished("tg1")
        assert event.outcome == "failed"
        assert "drain failed: load balancer unreachable" in event.message
        status = await f.node_status("tg1")
        assert status["update_lock"] is not None
        assert "failed at step drain" in status["update_lock"]["reason"]
        assert status["maintenance"] is not None
        assert status["maintenance"]["reason"] == "Scheduled update"
        assert status["lb"] == "in"
        assert (await f.api.status())["clusters"][0]["updating"] == []
        log = (await f.api.command("log tg1 40"))["text"]
        assert "update lock set tg1" in log
        assert "run scheduled-update failed tg1" in log


async def test_scheduled_update_keeps_a_maintenance_set_by_hand(tmp_path: Path) -> None:
    async with scheduling(tmp_path=tmp_path) as f:
        tomorrow = (datetime.now(BERLIN) + timedelta(days=1)).strftime("%Y-%m-%d")
        reply = await f.api.command(f"maintenance schedule solo1 {tomorrow} 09:00 Disk check")
        assert reply["ok"], reply["text"]
        assert (await f.api.command(f"schedule update solo1 on daily {soon(3)}"))["ok"]
        event = await f.finished("solo1")
        assert event.outcome == "succeeded", event.message
        assert (await f.node_status("solo1"))["installed"] == {"tg-base": "1.0"}
        maintenance = (await f.node_status("solo1"))["maintenance"]
        assert maintenance is not None and maintenance["reason"] == "Disk check"
        log = (await f.api.command("log solo1 40"))["text"]
        assert "maintenance kept solo1" in log and "(Disk check) set by token:admin" in log


async def test_a_node_waits_for_a_slot_no_longer_than_slot_wait(tmp_path: Path) -> None:
    """tg1's install fails: it keeps its slot (out of load balancing, locked), so tg2 of
    the same cluster waits, and gives up untouched `slot_wait` after the update time."""
    async with scheduling(
        tmp_path=tmp_path, cluster_nodes=2, max_parallel=1, updates={"slot_wait": "2s"}
    ) as f:
        f.fault("tg1", {"install": "disk full"})
        f.fault("tg2", {"install": "disk full"})  # whichever node goes first fails
        assert (await f.api.command(f"schedule update c1 on daily {soon(3)}"))["ok"]
        first = await f.finished("tg1")
        second = await f.finished("tg2")
        events = {e.node: e for e in (first, second)}
        failed = [n for n, e in events.items() if e.outcome == "failed"]
        assert len(failed) == 1, events
        (other,) = set(events) - set(failed)
        assert events[other].outcome == "skipped"
        assert (
            f"no slot of cluster c1 became free in time (held by {failed[0]}); "
            f"{other} was not touched" in events[other].message
        )
        status = await f.node_status(other)
        assert status["installed"] == {} and status["lb"] == "in"
        assert status["maintenance"] is None and status["update_lock"] is None


async def test_a_notice_failing_on_one_node_does_not_stop_the_others(tmp_path: Path) -> None:
    async with scheduling(tmp_path=tmp_path) as f:
        f.fault("tg1", {"announce": "wall: cannot write"})  # the next notice on tg1 fails
        today = datetime.now(BERLIN).strftime("%Y-%m-%d")
        reply = await f.api.command(f"maintenance schedule c1 {today} {soon(3)} Disk swap")
        assert reply["ok"], reply["text"]
        await f.events.wait_for(
            lambda e: isinstance(e, ev.MaintenanceStarted) and e.node == "tg3", 20
        )
        for node in ("tg2", "tg3"):
            notices = [m for m in f.messages(node) if f"Maintenance of {node}" in m]
            assert notices and "Disk swap" in notices[0], node
        # tg1's first notice failed; the next reminder reached its users
        assert [m for m in f.messages("tg1") if "Maintenance of tg1" in m]
        assert len(f.messages("tg1")) < len(f.messages("tg2"))


async def test_nodes_of_one_update_time_share_a_timer_and_a_moved_node_leaves_it(
    tmp_path: Path,
) -> None:
    """All nodes scheduled for one time fire together from one timer; a node scheduled
    again for a later time is no longer part of it (and runs at its own time)."""
    async with scheduling(tmp_path=tmp_path) as f:
        at = soon(5)
        assert (await f.api.command(f"schedule update all on daily {at}"))["ok"]
        later = soon(3600)
        assert (await f.api.command(f"schedule update solo1 on daily {later}"))["ok"]
        # the others' runs start from the timer of their update time, solo1's does not
        started = await f.events.wait_count(
            lambda e: isinstance(e, ev.RunStarted) and e.kind == "scheduled-update", 3
        )
        assert sorted(e.node for e in started) == ["tg1", "tg2", "tg3"]  # type: ignore[attr-defined]
        for node in ("tg1", "tg2", "tg3"):
            await f.finished(node)
        assert not any(isinstance(e, ev.RunStarted) and e.node == "solo1" for e in f.events.events)
        plan = await f.api.command("plan solo1")
        assert local_text(wall_time(later), BERLIN) in plan["text"], plan["text"]
