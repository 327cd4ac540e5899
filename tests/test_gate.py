"""The gate end to end: a real Prometheus on loopback (``tests.prometheus``) whose alerts
the test fires and clears through a tiny exporter, and a service that holds its runs
while they fire."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from core import events as ev
from core.errors import ConfigError
from core.gate import Alert
from core.gate.decision import AlertRules
from core.settings import load_settings
from tests.events import until
from tests.fake_slack import fake_slack
from tests.fleet import Fleet, fleet, run_ids
from tests.ports import free_port
from tests.prometheus import GATE_USER, Prometheus, alert_rule, alertmanager, prometheus
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import fleet_toml, running, settings_for

RULES = [
    alert_rule("DiskFull", "tg_disk_full > 0", severity="critical"),
    alert_rule("NoisyBackup", "tg_backup_running > 0"),
]
TIMINGS = {"maintenance": {"notice_lead": "4s", "reminder_interval": "0.5s", "lb_drain_lead": "1s"}}
UPDATES = {"download_lead": "2s", "update_grace": "30s"}
BERLIN = ZoneInfo("Europe/Berlin")


def soon(seconds: float) -> str:
    """A wall time ``seconds`` from now in Berlin, as HH:MM:SS."""
    return (datetime.now(BERLIN) + timedelta(seconds=seconds)).strftime("%H:%M:%S")


def held(node: str, state: str = "held") -> Any:
    return lambda e: isinstance(e, ev.RunHeld) and e.node == node and e.state == state


@asynccontextmanager
async def gated(
    tmp_path: Path,
    *,
    gate: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    auth: bool = False,
    **kwargs: Any,
) -> AsyncIterator[tuple[Prometheus, Fleet]]:
    """Prometheus with ``RULES`` (nothing firing yet) and a fleet whose gate asks it;
    alerts count for the node named in their ``node`` label."""
    async with prometheus(tmp_path / "prometheus", RULES, auth=GATE_USER if auth else None) as p:
        for node in ("tg1", "tg2", "tg3", "solo1"):
            p.exporter.set("tg_disk_full", 0, node=node)
            p.exporter.set("tg_backup_running", 0, node=node)
            p.exporter.set("tg_up", 1, node=node)
        await p.until_series("tg_disk_full")
        settings = {
            "gate": {
                "prometheus_url": p.url,
                "check_interval": "0.3s",
                "max_wait": "60s",
                "timeout": "2s",
                **(gate or {}),
            },
            "gate.labels": {"node": "{node}"},
            **(sections or {}),
        }
        async with fleet(tmp_path, sections=settings, **kwargs) as f:
            yield p, f


async def fire(p: Prometheus, alert: str, metric: str, node: str) -> None:
    p.exporter.set(metric, 1, node=node)
    await p.until_firing(alert)


async def metrics(f: Fleet) -> str:
    async with f.api.session.get(f"{f.api.base}/metrics") as response:
        return await response.text()


def sessions(f: Fleet, node: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = json.loads((f.node(node) / "sessions.json").read_text())
    return found


# -- holding and releasing -----------------------------------------------------------------


async def test_a_firing_alert_holds_a_manual_auto_update_until_it_clears(tmp_path: Path) -> None:
    async with gated(tmp_path) as (p, f):
        f.login("solo1", "bob")
        await fire(p, "DiskFull", "tg_disk_full", "solo1")
        reply = await f.api.command("auto-update solo1 --yes")
        assert reply["ok"], reply["text"]
        [run_id] = run_ids(reply["text"])
        await f.events.wait_for(held("solo1"))

        node = await f.node_status("solo1")
        assert node["run"]["step"] == "gate"
        assert node["held"]["reason"].startswith("alerts firing: DiskFull (")
        reason = node["held"]["reason"]
        assert "node=solo1" in reason and "severity=critical" in reason
        assert node["held"]["since"] and node["held"]["run"] == run_id
        assert sessions(f, "solo1") == [{"user": "bob"}]  # nobody was disconnected
        assert node["installed"] == {}
        status = (await f.api.command("status solo1"))["text"]
        assert "!! Update held: solo1 (alerts firing: DiskFull" in status
        assert "held: alerts firing: DiskFull (" in status and "waiting since" in status
        plan = (await f.api.command("plan"))["text"]
        assert f"solo1: run #{run_id} auto-update held: alerts firing: DiskFull" in plan
        log = (await f.api.command("log solo1"))["text"]
        assert f"gate (system) run held solo1 run #{run_id}: held: alerts firing: DiskFull" in log
        text = await metrics(f)
        assert 'tgops_gate_blocked{target="solo1"} 1.0' in text
        assert 'tgops_gate_checks_total{result="blocked"}' in text

        p.exporter.set("tg_disk_full", 0, node="solo1")
        await p.until_clear("DiskFull")
        cleared_at = datetime.now(UTC)
        [run] = await f.service.lifecycle.wait([run_id])
        assert run.status == "succeeded", run.error
        await f.events.wait_for(held("solo1", "released"))
        # released by the first check after the alert cleared (one in flight may still
        # have seen it): within one check_interval
        checks = [e for e in f.events.events if isinstance(e, ev.GateChecked) and e.node == "solo1"]
        after = [e.result for e in checks if e.at >= cleared_at]
        if not after:
            # the gate saw the alert clear before this test's own poll of Prometheus did:
            # the check that released it is the last one before that poll
            after = [checks[-1].result]
        assert after in (["clear"], ["blocked", "clear"]), after
        assert sessions(f, "solo1") == []
        log = (await f.api.command("log solo1 40"))["text"]
        assert f"run released solo1 run #{run_id}: alerts cleared after" in log
        assert (await f.node_status("solo1"))["held"] is None
        assert 'tgops_gate_blocked{target="solo1"} 0.0' in await metrics(f)


async def test_a_held_run_is_still_held_after_a_restart_counting_from_its_first_hold(
    tmp_path: Path,
) -> None:
    async with prometheus(tmp_path / "prometheus", RULES) as p:
        await fire(p, "DiskFull", "tg_disk_full", "solo1")
        repo = Repo(tmp_path)
        repo.add("tg-base", "1.0")
        async with serve_repo(repo.root) as server:
            gate = {"prometheus_url": p.url, "check_interval": "0.3s", "timeout": "2s"}
            settings = settings_for(
                tmp_path,
                repository_url=server.url,
                public_key=repo.public_key,
                sections={"gate": gate},
            )
            async with running(settings) as (service, api):
                reply = await api.command("auto-update solo1 --yes")
                [run_id] = run_ids(reply["text"])

                async def held_in_store() -> bool:
                    run = await service.store.run(run_id)
                    return run is not None and isinstance(run.params.get("held"), dict)

                await until(held_in_store)
                stopped = await service.store.run(run_id)
                assert stopped is not None
                first = stopped.params["held"]
            async with running(settings) as (service, api):

                async def held_again() -> bool:
                    records = await service.store.audit_log(targets=["solo1"], limit=100)
                    return sum(r.action == "run held" for r in records) >= 2

                await until(held_again)  # resumed at its gate step, and asked again
                node = next(n for n in (await api.status())["nodes"] if n["name"] == "solo1")
                assert node["held"]["since"] == first["since"]
                assert node["held"]["until"] == first["until"]  # max_wait from the first hold
                p.exporter.set("tg_disk_full", 0, node="solo1")

                async def ended() -> bool:
                    run = await service.store.run(run_id)
                    return run is not None and run.status not in {"queued", "running"}

                await until(ended)
                run = await service.store.run(run_id)
                assert run is not None and run.status == "succeeded", run


async def test_an_alertmanager_as_the_gate_holds_while_the_alert_is_active(
    tmp_path: Path,
) -> None:
    async with (
        alertmanager(tmp_path / "alertmanager") as am,
        prometheus(tmp_path / "prometheus", RULES, alertmanager=am) as p,
    ):
        p.exporter.set("tg_disk_full", 0, node="tg1")  # another node's series, never firing
        await fire(p, "DiskFull", "tg_disk_full", "solo1")
        await am.until_active("DiskFull")
        gate = {"prometheus_url": am.url, "check_interval": "0.3s", "timeout": "2s"}
        sections = {"gate": gate, "gate.labels": {"node": "{node}"}}
        async with fleet(tmp_path, sections=sections) as f:
            reply = await f.api.command("auto-update solo1 --yes")
            [run_id] = run_ids(reply["text"])
            event = await f.events.wait_for(held("solo1"))
            assert isinstance(event, ev.RunHeld)
            assert event.reason.startswith("alerts firing: DiskFull (")
            assert "node=solo1" in event.reason
            gate_client = f.service.lifecycle.hold.gate
            assert gate_client is not None
            assert gate_client.client.kind in {"alertmanager-v1", "alertmanager-v2"}
            p.exporter.set("tg_disk_full", 0, node="solo1")  # resolved, sent on to Alertmanager
            [run] = await f.service.lifecycle.wait([run_id])
            assert run.status == "succeeded", run.error
            assert await f.outcomes("auto-update tg1 --yes") == {"tg1": "succeeded"}


async def test_filtered_alerts_and_other_nodes_alerts_do_not_hold(tmp_path: Path) -> None:
    async with gated(tmp_path, gate={"alert_filter": "^Noisy"}) as (p, f):
        await fire(p, "NoisyBackup", "tg_backup_running", "solo1")  # filtered out
        await fire(p, "DiskFull", "tg_disk_full", "tg2")  # another node's
        outcomes = await f.outcomes("auto-update solo1 --yes")
        assert outcomes == {"solo1": "succeeded"}
        assert not [e for e in f.events.events if isinstance(e, ev.RunHeld)]
        checks = [e.result for e in f.events.events if isinstance(e, ev.GateChecked)]
        assert checks == ["clear"]


async def test_a_scheduled_update_is_held_keeps_maintenance_and_tells_the_new_time(
    tmp_path: Path,
) -> None:
    async with gated(tmp_path, sections=TIMINGS, updates=UPDATES) as (p, f):
        f.login("solo1", "bob")
        await fire(p, "DiskFull", "tg_disk_full", "solo1")
        reply = await f.api.command(f"schedule update solo1 on daily {soon(4)}")
        assert reply["ok"], reply["text"]
        plan = (await f.api.command("plan solo1"))["text"]
        assert "(the gate would hold solo1 if it were asked now: alerts firing: DiskFull" in plan
        event = await f.events.wait_for(held("solo1"), within=30)
        assert isinstance(event, ev.RunHeld)
        node = await f.node_status("solo1")
        assert node["maintenance"] is not None  # kept while held
        assert node["logon"] == "enabled"  # the single system's logon lock waits too
        plan = (await f.api.command("plan solo1"))["text"]
        assert "scheduled-update held: alerts firing: DiskFull" in plan
        assert any("held back" in m for m in f.messages("solo1"))

        p.exporter.set("tg_disk_full", 0, node="solo1")
        finished = await f.finished("solo1")
        assert finished.outcome == "succeeded", finished.message
        assert any("it now starts at" in m for m in f.messages("solo1")), f.messages("solo1")
        node = await f.node_status("solo1")
        assert node["installed"] == {"tg-base": "1.0"}
        assert node["maintenance"] is None
        log = (await f.api.command("log solo1 60"))["text"]
        assert "run released solo1" in log


async def test_max_wait_skips_a_scheduled_cluster_update_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    sections = {**TIMINGS, "notify": {"admin_emails": ["ops@example.org"]}}
    async with gated(tmp_path, gate={"max_wait": "1.5s"}, sections=sections, updates=UPDATES) as (
        p,
        f,
    ):
        await fire(p, "DiskFull", "tg_disk_full", "tg1")
        reply = await f.api.command(f"schedule update tg1 on daily {soon(4)}")
        assert reply["ok"], reply["text"]
        finished = await f.finished("tg1")
        assert finished.outcome == "skipped"
        assert "held for 1.5s (gate.max_wait)" in finished.message
        assert "alerts firing: DiskFull" in finished.message
        node = await f.node_status("tg1")
        assert node["lb"] == "in"
        assert node["maintenance"] is None
        assert node["update_lock"] is None
        assert node["installed"] == {}
        assert node["held"] is None and node["run"] is None
        assert await f.service.store.slots("c1") == []
        listing = (await f.api.command("schedule"))["text"]
        assert "tg1: update on daily" in listing and "next" in listing  # planned as usual
        outbox = await f.service.store.outbox(limit=50)
        alerts = [o for o in outbox if o.recipient == "ops@example.org"]
        assert any("held" in o.subject and "tg1" in o.subject for o in alerts), alerts
        log = (await f.api.command("log tg1 60"))["text"]
        assert "run held tg1" in log and "maintenance ended tg1" in log


async def test_an_unreachable_gate_holds_fail_closed(tmp_path: Path) -> None:
    async with gated(tmp_path, gate={"max_wait": "1s"}) as (p, f):
        f.login("solo1", "bob")
        await p.stop()
        reply = await f.api.command("auto-update solo1 --yes")
        [run_id] = run_ids(reply["text"])
        event = await f.events.wait_for(held("solo1"))
        assert isinstance(event, ev.RunHeld)
        assert event.reason.startswith("gate unreachable: ")
        [run] = await f.service.lifecycle.wait([run_id])
        assert run.status == "skipped"
        assert "gate unreachable" in (run.error or "")
        assert sessions(f, "solo1") == [{"user": "bob"}]
        assert (await f.node_status("solo1"))["installed"] == {}
        assert 'tgops_gate_checks_total{result="unreachable"}' in await metrics(f)


async def test_gate_fail_open_goes_ahead_when_the_gate_is_unreachable(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/"
    gate = {"prometheus_url": closed, "gate_fail_open": True, "timeout": "2s"}
    async with fleet(tmp_path, sections={"gate": gate}) as f:
        assert await f.outcomes("auto-update solo1 --yes") == {"solo1": "succeeded"}
        log = (await f.api.command("log solo1 40"))["text"]
        assert "gate unreachable solo1" in log and "(gate_fail_open: going ahead)" in log


async def test_a_failing_health_query_locks_the_node_and_stops_the_rollout(
    tmp_path: Path,
) -> None:
    gate = {"health_query": 'tg_up{node="{node}"} == 1', "health_wait": "1s"}
    async with gated(tmp_path, gate=gate) as (p, f):
        p.exporter.set("tg_up", 0, node="tg2")
        await p.until_series('tg_up{node="tg2"} == 0')
        outcomes = await f.outcomes("auto-update c1 --yes")
        assert outcomes == {"tg1": "succeeded", "tg2": "failed", "tg3": "cancelled"}
        tg2 = await f.node_status("tg2")
        assert "health check of tg2 failed" in tg2["update_lock"]["reason"]
        assert 'tg_up{node="tg2"} == 1: no series' in tg2["update_lock"]["reason"]
        assert tg2["lb"] == "drained"  # stays out of load balancing until remove-lock
        assert (await f.node_status("tg3"))["installed"] == {}
        assert (await f.node_status("tg1"))["update_lock"] is None


async def test_ignore_alerts_passes_the_gate_and_is_audited(tmp_path: Path) -> None:
    async with gated(tmp_path) as (p, f):
        await fire(p, "DiskFull", "tg_disk_full", "solo1")
        refused = await f.api.command("download solo1 --ignore-alerts")
        assert not refused["ok"]
        assert "unknown option '--ignore-alerts' (accepted: none)" in refused["text"]
        help_text = (await f.api.command("help auto-update"))["text"]
        assert "auto-update T [--yes] [--ignore-alerts]" in help_text
        outcomes = await f.outcomes("auto-update solo1 --yes --ignore-alerts")
        assert outcomes == {"solo1": "succeeded"}
        log = (await f.api.command("log solo1 40"))["text"]
        assert "gate ignored solo1" in log
        assert "--ignore-alerts given by token:admin; the gate said: alerts firing: DiskFull" in log
        checks = [e.result for e in f.events.events if isinstance(e, ev.GateChecked)]
        assert checks == ["ignored"]


async def test_basic_auth_from_a_file(tmp_path: Path) -> None:
    password = tmp_path / "gate-password"
    password.write_text("wrong\n")
    gate = {"username": GATE_USER.user, "password_file": str(password), "max_wait": "1s"}
    async with gated(tmp_path, auth=True, gate=gate) as (p, f):
        reply = await f.api.command("auto-update solo1 --yes")
        event = await f.events.wait_for(held("solo1"))
        assert isinstance(event, ev.RunHeld)
        assert "HTTP 401: not allowed" in event.reason
        await f.service.lifecycle.wait(run_ids(reply["text"]))
        password.write_text(GATE_USER.password + "\n")  # read at each request
        await fire(p, "DiskFull", "tg_disk_full", "solo1")
        reply = await f.api.command("auto-update solo1 --yes")
        event = await f.events.wait_for(
            lambda e: held("solo1")(e) and "DiskFull" in getattr(e, "reason", "")
        )
        assert isinstance(event, ev.RunHeld)
        assert "alerts firing: DiskFull" in event.reason


async def test_the_slack_run_message_says_why_the_run_is_held(tmp_path: Path) -> None:
    async with fake_slack() as fake:
        slack = {
            "bot_token": "xoxb-test-token",  # the token the fake Slack accepts
            "signing_secret": "s3cret",
            "api_url": fake.api_url,
            "channel": "COPS",
        }
        async with gated(tmp_path, sections={"slack": slack}) as (p, f):
            await fire(p, "DiskFull", "tg_disk_full", "solo1")
            reply = await f.api.command("auto-update solo1 --yes")
            [run_id] = run_ids(reply["text"])
            [update] = await fake.wait_for(
                "chat.update", where=lambda c: "held: alerts firing: DiskFull" in c.text
            )
            assert f"Run #{run_id} auto-update on solo1" in update.text
            assert "waiting since" in update.text
            p.exporter.set("tg_disk_full", 0, node="solo1")
            [run] = await f.service.lifecycle.wait([run_id])
            assert run.status == "succeeded"


# -- rules and settings --------------------------------------------------------------------


def test_alert_rules_filter_invert_and_labels() -> None:
    disk = Alert(name="DiskFull", labels={"alertname": "DiskFull", "cluster": "c1"})
    noisy = Alert(name="NoisyBackup", labels={"alertname": "NoisyBackup", "node": "solo1"})
    ignore = AlertRules(pattern=re.compile("^Noisy"))
    assert ignore.blocking([disk, noisy], node="solo1", cluster=None) == (disk,)
    only = AlertRules(pattern=re.compile("^Noisy"), match_only=True)
    assert only.blocking([disk, noisy], node="solo1", cluster=None) == (noisy,)
    by_cluster = AlertRules(labels={"cluster": "{cluster}"})
    assert by_cluster.blocking([disk, noisy], node="tg1", cluster="c1") == (disk,)
    assert by_cluster.blocking([disk, noisy], node="solo1", cluster=None) == ()
    assert disk.describe() == "DiskFull (cluster=c1)"


@pytest.mark.parametrize(
    ("gate", "problem"),
    [
        ({"alert_filter": "("}, "gate.alert_filter: not a regular expression"),
        ({"health_query": "up == 1"}, "gate.health_query: needs gate.prometheus_url"),
        ({"prometheus_url": "prom:9090"}, "gate.prometheus_url: must start with http://"),
        ({"check_interval": "0s"}, "gate.check_interval: must be longer than 0s"),
    ],
)
def test_bad_gate_settings_name_the_key(tmp_path: Path, gate: dict[str, Any], problem: str) -> None:
    path = tmp_path / "tgops.toml"
    path.write_text(fleet_toml(tmp_path, sections={"gate": gate}))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_labels_take_only_node_and_cluster(tmp_path: Path) -> None:
    path = tmp_path / "tgops.toml"
    text = fleet_toml(tmp_path) + '[gate]\nprometheus_url = "http://127.0.0.1:9/"\n'
    path.write_text(text + '[gate.labels]\nnode = "{host}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert "gate.labels" in str(caught.value) and "{node}" in str(caught.value)
