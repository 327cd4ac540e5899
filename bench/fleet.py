"""Fleet benchmark (issue 15): 10,000 sandbox nodes scheduled for one update time.

Run as ``.venv/bin/python bench/fleet.py``. For each database backend (SQLite; also
PostgreSQL when ``TGOPS_TEST_DATABASE_URL`` is set, its public schema dropped and
recreated first) a child process of this script:

* builds a signed repository with one real .deb (``tests/repository.py``), served by
  ``tests/repo_server.py`` in a separate process;
* generates 500 clusters (``max_parallel_updates = 2``) of 20 sandbox nodes each, installs
  **without** an added delay (the sandbox still unpacks the .deb with ``dpkg-deb``), one
  logged-in user per node, leads of a minute or two (``FLEET_LEADS``);
* runs the real ``Service`` in-process (INFO logging into a file, like `tgops serve`),
  sends ``schedule update all on daily HH:MM:SS`` to ``POST /api/v1/command`` for an
  update time S a few minutes ahead, and awaits the 10,000 scheduled-update runs;
* from the first timer to the end of the last run, asks ``status`` through
  ``POST /api/v1/command`` (what `/tg status` does) and ``GET /api/v1/status`` once a
  second each, one request at a time, and records how long each answer took;
* reports the makespan from S to the last run's end, the answers' p50/p99/max (target:
  `/tg status` p99 < 1 s), the peak RSS (``VmHWM``), the service's CPU and statements per
  node and the users told before their sessions ended.

The figures go to bench/RESULTS.md under "## Fleet of 10,000 nodes (issue 15)" (other
sections are kept). ``TGOPS_BENCH_FLEET_CLUSTERS`` makes the fleet smaller while iterating
(the figures are then not comparable and say so).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/fleet.py`, Python puts bench/ first on sys.path, where another
# benchmark's module could shadow the standard library.
sys.path[:] = [str(ROOT), *(p for p in sys.path if p and Path(p).resolve() != ROOT / "bench")]

import argparse  # noqa: E402 - after the path is fixed
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402
from zoneinfo import ZoneInfo  # noqa: E402

import aiohttp  # noqa: E402

from bench.common import (  # noqa: E402
    FinishedCounter,
    LoopLag,
    SqlCounter,
    StallRecorder,
    api_command,
    backends,
    calls_text,
    cpu_children,
    first_notices,
    fleet_toml,
    log_problems,
    log_to,
    machine_line,
    now_text,
    percentile,
    prepare_nodes,
    proc_status_kib,
    remove_tree,
    repo_server,
    reset_postgres,
    run_child,
    scratch,
    verdict,
    write_section,
)
from bot.service import Service  # noqa: E402
from core.settings import load_settings  # noqa: E402
from tests.repository import Repo  # noqa: E402
from tests.service import ADMIN_TOKEN  # noqa: E402

HEADING = "## Fleet of 10,000 nodes (issue 15)"
CLUSTERS = int(os.environ.get("TGOPS_BENCH_FLEET_CLUSTERS", "500"))
PER_CLUSTER = 20
NODES = CLUSTERS * PER_CLUSTER
PARALLEL = 2
FLEET_LEADS = {"download_lead": 120.0, "lb_drain_lead": 10.0, "notice_lead": 30.0}
REMINDER = 10.0
SCHEDULE_MARGIN = 30.0
"""Seconds between the schedule command's answer and the first timer."""
AFTER_S_LIMIT = 1500.0
"""Seconds after S the child waits for the runs before it gives up (bounded)."""
PROBE_PERIOD = 1.0
PROBE_TIMEOUT = 60.0
TARGET_STATUS_P99 = 1.0
BERLIN = ZoneInfo("Europe/Berlin")


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


