"""Slack ack benchmark (issue 7): how fast ``POST /slack/events`` acknowledges `/tg status`.

Run as ``.venv/bin/python bench/slack_ack.py``. In one run it starts, on 127.0.0.1:

* the real service (``bot.service.Service``) with a 500-node sandbox fleet, Slack enabled
  and a fake Slack Web API / response URLs (``tests/fake_slack.py``);
* a bare slack-bolt ``AsyncApp`` on aiohttp whose `/tg` listener acks a constant (same
  signature check and authorize as ours, no work);

and, alternating between the two for ``--rounds`` rounds, fires ``--requests`` (200)
concurrent signed `/tg status` slash commands from a separate client process, measuring
each request's time to the HTTP response (the ack). Between rounds against the service it
waits until every command of the round has been answered on its response URL, so that no
round is measured while the previous one's background work still runs.

p50 and p99 per target (medians over the rounds) and the p99 ratio (target <= 1.5) are
written to bench/RESULTS.md under "## Slack acks (issue 7)"; other sections are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
# Python puts bench/ first on the path, and bench/ holds scripts named like standard modules
# (email.py): import from the project root only.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request  # noqa: E402
from slack_bolt.app.async_app import AsyncApp  # noqa: E402
from slack_bolt.authorization import AuthorizeResult  # noqa: E402
from slack_bolt.context.ack.async_ack import AsyncAck  # noqa: E402

from tests.fake_slack import FakeSlack, fake_slack, signature  # noqa: E402
from tests.service import running, settings_for  # noqa: E402

HEADING = "## Slack acks (issue 7)"
SECRET = "bench-signing-secret"  # noqa: S105  (of the benchmark's own loopback apps)
TOKEN = "xoxb-test-token"  # noqa: S105  (the fake Slack's token)
NODES = 500


# -- the client (a separate process) ---------------------------------------------------------


async def burst(url: str, count: int, response_base: str) -> list[float]:
    """``count`` concurrent signed `/tg status` requests; each one's seconds to the response."""
    ts = str(int(time.time()))
    bodies = []
    for i in range(count):
        form = urlencode(
            {
                "command": "/tg",
                "text": "status",
                "user_id": "UBENCH",
                "user_name": "bench",
                "channel_id": "CBENCH",
                "team_id": "T1",
                "response_url": f"{response_base}/respond/bench-{ts}-{i}",
                "trigger_id": f"trigger.{i}",
            }
        )
        bodies.append(
            (
                form.encode(),
                {
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Slack-Request-Timestamp": ts,
                    "X-Slack-Signature": signature(SECRET, ts, form),
                },
            )
        )
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(body: bytes, headers: dict[str, str]) -> float:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            return time.perf_counter() - started

        return list(await asyncio.gather(*(one(b, h) for b, h in bodies)))


def client_main(url: str, count: int, response_base: str) -> None:
    print(json.dumps(asyncio.run(burst(url, count, response_base))))


async def run_client(url: str, count: int, response_base: str) -> list[float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        url,
        "--requests",
        str(count),
        "--response-base",
        response_base,
        stdout=subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"client failed with exit status {process.returncode}")
    latencies: list[float] = json.loads(out)
    return latencies


# -- the bare bolt app -------------------------------------------------------------------------


async def bare_app() -> tuple[web.AppRunner, str]:
    async def authorize(
        enterprise_id: str | None, team_id: str | None, user_id: str | None
    ) -> AuthorizeResult:
        return AuthorizeResult(
            enterprise_id=enterprise_id, team_id=team_id, user_id=user_id, bot_token=TOKEN
        )

    bolt = AsyncApp(
        name="bare",
        signing_secret=SECRET,
        authorize=authorize,
        process_before_response=True,
    )

    async def tg(ack: AsyncAck) -> None:
        await ack("ok")

    bolt.command("/tg")(tg)

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    app = web.Application()
    app.router.add_post("/slack/events", events)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/slack/events"


# -- measuring -------------------------------------------------------------------------------


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[0::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table.get("ListenOverflows", 0))
    return 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


@dataclass(frozen=True, slots=True, kw_only=True)
class Round:
    target: str
    p50_ms: float
    p99_ms: float
    max_ms: float
    dropped: int  # SYNs dropped at a full listen queue during the burst (retried after 1 s)


def summary(target: str, latencies: list[float], dropped: int) -> Round:
    return Round(
        target=target,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=max(latencies) * 1000,
        dropped=dropped,
    )


async def measured(target: str, url: str, count: int, response_base: str) -> Round:
    before = listen_overflows()
    latencies = await run_client(url, count, response_base)
    return summary(target, latencies, listen_overflows() - before)


async def measure(rounds: int, count: int) -> tuple[list[Round], float]:
    with tempfile.TemporaryDirectory(prefix="tgops-bench-") as tmp:
        root = Path(tmp)
        async with fake_slack() as fake:
            sections: dict[str, dict[str, Any]] = {
                "slack": {
                    "bot_token": TOKEN,
                    "signing_secret": SECRET,
                    "api_url": fake.api_url,
                    "channel": "COPS",
                },
                "roles": {"viewer": ["*"]},
            }
            settings = settings_for(root, cluster_nodes=NODES - 10, singles=10, sections=sections)
            started = time.perf_counter()
            async with running(settings) as (service, _api):
                startup = time.perf_counter() - started
                real = f"http://127.0.0.1:{service.port}/slack/events"
                runner, bare = await bare_app()
                try:
                    results = await _rounds(fake, real, bare, rounds, count)
                finally:
                    await runner.cleanup()
    return results, startup


