"""The manual update lifecycle end to end through /api/v1/command (L1-L3, L6-L13).

Sandbox nodes (real .deb files unpacked with dpkg-deb), a signed repository on a real
HTTP server on loopback, the real service. Assertions are what an operator would see:
replies, status, the nodes' own files.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import event

from core import events as ev
from core.lifecycle.engine import REFRESH_PARALLEL
from core.lifecycle.maintenance import NOTICES_AT_ONCE, WAKE_SETTLE
from core.lifecycle.runs import STARTED_PER_TURN
from core.lifecycle.steps import FIRST_ROUND_WAIT
from core.model import SYSTEM, PackageKind
from tests.databases import statements_sent
from tests.fleet import fleet, run_ids
from tests.service import VIEWER_TOKEN, running, settings_for


async def test_download_then_auto_update_with_confirmation(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        reply = await f.run("download tg1")
        run = reply["runs"]["tg1"]
        assert run.status == "succeeded", run.error
        status = await f.node_status("tg1")
        assert status["staged"] == [{"name": "tg-base", "version": "1.0"}]
        assert status["installed"] == {}
        assert f.state("tg1")["staged"] == {"tg-base": "1.0"}
        assert f.messages("tg1") == []  # users are not affected by a download

        f.login("tg1", "alice", "bob")
        reply = await f.api.command("auto-update tg1")
        assert reply["ok"] is False
        assert reply["text"].startswith("2 user session(s) would be ended (tg1: 2)")
        assert "`auto-update tg1 --yes`" in reply["text"]
        assert f.state("tg1")["installed"] == {}  # nothing was done

        reply = await f.run("auto-update tg1 --yes")
        run = reply["runs"]["tg1"]
        assert run.status == "succeeded", run.error
        steps = [s.name for s in await f.service.store.steps(run.id)]
        assert steps == [
            "download",
            "slot",
            "drain",
            "notice",
            "disconnect",
            "install",
            "restart-services",
            "verify",
            "undrain",
            "release",
        ]
        assert f.state("tg1")["installed"] == {"tg-base": "1.0"}
        assert (f.node("tg1") / "fs" / "usr" / "share" / "tg-base" / "VERSION").read_text() == "1.0"
        assert json.loads((f.node("tg1") / "sessions.json").read_text()) == []
        assert any("update of tg1 starts now" in line for line in f.messages("tg1"))
        status = await f.node_status("tg1")
        assert status["lb"] == "in" and status["staged"] == [] and status["pending"] == []
        assert status["run"] is None
        cluster = (await f.api.status())["clusters"][0]
        assert cluster["updating"] == [] and cluster["waiting"] == []
        log = (await f.api.command("log tg1 50"))["text"]
        assert f"run auto-update tg1 run #{run.id}" in log
        assert f"run auto-update succeeded tg1 run #{run.id}: installed tg-base 1.0" in log
        # every command the driver ran for the run, with its exit status and output
        assert f"tgops (driver) command install tg1 run #{run.id}: $ dpkg-deb -X " in log
        assert "(exit 0)\n    Package: tg-base\n    Version: 1.0\n" in log
        assert "    ./usr/share/tg-base/VERSION\n" in log
        assert "token:admin (api) command tg1: auto-update tg1 --yes" in log


async def test_core_update_requires_restart(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.repo.add("tg-kernel", "6.1", kind=PackageKind.CORE)
        reply = await f.run("auto-update solo1")
        assert reply["runs"]["solo1"].status == "succeeded"
        status = await f.node_status("solo1")
        assert status["restart_required"] is True
        text = (await f.api.command("status", VIEWER_TOKEN))["text"]
        assert text.splitlines()[0] == "!! Restart required: solo1"
        reply = await f.run("restart solo1")
        assert reply["runs"]["solo1"].status == "succeeded"
        assert (await f.node_status("solo1"))["restart_required"] is False
        assert f.state("solo1")["last_reboot"] is not None
        assert "Restart required" not in (await f.api.command("status"))["text"]


async def test_cluster_rollout_stops_at_a_failing_node(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.node("tg2").mkdir(parents=True, exist_ok=True)
        f.fault("tg2", {"install": "disk full"})
        reply = await f.run("auto-update c1 --yes")
        runs = reply["runs"]
        assert runs["tg1"].status == "succeeded", runs["tg1"].error
        assert runs["tg2"].status == "failed"
        assert "install" in (runs["tg2"].error or "") and "disk full" in (runs["tg2"].error or "")
        assert runs["tg3"].status == "cancelled"
        assert "rollout stopped: tg2 failed" in (runs["tg3"].error or "")
        assert f.state("tg3")["installed"] == {} and f.state("tg3")["lb"] == "in"

        tg2 = await f.node_status("tg2")
        assert tg2["update_lock"] is not None
        assert "disk full" in tg2["update_lock"]["reason"]
        assert tg2["lb"] == "drained"  # left out of load balancing, with the reason recorded
        assert "stays out of load balancing" in tg2["update_lock"]["reason"]
        cluster = (await f.api.status())["clusters"][0]
        assert cluster["updating"] == ["tg2"]  # it still holds the slot: no other node starts

        reply = await f.api.command("auto-update tg2 --yes")
        assert reply["ok"] is False and "update lock set" in reply["text"]
        text = (await f.api.command("status"))["text"]
        assert "!! Update lock set: tg2" in text
        # the slot is held by a node that no run updates: the line says so and what frees it
        assert (
            "cluster c1: 0/1 updating, 1 slot held by tg2 (update lock, out of load "
            "balancing; `remove-lock` frees it)"
        ) in text.splitlines()

        reply = await f.api.command("remove-lock tg2")
        assert reply["ok"] is True
        assert "tg2: update lock removed; back in load balancing" in reply["text"]
        # tg2 is not in maintenance: the reply does not talk about ending one
        assert "maintenance" not in reply["text"]
        assert f.state("tg2")["lb"] == "in"
        assert (await f.api.status())["clusters"][0]["updating"] == []
        reply = await f.run("auto-update c1 --yes")
        assert {n: r.status for n, r in reply["runs"].items()} == {
            "tg1": "cancelled",
            "tg2": "succeeded",
            "tg3": "succeeded",
        }
        assert "nothing to install on tg1" in (reply["runs"]["tg1"].error or "")


async def test_the_nodes_behind_a_rollouts_first_round_prepare_once_it_installs(
    tmp_path: Path,
) -> None:
    """The first round (the first ``max_parallel_updates`` nodes in command order)
    prepares at once; the nodes behind it stage their packages only once every node of
    the first round has begun installing."""
    async with fleet(tmp_path, cluster_nodes=4, max_parallel=2) as f:
        reply = await f.run("auto-update c1 --yes")
        runs = reply["runs"]
        assert {n: r.status for n, r in runs.items()} == dict.fromkeys(runs, "succeeded")
        steps = {
            node: {s.name: s for s in await f.service.store.steps(run.id)}
            for node, run in runs.items()
        }
        first_installs = max(steps[n]["install"].started_at for n in ("tg1", "tg2"))
        for node in ("tg3", "tg4"):
            staged = steps[node]["download"].finished_at
            assert staged is not None and staged >= first_installs, (node, staged)


async def test_a_slow_first_round_holds_the_others_preparation_two_seconds_at_most(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        f.fault("tg1", {"delay": {"drain": 6}})  # the first round's node drains slowly
        reply = await f.run("auto-update c1 --yes")
        runs = reply["runs"]
        assert {n: r.status for n, r in runs.items()} == dict.fromkeys(runs, "succeeded")
        tg1 = {s.name: s for s in await f.service.store.steps(runs["tg1"].id)}
        for node in ("tg2", "tg3"):
            steps = {s.name: s for s in await f.service.store.steps(runs[node].id)}
            staged = steps["download"].finished_at
            # staged while tg1 still drained, long before its install began
            assert staged is not None and staged < tg1["install"].started_at, node
        assert FIRST_ROUND_WAIT < 6


async def test_the_nodes_behind_a_first_round_that_failed_to_download_stage_nothing(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        f.fault("tg1", {"stage": "disk full"})  # the first round's node fails to prepare
        runs = (await f.run("auto-update c1 --yes"))["runs"]
        assert runs["tg1"].status == "failed"
        for node in ("tg2", "tg3"):
            assert runs[node].status == "cancelled"
            assert f"rollout stopped: tg1 failed (run #{runs['tg1'].id})" in (
                runs[node].error or ""
            )
            assert f"{node} was not touched" in (runs[node].error or "")
            assert "apart from staging" not in (runs[node].error or "")
            assert f.state(node)["staged"] == {} and f.state(node)["installed"] == {}
            steps = [s.name for s in await f.service.store.steps(runs[node].id)]
            assert steps[-1] == "download", (node, steps)


async def test_post_update_check_failure_sets_the_lock(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.node("solo1").mkdir(parents=True, exist_ok=True)
        f.fault("solo1", {"post_check": "web pages do not open"})
        reply = await f.run("auto-update solo1")
        run = reply["runs"]["solo1"]
        assert run.status == "failed"
        assert run.error == "verify: node solo1: post_check failed: web pages do not open"
        lock = (await f.node_status("solo1"))["update_lock"]
        assert lock is not None and "failed at step verify" in lock["reason"]


async def test_lock_remove_with_cancel_schedule_and_warning_flag(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.server.fail_next(100, status=503)
        reply = await f.run("download solo1")
        run = reply["runs"]["solo1"]
        assert run.status == "failed"
        assert "2 attempts" in (run.error or "")
        flag = (await f.node_status("solo1"))["warning_flag"]
        assert flag is not None
        assert "!! Update download error: solo1" in (await f.api.command("status"))["text"]
        reply = await f.api.command("warning-flag clear solo1")
        assert reply["ok"] is False and "only a complete download clears" in reply["text"]
        # the flag blocks nothing: an auto-update is still allowed (and fails to download)
        f.server.reset()
        reply = await f.run("download solo1")
        assert reply["runs"]["solo1"].status == "succeeded"
        assert (await f.node_status("solo1"))["warning_flag"] is None
        log = (await f.api.command("log solo1 30"))["text"]
        assert "warning flag set" in log and "warning flag cleared" in log

        reply = await f.api.command("remove-lock solo1 --cancel-schedule")
        assert reply["ok"] is True
        assert "solo1: no update lock was set." in reply["text"]
        assert "no schedule was on" in reply["text"]


async def test_second_run_on_a_busy_node_is_refused(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.server.hold()
        first = await f.api.command("download tg1")
        assert first["ok"] is True
        run_id = int(first["text"].split("#")[1].split()[0])
        reply = await f.api.command("auto-update tg1 --yes")
        assert reply == {
            "ok": False,
            "text": f"tg1 is busy with run #{run_id}; nothing was started (see `status`).",
        }
        status = await f.node_status("tg1")
        assert status["run"]["id"] == run_id and status["run"]["kind"] == "download"
        f.server.release()
        (run,) = await f.service.lifecycle.wait([run_id])
        assert run.status == "succeeded"


async def test_hotfixes_selection_and_install(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.repo.add(
            "tg-browser", "1.0.1", hotfix="HF-7", urgency="urgent", summary="fixes video playback"
        )
        text = (await f.api.command("hotfixes tg1"))["text"]
        assert "HF-7 [urgent] tg-browser 1.0.1: fixes video playback" in text
        assert "tg1: not selected, not installed" in text
        reply = await f.api.command("hotfixes select tg1 HF-8")
        assert reply["ok"] is False and "unknown hotfix HF-8" in reply["text"]
        assert "known: HF-7" in reply["text"]
        assert (await f.api.command("hotfixes select tg1 HF-7"))["ok"]
        status = await f.node_status("tg1")
        assert status["hotfixes"] == {"always": False, "selected": ["HF-7"]}
        assert {p["name"] for p in status["pending"]} == {"tg-base", "tg-browser"}
        assert (await f.node_status("tg2"))["pending"] == [
            {"name": "tg-base", "version": "1.0", "kind": "regular", "id": None}
        ]
        reply = await f.run("auto-update tg1 --yes")
        assert reply["runs"]["tg1"].status == "succeeded"
        assert f.state("tg1")["installed"] == {"tg-base": "1.0", "tg-browser": "1.0.1"}
        assert "tg1: selected, installed" in (await f.api.command("hotfixes tg1"))["text"]
        assert (await f.api.command("hotfixes always on c1"))["ok"]
        assert (await f.node_status("tg2"))["hotfixes"]["always"] is True
        reply = await f.api.command("hotfixes unselect tg1 HF-7 HF-9")
        assert "tg1: unselected HF-7" in reply["text"]


async def test_oldstable_catch_up_and_omitted_update(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        assert (await f.run("auto-update solo1"))["runs"]["solo1"].status == "succeeded"
        f.repo.add("tg-base", "2.0", channel="oldstable")
        f.repo.add("tg-base", "3.0")
        assert await f.service.lifecycle.refresh_manifests() == []
        status = await f.node_status("solo1")
        assert status["omitted_update"] == ["tg-base"]
        assert (
            "update omitted: older than oldstable: tg-base"
            in (await f.api.command("status solo1"))["text"]
        )
        reply = await f.run("oldstable partial solo1 tg-base")
        assert reply["runs"]["solo1"].status == "succeeded"
        assert f.state("solo1")["installed"] == {"tg-base": "2.0"}
        assert (await f.node_status("solo1"))["omitted_update"] == []
        runs_before = len(await f.service.store.runs(node="solo1"))
        reply = await f.api.command("oldstable partial solo1 tg-nothing --yes")
        # unknown names are refused at once: no run starts
        assert reply["ok"] is False
        assert "channel oldstable has no package tg-nothing" in reply["text"]
        assert len(await f.service.store.runs(node="solo1")) == runs_before


async def test_optional_packages_and_integrity(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.repo.add(
            "ibus-anthy",
            "1.5",
            kind=PackageKind.OPTIONAL,
            files={"usr/lib/ibus/anthy.so": b"\x7fELF anthy"},
        )
        reply = await f.api.command("install solo1 ibus-nonesuch --yes")
        assert reply["ok"] is False  # refused at once, no run started
        assert "not an optional package of channel stable: ibus-nonesuch" in reply["text"]
        assert "optional packages: ibus-anthy" in reply["text"]
        assert (await f.service.store.runs(node="solo1")) == []
        assert (await f.node_status("solo1"))["update_lock"] is None  # nothing was changed

        reply = await f.run("install solo1 ibus-anthy")
        assert reply["runs"]["solo1"].status == "succeeded"
        assert f.state("solo1")["installed"] == {"ibus-anthy": "1.5"}

        reply = await f.run("integrity solo1")
        assert reply["runs"]["solo1"].status == "succeeded"
        (f.node("solo1") / "fs" / "usr" / "lib" / "ibus" / "anthy.so").write_bytes(b"tampered")
        reply = await f.run("integrity solo1")
        run = reply["runs"]["solo1"]
        assert run.status == "failed"
        assert "1 mismatch:" in (run.error or "")  # one: no plural
        assert "ibus-anthy: /usr/lib/ibus/anthy.so" in (run.error or "") or (
            "ibus-anthy: usr/lib/ibus/anthy.so" in (run.error or "")
        )
        # the outcome of every run is in the log (L13), not only while it runs
        log = (await f.api.command("log solo1 50", VIEWER_TOKEN))["text"]
        assert f"run integrity failed solo1 run #{run.id}: integrity: 1 mismatch:" in log


async def test_maintenance_notices_logon_and_cancel(tmp_path: Path) -> None:
    async with fleet(
        tmp_path,
        sections={
            "maintenance": {"notice_lead": "3s", "reminder_interval": "0.5s", "lb_drain_lead": "1s"}
        },
    ) as f:
        f.login("tg1", "alice")
        tz = ZoneInfo("Europe/Berlin")
        start = (datetime.now(tz) + timedelta(seconds=2)).replace(microsecond=0)
        when = start.strftime("%Y-%m-%d %H:%M:%S")
        reply = await f.api.command(
            f"maintenance schedule tg1 {when} Kernel update --disable-logon"
        )
        assert reply["ok"] is True, reply["text"]
        shown = when.removesuffix(":00")  # times are shown with seconds only when set
        zone = start.tzname()
        assert reply["text"].startswith(
            f"Maintenance scheduled on tg1 at {shown} {zone}: Kernel update."
        )
        listing = (await f.api.command("maintenance"))["text"]
        assert f"tg1: {shown} (manual, logon disabled at the start): Kernel update" in listing
        status = await f.node_status("tg1")
        assert status["maintenance"]["reason"] == "Kernel update"
        assert status["maintenance"]["disable_logon"] is True

        # wait (bounded) until the start has passed and the logon lock is set
        for _ in range(100):
            if not f.state("tg1")["logon_enabled"]:
                break
            await asyncio.sleep(0.1)
        assert f.state("tg1")["logon_enabled"] is False
        notices = [m for m in f.messages("tg1") if "Maintenance of tg1" in m]
        assert len(notices) >= 2, notices
        assert f"Maintenance of tg1 at {shown}: Kernel update." in notices[0]

        reply = await f.api.command("maintenance cancel tg1")
        assert reply == {"ok": True, "text": "Maintenance ended on tg1; users were told."}
        assert "maintenance of tg1 has ended" in f.messages("tg1")[-1]
        assert f.state("tg1")["logon_enabled"] is True
        assert (await f.node_status("tg1"))["maintenance"] is None
        reply = await f.api.command("maintenance cancel tg1")
        assert reply["ok"] is False and "No maintenance was scheduled on tg1" in reply["text"]


async def test_an_ended_window_does_not_make_the_reminder_loop_look_again(
    tmp_path: Path,
) -> None:
    """Ending a window gives the reminder loop nothing to do, so it does not read the open
    windows again for it (at a large update time each run's end ends its node's window:
    the loop read the whole table after every end). Scheduling one does wake it."""
    async with fleet(tmp_path, sections={"maintenance": {"notice_lead": "3s"}}) as f:
        tz = ZoneInfo("Europe/Berlin")
        when = (datetime.now(tz) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")

        def looks(sent: list[str]) -> list[str]:
            return [
                x for x in sent if x.lstrip().upper().startswith("SELECT") and "maintenance" in x
            ]

        with statements_sent(f.service.store.engine) as sent:
            reply = await f.api.command(f"maintenance schedule tg1 {when} Kernel update")
            assert reply["ok"] is True, reply["text"]
            after_reply = len(sent)
            await asyncio.sleep(5 * WAKE_SETTLE)  # the loop looks WAKE_SETTLE after a change
        assert looks(sent[after_reply:]), "scheduling a window wakes the reminder loop"

        with statements_sent(f.service.store.engine) as sent:
            reply = await f.api.command("maintenance cancel tg1")
            assert reply["ok"] is True, reply["text"]
            after_reply = len(sent)
            await asyncio.sleep(5 * WAKE_SETTLE)
        assert looks(sent[after_reply:]) == []
        assert (await f.node_status("tg1"))["maintenance"] is None


async def test_a_ticks_notices_leave_the_event_loop_turns_between_them(tmp_path: Path) -> None:
    """The reminders of many nodes are not all sent in one turn of the event loop: a
    simulated node's notice never waits, and 1,000 of them in one turn (0.1 to 0.2 s) held
    up every run's step meanwhile. At most ``NOTICES_AT_ONCE`` go out per turn."""
    nodes = [f"tg{i}" for i in range(1, 41)]
    async with fleet(
        tmp_path,
        cluster_nodes=len(nodes),
        # the windows open for notices together, 4 s after they were scheduled
        sections={"maintenance": {"notice_lead": "3596s", "reminder_interval": "1h"}},
    ) as f:
        files = [f.root / "nodes" / node / "messages.log" for node in nodes]
        turns: list[int] = []

        def notices() -> int:
            return sum(len(x.read_bytes().splitlines()) for x in files if x.exists())

        async def probe() -> None:  # one count per turn of the loop, until all are told
            while not turns or turns[-1] < len(nodes):
                turns.append(notices())
                await asyncio.sleep(0)

        watcher = asyncio.create_task(probe())
        when = (datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(hours=1)).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        reply = await f.api.command(f"maintenance schedule c1 {when} Kernel update")
        assert reply["ok"] is True, reply["text"]
        try:
            async with asyncio.timeout(20):
                await watcher
        finally:
            watcher.cancel()
    steps = [after - before for before, after in itertools.pairwise(turns)]
    assert turns[-1] == len(nodes)
    assert max(steps) <= NOTICES_AT_ONCE, steps
    assert len([x for x in steps if x]) >= len(nodes) // NOTICES_AT_ONCE


