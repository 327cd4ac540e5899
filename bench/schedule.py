"""Scheduled-update benchmark (issue 6): 1,000 sandbox nodes in 50 clusters, one update time.

Run as ``.venv/bin/python bench/schedule.py``. For each database backend (SQLite; also
PostgreSQL when ``TGOPS_TEST_DATABASE_URL`` is set, its public schema dropped and
recreated first) a child process of this script:

* builds a signed repository with one real .deb (``tests/repository.py``), served by
  ``tests/repo_server.py`` in a separate process;
* generates a configuration of 50 clusters (``[clusters.cNN]``, ``max_parallel_updates =
  2``) of 20 sandbox nodes each (``[[nodes]]``), every install delayed 1 s by
  ``faults.json``, with short leads (``download_lead``, ``lb_drain_lead``,
  ``notice_lead`` of seconds, ``reminder_interval`` 1 s);
* runs the real ``Service`` in-process (INFO logging into a file, like `tgops serve`),
  sends ``schedule update all on daily HH:MM:SS`` to ``POST /api/v1/command`` over
  127.0.0.1 for a wall time S about 75 s ahead (Europe/Berlin), and awaits the 1,000
  scheduled-update runs;
* measures the makespan from S to the end of the last run against the ideal 20 nodes /
  2 slots x 1 s = 10 s and against the driver alone (below), how late the timers fired
  (``Scheduler.fired_late``: p99 target < 0.1 s), and the peak RSS of the process
  (``VmHWM``, target < 200 MB).

Before those, a child measures the floor under the makespan on this machine, **the driver
alone**: the same 1,000 sandbox nodes' operations inside a slot (drain, notice, disconnect,
install, reboot, post-update check, undrain), made by the same driver class, 2 at a time per
cluster and all clusters at once, with nothing else in the process (no store, no scheduler,
no service). The service's makespan over that is what its bookkeeping adds.

The figures go to bench/RESULTS.md under "## Scheduled updates (issue 6)" (other sections
are kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/schedule.py`, Python puts bench/ first on sys.path, where another
# benchmark's module could shadow the standard library.
sys.path[:] = [str(ROOT), *(p for p in sys.path if p and Path(p).resolve() != ROOT / "bench")]

import argparse  # noqa: E402 - after the path is fixed
import asyncio  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402
from zoneinfo import ZoneInfo  # noqa: E402

import aiohttp  # noqa: E402

from bench.common import (  # noqa: E402
    SLOT_POLLING,
    SQLITE_STALL,
    STEP_BOOKKEEPING,
    DriverTime,
    FinishedCounter,
    LoopLag,
    SqlCounter,
    api_command,
    backends,
    cached_package,
    calls_text,
    cpu_children,
    driver_alone,
    first_notices,
    fleet_toml,
    log_problems,
    log_to,
    machine_busy,
    machine_line,
    now_text,
    percentile,
    postgres_cpu,
    prepare_nodes,
    print_floor,
    proc_status_kib,
    profiled,
    remove_tree,
    repo_server,
    reset_postgres,
    run_child,
    runs_and_floor,
    scratch,
    thread_cpu,
    verdict,
    write_section,
)
from bot.service import Service  # noqa: E402
from core.settings import load_settings  # noqa: E402
from tests.repository import Repo  # noqa: E402

HEADING = "## Scheduled updates (issue 6)"
CLUSTERS = int(os.environ.get("TGOPS_BENCH_CLUSTERS", "50"))
"""50; smaller with ``TGOPS_BENCH_CLUSTERS`` while iterating (figures are not comparable)."""
PER_CLUSTER = 20
NODES = CLUSTERS * PER_CLUSTER
PARALLEL = 2
INSTALL_SECONDS = 1.0
AHEAD = 75.0
"""Seconds from the schedule command to the update time S."""
LEADS = {"download_lead": 10.0, "lb_drain_lead": 4.0, "notice_lead": 8.0, "reminder": 1.0}
LONG_LEAD = 150.0
"""``download_lead`` of the diagnostic variant ``long-lead``: preparation done before S."""
VARIANTS = {
    "product": "as configured above",
    "no-gc": "diagnostic: `gc.disable()` in the service process",
    "long-lead": f"diagnostic: `download_lead` {LONG_LEAD:g} s, S {LONG_LEAD + 35:g} s ahead",
}
TARGET_RATIO = 1.5
TARGET_LATE = 0.1
TARGET_RSS_MB = 200.0
TARGET_CPU_MS = 15.0
AFTER_S_LIMIT = 120.0
"""Seconds after S the child waits for the runs before it gives up (bounded)."""
BERLIN = ZoneInfo("Europe/Berlin")
HELD_STEPS = ("drain", "notice", "disconnect", "install", "reboot", "verify", "undrain")


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def cluster_names() -> dict[str, list[str]]:
    return {
        f"c{c:02d}": [f"c{c:02d}n{n:02d}" for n in range(1, PER_CLUSTER + 1)]
        for c in range(1, CLUSTERS + 1)
    }


async def _analyse(service: Service, at: datetime, drivers: DriverTime) -> dict[str, Any]:
    """Makespan and where the time went, from the scheduled-update runs in the store."""
    runs = [r for r in await service.store.runs(limit=5 * NODES) if r.kind == "scheduled-update"]
    ends = [r.finished_at for r in runs if r.finished_at is not None]
    holds: list[float] = []
    in_slot: list[float] = []
    changes: list[tuple[datetime, int]] = []
    ready: list[float] = []
    started: list[float] = []
    step_durations: dict[str, list[float]] = {}
    first_install: dict[str, float] = {}
    for run in runs:
        steps = {s.name: s for s in await service.store.steps(run.id)}
        for name, step in steps.items():
            if step.finished_at is not None:
                step_durations.setdefault(name, []).append(
                    _seconds(step.started_at, step.finished_at)
                )
        check = steps.get("check")
        if check is not None:
            started.append(_seconds(at, check.started_at))
        download = steps.get("download")
        if download is not None and download.finished_at is not None:
            ready.append(_seconds(at, download.finished_at))
        slot, release = steps.get("slot"), steps.get("release")
        if slot and release and slot.finished_at and release.finished_at:
            holds.append(_seconds(slot.finished_at, release.finished_at))
            in_slot.append(drivers.in_slot(run.node, slot.finished_at, release.finished_at))
            changes += [(slot.finished_at, 1), (release.finished_at, -1)]
        install = steps.get("install")
        cluster = service.engine.cluster_of.get(run.node) or "-"
        if install is not None:
            offset = _seconds(at, install.started_at)
            first_install[cluster] = min(first_install.get(cluster, offset), offset)
    # slot utilisation from S to the last release, against all clusters' slots
    changes.sort()
    held, area = 0, 0.0
    for (when, delta), (nxt, _) in itertools.pairwise(changes):
        held += delta
        if nxt > at:
            area += held * _seconds(max(when, at), nxt)
    span = _seconds(at, changes[-1][0]) if changes else 0.0
    return {
        "statuses": {s: sum(1 for r in runs if r.status == s) for s in {r.status for r in runs}},
        "runs": len(runs),
        "makespan": _seconds(at, max(ends)) if ends else None,
        "first_check_after_s": min(started) if started else None,
        "last_check_after_s": max(started) if started else None,
        "last_download_after_s": max(ready) if ready else None,
        "first_install_after_s": statistics.median(first_install.values())
        if first_install
        else None,
        "first_install_max": max(first_install.values()) if first_install else None,
        "utilisation": area / (CLUSTERS * PARALLEL * span) if span > 0 else None,
        "hold_median": statistics.median(holds) if holds else None,
        "driver_median": statistics.median(in_slot) if in_slot else None,
        "hold_p90": percentile(holds, 90) if holds else None,
        "step_median": {k: statistics.median(v) for k, v in step_durations.items()},
        "step_max": {k: max(v) for k, v in step_durations.items()},
    }


def _notices(work: Path) -> int:
    total = 0
    for log in (work / "nodes").glob("*/messages.log"):
        with log.open(errors="replace") as handle:
            total += sum(1 for line in handle if "Maintenance of" in line)
    return total


def login_everyone(work: Path, names: list[str]) -> None:
    """One logged-in user on every node (``sessions.json``): each must be told in time."""
    for name in names:
        (work / "nodes" / name / "sessions.json").write_text(json.dumps([{"user": f"u-{name}"}]))


async def _told_in_time(service: Service, work: Path) -> dict[str, Any]:
    """Nodes whose users got at least one maintenance notice before the run ended their
    sessions (the ``disconnect`` step), and how long before."""
    first = first_notices(work)
    told, untold, ahead = 0, [], []
    for run in await service.store.runs(limit=5 * NODES):
        if run.kind != "scheduled-update":
            continue
        steps = {s.name: s for s in await service.store.steps(run.id)}
        disconnect = steps.get("disconnect")
        if disconnect is None:
            continue  # sessions were not ended by this run
        notice = first.get(run.node)
        ended = disconnect.started_at.replace(microsecond=0)
        if notice is not None and notice <= ended:
            told += 1
            ahead.append(_seconds(notice, disconnect.started_at))
        else:
            untold.append(run.node)
    return {
        "told": told,
        "untold": len(untold),
        "untold_nodes": sorted(untold)[:10],
        "notice_ahead_min": min(ahead) if ahead else None,
        "notice_ahead_median": statistics.median(ahead) if ahead else None,
    }


def _config(work: Path, database_url: str, url: str, key: str, leads: dict[str, float]) -> Path:
    clusters = cluster_names()
    config = work / "tgops.toml"
    config.write_text(
        fleet_toml(
            work,
            clusters={c: (members, PARALLEL) for c, members in clusters.items()},
            database_url=database_url,
            repository_url=url,
            public_key=key,
            sections={
                "maintenance": {
                    "notice_lead": f"{leads['notice_lead']:g}s",
                    "reminder_interval": f"{leads['reminder']:g}s",
                    "lb_drain_lead": f"{leads['lb_drain_lead']:g}s",
                }
            },
            updates={"download_lead": f"{leads['download_lead']:g}s"},
        )
    )
    return config


async def _scheduled_runs(
    service: Service, leads: dict[str, float], ahead: float, profile: Path | None
) -> dict[str, Any]:
    """Schedule every node for S, wait for the runs; the figures of that window."""
    counter = FinishedCounter(service.bus, frozenset({"scheduled-update"}))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        local = datetime.now(BERLIN) + timedelta(seconds=ahead)
        local = local.replace(microsecond=0) + timedelta(seconds=1)
        at = local.astimezone(UTC)
        fire_at = at - timedelta(seconds=leads["download_lead"])
        m0 = time.perf_counter()
        base = f"http://127.0.0.1:{service.port}"
        await api_command(session, base, f"schedule update all on daily {local:%H:%M:%S}")
        schedule_seconds = time.perf_counter() - m0
    if datetime.now(UTC) > fire_at:
        raise SystemExit("scheduling took longer than the time to the first timer")
    rss_scheduled = proc_status_kib("VmRSS")
    # idle until shortly before the timers fire, then measure
    await asyncio.sleep(max(0.0, _seconds(datetime.now(UTC), fire_at) - 1.0))
    sql = SqlCounter(service.store.engine)
    lag = LoopLag()
    lag.start()
    at_s: dict[str, float] = {}
    threads_at_s: dict[str, float] = {}

    async def mark_s() -> None:
        """The statement count and CPU time at S: what the time after S costs."""
        await asyncio.sleep(max(0.0, _seconds(datetime.now(UTC), at)))
        at_s.update(
            statements=sql.total,
            cpu=time.process_time(),
            t=time.perf_counter(),
            machine=machine_busy(),
            postgres=postgres_cpu(),
        )
        threads_at_s.update(thread_cpu())

    marker = asyncio.create_task(mark_s(), name="bench-mark-s")
    with profiled(profile):
        cpu0, children0, m0 = time.process_time(), cpu_children(), time.perf_counter()
        timed_out = False
        try:
            await counter.wait(NODES, _seconds(datetime.now(UTC), at) + AFTER_S_LIMIT)
        except TimeoutError:
            timed_out = True
        cpu = time.process_time() - cpu0
        children = cpu_children() - children0
        window = time.perf_counter() - m0
    marker.cancel()
    after_s = {
        "statements_after_s": sql.total - at_s["statements"] if at_s else None,
        "cpu_after_s": time.process_time() - at_s["cpu"] if at_s else None,
        "seconds_after_s": time.perf_counter() - at_s["t"] if at_s else None,
        # every core of the machine, and the PostgreSQL server's processes, after S: how
        # much of the 2 cores the update had, and what the database's server took of them
        "machine_after_s": machine_busy() - at_s["machine"] if at_s else None,
        "postgres_after_s": postgres_cpu() - at_s["postgres"] if at_s else None,
        "threads_after_s": {
            kind: seconds - threads_at_s.get(kind, 0.0) for kind, seconds in thread_cpu().items()
        },
    }
    await lag.stop()
    statements, by_key = sql.snapshot()
    sql.close()
    fired = list(service.scheduler.fired_late)
    return {
        "at": at,
        "local": f"{local:%H:%M:%S %Z}",
        "timed_out": timed_out,
        "schedule_seconds": schedule_seconds,
        "rss_scheduled_kib": rss_scheduled,
        "fired": len(fired),
        "fired_p50": percentile(fired, 50),
        "fired_p99": percentile(fired, 99),
        "fired_max": max(fired, default=float("nan")),
        "finished_events": counter.count,
        "cpu": cpu,
        "children_cpu": children,
        "window": window,
        **after_s,
        "statements": statements,
        "calls": sql.calls,
        "statements_by_key": dict(sorted(by_key.items(), key=lambda kv: -kv[1])[:12]),
        "statement_errors": sql.errors,
        **lag.summary(),
    }


async def measure(
    work: Path, label: str, database_url: str, profile: Path | None, variant: str
) -> dict[str, Any]:
    leads = dict(LEADS)
    ahead = AHEAD
    if variant == "long-lead":
        leads["download_lead"] = LONG_LEAD
        ahead = LONG_LEAD + 35
    load_start = os.getloadavg()[0]
    measured_at = now_text()
    repo = Repo(work)
    repo.add("tg-base", "1.0")
    names = [n for ns in cluster_names().values() for n in ns]
    prepare_nodes(work, names, install_delay=INSTALL_SECONDS)
    login_everyone(work, names)
    if label == "postgresql":
        await reset_postgres(database_url)
    log_file = work / "service.log"
    log_to(log_file)
    with repo_server(repo.root) as (url, _server):
        settings = load_settings(_config(work, database_url, url, repo.public_key, leads), {})
        started = time.perf_counter()
        async with Service(settings, freeze=True) as service:  # as `tgops serve` runs it
            drivers = DriverTime(service.engine.drivers)
            start_seconds = time.perf_counter() - started
            rss_started = proc_status_kib("VmRSS")
            window = await _scheduled_runs(service, leads, ahead, profile)
            at = window.pop("at")
            analysis = await _analyse(service, at, drivers)
            analysis.update(await _told_in_time(service, work))
    problems = log_problems(log_file)
    return {
        "label": label,
        "load": [load_start, os.getloadavg()[0]],
        "measured_at": measured_at,
        "variant": variant,
        "leads": leads,
        "gc": gc.isenabled(),
        "at": at.isoformat(),
        "start_seconds": start_seconds,
        "rss_started_kib": rss_started,
        "vm_hwm_kib": proc_status_kib("VmHWM"),
        "notices": _notices(work),
        "errors": problems.errors,
        "locked": problems.locked,
        "first_error": problems.first_error,
        **window,
        **analysis,
    }


async def floor(work: Path) -> dict[str, Any]:
    """The slot operations of every node by the sandbox driver alone (module docstring)."""
    package = cached_package(work, Repo(work).add("tg-base", "1.0"), "tg-base", "1.0")
    clusters = cluster_names()
    names = [n for ns in clusters.values() for n in ns]
    prepare_nodes(work, names, install_delay=INSTALL_SECONDS)
    login_everyone(work, names)
    return await driver_alone(work, package, clusters, parallel=PARALLEL, restart="reboot")


def child(
    label: str, database_url: str | None, profile: Path | None, keep: bool, variant: str
) -> None:
    if variant == "no-gc":
        gc.disable()  # diagnostic only: shows the run without the collector's stalls
    work = scratch("tgops-bench-schedule-")
    try:
        url = database_url or f"sqlite+aiosqlite:///{work}/state.db"
        result = asyncio.run(measure(work, label, url, profile, variant))
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            remove_tree(work)
    print(json.dumps(result))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _cores_line(r: dict[str, Any]) -> str:
    """Where the machine's 2 cores went after S (older figures lack it)."""
    threads = r.get("threads_after_s")
    if not threads or r.get("machine_after_s") is None:
        return "  - the machine's cores after S: not measured"
    window = r["seconds_after_s"] or 1.0
    postgres = r.get("postgres_after_s") or 0.0
    return (
        f"  - the machine's cores after S: busy {r['machine_after_s']:.1f} s in {window:.1f} s "
        f"({r['machine_after_s'] / window:.2f} of 2 cores); of it this process "
        f"{r['cpu_after_s']:.1f} s (event loop {threads['main']:.1f}, SQLite's thread "
        f"{threads['sqlite']:.1f}, threads starting commands {threads.get('commands', 0.0):.1f}, "
        f"executor threads {threads['executor']:.1f}, others "
        f"{threads['other']:.1f} s)"
        + (f", the PostgreSQL server {postgres:.1f} s" if postgres else "")
        + "; the rest: `dpkg-deb`, the repository server, the kernel, other work"
    )


