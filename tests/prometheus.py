"""A real Prometheus (Debian's ``prometheus``) on loopback, scraping an exporter the test
controls, with alert rules the test writes: an alert fires and clears when the test sets
a metric.

``async with prometheus(tmp_path, rules) as prom``: ``prom.exporter.set(...)`` sets a
series, ``await prom.until_firing("Name")`` / ``until_clear`` wait (bounded) until
Prometheus agrees, ``await prom.stop()`` stops it (for "unreachable" tests). Scrapes and
rule evaluations run every ``INTERVAL``. ``alertmanager(tmp_path)`` starts Debian's
Alertmanager for Prometheus to send its alerts to (``prometheus(…, alertmanager=am)``).
Tests skip, saying why, only where a binary is missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from core.gate.client import basic_auth
from tests.events import until
from tests.ports import free_port

BINARY = "prometheus"
INTERVAL = "250ms"
START_WITHIN = 30.0
"""Seconds Prometheus may take to become ready."""
SETTLE_WITHIN = 20.0
"""Seconds an alert may take to fire or clear after its metric changed."""


def binary(name: str = BINARY) -> str:
    """The path of ``name``; skips the test, saying why, where it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"Debian's {name} package is not installed (`scripts/setup --dev` installs "
            f"it): the gate tests need a real {name}"
        )
    return path


@dataclass
class Exporter:
    """A tiny exporter: the series the test sets, in the text exposition format."""

    series: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    port: int = 0

    def set(self, name: str, value: float, **labels: str) -> None:
        self.series[(name, tuple(sorted(labels.items())))] = value

    def text(self) -> str:
        lines = []
        for (name, labels), value in sorted(self.series.items()):
            inner = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{inner}}} {value}")
        return "\n".join(lines) + "\n"

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(text=self.text(), content_type="text/plain")