class Prober:
    """Asks the service one question every ``PROBE_PERIOD`` seconds, one at a time, and
    keeps how long each answer took (a failed or timed-out one counts as ``PROBE_TIMEOUT``)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, *, command: bool) -> None:
        self.session = session
        self.base = base
        self.command = command
        self.seconds: list[float] = []
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _ask(self) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        if self.command:
            request = self.session.post(
                f"{self.base}/api/v1/command", json={"text": "status"}, headers=headers
            )
        else:
            request = self.session.get(f"{self.base}/api/v1/status", headers=headers)
        async with request as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self._ask()
                self.seconds.append(loop.time() - t0)
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                self.seconds.append(PROBE_TIMEOUT)
                self.failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(max(0.0, PROBE_PERIOD - (loop.time() - t0)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-prober")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.seconds),
            "p50": percentile(self.seconds, 50),
            "p99": percentile(self.seconds, 99),
            "max": max(self.seconds, default=float("nan")),
            "failures": len(self.failures),
            "first_failure": self.failures[0] if self.failures else None,
        }


def cluster_names() -> dict[str, list[str]]:
    return {
        f"f{c:03d}": [f"f{c:03d}n{n:02d}" for n in range(1, PER_CLUSTER + 1)]
        for c in range(1, CLUSTERS + 1)
    }


async def _analyse(service: Service, at: datetime, work: Path) -> dict[str, Any]:
    """Makespan, step times and the users told in time, from the runs in the store."""
    runs = [r for r in await service.store.runs(limit=3 * NODES) if r.kind == "scheduled-update"]
    ends = [r.finished_at for r in runs if r.finished_at is not None]
    first = first_notices(work)
    told = untold = 0
    holds: list[float] = []
    for run in runs:
        steps = {s.name: s for s in await service.store.steps(run.id)}
        slot, release = steps.get("slot"), steps.get("release")
        if slot and release and slot.finished_at and release.finished_at:
            holds.append(_seconds(slot.finished_at, release.finished_at))
        disconnect = steps.get("disconnect")
        if disconnect is None:
            continue
        notice = first.get(run.node)
        if notice is not None and notice <= disconnect.started_at.replace(microsecond=0):
            told += 1
        else:
            untold += 1
    return {
        "runs": len(runs),
        "statuses": {s: sum(1 for r in runs if r.status == s) for s in {r.status for r in runs}},
        "makespan": _seconds(at, max(ends)) if ends else None,
        "hold_median": statistics.median(holds) if holds else None,
        "told": told,
        "untold": untold,
    }


async def _window(
    service: Service,
    session: aiohttp.ClientSession,
    base: str,
    counter: FinishedCounter,
    at: datetime,
) -> dict[str, Any]:
    """From the first timer to the last run's end: the runs awaited, status asked."""
    sql = SqlCounter(service.store.engine)
    lag = LoopLag()
    lag.start()
    stalls = StallRecorder() if os.environ.get("TGOPS_BENCH_STALLS") else None
    if stalls is not None:
        stalls.start()
    command_probe = Prober(session, base, command=True)
    api_probe = Prober(session, base, command=False)
    command_probe.start()
    api_probe.start()
    cpu0, children0, m0 = time.process_time(), cpu_children(), time.perf_counter()
    timed_out = False
    try:
        await counter.wait(NODES, _seconds(datetime.now(UTC), at) + AFTER_S_LIMIT)
    except TimeoutError:
        timed_out = True
    cpu = time.process_time() - cpu0
    children = cpu_children() - children0
    window = time.perf_counter() - m0
    await command_probe.stop()
    await api_probe.stop()
    await lag.stop()
    if stalls is not None:
        await stalls.stop()
    statements, by_key = sql.snapshot()
    sql.close()
    return {
        "timed_out": timed_out,
        "window": window,
        "cpu": cpu,
        "children_cpu": children,
        "statements": statements,
        "calls": sql.calls,
        "statements_by_key": dict(sorted(by_key.items(), key=lambda kv: -kv[1])[:10]),
        "status_command": command_probe.summary(),
        "status_api": api_probe.summary(),
        **lag.summary(),
        **(stalls.summary() if stalls is not None else {}),
    }


