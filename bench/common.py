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
import functools
import gc
import hashlib
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event as sa_event  # noqa: E402 - after the path is set

from core.events import Event, LocalEventBus, RunFinished  # noqa: E402
from core.model import PackageKind, StagedPackage  # noqa: E402
from core.store.journal_pg import statements_of  # noqa: E402
from tests.service import ADMIN_TOKEN  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
POSTGRES_ENV = "TGOPS_TEST_DATABASE_URL"

SETTLE = 1.5
"""Seconds of rest after ``sync`` before each turn of a comparison that writes large files
(bench/stage.py, bench/download.py): without it a turn pays for the kernel's work the one
before left behind (its writeback, freeing the pages of removed files). On 2026-12-06
``curl -o`` right after a download took 0.63 to 0.84 s against 0.42 to 0.47 s otherwise,
and the 1 GiB download right after ``curl -o`` 1.99 to 2.23 s against 0.92 to 0.97 s."""


# -- machine and results -------------------------------------------------------------------


def scratch(prefix: str) -> Path:
    """A new directory for a benchmark's files under ``TMPDIR`` (``/tmp`` when it is unset),
    where the simulated nodes, the repository and the store live."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def file_creation_us(count: int = 300) -> float:
    """CPU microseconds to create (and remove) one empty file in a new directory under
    ``TMPDIR``, the median of three rounds of ``count``. A simulated node creates a file
    at each change of its state (``core.drivers.sandbox``), so this cost is part of the
    floor under every benchmark with sandbox nodes: on one of this project's test machines
    it was 11 us on tmpfs, 19 to 36 us in some directories of the root file system (ext4)
    and 200 to 970 us in others, those under ``/tmp`` among them, which moved the
    1,000-node floor's CPU between 5.4 and 10.0 s (bench/RESULTS.md, "Twenty-third
    pass")."""
    work = scratch("tgops-bench-files-")
    rounds: list[float] = []
    try:
        for r in range(3):
            names = [str(work / f"f{r}-{i}") for i in range(count)]
            cpu0 = time.process_time()
            for name in names:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            rounds.append((time.process_time() - cpu0) / count * 1e6)
            for name in names:
                os.unlink(name)
    finally:
        remove_tree(work)
    return sorted(rounds)[1]


def machine_line() -> str:
    """`uname -a`, nproc, memory and Python, and what creating a file costs where the
    benchmark keeps its files, for the results."""
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False)  # noqa: S607
    mem_kib = 0
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kib = int(next(x for x in meminfo if x.startswith("MemTotal:")).split()[1])
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration, IndexError):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x for x in cpuinfo if x.startswith("model name")).split(":", 1)[1].strip()
    return (
        f"`{uname.stdout.strip() or ' '.join(platform.uname())}`, {cpu}, nproc "
        f"{os.cpu_count()}, memory {mem_kib / 1024 / 1024:.1f} GiB, "
        f"Python {platform.python_version()}; files under `{tempfile.gettempdir()}` "
        f"(creating one: {file_creation_us():.0f} us of CPU)"
    )


