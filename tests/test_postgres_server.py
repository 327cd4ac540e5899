"""The PostgreSQL the tests use: TGOPS_TEST_DATABASE_URL, or a throwaway server of their own."""

from __future__ import annotations

import os
import pwd
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from tests.databases import NO_POSTGRES, POSTGRES_URL
from tests.postgres import (
    ENV_VARIABLE,
    PostgresStartError,
    find_binaries,
    session_server,
    start_postgres,
)

BINARIES = find_binaries()
needs_binaries = pytest.mark.skipif(BINARIES is None, reason=NO_POSTGRES)


async def ask(url: str, *statements: str) -> list[tuple[object, ...]]:
    """Run ``statements`` in one transaction; the rows of the last one."""
    engine = create_async_engine(url)
    rows: list[tuple[object, ...]] = []
    try:
        async with engine.begin() as conn:
            for sql in statements:
                result = await conn.exec_driver_sql(sql)
                rows = [tuple(row) for row in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()
    return rows


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the server's user can enter (pytest's tmp_path is private to root)."""
    with tempfile.TemporaryDirectory(prefix="tgops-test-") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def process_uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("Uid:")]
    return [int(uid) for uid in line.split()[1:]]


def script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.postgres
@pytest.mark.skipif(POSTGRES_URL is None, reason=NO_POSTGRES)
async def test_the_postgresql_tests_reach_the_variable_or_the_session_server() -> None:
    assert POSTGRES_URL is not None
    [(data_directory, port)] = await ask(
        POSTGRES_URL, "SELECT current_setting('data_directory'), inet_server_port()"
    )
    configured = os.environ.get(ENV_VARIABLE)
    if configured:
        assert configured == POSTGRES_URL
        assert port == (urlsplit(configured).port or 5432)
    else:
        server = session_server()
        assert server is not None
        assert server.url == POSTGRES_URL
        assert (data_directory, port) == (str(server.data), server.port)


@needs_binaries
async def test_a_throwaway_server_runs_unprivileged_and_leaves_nothing_behind(
    shared_dir: Path,
) -> None:
    assert BINARIES is not None
    expected_uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    with start_postgres(BINARIES, parent=shared_dir) as server:
        assert server.directory.parent == shared_dir
        assert server.data.stat().st_uid == expected_uid  # never root: PostgreSQL refuses
        assert process_uids(server.process.pid) == [expected_uid] * 4  # real, effective, ...
        assert (server.directory / f".s.PGSQL.{server.port}").is_socket()
        await ask(server.url, "CREATE TABLE t (n int)", "INSERT INTO t VALUES (1), (2)")
        assert await ask(server.url, "SELECT sum(n), current_user FROM t") == [(3, "postgres")]
    assert server.process.poll() is not None
    assert names(shared_dir) == []
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.port), timeout=5),
    ):
        pass


def test_the_newest_complete_debian_version_is_chosen(tmp_path: Path) -> None:
    for version, names in (("13", ("initdb", "postgres")), ("15", ("initdb", "postgres"))):
        (tmp_path / version / "bin").mkdir(parents=True)
        for name in names:
            script(tmp_path / version / "bin" / name, "exit 0")
    (tmp_path / "16" / "bin").mkdir(parents=True)
    script(tmp_path / "16" / "bin" / "initdb", "exit 0")  # no postgres: incomplete
    assert find_binaries([tmp_path], path="") == tmp_path / "15" / "bin"
    assert find_binaries([tmp_path / "none"], path="") is None
    assert find_binaries([tmp_path / "none"], path=str(tmp_path / "13" / "bin")) == (
        tmp_path / "13" / "bin"
    )


def test_a_failing_initdb_is_one_error_with_its_output(shared_dir: Path) -> None:
    binaries = shared_dir / "bin"
    binaries.mkdir(mode=0o755)
    script(binaries / "initdb", "echo 'initdb: invalid locale settings' >&2; exit 1")
    script(binaries / "postgres", "exit 0")
    with pytest.raises(PostgresStartError) as info, start_postgres(binaries, parent=shared_dir):
        pass
    assert "initdb failed (exit status 1)" in str(info.value)
    assert "initdb: invalid locale settings" in str(info.value)
    assert names(shared_dir) == ["bin"]


@needs_binaries
def test_a_server_that_does_not_start_is_one_error_with_its_log(shared_dir: Path) -> None:
    assert BINARIES is not None
    binaries = shared_dir / "bin"
    binaries.mkdir(mode=0o755)
    (binaries / "initdb").symlink_to(BINARIES / "initdb")
    script(binaries / "postgres", "echo 'FATAL:  could not create shared memory segment' >&2")
    with pytest.raises(PostgresStartError) as info, start_postgres(binaries, parent=shared_dir):
        pass
    assert "postgres did not start" in str(info.value)
    assert "FATAL:  could not create shared memory segment" in str(info.value)
    assert names(shared_dir) == ["bin"]
