"""The Slack app end to end: signed requests to the real ``/slack/events`` of a running
service, a fake Slack Web API on loopback, sandbox nodes and a signed repository.

Assertions are what a Slack user sees: the messages (text and blocks) posted to the
response URL, the ops channel or App Home, and which Slack calls were made.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bot.service import Service
from core.clock import ManualClock
from core.interfaces import Clock
from core.model import SYSTEM, PackageKind
from core.settings import Settings
from core.store import Store
from tests.fake_slack import Call, FakeSlack, SlackUser, fake_slack, signature
from tests.fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, fake_twilio
from tests.notify_env import PUBLIC_URL, wait_until
from tests.repo_server import RepoServer, serve_repo
from tests.repository import Repo
from tests.service import Api, running, settings_for

SECRET = "signing-secret-for-tests"
TOKEN = "xoxb-test-token"
UPDATE = "U0UPDATE"
MAINT = "U0MAINT"
VIEWER = "U0VIEWER"  # in no role list: gets what "*" grants (viewer)
TZ = ZoneInfo("Europe/Berlin")


@dataclass
class Bed:
    root: Path
    repo: Repo
    server: RepoServer
    fake: FakeSlack
    service: Service
    api: Api
    viewer: SlackUser

    @property
    def update(self) -> SlackUser:
        return self.viewer.as_user(UPDATE)

    @property
    def maint(self) -> SlackUser:
        return self.viewer.as_user(MAINT)

    def login(self, node: str, *users: str) -> None:
        path = self.root / "nodes" / node
        path.mkdir(parents=True, exist_ok=True)
        (path / "sessions.json").write_text(json.dumps([{"user": u} for u in users]))

    def installed(self, node: str) -> dict[str, str]:
        path = self.root / "nodes" / node / "state.json"
        if not path.exists():
            return {}
        installed: dict[str, str] = json.loads(path.read_text()).get("installed", {})
        return installed


@asynccontextmanager
async def bed(
    tmp_path: Path,
    *,
    roles: dict[str, list[str]] | None = None,
    slack: dict[str, Any] | None = None,
    more: dict[str, dict[str, Any]] | None = None,
    extra: str = "",
    environ: dict[str, str] | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Bed]:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server, fake_slack() as fake:
        sections = {
            "slack": {
                "bot_token": TOKEN,
                "signing_secret": SECRET,
                "api_url": fake.api_url,
                "channel": "COPS",
                **(slack or {}),
            },
            "roles": roles or {"update": [UPDATE], "maint": [MAINT], "viewer": ["*"]},
            **(more or {}),
        }
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            sections=sections,
            updates={"read_timeout": "30s"},  # tests hold the repository while Slack retries
            extra=extra,
            environ=environ,
        )
        async with running(settings, clock=clock) as (service, api):
            viewer = SlackUser(
                url=f"{api.base}/slack/events", secret=SECRET, session=api.session, fake=fake
            )
            yield Bed(tmp_path, repo, server, fake, service, api, viewer)


def run_ids(text: str) -> list[int]:
    """The run numbers a reply names (its fallback text and blocks name them both)."""
    return list(dict.fromkeys(int(n) for n in re.findall(r"#(\d+) on", text)))


def buttons(call: Call) -> list[dict[str, Any]]:
    return [
        e
        for b in call.body.get("blocks", [])
        if b["type"] == "actions"
        for e in b["elements"]
        if e["type"] == "button"
    ]


# -- transport and signatures ----------------------------------------------------------------


async def test_bad_or_stale_signatures_are_refused_with_401(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        answer = await b.viewer.slash("status", sign_with="not-the-secret")
        assert answer.status == 401
        stale = str(int(time.time()) - 10 * 60)
        answer = await b.viewer.slash("status", timestamp=stale)
        assert answer.status == 401
        async with b.api.session.post(b.viewer.url, data=b"command=%2Ftg&text=status") as resp:
            assert resp.status == 401
        # the same request, signed now, is acknowledged at once with an empty body
        answer = await b.viewer.slash("status")
        assert (answer.status, answer.text) == (200, "")
        await b.fake.wait_for("response_url")
        assert len(b.fake.of("response_url")) == 1  # only the good request was answered


async def test_status_reply_begins_with_the_alert_header(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        await b.service.lifecycle.set_lock("tg2", "install failed: disk full", SYSTEM)
        await b.service.lifecycle.set_warning_flag("solo1", "10 attempts failed")
        tomorrow = (datetime.now(TZ) + timedelta(days=1)).strftime("%Y-%m-%d")
        reply = await b.api.command(f"maintenance schedule tg1 {tomorrow} 22:00 Kernel update")
        assert reply["ok"], reply["text"]

        call = await b.viewer.command("status")
        assert call.body["response_type"] == "ephemeral"  # a query: only the asker sees it
        header = call.body["blocks"][0]["text"]["text"]
        assert header.splitlines() == [
            ":warning: *Update download error:* solo1",
            ":lock: *Update lock set:* tg2",
            f":calendar: *Maintenance* tg1 at {tomorrow} 22:00: Kernel update",
        ]
        assert call.body["blocks"][1] == {"type": "divider"}
        body = call.body["blocks"][2]["text"]["text"]
        assert body.startswith("```") and "tg1 (cluster c1): 0 sessions" in body
        assert call.body["text"].startswith("Update download error: solo1 | Update lock set: tg2")


async def test_roles_refusals_help_and_unknown_commands(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        call = await b.viewer.command("download tg1")
        assert call.body["response_type"] == "ephemeral"
        assert ":no_entry: `download` needs role update; you have: viewer." in call.text
        assert b.installed("tg1") == {}

        call = await b.viewer.command("help")
        assert "/tg status" in call.text and "/tg download" not in call.text
        call = await b.update.command("help")
        assert "/tg download" in call.text and "/tg maintenance schedule" not in call.text
        call = await b.maint.command("help")
        assert "/tg maintenance schedule" in call.text and "/tg download" not in call.text

        call = await b.viewer.command("frobnicate tg1")
        assert call.body["response_type"] == "ephemeral"
        assert "unknown command 'frobnicate'" in call.text
        assert "Usage: help [COMMAND]" in call.text

        # an empty `/tg` is help
        call = await b.viewer.command("")
        assert "/tg status" in call.text

        # the response URL is gone: the refusal still reaches the user, ephemerally
        b.fake.fail_next("response_url", 404)
        answer = await b.viewer.slash("restart solo1")
        assert answer.status == 200
        [posted] = await b.fake.wait_for("chat.postEphemeral")
        assert posted.body["channel"] == "CCMD" and posted.body["user"] == VIEWER
        assert "`restart` needs role update" in posted.text


async def test_a_user_in_no_role_list_gets_nothing(tmp_path: Path) -> None:
    roles = {"viewer": [VIEWER], "update": [UPDATE], "maint": []}
    async with bed(tmp_path, roles=roles) as b:
        stranger = b.viewer.as_user("U0STRANGER")
        call = await stranger.command("status")
        assert "`status` needs role viewer; you have: none." in call.text
        assert "No alerts" not in call.text  # no role: not even the fleet's alerts
        call = await stranger.command("help")
        assert "`help` needs role viewer; you have: none." in call.text
        call = await b.viewer.command("status")
        assert "tg1 (cluster c1)" in call.text
        call = await b.update.command("status")  # update includes viewer (L11)
        assert "tg1 (cluster c1)" in call.text


# -- confirmations -------------------------------------------------------------------------


async def test_confirmation_button_starts_the_run_once(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        b.login("tg1", "alice", "bob")
        prompt = await b.update.command("auto-update tg1")
        assert prompt.body["response_type"] == "ephemeral"
        assert "2 user session(s) would be ended (tg1: 2). Nothing was done." in prompt.text
        assert "Sessions that will end:* tg1: alice, bob" in prompt.text
        [button] = buttons(prompt)
        assert button["style"] == "danger"
        assert button["confirm"]["style"] == "danger"
        assert button["confirm"]["text"]["text"] == "These sessions will be ended: tg1: alice, bob."
        assert "Or type `/tg auto-update tg1 --yes`." in prompt.text
        assert b.installed("tg1") == {}  # nothing was done

        b.server.hold()  # the run's download waits: the run stays running for a while
        click_url = b.fake.response_url()
        answer = await b.update.click(prompt, response_url=click_url)
        assert (answer.status, answer.text) == (200, "")
        path = click_url.split(b.fake.base)[1]
        confirmed, started = await b.fake.wait_for(
            "response_url", 2, where=lambda c: c.path == path
        )
        assert confirmed.body["replace_original"] is True
        assert f"Confirmed by <@{UPDATE}>: `auto-update tg1 --yes`." in confirmed.text
        assert started.body["response_type"] == "in_channel"  # an action: the channel sees it
        assert "auto-update started: #" in started.text
        [run_id] = run_ids(started.text)

        again_url = b.fake.response_url()
        await b.update.click(prompt, response_url=again_url)
        path = again_url.split(b.fake.base)[1]
        [again] = await b.fake.wait_for("response_url", where=lambda c: c.path == path)
        assert "Already running: this was confirmed before" in again.text
        assert f"run #{run_id} on tg1: running" in again.text

        b.server.release()
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error
        assert b.installed("tg1") == {"tg-base": "1.0"}

        done_url = b.fake.response_url()
        await b.update.click(prompt, response_url=done_url)
        path = done_url.split(b.fake.base)[1]
        [done] = await b.fake.wait_for("response_url", where=lambda c: c.path == path)
        assert (
            f"Already done: this was confirmed before (by <@{UPDATE}>); run #{run_id} on "
            "tg1: succeeded." in done.text
        )
        assert len(await b.service.store.runs(node="tg1")) == 1


async def test_a_click_after_someone_else_started_the_run(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        b.login("solo1", "carol")
        prompt = await b.update.command("auto-update solo1")
        assert "Sessions that will end:* solo1: carol" in prompt.text
        b.server.hold()
        # `--yes` typed skips the button; the action is posted in the channel
        typed = await b.update.command("auto-update solo1 --yes")
        assert typed.body["response_type"] == "in_channel"
        assert buttons(typed) == []
        [run_id] = run_ids(typed.text)

        url = b.fake.response_url()
        await b.update.click(prompt, response_url=url)
        path = url.split(b.fake.base)[1]
        [late] = await b.fake.wait_for("response_url", where=lambda c: c.path == path)
        assert late.body["replace_original"] is True
        assert f"Already running: solo1 is busy with run #{run_id} (at step download)" in late.text
        assert "nothing new was started" in late.text
        b.server.release()
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error
        assert len(await b.service.store.runs(node="solo1")) == 1


async def test_a_click_by_a_user_without_the_role_is_refused_naming_it(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        b.login("tg1", "alice")
        prompt = await b.update.command("auto-update tg1")
        assert "Sessions that will end:* tg1: alice" in prompt.text

        # the click checks the clicking user's roles again: maint is not update
        url = b.fake.response_url()
        answer = await b.maint.click(prompt, response_url=url)
        assert (answer.status, answer.text) == (200, "")
        path = url.split(b.fake.base)[1]
        [refusal] = await b.fake.wait_for("response_url", where=lambda c: c.path == path)
        assert refusal.body["response_type"] == "ephemeral"
        assert ":no_entry: `auto-update` needs role update; you have: maint, viewer." in (
            refusal.text
        )
        assert "Confirmed by" not in refusal.text
        assert await b.service.store.runs(node="tg1") == []
        assert b.installed("tg1") == {}

        # the refused click used nothing up: the button still works for an update admin
        url = b.fake.response_url()
        await b.update.click(prompt, response_url=url)
        path = url.split(b.fake.base)[1]
        _, started = await b.fake.wait_for("response_url", 2, where=lambda c: c.path == path)
        [run_id] = run_ids(started.text)
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error


async def test_a_click_after_an_update_lock_was_set_is_refused_with_its_reason(
    tmp_path: Path,
) -> None:
    async with bed(tmp_path) as b:
        b.login("tg1", "alice", "bob")
        prompt = await b.update.command("auto-update tg1")
        assert "2 user session(s) would be ended" in prompt.text
        # between the prompt and the click the node is locked
        await b.service.lifecycle.set_lock("tg1", "install failed: disk full", SYSTEM)

        url = b.fake.response_url()
        await b.update.click(prompt, response_url=url)
        path = url.split(b.fake.base)[1]
        [refusal] = await b.fake.wait_for("response_url", where=lambda c: c.path == path)
        assert refusal.body["replace_original"] is True
        assert "update lock set, nothing was started (L6)" in refusal.text
        assert "tg1: install failed: disk full" in refusal.text
        assert "Confirmed by" not in refusal.text
        assert await b.service.store.runs(node="tg1") == []
        assert b.installed("tg1") == {}


# -- the maintenance form --------------------------------------------------------------------


async def test_maintenance_form_opens_checks_and_schedules(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        call = await b.viewer.command("maintenance new")
        assert "`maintenance new` needs role maint" in call.text
        assert b.fake.of("views.open") == []

        url = b.fake.response_url()
        answer = await b.maint.slash("maintenance new", response_url=url)
        assert (answer.status, answer.text) == (200, "")
        [opened] = await b.fake.wait_for("views.open")
        assert opened.body["trigger_id"].startswith("trigger.")
        view = opened.body["view"]
        assert view["type"] == "modal" and view["callback_id"] == "tg_maintenance"
        select = view["blocks"][0]["element"]
        offered = [o["value"] for g in select["option_groups"] for o in g["options"]]
        assert offered == ["all", "c1", "tg1", "tg2", "tg3", "solo1"]
        kinds = [blk["element"]["type"] for blk in view["blocks"]]
        assert kinds == ["static_select", "datepicker", "timepicker", "plain_text_input",
                         "checkboxes"]  # fmt: skip

        def values(target: str, day: str, at: str, reason: str, logon: bool) -> dict[str, Any]:
            checked = [{"value": "disable_logon"}] if logon else []
            return {
                "target": {"target": {"type": "static_select",
                                      "selected_option": {"value": target}}},
                "date": {"date": {"type": "datepicker", "selected_date": day}},
                "time": {"time": {"type": "timepicker", "selected_time": at}},
                "reason": {"reason": {"type": "plain_text_input", "value": reason}},
                "options": {"disable_logon": {"type": "checkboxes", "selected_options": checked}},
            }  # fmt: skip

        yesterday = (datetime.now(TZ) - timedelta(days=1)).strftime("%Y-%m-%d")
        answer = await b.maint.submit(view, values("tg1", yesterday, "22:00", "   ", False))
        assert answer.status == 200
        errors = answer.json()
        assert errors["response_action"] == "errors"
        assert set(errors["errors"]) == {"date", "reason"}
        assert "in the past" in errors["errors"]["date"]
        assert "Say why" in errors["errors"]["reason"]

        tomorrow = (datetime.now(TZ) + timedelta(days=1)).strftime("%Y-%m-%d")
        answer = await b.maint.submit(view, values("nosuch", tomorrow, "22:00", "x", False))
        assert answer.json()["response_action"] == "errors"
        assert "'nosuch' is neither a node nor a cluster" in answer.json()["errors"]["target"]

        reason = 'Kernel update -- it\'s "urgent"; back in  30 min'
        answer = await b.maint.submit(view, values("tg1", tomorrow, "22:30", reason, True))
        assert (answer.status, answer.text) == (200, "")  # the form closes
        path = url.split(b.fake.base)[1]
        [done] = await b.fake.wait_for("response_url", where=lambda c: c.path == path)
        assert done.body["response_type"] == "in_channel"
        assert f"Maintenance scheduled on tg1 at {tomorrow} 22:30" in done.text
        maintenance = next(n for n in (await b.api.status())["nodes"] if n["name"] == "tg1")[
            "maintenance"
        ]
        assert maintenance["reason"] == 'Kernel update -- it\'s "urgent"; back in 30 min'
        assert maintenance["disable_logon"] is True
        log = (await b.api.command("log tg1"))["text"]
        assert f"{MAINT} (slack) command tg1: maintenance schedule tg1" in log


# -- App Home ------------------------------------------------------------------------------


async def test_app_home_is_published_and_refreshed(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        answer = await b.viewer.event({"type": "app_home_opened", "user": VIEWER, "tab": "home",
                                       "channel": "D1"})  # fmt: skip
        assert answer.status == 200
        [first] = await b.fake.wait_for("views.publish")
        assert first.body["user_id"] == VIEWER
        assert first.body["view"]["type"] == "home"
        text = first.text
        assert "tgops: the fleet" in text and "No alerts" in text
        assert "*Fleet* (4 nodes)" in text
        assert re.search(r"solo1\s+-\s+0\s+enabled", text)
        assert "Your roles: viewer." in text

        reply = await b.api.command("logon disable solo1")
        assert reply["ok"], reply["text"]
        await b.service.lifecycle.set_lock("tg3", "install failed", SYSTEM)
        calls = await b.fake.wait_for("views.publish", where=lambda c: "Update lock set" in c.text)
        assert re.search(r"solo1\s+-\s+0\s+disabled", calls[-1].text)
        assert calls[-1].body["user_id"] == VIEWER


# -- the ops channel -------------------------------------------------------------------------


async def test_ops_channel_follows_a_run_and_survives_429_and_500(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        b.fake.fail_next("chat.postMessage", 429, retry_after=1)
        b.fake.fail_next("chat.update", 500)
        b.server.hold()
        call = await b.update.command("download solo1")
        assert call.body["response_type"] == "in_channel"
        [run_id] = run_ids(call.text)
        title = f"Run #{run_id} download on solo1"

        [posted] = await b.fake.wait_for("chat.postMessage", where=lambda c: title in c.text)
        assert posted.body["channel"] == "COPS"
        assert f"started by <@{UPDATE}>" in posted.text
        limited = [c for c in b.fake.calls if c.method == "chat.postMessage" and c.status == 429]
        assert len(limited) == 1  # rate limited once, retried after Retry-After

        progress = await b.fake.wait_for("chat.update", where=lambda c: "step *download*" in c.text)
        assert "░" in progress[0].text
        stored = await b.service.store.kv_get("slack.run", str(run_id))
        assert stored["channel"] == "COPS" and stored["ts"] == progress[0].body["ts"]
        b.server.release()
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error
        [final] = await b.fake.wait_for("chat.update", where=lambda c: "succeeded" in c.text)
        assert final.body["ts"] == stored["ts"]  # the same message, updated in place
        assert f":white_check_mark: *{title}: succeeded*" in final.text
        assert [c for c in b.fake.calls if c.method == "chat.update" and c.status == 500]

        async def forgotten() -> bool:  # once Slack's answer to the final update is read
            return await b.service.store.kv_get("slack.run", str(run_id)) is None

        await wait_until(forgotten, within=10, what="the run's message record removed")


@asynccontextmanager
async def restartable(tmp_path: Path) -> AsyncIterator[tuple[RepoServer, FakeSlack, Settings]]:
    """The peers and settings of a service that a test starts more than once."""
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server, fake_slack() as fake:
        sections = {
            "slack": {"bot_token": TOKEN, "signing_secret": SECRET, "api_url": fake.api_url,
                      "channel": "COPS"},
            "roles": {"update": [UPDATE]},
        }  # fmt: skip
        settings = settings_for(
            tmp_path, repository_url=server.url, public_key=repo.public_key, sections=sections,
            updates={"read_timeout": "30s"},  # tests hold the repository while Slack retries
        )  # fmt: skip
        yield server, fake, settings


async def test_the_run_message_survives_a_restart(tmp_path: Path) -> None:
    async with restartable(tmp_path) as (server, fake, settings):
        server.hold()
        async with running(settings) as (_, api):
            user = SlackUser(f"{api.base}/slack/events", SECRET, api.session, fake, UPDATE)
            call = await user.command("download solo1")
            [run_id] = run_ids(call.text)
            title = f"Run #{run_id} download on solo1"
            [posted] = await fake.wait_for("chat.postMessage", where=lambda c: title in c.text)
            await fake.wait_for("chat.update", where=lambda c: "step *download*" in c.text)
        # the service stopped inside the run's download; the next one resumes the run
        server.release()
        async with running(settings) as (service, _):
            [run] = await service.lifecycle.wait([run_id])
            assert run.status == "succeeded", run.error
            [final] = await fake.wait_for("chat.update", where=lambda c: "succeeded" in c.text)
        assert final.body["ts"] == posted.answer["ts"]  # the same message, across the restart
        assert len(fake.of("chat.postMessage")) == 1


async def test_ops_channel_reports_a_failure_and_the_lock(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        node = tmp_path / "nodes" / "solo1"
        node.mkdir(parents=True, exist_ok=True)
        (node / "faults.json").write_text(json.dumps({"install": "disk full"}))
        call = await b.update.command("auto-update solo1")
        [run_id] = run_ids(call.text)
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "failed"
        [final] = await b.fake.wait_for("chat.update", where=lambda c: ": failed*" in c.text)
        assert "disk full" in final.text
        await b.fake.wait_for(
            "chat.postMessage", where=lambda c: "Update lock set on solo1" in c.text
        )
        await b.fake.wait_for(
            "chat.postMessage",
            where=lambda c: f"Run #{run_id} auto-update on solo1 failed" in c.text,
        )
        call = await b.viewer.command("status solo1")
        assert ":lock: *Update lock set:* solo1" in call.text


async def test_ops_channel_retries_502_and_504(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        # a gateway's 502 page for the run's first post, Slack's 504 for its final update
        b.fake.fail_next("chat.postMessage", 502, html=True)
        b.fake.fail_next("chat.update", 504, where=lambda body: "succeeded" in json.dumps(body))
        call = await b.update.command("download solo1")
        [run_id] = run_ids(call.text)
        title = f"Run #{run_id} download on solo1"
        [posted] = await b.fake.wait_for("chat.postMessage", where=lambda c: title in c.text)
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error
        [final] = await b.fake.wait_for("chat.update", where=lambda c: "succeeded" in c.text)
        assert final.body["ts"] == posted.answer["ts"]
        assert f":white_check_mark: *{title}: succeeded*" in final.text
        posts = [c.status for c in b.fake.calls if c.method == "chat.postMessage"]
        assert posts[:2] == [502, 200]
        updates = [c.status for c in b.fake.calls if "succeeded" in c.text]
        assert updates == [504, 200]


async def test_an_outcome_slack_refused_is_kept_and_shown_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bot.slack.ops")
    async with restartable(tmp_path) as (_, fake, settings):
        async with running(settings) as (service, api):
            # the final update fails three times: the first try and both retries
            fake.fail_next(
                "chat.update", 502, count=3, where=lambda body: "succeeded" in json.dumps(body)
            )
            user = SlackUser(f"{api.base}/slack/events", SECRET, api.session, fake, UPDATE)
            call = await user.command("download solo1")
            [run_id] = run_ids(call.text)
            title = f"Run #{run_id} download on solo1"
            [posted] = await fake.wait_for("chat.postMessage", where=lambda c: title in c.text)
            [run] = await service.lifecycle.wait([run_id])
            assert run.status == "succeeded", run.error
            # the ops channel handles events in order: once the post of the next one is
            # there, the run's end has been handled
            await service.lifecycle.set_warning_flag("tg3", "next event")
            await fake.wait_for("chat.postMessage", where=lambda c: "on tg3" in c.text)
            assert [c.status for c in fake.calls if "succeeded" in c.text] == [502, 502, 502]
            kept = await service.store.kv_get("slack.run", str(run_id))
            assert kept["ts"] == posted.answer["ts"]
            assert kept["final"]["outcome"] == "succeeded"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(
            f"ops channel message of run #{run_id} (download on solo1) could not be updated "
            "with its outcome (succeeded"
            in w
            and "Tried again at the next start" in w
            for w in warnings
        ), warnings
        # the next start writes the outcome into the same message, and forgets it then
        async with running(settings):
            [final] = await fake.wait_for("chat.update", where=lambda c: "succeeded" in c.text)
        assert final.body["ts"] == posted.answer["ts"]
        assert f":white_check_mark: *{title}: succeeded*" in final.text
        async with Store(settings.database_url) as store:
            assert await store.kv_get("slack.run", str(run_id)) is None


async def test_ops_channel_posts_maintenance_start_and_end(tmp_path: Path) -> None:
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    async with bed(tmp_path, clock=clock) as b:
        start = (clock.now() + timedelta(hours=1)).astimezone(TZ)
        when = start.strftime("%Y-%m-%d %H:%M:%S")
        call = await b.maint.command(
            f"maintenance schedule tg1 {when} Kernel update --disable-logon"
        )
        assert "Maintenance scheduled on tg1" in call.text

        await clock.set(start + timedelta(seconds=1))
        b.service.maintenance.changed()
        [started] = await b.fake.wait_for(
            "chat.postMessage", where=lambda c: "Maintenance of tg1 started" in c.text
        )
        assert started.body["channel"] == "COPS"
        assert ":construction: *Maintenance of tg1 started*\nKernel update (logon disabled)" in (
            started.text
        )
        await b.service.maintenance.tick()  # the start is announced once per window

        call = await b.maint.command("maintenance cancel tg1")
        assert "Maintenance ended on tg1" in call.text
        [ended] = await b.fake.wait_for(
            "chat.postMessage", where=lambda c: "Maintenance of tg1 ended" in c.text
        )
        assert f":white_check_mark: *Maintenance of tg1 ended*\ncancelled (by <@{MAINT}>)" in (
            ended.text
        )
        # events reach the ops channel in order: a second start would be posted by now
        posts = [c for c in b.fake.of("chat.postMessage") if "Maintenance of tg1" in c.text]
        assert len(posts) == 2


async def test_ops_channel_posts_the_warning_flag(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        await b.service.lifecycle.set_warning_flag("solo1", "10 attempts failed: refused")
        [posted] = await b.fake.wait_for(
            "chat.postMessage", where=lambda c: "Update download error on solo1" in c.text
        )
        assert posted.body["channel"] == "COPS"
        assert ":warning: *Update download error on solo1*\n10 attempts failed: refused" in (
            posted.text
        )


async def test_ops_channel_posts_an_acknowledged_urgent_hotfix_call(tmp_path: Path) -> None:
    async with fake_twilio() as twilio:
        twilio.public_url = PUBLIC_URL
        more = {
            "twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                       "from_number": FROM_NUMBER, "api_url": twilio.url, "timeout": "3s"},
            "escalation": {"call_rounds": 1, "ack_wait": "20s"},
        }  # fmt: skip
        alice = '[[contacts]]\nname = "Alice"\nphone = "+4917000000001"\n'
        environ = {"TGOPS_HTTP__PUBLIC_URL": PUBLIC_URL, "TGOPS_UPDATES__POLL_INTERVAL": "0.2s"}
        async with bed(tmp_path, more=more, extra=alice, environ=environ) as b:
            b.repo.add("tg-vnc", "2.0-1", hotfix="HF-7", urgency="urgent", summary="VNC crash")
            (call,) = await twilio.wait_calls(1)
            status, _ = await twilio.press(call, "1", b.service.port or 0)
            assert status == 200
            [posted] = await b.fake.wait_for(
                "chat.postMessage", where=lambda c: "Hotfix HF-7 acknowledged" in c.text
            )
            assert posted.body["channel"] == "COPS"
            assert ":telephone_receiver: *Hotfix HF-7 acknowledged*" in posted.text
            assert "by Alice (+4917000000001); the escalation stops." in posted.text


async def test_restart_required_is_red_in_every_header(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        b.repo.add("tg-kernel", "6.1", kind=PackageKind.CORE)
        call = await b.update.command("auto-update solo1")
        [run_id] = run_ids(call.text)
        [run] = await b.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error
        call = await b.viewer.command("nodes")
        first = call.body["blocks"][0]["text"]["text"]
        assert first == ":red_circle: *Restart required:* solo1"


# -- configuration ---------------------------------------------------------------------------


async def test_without_slack_settings_the_service_runs_without_slack(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.slack.app")
    settings = settings_for(tmp_path, sections={"slack": {"bot_token": TOKEN}})
    async with running(settings) as (_, api):
        async with api.session.post(f"{api.base}/slack/events", data=b"x") as response:
            assert response.status == 404
        assert (await api.command("status"))["ok"]
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.slack.app"]
    assert lines == ["Slack is disabled: slack.signing_secret not set"]
    assert TOKEN not in caplog.text


async def test_bolts_answer_goes_out_with_its_own_headers(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        body = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "x"})
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": signature(SECRET, ts, body),
        }
        async with b.api.session.post(b.viewer.url, data=body, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert json.loads(await response.text()) == {"challenge": "c-123"}
        answer = await b.viewer.slash("status")
        assert (answer.status, answer.text) == (200, "")