SLOT_KEYS = ("SELECT slot_waiters", "SELECT cluster_slots")


def _row(r: dict[str, Any], ideal: float, alone: dict[str, Any] | None) -> str:
    floor = alone["makespan"] if alone else None
    makespan = r["makespan"]
    complete = r["statuses"] == {"succeeded": NODES} and not r["timed_out"]
    ratio = makespan / ideal if makespan is not None and complete else None
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items()))
    rss_mb = r["vm_hwm_kib"] * 1024 / 1e6
    if r["variant"] == "product":
        marks = [
            verdict(ratio is not None and ratio <= TARGET_RATIO),
            verdict(r["fired"] == NODES and r["fired_p99"] < TARGET_LATE),
            verdict(rss_mb < TARGET_RSS_MB),
            verdict(r["untold"] == 0 and r["told"] == NODES),
        ]
    else:
        marks = ["diagnostic"] * 4
    shown = _fmt(makespan) + " s" if complete else f"n/a (ended {_fmt(makespan)} s after S)"
    over = makespan / floor if floor and makespan is not None and complete else None
    return (
        f"| {r['label']}{'' if r['variant'] == 'product' else ', ' + r['variant']} | {shown} | "
        f"**{_fmt(ratio)}** | {marks[0]} | {_fmt(over)} | "
        f"{r['fired_p99']:.3f} s ({r['fired']} timers, max "
        f"{r['fired_max']:.3f} s) | {marks[1]} | {rss_mb:.0f} MB | {marks[2]} | "
        f"{r['told']} of {NODES} | {marks[3]} | {r['cpu'] / NODES * 1000:.0f} ms | "
        f"{_own_cpu(r, alone)} | "
        f"{r['statements'] / NODES:.0f} | {statuses}{' (TIMED OUT)' if r['timed_out'] else ''} |"
    )