async def _turns_while(work: asyncio.Task[Any], count: Callable[[], int]) -> list[int]:
    """``count()`` once per turn of the event loop until ``work`` is done."""
    turns = [count()]
    async with asyncio.timeout(30):
        while not work.done():
            await asyncio.sleep(0)
            turns.append(count())
    await work
    return turns


async def test_a_large_refresh_leaves_the_event_loop_turns_between_the_nodes(
    tmp_path: Path,
) -> None:
    """A simulated node's status never waits, so the refresh of a fleet (every update
    time starts with one) once ran in one turn of the event loop: 10,000 nodes kept it
    from anything else for about a second. Each refresh now takes a turn before it asks
    its node, so at most ``REFRESH_PARALLEL`` nodes are asked per turn (the nodes' real
    ``status`` is called; the test only counts the calls)."""
    nodes = [f"tg{i}" for i in range(1, 161)]
    async with fleet(tmp_path, cluster_nodes=len(nodes)) as f:
        engine = f.service.engine
        await engine.refresh(nodes)  # what the nodes say now is stored: nothing changes next
        asked: list[str] = []
        for name in nodes:
            driver = engine.drivers[name]

            async def status(real: Any = driver.status, name: str = name) -> Any:
                asked.append(name)
                return await real()

            driver.status = status  # type: ignore[method-assign]
        work = asyncio.create_task(engine.refresh(nodes))
        turns = await _turns_while(work, lambda: len(asked))
    assert sorted(r.name for r in work.result()) == sorted(nodes)
    steps = [after - before for before, after in itertools.pairwise(turns)]
    assert sorted(asked) == sorted(nodes)
    assert max(steps) <= REFRESH_PARALLEL, steps