def now_text() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def write_section(heading: str, text: str) -> Path:
    """Replace (or append) the section ``heading`` of bench/RESULTS.md; keep all others.

    What follows the old section's first ``### `` heading was written by hand (analyses,
    earlier runs, what was tried): it is kept, after the new text, unless the new text
    has a subsection of the same heading. The file is read right before it is written,
    under an advisory lock, so that sections other people add at the same time are kept.
    """
    RESULTS.touch(exist_ok=True)
    with RESULTS.open("r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            old = handle.read() or "# Benchmark results\n"
            kept: list[str] = []
            by_hand: list[str] = []
            skipping = False
            for line in old.splitlines(keepends=True):
                if line.startswith("## "):
                    skipping = line.strip() == heading
                if not skipping:
                    kept.append(line)
                elif by_hand or line.startswith("### "):
                    by_hand.append(line)
            body = "".join(kept).rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
            body += _subsections_kept("".join(by_hand), text)
            handle.seek(0)
            handle.write(body)
            handle.truncate()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return RESULTS


def _subsections_kept(by_hand: str, text: str) -> str:
    """The hand-written ``### `` subsections of a section, less those ``text`` has."""
    generated = {line.strip() for line in text.splitlines() if line.startswith("### ")}
    parts = [p for p in re.split(r"(?m)^(?=### )", by_hand) if p.strip()]
    kept = [p for p in parts if p.splitlines()[0].strip() not in generated]
    return "".join("\n" + p.strip("\n") + "\n" for p in kept)


# -- measurement ---------------------------------------------------------------------------


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    """CPU seconds of finished, waited-for children (dpkg-deb of the sandbox driver)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds(stat: Path, fields: int) -> float:
    """CPU seconds of a ``/proc/.../stat`` file: its first ``fields`` time fields (2:
    utime and stime; 4: also cutime and cstime, the children waited for); 0 when the
    process or thread has ended."""
    try:
        values = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in values[11 : 11 + fields]) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (/proc)."""
    return _cpu_seconds(Path(f"/proc/{pid}/stat"), 4)


def postgres_cpu() -> float:
    """CPU seconds of the machine's PostgreSQL processes (the server's own, and through
    its ``cutime`` those of the connections' backends that have ended)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            program = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if program.startswith(b"postgres") or program.endswith(b"/postgres"):
            total += process_cpu(int(entry.name))
    return total


def machine_busy() -> float:
    """CPU seconds all of the machine's cores have spent busy since boot (/proc/stat:
    everything but idle and iowait); over a window, divided by its length, the cores
    that were busy on average."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user..steal, less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by kind (/proc/self/task): the event loop
    (``main``), SQLite's connection thread (``sqlite``), the threads that start the
    drivers' commands (``commands``: the sandbox's ``dpkg-deb``), the default executor's
    threads (``executor``: file reads, hashing) and any other (``other``)."""
    import threading  # noqa: PLC0415 - only the fleet benchmarks need it

    by_id = {thread.native_id: thread for thread in threading.enumerate()}
    found = dict.fromkeys(("main", "sqlite", "commands", "executor", "other"), 0.0)
    for task in Path("/proc/self/task").iterdir():
        thread = by_id.get(int(task.name))
        if thread is threading.main_thread():
            kind = "main"
        elif type(thread).__module__.startswith("aiosqlite"):
            kind = "sqlite"
        elif thread is not None and thread.name.startswith("tgops-process"):
            kind = "commands"
        elif thread is not None and thread.name.startswith("asyncio_"):
            kind = "executor"
        else:
            kind = "other"
        found[kind] += _cpu_seconds(task / "stat", 2)
    return found


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
    sections = dict(sections or {})
    http = {"host": "127.0.0.1", "port": 0, **sections.pop("http", {})}
    lines = [
        'timezone = "Europe/Berlin"',
        f"database_url = {json.dumps(database_url)}",
        "[http]",
        *(f"{k} = {_toml_value(v)}" for k, v in http.items()),
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
    for section, values in sections.items():
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


async def driver_alone(
    work: Path,
    package: StagedPackage,
    clusters: Mapping[str, Sequence[str]],
    *,
    parallel: int,
    restart: str,
) -> dict[str, Any]:
    """The operations a run makes inside a node's slot (drain, notice, disconnect, install,
    ``restart`` = ``reboot`` or ``restart_services``, post-update check, undrain), made by
    ``SandboxDriver`` alone: ``parallel`` nodes at a time per cluster, all clusters at once,
    nothing else in the process; the nodes under ``work/nodes`` are prepared and
    ``package`` is staged on each first. Makespan, the process's CPU and its children's
    (``dpkg-deb``): the floor the simulated nodes set, which the service's share leaves out."""
    from core.drivers.sandbox import SandboxDriver  # noqa: PLC0415 - only the floor needs it

    names = [n for members in clusters.values() for n in members]
    drivers = {n: SandboxDriver(n, work / "nodes" / n, clustered=True) for n in names}
    await asyncio.gather(*(d.stage([package]) for d in drivers.values()))

    async def update(driver: SandboxDriver, slots: asyncio.Semaphore) -> None:
        async with slots:
            await driver.drain()
            await driver.announce("Maintenance of this server starts now.")
            await driver.disconnect_sessions()
            await driver.install([package])
            await (driver.reboot() if restart == "reboot" else driver.restart_services())
            await driver.post_check()
            await driver.undrain()

    updates = []
    for members in clusters.values():
        slots = asyncio.Semaphore(parallel)
        updates += [update(drivers[n], slots) for n in members]
    cpu0, children0, m0 = time.process_time(), cpu_children(), time.perf_counter()
    await asyncio.gather(*updates)
    return {
        "makespan": time.perf_counter() - m0,
        "cpu": time.process_time() - cpu0,
        "children_cpu": cpu_children() - children0,
        "load": os.getloadavg()[0],
    }


