"""Which instance leads: only the leader runs timers, reminders, the outbox workers, the
hotfix watch and the recovery of orphaned runs. Every instance serves Slack and the API.

- PostgreSQL: leader election with an advisory lock held on a dedicated connection (the
  database is the coordination engine; no protocol of our own). Each instance also holds
  a "liveness" advisory lock of its own, so any instance can tell whether the owner of a
  run is still alive. When the leader dies its session ends and the lock is free at once;
  when it loses its connection it stops leading (and stops its runs, which the new leader
  resumes) within one check interval.
- SQLite: one instance only. A second instance on the same file refuses to start.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import asyncpg
from sqlalchemy.engine import make_url

from core.errors import TgopsError
from core.store import Store

log = logging.getLogger(__name__)

LEADER_LOCK = (74470, 1)
LIVENESS_NAMESPACE = 74471
Hook = Callable[[], Awaitable[None]]


class SecondInstanceError(TgopsError):
    def __init__(self, path: str, holder: str) -> None:
        super().__init__(
            f"another tgops instance ({holder}) already uses the SQLite store {path}; SQLite "
            "supports one instance: stop the other one, or use PostgreSQL (database_url = "
            '"postgresql+asyncpg://…") to run several'
        )


def liveness_key(instance: str) -> int:
    """A 32-bit signed key for an instance's liveness lock."""
    value = zlib.crc32(instance.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class Election(ABC):
    """Base: ``is_leader``, ``leader`` (best known), and hooks called on changes."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.is_leader = False
        self.since: datetime | None = None
        self.on_elected: Hook | None = None
        self.on_demoted: Hook | None = None
        self.on_disconnected: Hook | None = None

    @abstractmethod
    async def start(self) -> None:
        """Begin taking part in the election (hooks are set by now)."""

    async def leader(self) -> str | None:
        return self.instance if self.is_leader else None

    async def alive(self, instance: str | None) -> bool:
        """Whether ``instance`` is running (its runs must not be taken over)."""
        return instance == self.instance

    async def _elected(self) -> None:
        self.is_leader = True
        self.since = datetime.now(UTC)
        log.info("instance %s leads", self.instance)
        if self.on_elected is not None:
            await self.on_elected()

    async def _demoted(self, *, stopping: bool = False) -> None:
        """No longer the leader: a warning when the lead was lost, a note when this
        instance hands it over because it stops."""
        if not self.is_leader:
            return
        self.is_leader = False
        self.since = None
        if stopping:
            log.info("instance %s stops leading (shutting down)", self.instance)
        else:
            log.warning("instance %s no longer leads", self.instance)
        if self.on_demoted is not None:
            await self.on_demoted()


class SingleInstance(Election):
    """SQLite: this instance leads, and an exclusive lock file keeps a second one out."""

    def __init__(self, instance: str, database: str | None) -> None:
        super().__init__(instance)
        self._path = None if database in (None, "", ":memory:") else Path(f"{database}.lock")
        self._handle: IO[str] | None = None

    async def __aenter__(self) -> Self:
        """Take the store's lock file (a second instance fails here, at once)."""
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            handle = self._path.open("a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise SecondInstanceError(str(self._path.with_suffix("")), holder) from None
            handle.seek(0)
            handle.truncate()
            handle.write(self.instance)
            handle.flush()
            self._handle = handle
        return self

    async def start(self) -> None:
        await self._elected()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._demoted(stopping=True)
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class PostgresElection(Election):
    """Leader election over PostgreSQL advisory locks on a dedicated connection."""

    def __init__(self, instance: str, url: str, store: Store, *, interval: float) -> None:
        super().__init__(instance)
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._store = store
        self._interval = interval
        self._conn: asyncpg.Connection[Any] | None = None
        self._query = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def start(self) -> None:
        """Campaign from now on; waits (bounded) for the first round."""
        self._task = asyncio.create_task(self._run(), name="leader-election")
        try:
            async with asyncio.timeout(max(5.0, self._interval * 4)):
                await self.connected.wait()
        except TimeoutError:
            log.warning("leader election: no database connection yet; retrying")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._demoted(stopping=True)
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None:
            try:
                async with asyncio.timeout(2):
                    await conn.close()
            except (OSError, asyncpg.PostgresError, TimeoutError):
                conn.terminate()

    def _keepalive(self) -> dict[str, str]:
        """Server-side TCP keepalive for the election connection: if the leader's host
        vanishes without closing the connection (power loss, network partition), the
        database ends its session, and so frees the leader lock, within about half the
        takeover time instead of the kernel's default of hours."""
        probe = max(1, round(self._interval))
        return {
            "tcp_keepalives_idle": str(probe),
            "tcp_keepalives_interval": str(probe),
            "tcp_keepalives_count": "1",
            "tcp_user_timeout": str(probe * 2000),
        }

    async def _fetch(self, query: str, *args: Any) -> Any:
        if self._conn is None:
            raise ConnectionError("no leader-election connection")
        async with self._query, asyncio.timeout(self._interval):
            return await self._conn.fetchval(query, *args)

    async def _run(self) -> None:
        while True:
            try:
                self._conn = await asyncpg.connect(
                    self._dsn, timeout=self._interval, server_settings=self._keepalive()
                )
                await self._fetch(
                    "SELECT pg_advisory_lock($1, $2)",
                    LIVENESS_NAMESPACE,
                    liveness_key(self.instance),
                )
                self.connected.set()
                while True:
                    if not self.is_leader:
                        if await self._fetch("SELECT pg_try_advisory_lock($1, $2)", *LEADER_LOCK):
                            await self._store.kv_set(
                                "leader",
                                "current",
                                {"instance": self.instance, "since": datetime.now(UTC).isoformat()},
                            )
                            await self._elected()
                    else:
                        await self._fetch("SELECT 1")
                    self.connected.set()
                    await asyncio.sleep(self._interval)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, TimeoutError, ConnectionError) as exc:
                log.warning("leader election: database connection lost (%s)", exc)
            await self._demoted()
            await self._close()
            if self.on_disconnected is not None:
                await self.on_disconnected()
            await asyncio.sleep(self._interval)

    async def leader(self) -> str | None:
        if self.is_leader:
            return self.instance
        value = await self._store.kv_get("leader", "current")
        return str(value["instance"]) if isinstance(value, dict) else None

    async def alive(self, instance: str | None) -> bool:
        if instance is None:
            return False
        if instance == self.instance:
            return True
        key = liveness_key(instance)
        free = await self._fetch("SELECT pg_try_advisory_lock($1, $2)", LIVENESS_NAMESPACE, key)
        if free:
            await self._fetch("SELECT pg_advisory_unlock($1, $2)", LIVENESS_NAMESPACE, key)
        return not free


def election_for(
    url: str, instance: str, store: Store, *, interval: float
) -> SingleInstance | PostgresElection:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return PostgresElection(instance, url, store, interval=interval)
    return SingleInstance(instance, parsed.database)
