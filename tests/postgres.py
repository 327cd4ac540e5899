"""A throwaway PostgreSQL server on 127.0.0.1 for the tests, as tests/sshd.py starts sshd.

``start_postgres`` runs Debian's binaries (package postgresql, under
``/usr/lib/postgresql/VERSION/bin``): ``initdb`` into a new temporary directory, then
``postgres`` in the foreground on a free loopback port with its socket in that directory,
trust authentication for the superuser ``postgres`` and no fsync (the data is thrown away).
PostgreSQL refuses to run as root, so when the tests run as root (as CI does) the server
runs as the system user ``postgres`` (``nobody`` where that user is missing) and the
directory belongs to that user. On leaving, the server is stopped and the directory removed.

``session_url`` is the URL the PostgreSQL tests use: ``TGOPS_TEST_DATABASE_URL`` when it
is set, otherwise one throwaway server started on first use and stopped when the test
session ends (``stop_session_server``, called by tests/conftest.py).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

ENV_VARIABLE = "TGOPS_TEST_DATABASE_URL"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
MISSING = (
    "PostgreSQL's initdb and postgres were not found (under /usr/lib/postgresql/*/bin or on "
    "PATH): install the Debian package postgresql (scripts/setup --dev does it as root) or "
    f"set {ENV_VARIABLE} to a server's URL"
)
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_PORT_TRIES = 3
_READY = "database system is ready to accept connections"
_PORT_TAKEN = "Address already in use"


class PostgresStartError(Exception):
    """The throwaway server could not be initialised or did not become ready."""


def _version(directory: Path) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15`` -> (15,); names that are not versions sort first."""
    numbers = re.findall(r"\d+", directory.name)
    return tuple(int(n) for n in numbers) if numbers else (-1,)