def print_floor(floor: Callable[[Path], Awaitable[dict[str, Any]]]) -> None:
    """The ``--driver-alone`` child: ``floor`` in a temporary directory, printed as JSON.
    It logs as the service's child does (INFO into a file): the simulated nodes' own log
    lines are part of what they cost (without this, their lines were counted as the
    service's: 35 to 80 us a line, six lines per node, on the twenty-third pass's machine)."""
    work = scratch("tgops-bench-alone-")
    log_to(work / "driver-alone.log")
    try:
        result = asyncio.run(floor(work))
    finally:
        remove_tree(work)
    print(json.dumps(result))


def runs_and_floor(
    script: Path, render_json: Path | None, *, about: str
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The figures saved before in ``render_json`` (runs and the driver alone, if kept), or
    no runs yet and the driver alone measured now by ``script --driver-alone``."""
    if render_json is not None:
        saved = json.loads(render_json.read_text())
        if isinstance(saved, list):  # saved before the driver-alone figures were kept
            return saved, None
        return saved["runs"], saved["alone"]
    print(f"measuring the driver alone (about {about}) ...", flush=True)
    alone: dict[str, Any] = run_child([str(script), "--driver-alone"], timeout=600).data
    print(f"driver alone: {alone['makespan']:.2f} s, CPU {alone['cpu']:.1f} s", flush=True)
    return [], alone


def cached_package(work: Path, deb: Path, name: str, version: str) -> StagedPackage:
    """``deb`` copied into ``work/cache`` under its SHA-256, as the download cache keeps a
    verified file (a sandbox node then stages it by hard link, as in the service)."""
    data = deb.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cached = work / "cache" / f"{digest}.deb"
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(data)
    return StagedPackage(
        name=name,
        version=version,
        kind=PackageKind.REGULAR,
        sha256=digest,
        path=cached,
        size=len(data),
    )


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


@dataclass(frozen=True, slots=True)
class LogProblems:
    errors: int
    """ERROR lines of the service's log."""
    locked: int
    """Lines saying ``database is locked`` (SQLite's busy timeout ran out)."""
    first_error: str | None


def log_problems(path: Path) -> LogProblems:
    errors, locked, first = 0, 0, None
    with contextlib.suppress(FileNotFoundError), path.open(errors="replace") as handle:
        for line in handle:
            if " ERROR " in line:
                errors += 1
                first = first or line.strip()[:240]
            if "database is locked" in line:
                locked += 1
    return LogProblems(errors=errors, locked=locked, first_error=first)


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


def calls_text(r: Mapping[str, Any]) -> str:
    """ ", sent in N calls" where the store sent fewer calls than it ran statements (the run
    journal's on PostgreSQL), else nothing."""
    calls = r.get("calls")
    if calls is None or calls == r["statements"]:
        return ""
    return f", sent in {calls} calls: a journal transaction's statements in one"


class SqlCounter:
    """Counts the SQL statements the store sends, by kind and table (a cheap engine hook)."""

    _TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)

    def __init__(self, engine: Any) -> None:
        self.total = 0
        self.calls = 0
        """Statements sent: on PostgreSQL a run journal transaction's statements are one
        call (``core.store.journal_pg``), counted once here and each in ``total``."""
        self.by_key: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        """Statements that raised, by exception and statement kind (e.g. IntegrityError)."""
        self._engine = engine.sync_engine
        sa_event.listen(self._engine, "before_cursor_execute", self._count)
        sa_event.listen(self._engine, "handle_error", self._error)

    def _count(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.calls += 1
        for one in statements_of(statement, parameters):
            self.total += 1
            match = self._TABLE.search(one)
            key = f"{one.split(None, 1)[0].upper()} {match.group(1) if match else '-'}"
            self.by_key[key] = self.by_key.get(key, 0) + 1

    def _error(self, context: Any) -> None:
        exc = context.original_exception
        statement = (context.statement or "-").split(None, 1)[0].upper()
        key = f"{type(exc).__name__} ({str(exc).splitlines()[0][:60]}) on {statement}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> tuple[int, dict[str, int]]:
        return self.total, dict(self.by_key)

    def close(self) -> None:
        sa_event.remove(self._engine, "before_cursor_execute", self._count)
        sa_event.remove(self._engine, "handle_error", self._error)


class LoopLag:
    """How late the event loop wakes a 50 ms sleeper: a measure of how blocked it is."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, loop.time() - planned))

    def start(self) -> None:
        self.lags.clear()
        self._task = asyncio.create_task(self._run(), name="bench-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self) -> dict[str, float]:
        return {
            "lag_p50": percentile(self.lags, 50),
            "lag_p99": percentile(self.lags, 99),
            "lag_max": max(self.lags, default=float("nan")),
            "lag_over_1s": float(sum(1 for x in self.lags if x > 1.0)),
        }


class StallRecorder:
    """Where the event loop's thread is when the loop stalls, and the collector's passes.

    A thread of its own looks every 20 ms at when the loop last ran a 20 ms ticker; while
    the ticker is more than ``threshold`` late it samples the loop thread's stack
    (``sys._current_frames``). ``gc.callbacks`` times every collection. Diagnostic only:
    the benchmarks turn it on with ``--stalls``.
    """

    def __init__(self, threshold: float = 0.3) -> None:
        self.threshold = threshold
        self.stalls: list[dict[str, Any]] = []
        self.gc_passes: list[tuple[int, float]] = []
        self._beat = 0.0
        self._gc_started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop_thread = threading.get_ident()

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_passes.append((info["generation"], time.perf_counter() - self._gc_started))

    async def _tick(self) -> None:
        while True:
            self._beat = time.perf_counter()
            await asyncio.sleep(0.02)

    def _watch(self) -> None:
        current: dict[str, Any] | None = None
        while not self._stop.wait(0.02):
            late = time.perf_counter() - self._beat
            if late < self.threshold:
                if current is not None:  # ended: its length is the last lateness seen
                    self.stalls.append(current)
                    current = None
                continue
            frame = sys._current_frames().get(self._loop_thread)
            stack = traceback.format_stack(frame, limit=14) if frame is not None else []
            where = "".join(line for line in stack if "/bench/" not in line)
            if current is None:
                current = {"at": time.time(), "seconds": late, "samples": {}}
            current["seconds"] = late
            current["samples"][where] = current["samples"].get(where, 0) + 1

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._beat = time.perf_counter()
        gc.callbacks.append(self._gc)
        self._task = asyncio.create_task(self._tick(), name="bench-stall-ticker")
        self._thread = threading.Thread(target=self._watch, name="bench-stalls", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self) -> dict[str, Any]:
        longest = sorted(self.stalls, key=lambda s: -s["seconds"])[:8]
        slow_gc = sorted(self.gc_passes, key=lambda g: -g[1])[:8]
        return {
            "stalls": [
                {
                    "seconds": s["seconds"],
                    "at": s["at"],
                    "samples": sorted(s["samples"].items(), key=lambda kv: -kv[1])[:3],
                }
                for s in longest
            ],
            "stall_count": len(self.stalls),
            "gc_passes": {
                str(g): [
                    sum(1 for x in self.gc_passes if x[0] == g),
                    sum(x[1] for x in self.gc_passes if x[0] == g),
                ]
                for g in (0, 1, 2)
            },
            "gc_slowest": slow_gc,
        }


# -- causes found (shared text of both benchmarks) ---------------------------------------

SQLITE_STALL = (
    "- **SQLite: the event loop stalls for the 10 s busy timeout, runs fail with `database "
    "is locked`.** `core/store/base.py` `StoreBase.__aenter__` opens SQLite with SQLAlchemy's "
    "default "
    "pool (up to 15 aiosqlite connections, each with its own thread) and `busy_timeout=10000`. "
    "Statements that raise (here first the `IntegrityError` of two in-process waiters "
    "inserting the same slot in `Store.try_take_slot`) leave unclosed sqlite3 cursors in "
    "reference cycles (exception, traceback, frame). Python's cyclic garbage collector later "
    "frees them **in the event-loop thread**: `cursor_clear` -> `sqlite3_reset`, which waits "
    "for the connection's mutex while that connection's thread sits in SQLite's busy handler "
    "waiting for the write lock, and the lock's holder is a coroutine that cannot run because "
    "the loop is blocked: a deadlock until the busy timeout (py-spy native stack of the stalled "
    "loop: `gc_collect_main` -> `cursor_clear` -> `stmt_reset` -> `sqlite3_reset` -> "
    "`pthread_mutex_lock`; another thread in `sqlite3InvokeBusyHandler`). Each stall makes "
    "more statements fail, so more garbage cursors, so more stalls; failed runs set update "
    "locks and stop the rollout. Fix: in `Store.__aenter__`, for SQLite use one connection "
    "(`pool_size=1, max_overflow=0`; SQLite has one writer anyway and `core/leader.py` "
    "allows one instance) or serialize `Store.transaction` with an `asyncio.Lock`, so that no "
    "connection ever waits in the busy handler inside the process. Tried here by patching the "
    "pool size in a scratch run on 2026-11-25 (not part of these scripts): no stall, no "
    "error, all 200 rollout runs succeeded, and the process used a third less CPU."
)
SLOT_POLLING = (
    "`core/lifecycle/slots.py` `SlotGate`: waiters do not poll. A slot freed by a run is "
    "handed to the first node of the cluster's queue in the freeing transaction "
    "(`Store.release_slot`); only that node is woken. Other changes (a queue place left, a "
    "slot freed without a hand-over) wake that cluster's waiters, who share one look at the "
    "store (`Store.slot_state`); other instances' changes are found by one statement for all "
    "waited-for clusters every `REMOTE_RECHECK` s. What is counted here: nodes joining the "
    "queue when they reach the slot step (a scheduled update's runs; a command's are queued "
    "when created), their looks, the takes of the first round and the hand-overs."
)
STEP_BOOKKEEPING = (
    "Step transitions, node and run changes, step and run ends and audit records go through "
    "the run journal (`core/store/journal.py`: what arrives while a transaction is written "
    "waits for the next one, which writes it with one statement per kind of row; a step "
    "starts only once its own record is committed). What is left per step: one journal "
    "commit per transition and per node change (few runs in flight fill no batch), the "
    "update lock check at S, taking and freeing the slot, and the events' subscribers; each "
    "statement is a hop to the store's connection (SQLite: one connection and its aiosqlite "
    "thread) and back to the one event-loop thread that serves every run, so on a loaded "
    "machine each hop waits for a turn of the loop."
)


class DriverTime:
    """When each node's driver was busy with its own operations: the real driver objects'
    methods are wrapped (nothing is replaced), each call's start and end kept per node.

    ``in_slot(node, start, end)`` is the time the node's driver spent in calls that lay
    between taking and freeing its cluster slot: the "driver's own operations inside one
    slot" that the rollout and schedule benchmarks' ideal is made of.
    """

    OPERATIONS = (
        "announce",
        "set_logon",
        "drain",
        "undrain",
        "disconnect_sessions",
        "install",
        "restart_services",
        "reboot",
        "post_check",
    )

    def __init__(self, drivers: dict[str, Any]) -> None:
        self.calls: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
        for name, driver in drivers.items():
            for operation in self.OPERATIONS:
                method = getattr(driver, operation, None)
                if method is not None:
                    setattr(driver, operation, self._timed(name, method))

    def _timed(self, node: str, method: Any) -> Any:
        calls = self.calls.setdefault(node, [])

        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = dt.datetime.now(dt.UTC)
            try:
                return await method(*args, **kwargs)
            finally:
                calls.append((start, dt.datetime.now(dt.UTC)))

        return timed

    def in_slot(self, node: str, start: dt.datetime, end: dt.datetime) -> float:
        return sum(
            (b - a).total_seconds() for a, b in self.calls.get(node, []) if a >= start and b <= end
        )


def first_notices(work: Path) -> dict[str, dt.datetime]:
    """Per sandbox node below ``work/nodes``, when its users were first shown a maintenance
    notice (messages.log has whole seconds: the time is rounded down)."""
    first: dict[str, dt.datetime] = {}
    for log in (work / "nodes").glob("*/messages.log"):
        with log.open(errors="replace") as handle:
            for line in handle:
                if "Maintenance of" in line:
                    first[log.parent.name] = dt.datetime.fromisoformat(line.split(" ", 1)[0])
                    break
    return first


async def api_command(session: Any, base: str, text: str) -> dict[str, Any]:
    """``POST /api/v1/command`` as the admin token; the benchmark stops on a refusal."""
    async with session.post(
        f"{base}/api/v1/command",
        json={"text": text},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        body = await response.text()
        if response.status != 200:
            raise SystemExit(f"{text!r}: HTTP {response.status}: {body[:500]}")
        reply: dict[str, Any] = json.loads(body)
        if not reply.get("ok"):
            raise SystemExit(f"{text!r} refused: {reply.get('text')}")
        return reply