async def measure(work: Path, label: str, database_url: str) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    measured_at = now_text()
    repo = Repo(work)
    repo.add("tg-base", "1.0")
    clusters = cluster_names()
    names = [n for ns in clusters.values() for n in ns]
    prepare_nodes(work, names, install_delay=0.0)
    for name in names:
        (work / "nodes" / name / "sessions.json").write_text(json.dumps([{"user": f"u-{name}"}]))
    if label == "postgresql":
        await reset_postgres(database_url)
    log_file = work / "service.log"
    log_to(log_file)
    with repo_server(repo.root) as (url, _server):
        config = work / "tgops.toml"
        config.write_text(
            fleet_toml(
                work,
                clusters={c: (members, PARALLEL) for c, members in clusters.items()},
                database_url=database_url,
                repository_url=url,
                public_key=repo.public_key,
                sections={
                    "maintenance": {
                        "notice_lead": f"{FLEET_LEADS['notice_lead']:g}s",
                        "reminder_interval": f"{REMINDER:g}s",
                        "lb_drain_lead": f"{FLEET_LEADS['lb_drain_lead']:g}s",
                    },
                },
                updates={"download_lead": f"{FLEET_LEADS['download_lead']:g}s"},
            )
        )
        settings = load_settings(config, {})
        started = time.perf_counter()
        async with Service(settings, freeze=True) as service:  # as `tgops serve` runs it
            start_seconds = time.perf_counter() - started
            rss_started = proc_status_kib("VmRSS")
            base = f"http://127.0.0.1:{service.port}"
            counter = FinishedCounter(service.bus, frozenset({"scheduled-update"}))
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT + 60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # the update time: far enough ahead for the schedule command itself
                local = datetime.now(BERLIN) + timedelta(seconds=1800)
                m0 = time.perf_counter()
                await api_command(session, base, f"schedule update all on daily {local:%H:%M:%S}")
                probe_schedule = time.perf_counter() - m0
                ahead = 2 * probe_schedule + SCHEDULE_MARGIN + FLEET_LEADS["download_lead"]
                local = datetime.now(BERLIN) + timedelta(seconds=ahead)
                local = local.replace(microsecond=0) + timedelta(seconds=1)
                at = local.astimezone(UTC)
                fire_at = at - timedelta(seconds=FLEET_LEADS["download_lead"])
                m0 = time.perf_counter()
                await api_command(session, base, f"schedule update all on daily {local:%H:%M:%S}")
                schedule_seconds = time.perf_counter() - m0
                if datetime.now(UTC) > fire_at:
                    raise SystemExit("scheduling took longer than the time to the first timer")
                rss_scheduled = proc_status_kib("VmRSS")
                await asyncio.sleep(max(0.0, _seconds(datetime.now(UTC), fire_at) - 1.0))
                window = await _window(service, session, base, counter, at)
            fired = list(service.scheduler.fired_late)
            analysis = await _analyse(service, at, work)
    problems = log_problems(log_file)
    return {
        "label": label,
        "nodes": NODES,
        "load": [load_start, os.getloadavg()[0]],
        "measured_at": measured_at,
        "start_seconds": start_seconds,
        "schedule_seconds": schedule_seconds,
        "rss_started_kib": rss_started,
        "rss_scheduled_kib": rss_scheduled,
        "vm_hwm_kib": proc_status_kib("VmHWM"),
        **window,
        "fired": len(fired),
        "fired_p99": percentile(fired, 99),
        "errors": problems.errors,
        "first_error": problems.first_error,
        **analysis,
    }


