"""Cluster rollout benchmark (issue 5): `auto-update c1 --yes` of a 200-node sandbox cluster.

Run as ``.venv/bin/python bench/rollout.py``. For each database backend (SQLite; also
PostgreSQL when ``TGOPS_TEST_DATABASE_URL`` is set, its public schema dropped and
recreated first) a child process of this script:

* builds a signed repository with one real .deb (``tests/repository.py``) in a temporary
  directory and serves it with ``tests/repo_server.py`` in a separate process;
* writes ``faults.json`` with ``{"delay": {"install": 1.0}}`` for each of the 200 sandbox
  nodes of cluster ``c1`` (``max_parallel_updates = 10``);
* runs the real ``Service`` in-process (logging at INFO into a file, as `tgops serve`
  logs to stderr) and sends ``auto-update c1 --yes`` to ``POST /api/v1/command`` over
  127.0.0.1, then awaits the 200 runs;
* measures the makespan from the command to the end of the last run (the runs'
  ``finished_at`` in the store) against the ideal 200 / 10 x 1 s = 20 s, the process CPU
  time (all threads, ``time.process_time``) over that window per node, the CPU of the
  ``dpkg-deb`` children per node, and the peak RSS (``VmHWM``) of the process.

The figures go to bench/RESULTS.md under "## Cluster rollout (issue 5)" (other sections
are kept). ``--profile`` also writes a cProfile of the event-loop thread (a separate,
slower run; its figures are not recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402 - after the path is set
    FinishedCounter,
    backends,
    cpu_children,
    fleet_toml,
    log_problems,
    log_to,
    machine_line,
    now_text,
    prepare_nodes,
    proc_status_kib,
    profiled,
    remove_tree,
    repo_server,
    reset_postgres,
    run_child,
    verdict,
    write_section,
)
from bot.service import Service  # noqa: E402
from core.settings import load_settings  # noqa: E402
from tests.repository import Repo  # noqa: E402
from tests.service import ADMIN_TOKEN  # noqa: E402

HEADING = "## Cluster rollout (issue 5)"
NODES = 200
PARALLEL = 10
INSTALL_SECONDS = 1.0
TARGET_RATIO = 1.10
RUN_LIMIT = 240.0
"""Seconds the child waits for the runs before it gives up (the benchmark stays bounded)."""
HELD_STEPS = ("drain", "notice", "disconnect", "install", "restart-services", "verify", "undrain")


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


async def _analyse(service: Service, ids: list[int], t0: datetime) -> dict[str, Any]:
    """Makespan and where the time went, from the runs' steps in the store."""
    runs = [r for i in ids if (r := await service.store.run(i)) is not None]
    ends = [r.finished_at for r in runs if r.finished_at is not None]
    step_durations: dict[str, list[float]] = {}
    holds: list[float] = []
    changes: list[tuple[datetime, int]] = []
    first_slot: datetime | None = None
    downloads_done: list[datetime] = []
    for run in runs:
        steps = {s.name: s for s in await service.store.steps(run.id)}
        for name, step in steps.items():
            if step.finished_at is not None:
                step_durations.setdefault(name, []).append(
                    _seconds(step.started_at, step.finished_at)
                )
        slot, release = steps.get("slot"), steps.get("release")
        if slot and release and slot.finished_at and release.finished_at:
            holds.append(_seconds(slot.finished_at, release.finished_at))
            changes += [(slot.finished_at, 1), (release.finished_at, -1)]
            first_slot = min(first_slot or slot.finished_at, slot.finished_at)
        download = steps.get("download")
        if download and download.finished_at:
            downloads_done.append(download.finished_at)
    # slot utilisation: held slots integrated over the time from the first take to the last
    # release, against PARALLEL slots over that time
    changes.sort()
    held, area = 0, 0.0
    for (when, delta), (nxt, _) in zip(changes, changes[1:], strict=False):
        held += delta
        area += held * _seconds(when, nxt)
    span = _seconds(changes[0][0], changes[-1][0]) if changes else 0.0
    return {
        "statuses": {s: sum(1 for r in runs if r.status == s) for s in {r.status for r in runs}},
        "makespan": _seconds(t0, max(ends)) if ends else None,
        "first_slot_after": _seconds(t0, first_slot) if first_slot else None,
        "downloads_done_after": _seconds(t0, max(downloads_done)) if downloads_done else None,
        "slot_span": span,
        "utilisation": area / (PARALLEL * span) if span else None,
        "hold_median": statistics.median(holds) if holds else None,
        "hold_p90": sorted(holds)[int(len(holds) * 0.9)] if holds else None,
        "hold_max": max(holds) if holds else None,
        "step_median": {k: statistics.median(v) for k, v in step_durations.items()},
        "step_max": {k: max(v) for k, v in step_durations.items()},
    }