async def test_runs_started_together_take_their_first_steps_in_turns(tmp_path: Path) -> None:
    """A command for many nodes starts their runs ``STARTED_PER_TURN`` at a time, each
    group taking its first steps before the next is started: 10,000 runs started at once
    kept the event loop from everything else for about a second."""
    nodes = [f"tg{i}" for i in range(1, 161)]
    async with fleet(tmp_path, cluster_nodes=len(nodes)) as f:
        started = f.events.wait_count(lambda e: isinstance(e, ev.RunStarted), len(nodes))
        command = asyncio.create_task(f.api.command("download c1"))
        turns = await _turns_while(
            asyncio.create_task(started),
            lambda: sum(isinstance(e, ev.RunStarted) for e in f.events.events),
        )
        reply = await command
        assert reply["ok"] is True, reply["text"]
        await f.service.lifecycle.wait(run_ids(reply["text"]), limit=60)
    steps = [after - before for before, after in itertools.pairwise(turns)]
    assert turns[-1] == len(nodes)
    # the recorder takes each turn's events in the turn after: two groups may meet in one
    assert max(steps) <= 2 * STARTED_PER_TURN, steps
    assert len([x for x in steps if x]) >= len(nodes) // (2 * STARTED_PER_TURN) + 1, steps


async def test_windows_that_start_together_are_marked_at_once_and_announced_once(
    tmp_path: Path,
) -> None:
    """A scheduled update opens the maintenance of all its nodes for the same time: when
    it comes, their windows are marked started by one statement (not one transaction
    each, which kept the store busy for the whole update on a large fleet), and each
    start is announced and audited once."""
    nodes = [f"tg{i}" for i in range(1, 7)]
    async with fleet(
        tmp_path,
        cluster_nodes=len(nodes),
        sections={"maintenance": {"notice_lead": "1s", "reminder_interval": "0.5s"}},
    ) as f:
        with statements_sent(f.service.store.engine) as sent:
            start = (datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(seconds=2)).replace(
                microsecond=0
            )
            when = start.strftime("%Y-%m-%d %H:%M:%S")
            for node in nodes:
                reply = await f.api.command(f"maintenance schedule {node} {when} Kernel update")
                assert reply["ok"] is True, reply["text"]
            started = await f.events.wait_count(
                lambda e: isinstance(e, ev.MaintenanceStarted), len(nodes), within=20
            )
            for _ in range(3):  # a later tick marks nothing again
                await f.service.maintenance.tick()
        marks = [s for s in sent if s.startswith("UPDATE maintenance SET started_at")]
        assert sorted(e.node for e in started) == nodes
        assert len([e for e in f.events.events if isinstance(e, ev.MaintenanceStarted)]) == 6
        assert len(marks) == 1, marks  # and the later ticks found nothing to mark
        audit = await f.service.store.audit_log(limit=100)
        assert sorted(a.target or "" for a in audit if a.action == "maintenance started") == nodes


