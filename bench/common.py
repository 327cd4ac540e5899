"""Shared helpers of the fleet benchmarks (bench/rollout.py, bench/schedule.py).

Each benchmark runs one measurement per database backend in a child process of its own
(so that peak RSS and CPU time belong to that measurement only); the child runs the real
``Service`` in-process, the update repository is served by ``tests/repo_server.py`` in a
further process (its CPU is not the service's). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.events import Event, LocalEventBus, RunFinished  # noqa: E402 - after the path is set
from tests.service import ADMIN_TOKEN  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
POSTGRES_ENV = "TGOPS_TEST_DATABASE_URL"


# -- machine and results -------------------------------------------------------------------


def machine_line() -> str:
    """`uname -a`, nproc, memory and Python, for the results."""
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False)  # noqa: S607
    mem_kib = 0
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kib = int(next(x for x in meminfo if x.startswith("MemTotal:")).split()[1])
    return (
        f"`{uname.stdout.strip() or ' '.join(platform.uname())}`, nproc {os.cpu_count()}, "
        f"memory {mem_kib / 1024 / 1024:.1f} GiB, Python {platform.python_version()}"
    )


def now_text() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def write_section(heading: str, text: str) -> Path:
    """Replace (or append) the section ``heading`` of bench/RESULTS.md; keep all others.

    The file is read right before it is written, under an advisory lock, so that sections
    other people add at the same time are kept.
    """
    RESULTS.touch(exist_ok=True)
    with RESULTS.open("r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            old = handle.read() or "# Benchmark results\n"
            kept: list[str] = []
            skipping = False
            for line in old.splitlines(keepends=True):
                if line.startswith("## "):
                    skipping = line.strip() == heading
                if not skipping:
                    kept.append(line)
            body = "".join(kept).rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
            handle.seek(0)
            handle.write(body)
            handle.truncate()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return RESULTS


# -- measurement ---------------------------------------------------------------------------


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    """CPU seconds of finished, waited-for children (dpkg-deb of the sandbox driver)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmHWM: peak RSS since exec, VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class FinishedCounter:
    """Counts ``RunFinished`` events of some run kinds; ``wait(n)`` wakes at the n-th.

    Cheap on purpose (no list of every event), so that it adds nearly nothing to the
    service's CPU time.
    """

    def __init__(self, bus: LocalEventBus, kinds: frozenset[str]) -> None:
        self.kinds = kinds
        self.outcomes: dict[str, int] = {}
        self.count = 0
        self._target = 0
        self._reached = asyncio.Event()
        bus.subscribe("bench-finished", self._on_event)

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, RunFinished) and event.kind in self.kinds:
            self.count += 1
            self.outcomes[event.outcome] = self.outcomes.get(event.outcome, 0) + 1
            if self._target and self.count >= self._target:
                self._reached.set()

    async def wait(self, count: int, within: float) -> None:
        self._target = count
        if self.count >= count:
            return
        async with asyncio.timeout(within):
            await self._reached.wait()


# -- fleet ---------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fleet_toml(
    root: Path,
    *,
    clusters: Mapping[str, tuple[Sequence[str], int]],
    database_url: str,
    repository_url: str,
    public_key: str,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    updates: Mapping[str, Any] | None = None,
) -> str:
    """A configuration of sandbox clusters: ``{cluster: (node names, max_parallel)}``.

    Modelled on ``tests.service.fleet_toml`` (same API token, loopback HTTP on a free port),
    with generated ``[clusters.NAME]`` sections and ``[[nodes]]`` entries.
    """
    lines = [
        'timezone = "Europe/Berlin"',
        f"database_url = {json.dumps(database_url)}",
        "[http]",
        'host = "127.0.0.1"',
        "port = 0",
        "[api.tokens.admin]",
        f'token = "{ADMIN_TOKEN}"',
        'roles = ["update", "maint"]',
        "[updates]",
        f"repository_url = {json.dumps(repository_url)}",
        f"public_key = {json.dumps(public_key)}",
    ]
    tuned = {
        "cache_dir": f"{root}/cache",
        "retry_delay": "0s",
        "download_attempts": 2,
        "connect_timeout": "5s",
        "read_timeout": "10s",
        **(updates or {}),
    }
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in tuned.items())
    for section, values in (sections or {}).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    for cluster, (_, max_parallel) in clusters.items():
        lines += [f"[clusters.{cluster}]", f"max_parallel_updates = {max_parallel}"]
    for cluster, (names, _) in clusters.items():
        for name in names:
            lines += [
                "[[nodes]]",
                f'name = "{name}"',
                f'cluster = "{cluster}"',
                f'root = "{root}/nodes/{name}"',
            ]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # a broken configuration fails here, not inside the service
    return text


def prepare_nodes(root: Path, names: Sequence[str], *, install_delay: float) -> None:
    """Node directories with ``faults.json``: every install takes ``install_delay`` s."""
    faults = json.dumps({"delay": {"install": install_delay}})
    for name in names:
        node = root / "nodes" / name
        node.mkdir(parents=True, exist_ok=True)
        (node / "faults.json").write_text(faults)


@contextlib.contextmanager
def repo_server(repo_root: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``tests/repo_server.py`` serving ``repo_root`` on 127.0.0.1 in its own process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.repo_server", str(repo_root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"repository server did not start (said {url!r})")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def log_to(path: Path) -> None:
    """Log like `tgops serve` does (INFO, same format), into a file instead of stderr."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def log_problems(path: Path, limit: int = 5) -> tuple[int, list[str]]:
    """Number of WARNING/ERROR lines in the log and the first few of them."""
    count, first = 0, []
    with contextlib.suppress(FileNotFoundError), path.open(errors="replace") as handle:
        for line in handle:
            if " WARNING " in line or " ERROR " in line:
                count += 1
                if len(first) < limit:
                    first.append(line.strip()[:300])
    return count, first


# -- databases -----------------------------------------------------------------------------


def backends(root: Path) -> list[tuple[str, str]]:
    """(label, database_url): SQLite always, PostgreSQL when TGOPS_TEST_DATABASE_URL is set."""
    found = [("sqlite", f"sqlite+aiosqlite:///{root}/state.db")]
    url = os.environ.get(POSTGRES_ENV)
    if url:
        found.append(("postgresql", url))
    return found


async def reset_postgres(url: str) -> None:
    """Drop and recreate the public schema, as tests/databases.py does."""
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        await engine.dispose()


# -- child processes -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildResult:
    data: dict[str, Any]
    stderr: str


def run_child(argv: Sequence[str], *, timeout: float) -> ChildResult:
    """Run a measurement child (this interpreter); its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [x for x in result.stdout.splitlines() if x.strip()]
    if result.returncode != 0 or not lines:
        raise SystemExit(
            f"measurement child {argv} failed (exit {result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return ChildResult(data=json.loads(lines[-1]), stderr=result.stderr)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def profiled(out: Path | None, top: int = 30) -> Iterator[None]:
    """cProfile of the block (event-loop thread only) written to ``out``; no-op for None."""
    if out is None:
        yield
        return
    import cProfile  # noqa: PLC0415
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top * 2)
        out.write_text(text.getvalue())