def _own_cpu(r: dict[str, Any], alone: dict[str, Any] | None) -> str:
    """Process CPU per node less what the simulated nodes' in-slot operations took alone."""
    if alone is None:
        return "n/a"
    own = (r["cpu"] - alone["cpu"]) / NODES * 1000
    mark = verdict(own <= TARGET_CPU_MS) if r["variant"] == "product" else "diagnostic"
    return f"{own:.0f} ms ({mark})"


def _details(r: dict[str, Any]) -> list[str]:
    med = r["step_median"]
    held = " + ".join(f"{s} {med.get(s, 0):.3f}" for s in HELD_STEPS if s in med)
    slot_queries = sum(r["statements_by_key"].get(k, 0) for k in SLOT_KEYS)
    top = ", ".join(f"{k} {n}" for k, n in list(r["statements_by_key"].items())[:6])
    name = r["label"] + ("" if r["variant"] == "product" else f", {VARIANTS[r['variant']]}")
    lead = r["leads"]["download_lead"]
    return [
        f"- {name} (S = {r['local']}):",
        f"  - service start-up {r['start_seconds']:.1f} s; `schedule update all` answered in "
        f"{r['schedule_seconds']:.1f} s; RSS {r['rss_started_kib'] / 1024:.0f} MiB after "
        f"start-up, {r['rss_scheduled_kib'] / 1024:.0f} MiB after scheduling",
        f"  - timers fired late by p50 {r['fired_p50']:.3f} s, p99 {r['fired_p99']:.3f} s, max "
        f"{r['fired_max']:.3f} s; runs' first step began {_fmt(r['first_check_after_s'])} .. "
        f"{_fmt(r['last_check_after_s'])} s from S (planned: -{lead:g} s)",
        f"  - preparation (check, maintenance, download and stage): last download step done "
        f"{_fmt(r['last_download_after_s'])} s from S (must be before -"
        f"{r['leads']['lb_drain_lead']:g} s, when the first two nodes of each cluster drain)",
        f"  - first install of a cluster began {_fmt(r['first_install_after_s'])} s after S "
        f"(median over clusters; latest {_fmt(r['first_install_max'])} s)",
        f"  - a slot is held {_fmt(r['hold_median'], '.3f')} s (median; p90 "
        f"{_fmt(r['hold_p90'], '.3f')}) for {INSTALL_SECONDS:g} s of install delay (its "
        f"driver busy {_fmt(r.get('driver_median'), '.3f')} s of it: with that as a "
        f"round, the ideal would be {PER_CLUSTER // PARALLEL} x "
        f"{_fmt(r.get('driver_median'), '.3f')} s); step "
        f"medians: {held} s; slot utilisation from S to the last release "
        f"{_fmt((r['utilisation'] or 0) * 100, '.1f')} % of {CLUSTERS * PARALLEL} slots",
        f"  - process CPU from the timers to the end {r['cpu']:.1f} s in {r['window']:.0f} s "
        f"({r['cpu'] / NODES * 1000:.0f} ms per node; dpkg-deb "
        f"{r['children_cpu'] / NODES * 1000:.0f} ms per node)",
        f"  - event loop: a 50 ms sleeper woke late by p50 {r['lag_p50'] * 1000:.0f} ms, p99 "
        f"{r['lag_p99'] * 1000:.0f} ms, max {r['lag_max']:.2f} s "
        f"({r['lag_over_1s']:.0f} times more than 1 s)",
        f"  - maintenance notices shown on the nodes: {r['notices']} "
        f"({r['notices'] / NODES:.1f} per node); every node has one logged-in user: "
        f"**{r['told']} of {r['told'] + r['untold']} nodes told before their sessions were ended**"
        + (f" (not told: {', '.join(r['untold_nodes'])})" if r["untold"] else "")
        + f"; first notice {_fmt(r['notice_ahead_min'], '.1f')} s (least) / "
        f"{_fmt(r['notice_ahead_median'], '.1f')} s (median) before the sessions ended",
        f"  - SQL statements: {r['statements']} ({r['statements'] / NODES:.0f} per node, "
        f"{r['statements'] / r['window']:.0f} per second over the {r['window']:.0f} s window"
        f"{calls_text(r)}), of "
        f"which {slot_queries} ({slot_queries / max(1, r['statements']) * 100:.0f} %) are the "
        f"slot waiters' polling SELECTs; most frequent: {top}",
        f"  - after S: {_fmt(r['statements_after_s'], '.0f')} statements "
        f"({(r['statements_after_s'] or 0) / NODES:.0f} per node, "
        f"{(r['statements_after_s'] or 0) / (r['seconds_after_s'] or 1):.0f} per second), "
        f"process CPU {_fmt(r['cpu_after_s'], '.1f')} s in {_fmt(r['seconds_after_s'], '.0f')} s",
        _cores_line(r),
        "  - statements that raised: "
        + (", ".join(f"{k}: {n}" for k, n in r["statement_errors"].items()) or "none"),
        f"  - load average (1 min) {r['load'][0]:.2f} at the start, {r['load'][1]:.2f} at the "
        "end (other work on the machine competes for its 2 cores)",
        f"  - log: {r['errors']} ERROR lines, {r['locked']} mention `database is locked`"
        + (f"; first: `{r['first_error']}`" if r["first_error"] else ""),
    ]