async def test_maintenance_bad_input(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        reply = await f.api.command(
            "maintenance schedule solo1 2020-01-01 10:00 Old --disable-logon"
        )
        assert reply["ok"] is False and "is in the past" in reply["text"]
        future = (datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(days=2)).strftime("%Y-%m-%d")
        reply = await f.api.command(
            f"maintenance schedule solo1 {future} 10:00 Disk swap --disable-logon"
        )
        assert reply["ok"] is True
        assert "only useful for cluster nodes" in reply["text"]
        reply = await f.api.command(f"maintenance schedule solo1 {future} 11:00 Disk check")
        assert reply["ok"] is True
        assert "solo1: replaces the maintenance of " in reply["text"]
        assert "(Disk swap); a node has one maintenance window at a time" in reply["text"]
        reply = await f.api.command(f"maintenance schedule nosuch {future} 10:00 x")
        assert reply["ok"] is False and "'nosuch' is neither a node nor a cluster" in reply["text"]
        reply = await f.api.command("maintenance schedule solo1 2026-02-30 10:00 x")
        assert reply["ok"] is False and "'2026-02-30' is not a date" in reply["text"]
        reply = await f.api.command("maintenance schedule solo1 2027-03-28 02:30 DST gap")
        assert reply["ok"] is False and "does not exist in Europe/Berlin" in reply["text"]


async def test_status_json_has_the_design_schema(tmp_path: Path) -> None:
    """The keys of GET /api/v1/status are a contract (docs/lifecycle.md, "Status JSON"); the
    additions (reachable, error, omitted_update; instance, leader) are documented."""
    async with fleet(tmp_path) as f:
        f.fault("tg1", {"delay": {"install": 30}})
        future = (datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(days=2)).strftime("%Y-%m-%d")
        for command in (
            f"maintenance schedule tg2 {future} 10:00 Disk swap",
            "schedule download tg2 on mon-fri 01:00 until 03:00",
            "schedule update tg2 on daily 02:30",
            "auto-update tg1 --yes",
        ):
            assert (await f.api.command(command))["ok"], command
        await f.service.lifecycle.set_lock("solo1", "checked by hand", SYSTEM)
        await f.service.lifecycle.set_warning_flag("solo1", "repository down")
        status = await f.api.status()
        assert set(status) == {"nodes", "clusters", "instance", "leader"}
        node_keys = {
            "name", "cluster", "driver", "installed", "pending", "staged", "sessions",
            "logon", "lb", "maintenance", "update_lock", "warning_flag", "restart_required",
            "schedules", "hotfixes", "run",
        }  # fmt: skip
        extras = {"reachable", "error", "omitted_update"}
        nodes = {n["name"]: n for n in status["nodes"]}
        for node in nodes.values():
            assert set(node) == node_keys | extras, node["name"]
        assert nodes["solo1"]["pending"] == [
            {"name": "tg-base", "version": "1.0", "kind": "regular", "id": None}
        ]
        assert set(nodes["tg2"]["maintenance"]) == {"start", "reason", "origin", "disable_logon"}
        assert set(nodes["solo1"]["update_lock"]) == {"since", "reason"}
        assert set(nodes["solo1"]["warning_flag"]) == {"since", "reason"}
        assert set(nodes["tg2"]["schedules"]["download"]) == {"days", "start", "end"}
        assert set(nodes["tg2"]["schedules"]["update"]) == {"days", "start"}
        assert set(nodes["tg1"]["hotfixes"]) == {"always", "selected"}

        await f.events.wait_for(
            lambda e: isinstance(e, ev.RunProgress) and e.node == "tg1" and e.step == "install"
        )
        run = (await f.node_status("tg1"))["run"]
        assert set(run) == {"id", "kind", "step", "progress"}
        (cluster,) = status["clusters"]
        assert set(cluster) == {"name", "max_parallel_updates", "updating", "waiting"}


async def test_changes_found_on_the_nodes_are_audited(tmp_path: Path) -> None:
    """L13: what tgops finds changed on a node by others is in the log too."""
    async with fleet(tmp_path) as f:
        assert (await f.run("auto-update solo1"))["runs"]["solo1"].status == "succeeded"
        state_file = f.node("solo1") / "state.json"
        state = json.loads(state_file.read_text())
        state["installed"]["tg-extra"] = "0.9"  # an admin installed a package by hand
        state["installed"]["tg-base"] = "1.1"
        state_file.write_text(json.dumps(state))
        f.fault("tg2", {"unreachable": "powered off"})
        await f.api.command("status")
        f.fault("tg2", {})
        await f.api.command("status")
        log = (await f.api.command("log 60"))["text"]
        assert (
            "tgops (system) observed: installed packages changed solo1: "
            "tg-base 1.0 -> 1.1, tg-extra (new) 0.9"
        ) in log
        assert "observed: unreachable tg2: node tg2: status failed: powered off" in log
        assert "observed: reachable again tg2: status answered" in log
        assert log.count("observed: installed packages changed") == 1  # not on every look


async def test_the_first_look_at_a_node_is_not_a_change(tmp_path: Path) -> None:
    node = tmp_path / "nodes" / "solo1"
    node.mkdir(parents=True)
    (node / "state.json").write_text(json.dumps({"installed": {"tg-base": "0.9"}}))
    async with running(settings_for(tmp_path)) as (_, api):
        assert (await api.status())["nodes"][3]["installed"] == {"tg-base": "0.9"}
        log = (await api.command("log 20"))["text"]
        assert "observed: installed packages changed" not in log


async def test_a_run_done_compares_the_node_with_the_row_it_holds(tmp_path: Path) -> None:
    """The refresh after a successful run compares the node's answer with the row the run
    holds, without reading the row again; when the row changed meanwhile by another hand
    (another version), the node's answer is compared with the stored row and still kept."""
    async with fleet(tmp_path) as f:
        engine, store = f.service.engine, f.service.store
        (held,) = await engine.refresh(["solo1"])  # the row as the node is now
        statements: list[str] = []

        def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
            statements.append(" ".join(statement.split()[:3]))

        sync = store.engine.sync_engine
        event.listen(sync, "before_cursor_execute", seen)
        try:
            # the row held is the stored one and the node has not changed: nothing is read
            assert await engine.refresh_held("solo1", held) == held
            assert statements == []
            # another hand changes the row, the node changes too: the answer is kept
            other = await store.update_node("solo1", sessions=7)
            (f.node("solo1") / "state.json").write_text(
                json.dumps({"installed": {"tg-extra": "0.9"}})
            )
            after = await engine.refresh_held("solo1", held)
        finally:
            event.remove(sync, "before_cursor_execute", seen)
        assert after.installed == {"tg-extra": "0.9"} and after.sessions == 0
        assert after.version == other.version + 1
        assert after == await store.node("solo1")
