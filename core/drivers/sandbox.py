"""The sandbox driver: a node SIMULATED in a directory, for the demo and for tests.

This is a simulator, not a way to manage a real server (that is ``local`` and ``ssh``).
Packages are real ``.deb`` files, unpacked with ``dpkg-deb`` (no maintainer script runs).
Other programs (the demo console, tests, benchmarks) read and write these files in ``ROOT``:

``sessions.json``
    A JSON list of ``{"user": NAME}`` (optionally ``"id"``): the logged-in users. A missing
    file means nobody is logged in. ``disconnect_sessions`` empties it.
``messages.log``
    One line per notice shown to users: ``<ISO timestamp> <message>`` (newlines in a
    message become spaces). Lines are appended with one ``write`` each.
``faults.json`` (optional)
    ``{"<operation>": "message"}`` makes the next call of that operation fail with that
    message and removes the key (one-shot). ``{"unreachable": "message"}`` makes every
    operation fail with ``NodeUnreachableError`` until the key is removed.
    ``{"delay": {"<operation>": SECONDS}}`` makes that operation take that long, every time.
    Operations: the ``NodeDriver`` method names (``OPERATIONS``).
``state.json`` (written by the driver)
    ``installed`` {package: version}, ``logon_enabled``, ``lb`` ("in"/"drained", null for a
    single system), ``restart_required``, ``staged`` {package: version}, ``last_reboot``,
    ``last_services_restart`` (ISO times or null) and ``files`` {package: {path: sha256}}
    (what ``install`` unpacked, for the integrity check). Absent: nothing installed, logon
    enabled, in load balancing (cluster nodes).
``staged/``
    Staged ``.deb`` files, ``<name>_<version>.deb``.
``fs/``
    The simulated file system the packages are unpacked into.

Every file except ``messages.log`` is replaced atomically (temporary file in the same
directory, then exchanged with the old file or renamed over it, ``_write_atomic``), so a
reader never sees half a file. The small JSON files
are not fsync'd: a simulated node needs no durability against a power loss, and an
fsync on the event loop's thread would stall every other run (the staged copies of
packages are fsync'd, in a worker thread).

All sandbox nodes of one process share this machine's processor cores: ``install``
unpacks (the hash of the staged file, ``dpkg-deb -f`` and ``-X``, the hash of what was
unpacked) on at most as many nodes at once as the process may use cores (``Unpacks``);
the others wait their turn in order. A hundred simulated nodes unpacking at the same
moment on two cores would only make each unpack slower and keep the nodes in step, every
one finishing at the end of the burst (bench/RESULTS.md, "Eleventh pass"). A turn is one
hand-over to a worker thread that does all four one after another (``_unpack``), so the
next node's turn does not wait for the busy event loop between them. A real node
unpacks on its own processor, so the real drivers have no such limit.

It is over 600 lines on purpose: the simulated node's whole file format (state,
sessions, faults, messages) and every driver operation stay in one place, so that the
demo, tests and benchmarks that write these files have one module to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import shlex
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from core.drivers.checkurl import check_url
from core.drivers.shell import Completed, Programs, run_process
from core.drivers.staging import sha256_file, staged_file_name
from core.errors import DriverError, NodeUnreachableError
from core.interfaces import OutputSink
from core.model import (
    CommandOutput,
    InstallResult,
    IntegrityMismatch,
    LbState,
    NodeStatus,
    PackageKind,
    Session,
    StagedPackage,
)

log = logging.getLogger(__name__)

Operation = Literal[
    "status",
    "announce",
    "set_logon",
    "drain",
    "undrain",
    "disconnect_sessions",
    "stage",
    "install",
    "restart_services",
    "reboot",
    "post_check",
    "verify_integrity",
]

OPERATIONS: tuple[str, ...] = get_args(Operation)
"""Operation names as used in ``faults.json`` (the ``NodeDriver`` method names)."""

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class _Unpacked:
    """What unpacking one package on a worker thread came to: the files it put down with
    their SHA-256, or why it was refused (a failed program is in the programs' list)."""

    files: dict[str, str] = field(default_factory=dict)
    refused: str | None = None


class _SessionEntry(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    user: str = Field(min_length=1)
    id: str | int | None = None


_SESSIONS = TypeAdapter(list[_SessionEntry])


class _Faults(BaseModel):
    """``faults.json``: one-shot failures per operation, ``unreachable``, ``delay``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unreachable: str | None = None
    delay: dict[Operation, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    status: str | None = None
    announce: str | None = None
    set_logon: str | None = None
    drain: str | None = None
    undrain: str | None = None
    disconnect_sessions: str | None = None
    stage: str | None = None
    install: str | None = None
    restart_services: str | None = None
    reboot: str | None = None
    post_check: str | None = None
    verify_integrity: str | None = None

    def one_shot(self, operation: str) -> str | None:
        value = getattr(self, operation)
        return value if isinstance(value, str) else None


class _State(BaseModel):
    """``state.json``, written by the driver."""

    model_config = ConfigDict(extra="ignore")

    installed: dict[str, str] = Field(default_factory=dict)
    logon_enabled: bool = True
    lb: LbState | None = "in"
    restart_required: bool = False
    staged: dict[str, str] = Field(default_factory=dict)
    last_reboot: datetime | None = None
    last_services_restart: datetime | None = None
    files: dict[str, dict[str, str]] = Field(default_factory=dict)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        problems.append(f"{where.lstrip('.') or 'top level'}: {error['msg']}")
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


T = TypeVar("T")

_SETTLED = 0.05
"""Seconds after its last change from which ``faults.json`` is read from memory while it
stays unchanged (file system clocks tick every few milliseconds)."""


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one,
    never part of either: the data goes to a new file in the same directory, which then
    takes ``path``'s place. Where ``path`` exists the two names are exchanged in one step
    (``renameat2`` with ``RENAME_EXCHANGE``) and the old file, now under the temporary
    name, is removed; a first write, and a file system or kernel without the exchange, use
    ``os.replace``. On ext4 a rename over an existing file makes the kernel allocate and
    start writing out the new file's blocks at once (``auto_da_alloc``): 150 to 550 us per
    write on this project's test machine against about 50 us exchanged (bench/RESULTS.md,
    "Eleventh pass"); a simulated node writes its state about ten times per update."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if _exchanged(tmp, path):
            os.unlink(tmp)  # the old file
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc 2.28 and later), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_exchange: Any = _renameat2()


def _exchanged(tmp: str, path: Path) -> bool:
    """Exchange the names ``tmp`` and ``path`` atomically; False (nothing changed) where
    ``path`` does not exist yet, the exchange is refused, or the file system or kernel has
    no exchange (then it is not tried again in this process)."""
    global _exchange  # noqa: PLW0603 - learnt once per process
    if _exchange is None:
        return False
    if _exchange(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        _exchange = None  # this file system or kernel has no exchange
    # otherwise (no file yet, or refused) os.replace is tried, and says why if it fails too
    return False


def _json_bytes(value: Any, *, one_line: bool = False) -> bytes:
    """``value`` as JSON: indented for files people edit, on one line for the state the
    driver writes at every operation (json's C encoder: indenting takes the pure-Python
    one, about 2 % of the service's CPU in a 1,000-node update)."""
    if one_line:
        return (json.dumps(value, sort_keys=True) + "\n").encode()
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _copy_verified(source: Path, target: Path, sha256: str) -> str | None:
    """Copy ``source`` to ``target`` atomically if the copy hashes to ``sha256``.

    Returns the copy's SHA-256 when it differs (nothing is left behind then), else None.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = sha256_file(Path(tmp))
        if actual != sha256:
            os.unlink(tmp)
            return actual
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return None


def _from_cache(source: Path, sha256: str, size: int | None) -> bool:
    """Whether ``source`` is a verified file of the content cache: named by its SHA-256
    (the cache gives a file that name only once its hash was checked) and of the size the
    manifest says."""
    if size is None or source.name != f"{sha256}.deb":
        return False
    try:
        return source.stat().st_size == size
    except OSError:
        return False


def _link_verified(source: Path, target: Path) -> bool:
    """Stage the cache's verified ``source`` as ``target`` without copying its bytes: a
    hard link (read-only: it shares the cache's copy) on the same file system. False when
    the file systems differ or links are refused (then it is copied)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise
    try:
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


class Unpacks:
    """At most ``limit`` sandbox installs of one process unpack at once (module doc); the
    others wait in the order they came. One limiter serves every event loop of the process
    (tests run many), each loop with its own queue. ``peak`` is the most that ever unpacked
    at once."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the unpack limit must be 1 or more, not {limit}")
        self.limit = limit
        self.peak = 0
        self._busy = 0
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._queues = weakref.WeakKeyDictionary()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = asyncio.Semaphore(self.limit)
        async with queue:
            self._busy += 1
            self.peak = max(self.peak, self._busy)
            try:
                yield
            finally:
                self._busy -= 1


UNPACKS = Unpacks(len(os.sched_getaffinity(0)))
"""The limit every ``SandboxDriver`` uses unless it is given another: the cores this
process may run on."""


class SandboxDriver:
    """A node SIMULATED in the directory ``root`` (see the module doc for its files).

    For the demo and for tests only; real hosts are driven by ``LocalDriver``/``SshDriver``.
    ``clustered`` says whether the node belongs to a cluster (load balancing applies) or is
    a single system (``lb`` is None and drain/undrain do nothing).
    """

    def __init__(
        self,
        name: str,
        root: Path,
        *,
        clustered: bool,
        output: OutputSink | None = None,
        command_timeout: float = 600.0,
        check_url: str | None = None,
        tz: tzinfo = UTC,
        unpacks: Unpacks = UNPACKS,
    ) -> None:
        self.name = name
        self.tz = tz
        """The zone of the stamps in ``messages.log`` (the service's time zone)."""
        self.root = Path(root)
        self.clustered = clustered
        self._output = output
        self._timeout = command_timeout
        self._check_url = check_url
        self._faults_seen: tuple[tuple[int, int, int], _Faults] | None = None
        self._unpacks = unpacks

    # -- files ------------------------------------------------------------------------

    @property
    def sessions_file(self) -> Path:
        return self.root / "sessions.json"

    @property
    def messages_file(self) -> Path:
        return self.root / "messages.log"

    @property
    def faults_file(self) -> Path:
        return self.root / "faults.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def staged_dir(self) -> Path:
        return self.root / "staged"

    @property
    def fs_dir(self) -> Path:
        return self.root / "fs"

    def _read_json(
        self, path: Path, operation: str, expected: str, *, shown: Path | None = None
    ) -> Any:
        """The parsed file, or None when it does not exist; errors name ``shown``."""
        shown = shown or path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DriverError(self.name, operation, f"{shown}: cannot read: {exc}") from exc
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DriverError(
                self.name,
                operation,
                f"{shown}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                f"expected {expected} (fix or remove the file)",
            ) from exc

    def _in_root(self, make: Callable[[], T]) -> T:
        """``make()`` (a file of the node), the node's directory made first when missing:
        only its first file pays for the ``mkdir``."""
        try:
            return make()
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True)
            return make()

    def _write(self, path: Path, data: bytes, operation: str) -> None:
        try:
            self._in_root(lambda: _write_atomic(path, data))
        except OSError as exc:
            raise DriverError(self.name, operation, f"{path}: cannot write: {exc}") from exc

    def _load_state(self, operation: str) -> _State:
        expected = "the driver's state object"
        raw = self._read_json(self.state_file, operation, expected)
        if raw is None:
            return _State(lb="in" if self.clustered else None)
        try:
            state = _State.model_validate(raw)
        except ValidationError as exc:
            raise DriverError(
                self.name,
                operation,
                f"{self.state_file}: {_describe(exc)} (fix it, or remove it to start afresh)",
            ) from exc
        if not self.clustered:
            state.lb = None
        elif state.lb is None:
            state.lb = "in"
        return state

    def _save_state(self, state: _State, operation: str) -> None:
        state_json = _json_bytes(state.model_dump(mode="json"), one_line=True)
        self._write(self.state_file, state_json, operation)

    def _sessions(self, operation: str, path: Path | None = None) -> tuple[Session, ...]:
        path = path or self.sessions_file
        expected = 'a list of {"user": NAME}'
        raw = self._read_json(path, operation, expected, shown=self.sessions_file)
        if raw is None:
            return ()
        try:
            entries = _SESSIONS.validate_python(raw)
        except ValidationError as exc:
            raise DriverError(
                self.name,
                operation,
                f"{self.sessions_file}: {_describe(exc)}; expected {expected}",
            ) from exc
        return tuple(Session(user=e.user, id="" if e.id is None else str(e.id)) for e in entries)

    def _faults(self, operation: str) -> _Faults:
        """``faults.json`` as read last time when the file has not changed since (same
        inode, size and modification time, and that time older than ``_SETTLED`` seconds:
        a file rewritten in place within one tick of the file system's clock keeps its
        time, so a file that recent is read again), otherwise read and checked."""
        try:
            info = os.stat(self.faults_file)
        except FileNotFoundError:
            return _Faults()
        except OSError as exc:
            raise DriverError(
                self.name, operation, f"{self.faults_file}: cannot read: {exc}"
            ) from exc
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        seen = self._faults_seen
        if seen is not None and seen[0] == key:
            return seen[1]
        faults = self._read_faults(operation)
        settled = time.time_ns() - info.st_mtime_ns > _SETTLED * 1e9
        self._faults_seen = (key, faults) if settled else None
        return faults

    def _read_faults(self, operation: str) -> _Faults:
        expected = '{"<operation>": "message", "unreachable": "message", "delay": {...}}'
        raw = self._read_json(self.faults_file, operation, expected)
        if raw is None:
            return _Faults()
        try:
            return _Faults.model_validate(raw)
        except ValidationError as exc:
            raise DriverError(
                self.name,
                operation,
                f"{self.faults_file}: {_describe(exc)}; accepted keys: unreachable, delay, "
                + ", ".join(OPERATIONS),
            ) from exc

    async def _begin(self, operation: str) -> None:
        """Apply ``faults.json`` to this call of ``operation``."""
        faults = self._faults(operation)
        if faults.unreachable is not None:
            raise NodeUnreachableError(
                self.name,
                operation,
                f"{faults.unreachable} (simulated: remove 'unreachable' from {self.faults_file})",
            )
        delay = {str(op): seconds for op, seconds in faults.delay.items()}.get(operation)
        if delay:
            log.debug("node %s: %s: simulated delay of %ss", self.name, operation, delay)
            await asyncio.sleep(delay)
        message = faults.one_shot(operation)
        if message is None:
            return
        raw = self._read_json(self.faults_file, operation, "an object")
        if isinstance(raw, dict) and operation in raw:
            del raw[operation]
            self._write(self.faults_file, _json_bytes(raw), operation)
        log.info("node %s: %s: simulated fault: %s", self.name, operation, message)
        raise DriverError(self.name, operation, message)

    async def _run(self, operation: str, argv: Sequence[str]) -> Completed:
        result = await run_process(argv, node=self.name, operation=operation, limit=self._timeout)
        await self._report(operation, argv, result)
        return result

    async def _report(self, operation: str, argv: Sequence[str], result: Completed) -> None:
        """Hand a program's output to the output sink; a failed one is this operation's
        error."""
        await self._emit(operation, argv, result)
        if result.exit_status != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise DriverError(
                self.name,
                operation,
                f"exit {result.exit_status}: {last[-1] if last else 'no output'}",
            )

    async def _emit(self, operation: str, argv: Sequence[str], result: Completed) -> None:
        if self._output is not None:
            await self._output(
                CommandOutput(
                    operation=operation,
                    command=shlex.join(argv),
                    exit_status=result.exit_status,
                    stdout=result.stdout,
                    stderr=result.stderr,
                    at=datetime.now(UTC),
                )
            )

    # -- NodeDriver ---------------------------------------------------------------------

    async def status(self) -> NodeStatus:
        await self._begin("status")
        state = self._load_state("status")
        return NodeStatus(
            installed=dict(state.installed),
            sessions=self._sessions("status"),
            logon_enabled=state.logon_enabled,
            lb=state.lb,
            restart_required=state.restart_required,
            staged=dict(state.staged),
        )

    async def announce(self, message: str) -> None:
        await self._begin("announce")
        line = " ".join(message.splitlines()).strip()
        entry = f"{datetime.now(self.tz).isoformat(timespec='seconds')} {line}\n".encode()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            fd = self._in_root(lambda: os.open(self.messages_file, flags, 0o644))
            try:
                os.write(fd, entry)
            finally:
                os.close(fd)
        except OSError as exc:
            raise DriverError(
                self.name, "announce", f"{self.messages_file}: cannot append: {exc}"
            ) from exc
        log.info("node %s: announce: %s", self.name, line)

    async def set_logon(self, enabled: bool) -> None:
        await self._begin("set_logon")
        state = self._load_state("set_logon")
        state.logon_enabled = enabled
        self._save_state(state, "set_logon")
        log.info("node %s: set_logon: %s", self.name, "enabled" if enabled else "disabled")

    async def _set_lb(self, operation: str, value: LbState) -> None:
        await self._begin(operation)
        if not self.clustered:
            log.debug("node %s: %s: single system, no load balancing", self.name, operation)
            return
        state = self._load_state(operation)
        state.lb = value
        self._save_state(state, operation)
        log.info("node %s: %s: load balancing %s", self.name, operation, value)

    async def drain(self) -> None:
        await self._set_lb("drain", "drained")

    async def undrain(self) -> None:
        await self._set_lb("undrain", "in")

    async def disconnect_sessions(self) -> int:
        await self._begin("disconnect_sessions")
        operation = "disconnect_sessions"
        # Take the file away atomically, so a logon written meanwhile is not lost, then
        # leave an empty list unless another program has written a new file already.
        taken = self.root / f".sessions.ending.{os.getpid()}.{id(self)}"
        try:
            os.rename(self.sessions_file, taken)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise DriverError(self.name, operation, f"{self.sessions_file}: {exc}") from exc
        try:
            sessions = self._sessions(operation, taken)
        except DriverError:
            os.replace(taken, self.sessions_file)  # put the bad file back for inspection
            raise
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".sessions.json.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"[]\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.sessions_file)
        finally:
            os.unlink(tmp)
            os.unlink(taken)
        log.info("node %s: %s: ended %d session(s)", self.name, operation, len(sessions))
        return len(sessions)

    async def stage(self, packages: Sequence[StagedPackage]) -> None:
        await self._begin("stage")
        try:
            self.staged_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DriverError(self.name, "stage", f"{self.staged_dir}: {exc}") from exc
        for package in packages:
            target = self.staged_dir / staged_file_name(package.name, package.version)
            try:
                if _from_cache(package.path, package.sha256, package.size) and _link_verified(
                    package.path, target
                ):
                    actual = None  # the cache's verified file itself: size and hash checked
                else:
                    actual = await asyncio.to_thread(
                        _copy_verified, package.path, target, package.sha256
                    )
            except OSError as exc:
                raise DriverError(
                    self.name, "stage", f"copying {package.path} to {target}: {exc}"
                ) from exc
            if actual is not None:
                raise DriverError(
                    self.name,
                    "stage",
                    f"{package.name} {package.version}: the copy's SHA-256 is {actual}, "
                    f"expected {package.sha256}; nothing staged (download it again)",
                )
            state = self._load_state("stage")
            old = state.staged.get(package.name)
            if old is not None and old != package.version:
                with contextlib.suppress(FileNotFoundError):
                    (self.staged_dir / staged_file_name(package.name, old)).unlink()
            state.staged[package.name] = package.version
            self._save_state(state, "stage")
            log.info("node %s: stage: %s %s", self.name, package.name, package.version)

    async def install(self, packages: Sequence[StagedPackage]) -> InstallResult:
        operation = "install"
        await self._begin(operation)
        state = self._load_state(operation)
        for package in packages:
            path = self.staged_dir / staged_file_name(package.name, package.version)
            if state.staged.get(package.name) != package.version or not path.is_file():
                raise DriverError(
                    self.name,
                    operation,
                    f"{package.name} {package.version} is not staged; stage (download) it "
                    "before installing",
                )
        installed: dict[str, str] = {}
        output: list[str] = []
        for package in packages:
            async with self._unpacks.turn():
                path = self.staged_dir / staged_file_name(package.name, package.version)
                programs = Programs(node=self.name, operation=operation, limit=self._timeout)
                try:
                    unpacked = await programs.hand_over(
                        functools.partial(self._unpack, package=package, path=path)
                    )
                except DriverError:
                    # what ran before the failure (a timeout, a program that cannot start)
                    for argv, result in programs.ran:
                        await self._emit(operation, argv, result)
                    raise
                for argv, result in programs.ran:
                    await self._report(operation, argv, result)
                if unpacked.refused is not None:
                    raise DriverError(self.name, operation, unpacked.refused)
                files = unpacked.files
                state = self._load_state(operation)
                for stale in set(state.files.get(package.name, {})) - set(files):
                    with contextlib.suppress(FileNotFoundError):
                        (self.fs_dir / stale.lstrip("/")).unlink()
                state.files[package.name] = files
                state.installed[package.name] = package.version
                state.staged.pop(package.name, None)
                if package.kind is PackageKind.CORE:
                    state.restart_required = True
                self._save_state(state, operation)
                path.unlink()
                installed[package.name] = package.version
                output.append(f"unpacked {package.name} {package.version}: {len(files)} files")
                log.info("node %s: install: %s %s", self.name, package.name, package.version)
        state = self._load_state(operation)
        return InstallResult(
            installed=installed,
            restart_required=state.restart_required,
            output="\n".join(output),
        )

    def _unpack(self, programs: Programs, *, package: StagedPackage, path: Path) -> _Unpacked:
        """On a thread of the process pool, in one hand-over: check the staged file's
        SHA-256, read its control fields, unpack it and hash what it put down. A program
        that fails ends the work (``install`` reports it from ``programs.ran``)."""
        actual = sha256_file(path)
        if actual != package.sha256:
            return _Unpacked(
                refused=f"staged {path.name} has SHA-256 {actual}, expected {package.sha256}; "
                "it was changed after staging (download it again)"
            )
        fields = programs.run(["dpkg-deb", "-f", str(path), "Package", "Version"])
        if fields.exit_status != 0:
            return _Unpacked()
        control = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
        if (control.get("Package"), control.get("Version")) != (package.name, package.version):
            return _Unpacked(
                refused=f"{path.name} contains {control.get('Package')} "
                f"{control.get('Version')}, not {package.name} {package.version}; refused"
            )
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        unpacked = programs.run(["dpkg-deb", "-X", str(path), str(self.fs_dir)])
        if unpacked.exit_status != 0:
            return _Unpacked()
        return _Unpacked(files=self._hash_unpacked(unpacked.stdout))

    def _hash_unpacked(self, listing: str) -> dict[str, str]:
        """SHA-256 of every regular file ``dpkg-deb -X`` listed, keyed by absolute path."""
        files: dict[str, str] = {}
        for line in listing.splitlines():
            rel = line.removeprefix("./")
            if not rel or rel.endswith("/"):
                continue
            path = self.fs_dir / rel
            if path.is_symlink() or not path.is_file():
                continue
            files["/" + rel] = sha256_file(path)
        return files

    async def restart_services(self) -> None:
        await self._begin("restart_services")
        state = self._load_state("restart_services")
        state.last_services_restart = datetime.now(UTC)
        self._save_state(state, "restart_services")
        log.info("node %s: restart_services: done", self.name)

    async def reboot(self) -> None:
        await self._begin("reboot")
        state = self._load_state("reboot")
        state.last_reboot = datetime.now(UTC)
        state.restart_required = False
        self._save_state(state, "reboot")
        log.info("node %s: reboot: done", self.name)

    async def post_check(self) -> None:
        await self._begin("post_check")
        if self._check_url is not None:
            await check_url(self.name, self._check_url, limit=min(self._timeout, 60.0))

    async def verify_integrity(self) -> list[IntegrityMismatch]:
        await self._begin("verify_integrity")
        state = self._load_state("verify_integrity")
        return await asyncio.to_thread(self._verify, state.files)

    def _verify(self, recorded: Mapping[str, Mapping[str, str]]) -> list[IntegrityMismatch]:
        mismatches: list[IntegrityMismatch] = []
        for package in sorted(recorded):
            for path, expected in sorted(recorded[package].items()):
                local = self.fs_dir / path.lstrip("/")
                try:
                    actual = sha256_file(local)
                except FileNotFoundError:
                    problem = "missing"
                except OSError as exc:
                    problem = f"unreadable: {exc.strerror or exc}"
                else:
                    if actual == expected:
                        continue
                    problem = "checksum differs"
                mismatches.append(IntegrityMismatch(package=package, path=path, problem=problem))
        return mismatches

    async def aclose(self) -> None:
        return None