def _stalled(r: dict[str, Any]) -> bool:
    return bool(r["locked"]) or any("database is locked" in k for k in r["statement_errors"])


def _analysis(results: list[dict[str, Any]]) -> list[str]:
    """The causes found, each shown only when this run's figures show it."""
    lines = ["Causes found (py-spy and cProfile of the child, and the counts above):", ""]
    product = [r for r in results if r["variant"] == "product"]
    if any(_stalled(r) for r in product):
        lines.append(SQLITE_STALL)
    elif any(r["label"] == "sqlite" for r in product):
        lines.append(
            '- No SQLite stall in this run. The stall described under "Cluster rollout (issue '
            '5)" is intermittent here (it depends on when the garbage collector runs); when '
            "it hits, the loop stops for 10 s and runs fail with `database is locked`, setting "
            "update locks."
        )
    late = [
        r
        for r in results
        if r["last_download_after_s"] is None
        or r["last_download_after_s"] > -r["leads"]["lb_drain_lead"]
    ]
    if late:
        r = late[0]
        rate = r["statements"] / r["window"]
        lines.append(
            f"- **Preparation late** ({r['label']}, {r['variant']}): the last download step "
            f"ended {_fmt(r['last_download_after_s'], '.1f')} s from S (median `check` "
            f"{r['step_median'].get('check', 0):.2f} s, `maintenance` "
            f"{r['step_median'].get('maintenance', 0):.2f} s, `download` "
            f"{r['step_median'].get('download', 0):.1f} s). An update time now starts with one "
            "look (`ScheduledRuns.start_many`: one status of every node, one manifest fetch, "
            "the runs and the maintenance windows written with one statement per kind of "
            "row), so `check` and `maintenance` cost next to nothing; what is left per node is "
            "staging (4 at once, first rounds first) and its bookkeeping (the staged "
            "packages, the plan and the progress, one journal commit shared with the other "
            "runs), each waiting for the store's one connection behind every other "
            f"run's writes ({rate:.0f} statements/s at {r['statements'] / NODES:.0f} per node). "
            "The notices no longer depend on it (next item)."
        )
    for r in product:
        lines.append(
            f"- **Notices** ({r['label']}): {r['told']} of {r['told'] + r['untold']} nodes "
            "with a logged-in user were told before their sessions were ended (the "
            "maintenance of every node of the update time is opened in one transaction when "
            "its timers fire, so the reminder loop tells the users from S - `notice_lead` "
            "whatever the downloads are doing; before issue 15 it opened in each run's own "
            "`maintenance` step, behind that run's check, and under load after the window had "
            "passed)."
        )
    polled = max(
        (sum(r["statements_by_key"].get(k, 0) for k in SLOT_KEYS), r["statements"], r["label"])
        for r in results
    )
    if polled[0] > 0.1 * polled[1]:
        lines.append(
            f"- **Slot statements** ({polled[0]} of {polled[1]} statements in the "
            f"{polled[2]} run): " + SLOT_POLLING
        )
    for r in (x for x in results if x["variant"] == "long-lead"):
        after = r["statements_after_s"] or 0
        rate = after / (r["seconds_after_s"] or 1)
        per_node = after / NODES
        lines.append(
            f"- **With the preparation done before S** (diagnostic `download_lead` "
            f"{r['leads']['download_lead']:g} s; the last download step ended "
            f"{-(r['last_download_after_s'] or 0):.0f} s before S), the first install of a "
            f"cluster began {_fmt(r['first_install_after_s'], '.0f')} s after S (median) and "
            f"the slots were {(r['utilisation'] or 0) * 100:.0f} % used, yet the makespan was "
            f"{_fmt(r['makespan'], '.0f')} s: a slot was held {_fmt(r['hold_median'], '.1f')} s "
            f"(median) for a {INSTALL_SECONDS:g} s install. After S the store executed "
            f"{after:.0f} statements ({per_node:.0f} per node) at {rate:.0f} per second, its "
            "ceiling here (the process was CPU-bound: each statement costs about a "
            "millisecond of SQLAlchemy and aiosqlite work, most of it on the event-loop "
            f"thread). So the time after S is about {NODES} x {per_node:.0f} / {rate:.0f} = "
            f"{NODES * per_node / max(rate, 1):.0f} s whatever the leads; the ideal "
            f"{PER_CLUSTER / PARALLEL * INSTALL_SECONDS:g} s needs far fewer statements per "
            "node after S (see the next item) or a store path that carries many more per "
            "second."
        )
    held = [r for r in results if r["hold_median"] is not None]
    if held:
        r = min(held, key=lambda x: x["hold_median"])
        lines.append(
            f"- **Time inside the slot window**: a slot is held {r['hold_median']:.2f} s "
            f"(median, {r['label']}, {r['variant']}) for a {INSTALL_SECONDS:g} s install. "
            + STEP_BOOKKEEPING
        )
    ok = [r for r in product if r["fired"] == NODES and r["fired_p99"] < TARGET_LATE]
    if ok:
        lines.append(
            f"- Timers: APScheduler started all {NODES} jobs within "
            f"{max(r['fired_max'] for r in ok):.2f} s of their time (met). Peak RSS "
            f"{max(r['vm_hwm_kib'] for r in product) * 1024 / 1e6:.0f} MB with {NODES} nodes "
            "(met)."
        )
    return [*lines, ""]