def find_binaries(roots: Sequence[Path] = (DEBIAN_ROOT,), path: str | None = None) -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: the newest Debian version under
    ``roots``, else the directory of an ``initdb`` on ``path`` (default: PATH)."""
    candidates: list[Path] = []
    for root in roots:
        if root.is_dir():
            versions = sorted((d for d in root.iterdir() if d.is_dir()), key=_version)
            candidates.extend(d / "bin" for d in reversed(versions))
    on_path = shutil.which("initdb", path=path)
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres")):
            return directory
    return None


@dataclass(frozen=True)
class ServerUser:
    """Whom the server runs as: ``None`` ids mean the current user (not root)."""

    name: str
    uid: int | None
    gid: int | None


def server_user() -> ServerUser:
    if os.geteuid() != 0:
        return ServerUser(pwd.getpwuid(os.geteuid()).pw_name, None, None)
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return ServerUser(name, entry.pw_uid, entry.pw_gid)
    raise PostgresStartError(
        "the tests run as root and PostgreSQL refuses to: neither the user postgres nor "
        "nobody exists to run it as"
    )


@dataclass
class Postgres:
    """A running throwaway server: where it listens and what it logged."""

    port: int
    directory: Path
    process: subprocess.Popen[str]
    user: ServerUser
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.directory / "data"


def _run_as(user: ServerUser) -> dict[str, object]:
    """Popen keywords that run a command as ``user`` (nothing when it is the current one)."""
    if user.uid is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}


def _initdb(binaries: Path, directory: Path, user: ServerUser) -> None:
    try:
        done = subprocess.run(
            [
                str(binaries / "initdb"),
                "--pgdata",
                str(directory / "data"),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT,
            cwd=directory,
            env=_environment(),
            check=False,
            **_run_as(user),  # type: ignore[call-overload]
        )
    except subprocess.TimeoutExpired as error:
        raise PostgresStartError(f"initdb did not finish within {_START_TIMEOUT:.0f} s") from error
    if done.returncode != 0:
        raise PostgresStartError(
            f"initdb failed (exit status {done.returncode}) as user {user.name} in "
            f"{directory}:\n{done.stdout}{done.stderr}"
        )


def _launch(binaries: Path, directory: Path, user: ServerUser) -> Postgres:
    """One try at starting the server on a free port; the caller stops it."""
    port = free_port()
    process: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        [
            str(binaries / "postgres"),
            "-D",
            str(directory / "data"),
            "-p",
            str(port),
            "-k",
            str(directory),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=directory,
        env=_environment(),
        **_run_as(user),
    )
    server = Postgres(port=port, directory=directory, process=process, user=user)
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            server.log.append(line.rstrip("\n"))
            if _READY in line:
                ready.set()
        ready.set()  # the server ended: wake the waiter, which then reports the log

    server.reader = threading.Thread(target=drain, name=f"postgres-{port}-log", daemon=True)
    server.reader.start()
    ready.wait(_START_TIMEOUT)
    return server


def _stop(server: Postgres) -> None:
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, then exit
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)
    # The log reader ends at the end of the server's output; only then is the pipe closed
    # (closing it under a reading thread makes that thread fail).
    if server.reader is not None:
        server.reader.join(timeout=_STOP_TIMEOUT)
        if server.reader.is_alive():
            return
    if process.stderr is not None:
        process.stderr.close()


def _ready(server: Postgres) -> bool:
    return server.process.poll() is None and any(_READY in line for line in server.log)


@contextmanager
def start_postgres(binaries: Path, parent: Path | None = None) -> Iterator[Postgres]:
    """A throwaway server from ``binaries`` (see ``find_binaries``) in a new directory
    under ``parent`` (default: the system's temporary directory), removed on leaving."""
    user = server_user()
    with ExitStack() as cleanup:
        directory = Path(tempfile.mkdtemp(prefix="tgops-postgres-", dir=parent))
        cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
        if user.uid is not None and user.gid is not None:
            os.chown(directory, user.uid, user.gid)
        _initdb(binaries, directory, user)
        for _ in range(_PORT_TRIES):
            server = _launch(binaries, directory, user)
            if _ready(server):
                break
            _stop(server)
            if not any(_PORT_TAKEN in line for line in server.log):
                break  # another cause than a lost race for the port: trying again won't help
        if not _ready(server):
            raise PostgresStartError(
                f"postgres did not start within {_START_TIMEOUT:.0f} s as user {user.name} "
                f"on 127.0.0.1:{server.port}:\n" + "\n".join(server.log)
            )
        cleanup.callback(_stop, server)
        yield server


@dataclass
class _Session:
    """The test session's own server, started on first use."""

    stack: ExitStack | None = None
    server: Postgres | None = None
    failure: PostgresStartError | None = None


_session = _Session()


def session_server() -> Postgres | None:
    """The throwaway server of this test session (``None`` before ``session_url`` started it)."""
    return _session.server


def session_url() -> str | None:
    """The PostgreSQL URL for the tests: ``TGOPS_TEST_DATABASE_URL`` if set, otherwise the
    session's throwaway server (started now if need be); ``None`` without PostgreSQL binaries.
    Raises ``PostgresStartError`` (every time, after trying once) when the server fails."""
    configured = os.environ.get(ENV_VARIABLE)
    if configured:
        return configured
    if _session.server is not None:
        return _session.server.url
    if _session.failure is not None:
        raise _session.failure
    binaries = find_binaries()
    if binaries is None:
        return None
    stack = ExitStack()
    try:
        _session.server = stack.enter_context(start_postgres(binaries))
    except PostgresStartError as error:
        stack.close()
        _session.failure = error
        raise
    _session.stack = stack
    atexit.register(stop_session_server)  # also when pytest ends without unconfiguring
    return _session.server.url


def stop_session_server() -> None:
    """Stop the session's throwaway server and remove its directory (idempotent)."""
    stack, _session.stack, _session.server = _session.stack, None, None
    if stack is not None:
        stack.close()