def child(label: str, database_url: str | None, keep: bool) -> None:
    work = scratch("tgops-bench-fleet-")
    try:
        url = database_url or f"sqlite+aiosqlite:///{work}/state.db"
        result = asyncio.run(measure(work, label, url))
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            remove_tree(work)
    print(json.dumps(result))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def render(results: list[dict[str, Any]]) -> str:
    smaller = "" if NODES == 10_000 else f" (a smaller fleet: {NODES} nodes, not comparable)"
    measured = results[0].get("measured_at", now_text()) if results else now_text()
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python bench/fleet.py` on {measured}",
        "",
        f"- machine: {machine_line()}",
        f"- {NODES} sandbox nodes{smaller} in {CLUSTERS} clusters of {PER_CLUSTER} "
        f"(`max_parallel_updates = {PARALLEL}`), installs without an added delay (the "
        "sandbox unpacks one real .deb per node with `dpkg-deb`), one logged-in user per "
        f"node; `download_lead` {FLEET_LEADS['download_lead']:g} s, `notice_lead` "
        f"{FLEET_LEADS['notice_lead']:g} s, `lb_drain_lead` {FLEET_LEADS['lb_drain_lead']:g} s, "
        f"`reminder_interval` {REMINDER:g} s. The service runs in-process (`Service`); "
        "`schedule update all on daily HH:MM:SS` over `POST /api/v1/command` gives every "
        "node the time S.",
        "- during the window (first timer to the last run's end) `status` is asked through "
        f"`POST /api/v1/command` (what `/tg status` does) and `GET /api/v1/status`, every "
        f"{PROBE_PERIOD:g} s each, one at a time; target: `/tg status` p99 < "
        f"{TARGET_STATUS_P99:g} s and every run finished",
        "",
        "| backend | runs | makespan after S | `/tg status` p50 / p99 / max | target "
        "| `GET /api/v1/status` p50 / p99 / max | peak RSS | CPU per node | statements per "
        "node | users told before their sessions ended |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items()))
        c, a = r["status_command"], r["status_api"]
        ok = (
            not r["timed_out"]
            and r["statuses"] == {"succeeded": r["nodes"]}
            and c["p99"] < TARGET_STATUS_P99
        )
        lines.append(
            f"| {r['label']} | {statuses}{' (TIMED OUT)' if r['timed_out'] else ''} | "
            f"{_fmt(r['makespan'], '.0f')} s | {c['p50']:.3f} / **{c['p99']:.3f}** / "
            f"{c['max']:.3f} s | {verdict(ok)} | {a['p50']:.3f} / {a['p99']:.3f} / "
            f"{a['max']:.3f} s | {r['vm_hwm_kib'] / 1024:.0f} MiB | "
            f"{r['cpu'] / r['nodes'] * 1000:.0f} ms | {r['statements'] / r['nodes']:.0f} | "
            f"{r['told']} of {r['told'] + r['untold']} |"
        )
    lines += ["", "Measured detail:", ""]
    for r in results:
        c, a = r["status_command"], r["status_api"]
        lines += [
            f"- {r['label']} ({r['measured_at']}; load average {r['load'][0]:.2f} at the "
            f"start, {r['load'][1]:.2f} at the end):",
            f"  - service start-up {r['start_seconds']:.1f} s, RSS "
            f"{r['rss_started_kib'] / 1024:.0f} MiB; `schedule update all` answered in "
            f"{r['schedule_seconds']:.1f} s, RSS then "
            f"{r['rss_scheduled_kib'] / 1024:.0f} MiB",
            f"  - window {r['window']:.0f} s; timers: {r['fired']} fired, p99 "
            f"{r['fired_p99']:.3f} s late; slot held {_fmt(r['hold_median'], '.3f')} s (median)",
            f"  - process CPU {r['cpu']:.0f} s over the window ({r['cpu'] / r['nodes'] * 1000:.1f}"
            f" ms per node), `dpkg-deb` children {r['children_cpu']:.0f} s",
            f"  - event loop: a 50 ms sleeper woke late by p50 {r['lag_p50'] * 1000:.0f} ms, "
            f"p99 {r['lag_p99'] * 1000:.0f} ms, max {r['lag_max']:.2f} s",
            f"  - status answers: `/tg status` {c['n']} asked, {c['failures']} failed"
            + (f" (first: {c['first_failure']})" if c["first_failure"] else "")
            + f"; `GET /api/v1/status` {a['n']} asked, {a['failures']} failed"
            + (f" (first: {a['first_failure']})" if a["first_failure"] else ""),
            f"  - SQL statements: {r['statements']} ({r['statements'] / r['nodes']:.1f} per "
            f"node{calls_text(r)}); most frequent: "
            + ", ".join(f"{k} {v}" for k, v in r["statements_by_key"].items()),
            f"  - log: {r['errors']} ERROR lines"
            + (f" (first: {r['first_error']})" if r["first_error"] else ""),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--child", nargs=2, metavar=("LABEL", "URL"))
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the child's temp dir")
    parser.add_argument("--save-json", type=Path, help="also write the raw figures here")
    parser.add_argument("--render-json", type=Path, help="only render figures saved before")
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="diagnostic: sample the event loop's stack while it stalls, time the collector",
    )
    args = parser.parse_args()
    if args.stalls:
        os.environ["TGOPS_BENCH_STALLS"] = "1"  # the child inherits it
    if args.child:
        label, url = args.child
        child(label, None if url == "-" else url, args.keep)
        return
    results: list[dict[str, Any]] = []
    if args.render_json:
        results = json.loads(args.render_json.read_text())
    for label, url in [] if args.render_json else backends(Path("/nonexistent")):
        if args.only is not None and label != args.only:
            continue
        print(f"measuring {label} ({NODES} nodes; several minutes) ...", flush=True)
        argv = [str(Path(__file__)), "--child", label, "-" if label == "sqlite" else url]
        if args.keep:
            argv.append("--keep")
        data = run_child(argv, timeout=AFTER_S_LIMIT + 1200).data
        print(
            f"{label}: makespan {_fmt(data['makespan'])} s after S, runs {data['statuses']}, "
            f"/tg status p99 {data['status_command']['p99']:.3f} s, "
            f"peak RSS {data['vm_hwm_kib'] / 1024:.0f} MiB",
            flush=True,
        )
        results.append(data)
    if args.save_json:
        args.save_json.write_text(json.dumps(results))
    text = render(results)
    print(text)
    if not args.no_write:
        print(f"written to {write_section(HEADING, text)}")


if __name__ == "__main__":
    main()