def render(results: list[dict[str, Any]], alone: dict[str, Any] | None) -> str:
    ideal = PER_CLUSTER / PARALLEL * INSTALL_SECONDS
    flag = " --diagnostics" if any(r["variant"] != "product" for r in results) else ""
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python bench/schedule.py{flag}` on "
        f"{results[0].get('measured_at', now_text()) if results else now_text()}",
        "",
        f"- machine: {machine_line()}",
        f"- {NODES:,} sandbox nodes in {CLUSTERS} generated clusters of {PER_CLUSTER} "
        f"(`max_parallel_updates = {PARALLEL}`), one .deb pending per node, each install",
        f"  delayed {INSTALL_SECONDS:g} s by `faults.json`; `schedule update all on daily "
        f"HH:MM:SS` for a time S ~{AHEAD:g} s ahead (Europe/Berlin);",
        f"  `download_lead` {LEADS['download_lead']:g} s, `lb_drain_lead` "
        f"{LEADS['lb_drain_lead']:g} s, `notice_lead` {LEADS['notice_lead']:g} s, "
        f"`reminder_interval` {LEADS['reminder']:g} s. The service runs **in-process** (the",
        "  `Service` context, INFO logging to a file like `tgops serve`) in a child process of",
        "  its own per measurement; the repository is served by `tests/repo_server.py` in",
        "  another process; commands go to `POST /api/v1/command` over 127.0.0.1. Makespan:",
        "  S to the last run's `finished_at` in the store. Peak RSS: the process's `VmHWM`.",
        f"- ideal: {PER_CLUSTER} / {PARALLEL} x {INSTALL_SECONDS:g} s = **{ideal:g} s** after S; "
        f"targets: ratio <= {TARGET_RATIO:.2f} with all {NODES} runs succeeded, p99 of "
        f"`Scheduler.fired_late` < {TARGET_LATE:g} s, peak RSS < {TARGET_RSS_MB:g} MB",
        *_alone_lines(alone, ideal),
        "",
        "| backend | makespan from S | ratio to ideal | target | over the driver alone "
        "| timers late (p99) | target "
        "| peak RSS | target | users told before their sessions ended | target | CPU per node "
        "| of it the service's (less the driver alone's), target 15 ms "
        "| statements per node | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r, ideal, alone) for r in results),
        "",
        "Measured detail:",
        "",
    ]
    for r in results:
        lines += _details(r)
    lines += ["", *_analysis(results)]
    return "\n".join(lines) + "\n"


