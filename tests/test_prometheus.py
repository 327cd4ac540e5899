"""Prometheus, with its own tools: ``promtool check metrics`` on a live ``/metrics``,
``promtool check rules`` and ``promtool test rules`` on ``config/prometheus-alerts.yml``,
and the alerts evaluated by promtool on what a real service exports in each kind of trouble.

For the last part a real service is scraped over HTTP as Prometheus would; each scrape
becomes one sample a minute of promtool's simulated time, with ``job`` and ``instance``
added, ``up`` 1 or 0 as the scrape worked or failed, and a stale marker for a series a
scrape did not return (as Prometheus writes one). Timestamps in the values
(``*_timestamp_seconds``) are moved into the simulated time by the same offset, so every
age the alerts compute is the real one. Last, Debian's ``prometheus`` itself scrapes a
live service with the shipped rules until an alert fires.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet import Fleet, fleet
from tests.ports import free_port

ROOT = Path(__file__).parent.parent
RULES = ROOT / "config" / "prometheus-alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts-test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
QUICK = {"leader": {"heartbeat": "0.5s", "node_check": "0.5s"}}
SAMPLE = re.compile(r"\{([^}]*)\}")
LABEL = re.compile(r'(\w+)="([^"]*)"')
FIRING = 'count by (alertname, node, channel) (ALERTS{alertstate="firing"})'


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args],
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_rules_fire_on_trouble_and_stay_quiet_otherwise() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


async def test_live_metrics_pass_promtool_and_are_gzipped_on_request(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            url = f"{f.api.base}/metrics"
            async with session.get(url, headers={"Accept-Encoding": "identity"}) as response:
                assert response.status == 200
                assert "Content-Encoding" not in response.headers
                plain = await response.read()
            async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                assert response.status == 200
                assert response.headers["Content-Encoding"] == "gzip"
                zipped = await response.read()
    assert len(zipped) < len(plain) / 3
    text = gzip.decompress(zipped).decode()
    checked = promtool("check", "metrics", stdin=plain)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""
    assert "_created" not in text
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert {
        "tgops_heartbeat_timestamp_seconds",
        "tgops_manifest_last_success_timestamp_seconds",
        "tgops_manifest_poll_interval_seconds",
        "tgops_node_reachable",
        "tgops_hotfix_pending",
    } <= names
    labels = {
        k
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for k in s.labels
    }
    assert "instance" not in labels
    assert "tgops_instance" in labels


# -- the alerts on a live service ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape as Prometheus stores it: series → value, at real time ``at``."""

    at: float
    up: bool
    series: dict[str, float]