async def _rounds(fake: FakeSlack, real: str, bare: str, rounds: int, count: int) -> list[Round]:
    # warm-up: first requests pay for imports and connection setup in both apps
    await run_client(bare, 20, fake.base)
    await run_client(real, 20, fake.base)
    answered = 20
    await fake.wait_for("response_url", answered, within=300)
    results = []
    for i in range(rounds):
        results.append(await measured("bare", bare, count, fake.base))
        results.append(await measured("tgops", real, count, fake.base))
        answered += count
        began = time.perf_counter()
        await fake.wait_for("response_url", answered, within=600)
        print(
            f"round {i + 1}: bare p99 {results[-2].p99_ms:.1f} ms, tgops p99 "
            f"{results[-1].p99_ms:.1f} ms; {count} replies done {time.perf_counter() - began:.1f}"
            " s after the acks",
            flush=True,
        )
    return results


def write_results(text: str) -> Path:
    results = ROOT / "bench" / "RESULTS.md"
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    kept: list[str] = []
    skipping = False
    for line in old.splitlines(keepends=True):
        if line.startswith("## "):
            skipping = line.strip() == HEADING
        if not skipping:
            kept.append(line)
    results.write_text("".join(kept).rstrip("\n") + "\n\n" + text)
    return results


def report(
    results: list[Round], startup: float, rounds: int, count: int, load: tuple[float, float]
) -> str:
    def med(target: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in results if r.target == target)

    bare50, bare99 = med("bare", "p50_ms"), med("bare", "p99_ms")
    ours50, ours99 = med("tgops", "p50_ms"), med("tgops", "p99_ms")
    ratio = ours99 / bare99
    uname = subprocess.run(
        [shutil.which("uname") or "/bin/uname", "-a"], capture_output=True, text=True, check=True
    ).stdout
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    pairs = zip(results[0::2], results[1::2], strict=True)
    per_round = "\n".join(
        f"| {i} | {b.p50_ms:.1f} | {b.p99_ms:.1f} | {b.max_ms:.0f} | {b.dropped} "
        f"| {o.p50_ms:.1f} | {o.p99_ms:.1f} | {o.max_ms:.0f} | {o.dropped} "
        f"| {o.p99_ms / b.p99_ms:.2f} |"
        for i, (b, o) in enumerate(pairs, 1)
    )
    verdict = "met" if ratio <= 1.5 else "NOT met"
    return f"""{HEADING}

`.venv/bin/python bench/slack_ack.py` (rounds: {rounds}, medians); {when}

- machine: `{uname.strip()}`, nproc {os.cpu_count()}, Python {platform.python_version()};
  load average (1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end (the machine is
  shared: other processes ran beside the benchmark)
- load: {count} concurrent signed `/tg status` slash commands per round, sent from a separate
  client process over 127.0.0.1 (one new connection each), time to the HTTP response (the
  ack); the service has {NODES} sandbox nodes (started in {startup:.1f} s) and answers each
  command afterwards on its response URL (a fake of Slack on loopback); the next round
  starts when all replies are in
- bare: a slack-bolt `AsyncApp` on aiohttp, same signature check, acking a constant

| target | p50 ms | p99 ms |
|---|---|---|
| bare slack-bolt AsyncApp | {bare50:.1f} | {bare99:.1f} |
| tgops `/slack/events` | {ours50:.1f} | {ours99:.1f} |

- p99 ratio tgops / bare: **{ratio:.2f}** (target <= 1.5) — {verdict}; p99 far below Slack's 3 s

| round | bare p50 | p99 | max | SYN drops | tgops p50 | p99 | max | SYN drops | p99 ratio |
|---|---|---|---|---|---|---|---|---|---|
{per_round}

- ms throughout. "SYN drops": connections the kernel dropped during the burst because the
  listen queue was full (aiohttp's default backlog is 128, the burst opens 200 connections
  at once); the client's retry comes 1 s later, which is what a max (or p99) near 1000 ms
  shows, for either app. Both servers use the default backlog.

- history: the first version acked first but started each command's work at once; one
  round then measured tgops 124 / 130 ms against bare 46 / 52 ms (p50 / p99), a p99 ratio
  of 2.50: the 200 commands' work (each refreshing 500 nodes) shared the event loop and
  the GIL with the rest of the burst's acks. Now commands wait until no Slack request has
  arrived for 50 ms (at most 1 s; `ACK_QUIET` in bot/slack/app.py) and run at most 4 at once.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--response-base", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.requests, args.response_base)
        return
    logging.basicConfig(level=logging.ERROR)
    before = os.getloadavg()[0]
    results, startup = asyncio.run(measure(args.rounds, args.requests))
    text = report(results, startup, args.rounds, args.requests, (before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        print(f"written to {write_results(text)}")


if __name__ == "__main__":
    main()
