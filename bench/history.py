"""What a year of maintenance history costs the reads of the open windows (issue 15).

Windows are kept after they end. A controller of 1,000 nodes updating daily adds 365,000
rows a year, and every reminder tick, ``status``, metrics scrape and status page reads the
open windows (``Store.maintenance()``); the calendar feed reads those ended since a time
(``Store.maintenance_called_off``). Before migration 0006 both read the whole table.

Per store: 1,000 open windows (the next update time of the fleet) and ``--history`` ended
ones; PostgreSQL's statistics gathered (``ANALYZE``, as its autovacuum does), SQLite's not
(tgops does not gather them). Each read is timed ``--reads`` times (median), in
this order within one run: with the index (the head), without it (the store migrated down
to 0005), with it again (the store opened again, migrated up). The baseline is the same
reads against a store holding only the 1,000 open windows.

    .venv/bin/python bench/history.py [--history 365000] [--reads 15] [--no-write]

PostgreSQL is measured when TGOPS_TEST_DATABASE_URL is set (its database is reset).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alembic import command
from sqlalchemy import Connection, insert

from bench.common import (
    backends,
    machine_line,
    now_text,
    remove_tree,
    reset_postgres,
    scratch,
    write_section,
)
from core.store import Store
from core.store import tables as t
from core.store.base import migrations_config

HEADING = "## Maintenance history (issue 15)"
FLEET = 1000
CHUNK = 5000
START = datetime(2025, 12, 1, 3, tzinfo=UTC)


def _downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(migrations_config(connection), revision)


def _window(i: int, *, ended: bool) -> dict[str, Any]:
    day = START + timedelta(days=i // FLEET)
    return {
        "node": f"n{i % FLEET:04d}",
        "start": day,
        "reason": "scheduled update",
        "origin": "scheduled-update",
        "disable_logon": False,
        "created_by": "schedule",
        "created_at": day - timedelta(minutes=10),
        "last_notice_at": day if ended else None,
        "started_at": day if ended else None,
        "ended_at": day + timedelta(minutes=20) if ended else None,
        "ended_by": "system" if ended else None,
        "end_reason": "update done" if ended else None,
    }


async def _fill(store: Store, history: int) -> float:
    """``history`` ended windows and the fleet's open ones; returns the seconds it took."""
    m0 = time.perf_counter()
    for first in range(0, history, CHUNK):
        rows = [_window(i, ended=True) for i in range(first, min(history, first + CHUNK))]
        async with store.engine.begin() as conn:
            await conn.execute(insert(t.maintenance), rows)
    opened = [_window(history + i, ended=False) for i in range(FLEET)]
    async with store.engine.begin() as conn:
        await conn.execute(insert(t.maintenance), opened)
    await _statistics(store)
    return time.perf_counter() - m0


async def _statistics(store: Store) -> None:
    """PostgreSQL's autovacuum gathers statistics of a table that grew; tgops never runs
    ``ANALYZE`` on SQLite, whose planner then knows nothing of the table (as in service)."""
    if store.engine.dialect.name == "postgresql":
        async with store.engine.begin() as conn:
            await conn.exec_driver_sql("ANALYZE")


async def _time(read: Callable[[], Awaitable[object]], reads: int) -> float:
    await read()  # warm the cache and the statement
    times = []
    for _ in range(reads):
        m0 = time.perf_counter()
        await read()
        times.append(time.perf_counter() - m0)
    return statistics.median(times)


async def _reads(store: Store, reads: int) -> dict[str, float]:
    since = datetime.now(UTC) - timedelta(days=1)

    async def open_windows() -> None:
        found = await store.maintenance()
        if len(found) != FLEET:
            raise SystemExit(f"expected {FLEET} open windows, read {len(found)}")

    async def called_off() -> None:
        await store.maintenance_called_off(since)

    return {
        "open": await _time(open_windows, reads),
        "called_off": await _time(called_off, reads),
    }


async def measure(label: str, url: str, history: int, reads: int) -> dict[str, Any]:
    empty_url = url.replace("state.db", "empty.db")
    if label == "postgresql":
        await reset_postgres(url)
    async with Store(empty_url) as store:
        await _fill(store, 0)
        empty = await _reads(store, reads)
    if label == "postgresql":
        await reset_postgres(url)
    async with Store(url) as store:
        fill_seconds = await _fill(store, history)
        indexed = await _reads(store, reads)
        async with store.engine.begin() as conn:
            await conn.run_sync(_downgrade, "0005")
        await _statistics(store)
        scanned = await _reads(store, reads)
    m0 = time.perf_counter()
    async with Store(url) as store:  # migrated up again: the index is built on the history
        migrate_seconds = time.perf_counter() - m0
        again = await _reads(store, reads)
    if label == "postgresql":
        await reset_postgres(url)
    return {
        "label": label,
        "empty": empty,
        "indexed": indexed,
        "scanned": scanned,
        "again": again,
        "fill_seconds": fill_seconds,
        "migrate_seconds": migrate_seconds,
    }


def render(results: list[dict[str, Any]], history: int, reads: int) -> str:
    lines = [
        HEADING,
        "",
        f"`.venv/bin/python bench/history.py --history {history}` on {now_text()}",
        "",
        f"- machine: {machine_line()}",
        f"- {FLEET:,} open maintenance windows (the fleet's next update time) and "
        f"{history:,} ended ones ({history // FLEET} days of daily updates of {FLEET:,} "
        "nodes); PostgreSQL's statistics gathered (as autovacuum does), SQLite's not "
        f"(tgops does not gather them); each read timed {reads} times after one warm-up, "
        "medians. In one run per store: with the index on `ended_at` (migration 0006), "
        "without it (migrated down to 0005), with it again (opened again: the migration "
        "builds the index on the history). Baseline: the same reads with no history.",
        "",
        "| store | read | no history | with history, index (0006) | ratio | "
        "with history, no index (0005) | ratio | index again | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "open": f"open windows (`Store.maintenance()`, {FLEET:,} rows)",
        "called_off": "windows called off in the last day (calendar feed)",
    }
    for r in results:
        for key, name in names.items():
            base = r["empty"][key]
            cells = [
                f"{r[k][key] * 1000:.2f} ms | {r[k][key] / base:.2f} x"
                for k in ("indexed", "scanned", "again")
            ]
            lines.append(
                f"| {r['label']} | {name} | {base * 1000:.2f} ms | " + " | ".join(cells) + " |"
            )
    lines.append("")
    for r in results:
        lines.append(
            f"- {r['label']}: {history:,} rows written in {r['fill_seconds']:.1f} s; opening "
            f"the store at 0005 (migration 0006 building the index on them) took "
            f"{r['migrate_seconds']:.2f} s"
        )
    lines.append(
        "- who reads them: the reminder loop at every tick (every `reminder_interval` while "
        "windows are open, and after each change), `status`, `/metrics`, the status page; "
        "the calendar feed reads the windows called off. Without the index each of these "
        "reads every window ever kept, so its cost grows with the history, not the fleet"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--history", type=int, default=365_000)
    parser.add_argument("--reads", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    work = scratch("tgops-bench-history-")
    results = []
    try:
        for label, url in backends(work):
            print(f"measuring {label} ({args.history:,} ended windows) ...", flush=True)
            results.append(asyncio.run(measure(label, url, args.history, args.reads)))
    finally:
        remove_tree(work)
    text = render(results, args.history, args.reads)
    print(text)
    if not args.no_write:
        print(f"written to {write_section(HEADING, text)}")


if __name__ == "__main__":
    main()