def _alone_lines(alone: dict[str, Any] | None, ideal: float) -> list[str]:
    if alone is None:
        return []
    return [
        "- the driver alone, the floor on this machine (measured first, in a child of its own): "
        f"the same {NODES:,} nodes' operations inside a slot (drain, notice, disconnect,",
        "  install, reboot, post-update check, undrain) by `SandboxDriver`, "
        f"{PARALLEL} at a time per cluster and all clusters at once, nothing else in the",
        f"  process: **{alone['makespan']:.2f} s, {alone['makespan'] / ideal:.2f} x the ideal**; "
        f"process CPU {alone['cpu']:.1f} s ({alone['cpu'] / NODES * 1000:.1f} ms per node), "
        f"dpkg-deb {alone['children_cpu']:.1f} s; load average {alone['load']:.2f}",
        "- the service's CPU per node: the process's CPU from the timers to the end less the "
        "driver alone's: the simulated nodes' in-slot operations run in the service's "
        "process here and on the nodes in a real fleet; what the simulated nodes do outside "
        "the slot (state reads, staging, every notice but the slot's) stays counted. "
        f"Target <= {TARGET_CPU_MS:g} ms (dpkg-deb excluded)",
    ]


def _measure(label: str, url: str, *, variant: str, profile: Path | None) -> dict[str, Any]:
    argv = [str(Path(__file__)), "--child", label, "-" if label == "sqlite" else url]
    argv += ["--variant", variant]
    if profile is not None:
        argv += ["--profile", str(profile.with_suffix(f".{label}-{variant}.txt").resolve())]
    data = run_child(argv, timeout=LONG_LEAD + 35 + AFTER_S_LIMIT + 240).data
    print(
        f"{label} ({variant}): makespan {_fmt(data['makespan'])} s "
        f"after S, runs {data['statuses']}, timers late p99 {data['fired_p99']:.3f} s, "
        f"peak RSS {data['vm_hwm_kib'] / 1024:.0f} MiB",
        flush=True,
    )
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--child", nargs=2, metavar=("LABEL", "URL"))
    parser.add_argument("--driver-alone", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="product")
    parser.add_argument("--profile", type=Path, help="write a cProfile here (not recorded)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the child's temp dir")
    parser.add_argument("--save-json", type=Path, help="also write the raw figures here")
    parser.add_argument("--render-json", type=Path, help="only render figures saved before")
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="also run the no-gc and long-lead variants on SQLite (about 8 more minutes)",
    )
    args = parser.parse_args()
    if args.driver_alone:
        print_floor(floor)
        return
    if args.child:
        label, url = args.child
        child(label, None if url == "-" else url, args.profile, args.keep, args.variant)
        return
    results, alone = runs_and_floor(Path(__file__), args.render_json, about="30 s")
    for label, url in [] if args.render_json else backends(Path("/nonexistent")):
        print(f"measuring {label} (about {AHEAD:g} s of lead, then the runs) ...", flush=True)
        results.append(_measure(label, url, variant="product", profile=args.profile))
        if label == "sqlite" and args.diagnostics:
            for variant in ("no-gc", "long-lead"):
                results.append(_measure(label, url, variant=variant, profile=args.profile))
    if args.save_json:
        args.save_json.write_text(json.dumps({"runs": results, "alone": alone}))
    text = render(results, alone)
    print(text)
    if not args.profile and not args.no_write:
        print(f"written to {write_section(HEADING, text)}")


if __name__ == "__main__":
    main()