async def measure(work: Path, label: str, database_url: str, profile: Path | None) -> dict[str, Any]:
    repo = Repo(work)
    repo.add("tg-base", "1.0")
    names = [f"tg{i}" for i in range(1, NODES + 1)]
    prepare_nodes(work, names, install_delay=INSTALL_SECONDS)
    if label == "postgresql":
        await reset_postgres(database_url)
    log_file = work / "service.log"
    log_to(log_file)
    with repo_server(repo.root) as (url, _server):
        config = work / "tgops.toml"
        config.write_text(
            fleet_toml(
                work,
                clusters={"c1": (names, PARALLEL)},
                database_url=database_url,
                repository_url=url,
                public_key=repo.public_key,
            )
        )
        settings = load_settings(config, {})
        started = time.perf_counter()
        async with Service(settings) as service:
            start_seconds = time.perf_counter() - started
            counter = FinishedCounter(service.bus, frozenset({"auto-update"}))
            rss_idle = proc_status_kib("VmRSS")
            base = f"http://127.0.0.1:{service.port}"
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                with profiled(profile):
                    cpu0, children0 = time.process_time(), cpu_children()
                    t0, m0 = datetime.now(UTC), time.perf_counter()
                    async with session.post(
                        f"{base}/api/v1/command",
                        json={"text": "auto-update c1 --yes"},
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    ) as response:
                        reply = await response.json()
                    reply_seconds = time.perf_counter() - m0
                    if not reply.get("ok"):
                        raise SystemExit(f"auto-update refused: {reply}")
                    ids = [int(w.strip("#,.")) for w in reply["text"].split() if w.startswith("#")]
                    timed_out = False
                    try:
                        await counter.wait(len(ids), RUN_LIMIT)
                        await service.lifecycle.wait(ids, limit=30)
                    except TimeoutError:
                        timed_out = True
                    wall = time.perf_counter() - m0
                    cpu = time.process_time() - cpu0
                    children = cpu_children() - children0
            analysis = await _analyse(service, ids, t0)
    warnings, first_warnings = log_problems(log_file)
    return {
        "label": label,
        "runs": len(ids),
        "timed_out": timed_out,
        "start_seconds": start_seconds,
        "reply_seconds": reply_seconds,
        "wall": wall,
        "cpu": cpu,
        "children_cpu": children,
        "rss_idle_kib": rss_idle,
        "vm_hwm_kib": proc_status_kib("VmHWM"),
        "warnings": warnings,
        "first_warnings": first_warnings,
        **analysis,
    }