def alert_rule(name: str, expr: str, **labels: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def _yaml(value: Any) -> str:
    """The configuration files: JSON is YAML, and needs no YAML library."""
    return json.dumps(value, indent=2)


@dataclass
class Prometheus:
    url: str
    exporter: Exporter
    proc: asyncio.subprocess.Process
    log: Path
    session: aiohttp.ClientSession

    async def alerts(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}api/v1/alerts") as response:
            body: dict[str, Any] = await response.json()
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts

    async def _firing(self, name: str) -> bool:
        return any(
            a["labels"].get("alertname") == name and a["state"] == "firing"
            for a in await self.alerts()
        )

    async def until_firing(self, name: str) -> None:
        await until(lambda: self._firing(name), within=SETTLE_WITHIN, step=0.1)

    async def until_clear(self, name: str) -> None:
        async def clear() -> bool:
            return not any(a["labels"].get("alertname") == name for a in await self.alerts())

        await until(clear, within=SETTLE_WITHIN, step=0.1)

    async def until_series(self, query: str) -> None:
        """Until an instant query returns something (the first scrape has landed)."""

        async def found() -> bool:
            async with self.session.get(
                f"{self.url}api/v1/query", params={"query": query}
            ) as response:
                body: dict[str, Any] = await response.json()
            return bool(body.get("data", {}).get("result"))

        await until(found, within=SETTLE_WITHIN, step=0.1)

    async def stop(self) -> None:
        await _stop(self.proc)


@dataclass(frozen=True)
class BasicAuth:
    """A user Prometheus asks for (``hash``: bcrypt of ``password``, made beforehand)."""

    user: str
    password: str
    hash: str


GATE_USER = BasicAuth(
    user="gate",
    password="gate-secret",
    hash="$2b$04$zMsGuSiMD1nmYagIoM9I0.r4NQUJzALCPzS53yrxyBSNeCGKpBPxK",
)
"""bcrypt (cost 4) of "gate-secret"."""


def _write_config(
    workdir: Path,
    rules: list[Mapping[str, Any]],
    target: int,
    auth: BasicAuth | None,
    alertmanager: str | None,
) -> list[str]:
    """The configuration, rules and web files; returns the flags that name them."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules.yml").write_text(
        _yaml({"groups": [{"name": "tests", "interval": INTERVAL, "rules": list(rules)}]})
    )
    (workdir / "prometheus.yml").write_text(
        _yaml(
            {
                "global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL},
                "rule_files": [str(workdir / "rules.yml")],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
                    if alertmanager
                    else []
                },
                "scrape_configs": [
                    {
                        "job_name": "tests",
                        "scrape_interval": INTERVAL,
                        "scrape_timeout": INTERVAL,
                        "static_configs": [{"targets": [f"127.0.0.1:{target}"]}],
                    }
                ],
            }
        )
    )
    flags = [f"--config.file={workdir / 'prometheus.yml'}"]
    if auth is not None:
        (workdir / "web.yml").write_text(_yaml({"basic_auth_users": {auth.user: auth.hash}}))
        flags.append(f"--web.config.file={workdir / 'web.yml'}")
    return flags


@dataclass
class Alertmanager:
    url: str
    session: aiohttp.ClientSession

    @property
    def target(self) -> str:
        """``host:port``, as Prometheus names it."""
        return self.url.removeprefix("http://").rstrip("/")

    async def _active(self, name: str) -> bool:
        async with self.session.get(f"{self.url}api/v2/alerts", params={"active": "true"}) as r:
            alerts: list[dict[str, Any]] = await r.json()
        return any(a["labels"].get("alertname") == name for a in alerts)

    async def until_active(self, name: str) -> None:
        await until(lambda: self._active(name), within=SETTLE_WITHIN, step=0.1)


@asynccontextmanager
async def alertmanager(workdir: Path) -> AsyncIterator[Alertmanager]:
    """Debian's Alertmanager on loopback (no cluster, one receiver that sends nothing)."""
    path = binary("prometheus-alertmanager")
    route = {"receiver": "none", "group_wait": "0s", "group_interval": "1s"}
    config = {"route": route, "receivers": [{"name": "none"}]}
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((workdir / "alertmanager.yml").write_text, _yaml(config))
    port = free_port()
    log = workdir / "alertmanager.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            path,
            f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def ready() -> bool:
            assert proc.returncode is None, log.read_text()[-2000:]
            try:
                async with session.get(f"{url}-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await until(ready, within=START_WITHIN, step=0.1)
            yield Alertmanager(url=url, session=session)
        finally:
            await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            async with asyncio.timeout(10):
                await proc.wait()


@asynccontextmanager
async def prometheus(
    workdir: Path,
    rules: list[Mapping[str, Any]],
    *,
    auth: BasicAuth | None = None,
    alertmanager: Alertmanager | None = None,
) -> AsyncIterator[Prometheus]:
    """Prometheus with ``rules`` (see ``alert_rule``) scraping a fresh ``Exporter``; with
    ``auth`` every request needs that user's basic auth."""
    path = binary()
    exporter = Exporter()
    app = web.Application()
    app.router.add_get("/metrics", exporter.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    exporter.port = runner.addresses[0][1]
    flags = await asyncio.to_thread(
        _write_config,
        workdir,
        rules,
        exporter.port,
        auth,
        alertmanager.target if alertmanager is not None else None,
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            path,
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.console.templates=/nonexistent",
            "--web.console.libraries=/nonexistent",
            *flags,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    timeout = aiohttp.ClientTimeout(total=5)
    headers = {} if auth is None else {"Authorization": basic_auth(auth.user, auth.password)}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        prom = Prometheus(url=url, exporter=exporter, proc=proc, log=log, session=session)

        async def ready() -> bool:
            assert proc.returncode is None, log.read_text()[-2000:]
            try:
                async with session.get(f"{url}-/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await until(ready, within=START_WITHIN, step=0.1)
            yield prom
        finally:
            await prom.stop()
            await runner.cleanup()