def _series_name(name: str, labels: dict[str, str]) -> str:
    def quoted(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    inner = ", ".join(f'{k}="{quoted(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


async def scrape(url: str) -> Scrape:
    at = time.time()
    target = {"job": "tgops", "instance": "tgops:8080"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{url}/metrics") as response,
        ):
            text = await response.text()
            ok = response.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        ok, text = False, ""
    series = {_series_name("up", target): 1.0 if ok else 0.0}
    if ok:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("tgops_") and math.isfinite(sample.value):
                    series[_series_name(sample.name, {**sample.labels, **target})] = sample.value
    return Scrape(at=at, up=ok, series=series)


def _value(name: str, value: float, scrape: Scrape, minute: int) -> str:
    if "_timestamp_seconds" in name and value > 0:
        value = value - scrape.at + minute * 60  # the same age in simulated time
    return f"{value:.3f}"


def firing(scrapes: Sequence[Scrape], tmp_path: Path) -> set[tuple[str, str, str]]:
    """The alerts (name, node, channel) firing after these scrapes, one a minute, as
    Prometheus evaluates config/prometheus-alerts.yml."""
    names = sorted({name for s in scrapes for name in s.series})
    lines = [
        f"rule_files: [{RULES}]",
        "evaluation_interval: 1m",
        "tests:",
        "  - interval: 1m",
        "    input_series:",
    ]
    for name in names:
        values = " ".join(
            _value(name, s.series[name], s, i) if name in s.series else "stale"
            for i, s in enumerate(scrapes)
        )
        lines += [f"      - series: '{name}'", f'        values: "{values}"']
    lines += [
        "    promql_expr_test:",
        f"      - expr: '{FIRING}'",
        f"        eval_time: {len(scrapes) - 1}m",
        "        exp_samples: []",
    ]
    path = tmp_path / f"live-{len(list(tmp_path.glob('live-*.yml')))}.yml"
    path.write_text("\n".join(lines) + "\n")
    result = promtool("test", "rules", str(path))
    # expecting nothing makes promtool list what fired ("got: …") when something did
    if result.returncode == 0:
        return set()
    output = result.stdout + result.stderr
    alerts = set()
    for group in SAMPLE.findall(output.partition("got:")[2]):
        labels = dict(LABEL.findall(group))
        if "alertname" in labels:
            alerts.add((labels["alertname"], labels.get("node", ""), labels.get("channel", "")))
    assert alerts, output
    return alerts


async def scrape_until(f: Fleet, check: Callable[[Scrape], bool], within: float = 30.0) -> Scrape:
    deadline = time.monotonic() + within
    while True:
        found = await scrape(f.api.base)
        if check(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


def metric(s: Scrape, name: str, **labels: str) -> float | None:
    return s.series.get(_series_name(name, {**labels, "job": "tgops", "instance": "tgops:8080"}))


@pytest.mark.slow
async def test_each_kind_of_trouble_turns_an_alert_red(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    async with fleet(tmp_path / "fleet", sections=QUICK, updates={"poll_interval": "1s"}) as f:
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
        healthy = await scrape(f.api.base)
        assert healthy.up
        assert firing([healthy] * 4, alerts) == set()

        # a node stops answering (the leader's node check notices)
        f.fault("tg3", '{"unreachable": "no route to host"}')
        down = await scrape_until(
            f, lambda s: metric(s, "tgops_node_reachable", node="tg3", cluster="c1") == 0
        )
        assert firing([healthy, *[down] * 4], alerts) == {("TgopsNodeUnreachable", "tg3", "")}
        f.fault("tg3", "{}")
        await scrape_until(
            f, lambda s: metric(s, "tgops_node_reachable", node="tg3", cluster="c1") == 1
        )

        # an urgent hotfix is published and installed nowhere
        f.repo.add("tg-base", "1.0.1", hotfix="HF-9", urgency="urgent", summary="urgent one")
        urgent = await scrape_until(
            f, lambda s: metric(s, "tgops_hotfix_pending", node="solo1", urgency="urgent") == 1
        )
        assert firing([healthy, *[urgent] * 2], alerts) == {
            ("TgopsUrgentHotfixPending", node, "") for node in ("tg1", "tg2", "tg3", "solo1")
        }
        assert (await f.api.command("hotfixes always on"))["ok"]
        assert await f.outcomes("auto-update all --yes") == dict.fromkeys(
            ("tg1", "tg2", "tg3", "solo1"), "succeeded"
        )
        installed = await scrape_until(
            f, lambda s: metric(s, "tgops_hotfix_pending", node="solo1", urgency="urgent") == 0
        )
        assert firing([healthy, installed], alerts) == set()

        # the repository stops answering: the manifest ages past 3 poll intervals (3 s)
        f.server.fail_next(100_000, status=503)
        stale = await scrape_until(
            f,
            lambda s: (
                s.at
                - (
                    metric(s, "tgops_manifest_last_success_timestamp_seconds", channel="stable")
                    or 0
                )
                > 4
            ),
        )
        assert firing([healthy, stale], alerts) == {("TgopsManifestStale", "", "stable")}
        f.server.reset()
        last = await scrape(f.api.base)
        assert last.up
    # the service is stopped: its target is down
    stopped = [await scrape(f.api.base) for _ in range(3)]
    assert not any(s.up for s in stopped)
    assert firing([healthy, *stopped], alerts) == {("TgopsServiceDown", "", "")}


# -- a real Prometheus server scraping a live service ----------------------------------------


@asynccontextmanager
async def prometheus_server(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """Debian's ``prometheus`` on loopback, scraping ``target`` every second under job
    ``tgops`` and evaluating the shipped rules every second; yields its base URL."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        "  - job_name: tgops\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as log:  # for a failing test's reader
        process = await asyncio.create_subprocess_exec(
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def ask(session: aiohttp.ClientSession, url: str) -> Any:
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return None
            return (await response.json())["data"]
    except (aiohttp.ClientError, OSError):
        return None  # not listening yet


async def test_a_real_prometheus_scrapes_the_service_and_fires_the_alert(tmp_path: Path) -> None:
    async with fleet(tmp_path / "fleet", sections=QUICK, updates={"poll_interval": "1s"}) as f:
        target = f.api.base.removeprefix("http://")
        async with (
            prometheus_server(tmp_path, target) as prometheus,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        ):
            query = f"{prometheus}/api/v1/query?query=tgops_leader"

            async def scraped() -> Any:
                data = await ask(session, query)
                return data["result"] if data and data["result"] else None

            result = await poll(scraped)
            (series,) = result
            # the instance's own label survives the scrape as it is (no exported_instance)
            assert series["metric"]["tgops_instance"] == f.service.instance
            assert series["metric"]["instance"] == target
            assert "exported_instance" not in series["metric"]
            assert series["value"][1] == "1"

            f.repo.add("tg-base", "1.0.1", hotfix="HF-9", urgency="urgent", summary="urgent one")

            async def firing() -> Any:
                data = await ask(session, f"{prometheus}/api/v1/alerts")
                alerts = [
                    a
                    for a in (data or {}).get("alerts", [])
                    if a["state"] == "firing" and a["labels"]["alertname"].startswith("Tgops")
                ]
                return alerts if len(alerts) >= 4 else None

            alerts = await poll(firing)
            assert sorted((a["labels"]["alertname"], a["labels"]["node"]) for a in alerts) == [
                ("TgopsUrgentHotfixPending", node) for node in ("solo1", "tg1", "tg2", "tg3")
            ]
            assert {a["labels"]["severity"] for a in alerts} == {"warning"}


async def poll(check: Callable[[], Awaitable[Any]], within: float = 60.0) -> Any:
    """``check()`` until it returns something (bounded in time)."""
    deadline = time.monotonic() + within
    while True:
        found = await check()
        if found is not None:
            return found
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.5)
