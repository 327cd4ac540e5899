"""What a newcomer reads: replies that name the node, count right, say what is left on a
node, explain a lock where it is shown, and suggest the command meant."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bot.grammar import ParseError, parse
from core.model import PackageKind
from tests.fleet import fleet
from tests.service import running, settings_for

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("stauts", "unknown command 'stauts' (did you mean `status`"),
        ("auto-updat tg1", "(did you mean `auto-update`?)"),
        ("hotfix", "(did you mean `hotfixes`?)"),
        ("maintenance shedule tg1 2030-01-01 10:00 x", "(did you mean `schedule`?)"),
        ("schedule updat tg1 on daily 10:00", "(did you mean `update`?)"),
        ("hotfixes selct tg1 HF-1", "unknown hotfixes command 'selct' (did you mean `select`"),
        ("logon disabel tg1", "(did you mean `disable`?)"),
        ("help stauts", "no command 'stauts' (did you mean `status`"),
    ],
)
def test_a_mistyped_command_suggests_the_one_meant(text: str, hint: str) -> None:
    result = parse(text)
    assert isinstance(result, ParseError)
    assert hint in result.text
    assert result.text.splitlines()[-1].startswith("Usage: ")


def test_no_suggestion_for_a_word_like_no_command() -> None:
    result = parse("frobnicate")
    assert isinstance(result, ParseError)
    assert "did you mean" not in result.text


async def test_core_update_names_the_node_to_restart(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        f.repo.add("tg-kernel", "6.1", kind=PackageKind.CORE)
        run = (await f.run("auto-update solo1 --yes"))["runs"]["solo1"]
        assert run.status == "succeeded", run.error
        log = (await f.api.command("log solo1 50"))["text"]
        assert "restart required (core update): `restart solo1`" in log
        assert "`restart T`" not in log


async def test_a_stopped_rollout_says_what_stays_staged_and_status_explains_the_lock(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        f.fault("tg1", {"install": "disk full"})
        runs = (await f.run("auto-update c1 --yes"))["runs"]
        assert runs["tg1"].status == "failed"
        for node in ("tg2", "tg3"):
            assert runs[node].status == "cancelled"
            # each downloaded before it queued for a slot: its packages are on the node
            assert f.state(node)["staged"] == {"tg-base": "1.0"}
            assert f.state(node)["installed"] == {}
            assert (
                f"{node} was not touched apart from staging tg-base 1.0 (nothing installed, "
                "no user disturbed; the staged packages stay for its next update)"
            ) in (runs[node].error or "")

        text = (await f.api.command("status tg1"))["text"]
        line = next(x for x in text.splitlines() if x.startswith("  ! update lock since "))
        assert f"run #{runs['tg1'].id} (auto-update) failed at step install" in line
        assert "disk full" in line and "`remove-lock tg1`" in line
        # the lock's time names its zone: the reader may sit in another one
        assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)? CES?T:", line), line

        # not in maintenance: remove-lock does not talk about ending maintenance
        reply = await f.api.command("remove-lock tg1")
        assert reply["ok"] and "update lock removed" in reply["text"]
        assert "maintenance" not in reply["text"]


async def test_remove_lock_reminds_of_a_maintenance_still_open(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        day = (datetime.now(BERLIN) + timedelta(days=2)).strftime("%Y-%m-%d")
        assert (await f.api.command(f"maintenance schedule tg2 {day} 10:00 Kernel"))["ok"]
        f.fault("tg2", {"install": "disk full"})
        assert (await f.run("auto-update tg2 --yes"))["runs"]["tg2"].status == "failed"
        reply = await f.api.command("remove-lock tg2")
        assert reply["ok"], reply["text"]
        assert (
            "tg2 is still in maintenance: maintenance mode is not ended by this; a maint "
            "admin ends it with `maintenance cancel tg2`."
        ) in reply["text"]


async def test_plan_for_a_node_with_nothing_pending_and_short_estimates(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        assert (await f.run("auto-update solo1 --yes"))["runs"]["solo1"].status == "succeeded"
        at = (datetime.now(BERLIN) + timedelta(hours=3)).strftime("%H:%M")
        for target in ("solo1", "c1"):
            assert (await f.api.command(f"schedule update {target} on daily {at}"))["ok"]
        plan = (await f.api.command("plan"))["text"]
        solo = [x for x in plan.splitlines() if "solo1:" in x]
        assert len(solo) == 1, plan
        assert (
            "solo1: checks for updates; nothing is pending now, so nothing else happens"
            in (solo[0])
        )
        assert "tg1: takes a slot of c1" in plan  # c1's nodes have tg-base 1.0 pending
        # one update took a few seconds here: estimates say so instead of "~0 min"
        assert "~0 min" not in plan and "0.0 min" not in plan
        assert re.search(
            r"tg2: expected to get a slot of c1 \(waits (~\d+s|less than a second)\)", plan
        ), plan
        assert re.search(
            r"\(estimates use the median update duration here: (\d+s|less than a second)\)", plan
        ), plan
        assert plan.splitlines()[-1] == "(times in Europe/Berlin)"


async def test_a_clean_shutdown_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="core.lifecycle.leader")
    async with running(settings_for(tmp_path)) as (service, _):
        assert service.election.is_leader
    messages = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "core.lifecycle.leader"
    ]
    assert not [m for level, m in messages if level >= logging.WARNING], messages
    assert (
        logging.INFO,
        f"instance {service.election.instance} stops leading (shutting down)",
    ) in (messages)


async def test_without_a_repository_download_says_what_is_missing_and_how_to_get_it(
    tmp_path: Path,
) -> None:
    example = (Path(__file__).parent.parent / "config" / "tgops.example.toml").read_text()
    # the example configuration says plainly what it lacks and where a full setup is
    assert "What it lacks: an update repository." in example
    assert "run `tgops demo`" in example
    async with running(settings_for(tmp_path)) as (_, api):
        reply = await api.command("download tg1")
        assert reply["ok"] is False
        assert "no update repository is usable: set updates.public_key" in reply["text"]
        assert "`tgops keygen` and `tgops publish` make a signed repository" in reply["text"]
        assert "`tgops demo` runs a complete one" in reply["text"]