def child(label: str, database_url: str | None, profile: Path | None, keep: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="tgops-bench-rollout-", dir="/tmp"))
    try:
        url = database_url or f"sqlite+aiosqlite:///{work}/state.db"
        result = asyncio.run(measure(work, label, url, profile))
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            remove_tree(work)
    print(json.dumps(result))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def render(results: list[dict[str, Any]]) -> str:
    ideal = NODES / PARALLEL * INSTALL_SECONDS
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python bench/rollout.py` on {now_text()}",
        "",
        f"- machine: {machine_line()}",
        f"- `auto-update c1 --yes` of {NODES} sandbox nodes, `max_parallel_updates = "
        f"{PARALLEL}`, each install delayed {INSTALL_SECONDS:g} s by `faults.json`; one .deb",
        "  pending per node (real `dpkg-deb` unpack). The service runs **in-process** (the",
        "  `Service` context, INFO logging to a file like `tgops serve`), in a child process of",
        "  its own per backend; the repository is served by `tests/repo_server.py` in another",
        "  process. The command goes to `POST /api/v1/command` over 127.0.0.1; the makespan",
        "  ends at the last run's `finished_at` in the store.",
        f"- ideal: {NODES} / {PARALLEL} x {INSTALL_SECONDS:g} s = **{ideal:g} s**; target ratio "
        f"<= {TARGET_RATIO:.2f}",
        "",
        "| backend | makespan | ratio to ideal | target | CPU per node (service) | CPU per node "
        "(dpkg-deb children) | peak RSS (VmHWM) | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        makespan = r["makespan"]
        ratio = makespan / ideal if makespan else None
        ok = ratio is not None and ratio <= TARGET_RATIO and not r["timed_out"]
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items()))
        lines.append(
            f"| {r['label']} | {_fmt(makespan)} s | **{_fmt(ratio)}** | {verdict(ok)} | "
            f"{r['cpu'] / r['runs'] * 1000:.0f} ms | {r['children_cpu'] / r['runs'] * 1000:.0f} ms"
            f" | {r['vm_hwm_kib'] / 1024:.0f} MiB | {statuses}"
            f"{' (TIMED OUT)' if r['timed_out'] else ''} |"
        )
    lines += ["", "Where the time goes (medians over the runs, from the runs' steps):", ""]
    for r in results:
        med = r["step_median"]
        held = " + ".join(f"{s} {med.get(s, 0):.3f}" for s in HELD_STEPS)
        lines += [
            f"- {r['label']}: command answered in {r['reply_seconds']:.2f} s; first slot taken "
            f"{_fmt(r['first_slot_after'])} s after the command; last download step done "
            f"{_fmt(r['downloads_done_after'])} s after it",
            f"  - a slot is held {_fmt(r['hold_median'], '.3f')} s (median; p90 "
            f"{_fmt(r['hold_p90'], '.3f')}, max {_fmt(r['hold_max'], '.3f')}) for "
            f"{INSTALL_SECONDS:g} s of install delay: {held} s",
            f"  - slot utilisation {_fmt((r['utilisation'] or 0) * 100, '.1f')} % of "
            f"{PARALLEL} slots over {r['slot_span']:.2f} s (first take to last release)",
            f"  - process CPU {r['cpu']:.1f} s over {r['wall']:.1f} s wall "
            f"({r['cpu'] / r['wall'] * 100:.0f} % of one core); service start-up "
            f"{r['start_seconds']:.1f} s, RSS {r['rss_idle_kib'] / 1024:.0f} MiB after start-up",
            f"  - log: {r['warnings']} WARNING/ERROR lines"
            + (f" (first: `{r['first_warnings'][0]}`)" if r["first_warnings"] else ""),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--child", nargs=2, metavar=("LABEL", "URL"))
    parser.add_argument("--profile", type=Path, help="write a cProfile here (not recorded)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the child's temp dir")
    args = parser.parse_args()
    if args.child:
        label, url = args.child
        child(label, None if url == "-" else url, args.profile, args.keep)
        return
    results = []
    for label, url in backends(Path("/nonexistent")):
        print(f"measuring {label} ...", flush=True)
        argv = [str(Path(__file__)), "--child", label, "-" if label == "sqlite" else url]
        if args.profile:
            argv += ["--profile", str(args.profile.with_suffix(f".{label}.txt").resolve())]
        results.append(run_child(argv, timeout=RUN_LIMIT + 180).data)
        r = results[-1]
        print(
            f"{label}: makespan {_fmt(r['makespan'])} s, ratio "
            f"{_fmt((r['makespan'] or 0) / (NODES / PARALLEL * INSTALL_SECONDS))}, "
            f"CPU {r['cpu']:.1f} s, peak RSS {r['vm_hwm_kib'] / 1024:.0f} MiB",
            flush=True,
        )
    text = render(results)
    print(text)
    if not args.profile and not args.no_write:
        print(f"written to {write_section(HEADING, text)}")


if __name__ == "__main__":
    main()
