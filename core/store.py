"""The durable store (SQLAlchemy 2 asyncio): SQLite by default, PostgreSQL when configured.

Every state change of the lifecycle is written here first; events are published after.
Migrations (Alembic) are applied at start-up, idempotently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, delete, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core import tables as t
from core.errors import StoreError

log = logging.getLogger(__name__)

ACTIVE_RUN_STATES = ("queued", "running")
R = TypeVar("R")


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoreUnavailableError(StoreError):
    def __init__(self, url: str, cause: str) -> None:
        super().__init__(
            f"database {url}: cannot be opened ({cause}); check database_url and that the "
            "server is running"
        )


class NodeBusyError(StoreError):
    def __init__(self, node: str, run_id: int) -> None:
        self.node = node
        self.run_id = run_id
        super().__init__(
            f"node {node} is busy with run #{run_id}; wait for it to end (see `log {node}`)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEnd:
    """Whose run ended, for its audit record (``Store.finish_run``)."""

    kind: str
    node: str
    message: str = ""
    """What the run did (the detail when it ended without an error)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRun:
    """A run to create (``Store.create_runs``)."""

    kind: str
    node: str
    target: str
    actor: str
    params: Mapping[str, Any]
    owner: str | None = None
    exclusive: bool = True
    audit: str | None = None
    """Detail of the run's audit record ("run KIND"); ``{run}`` is its number. None: none."""
    audit_source: str = "system"
    slot_queue: str | None = None
    """Cluster whose slot queue the node joins with the run (in command order)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    name: str
    cluster: str | None
    driver: str
    installed: Mapping[str, str] = field(default_factory=dict)
    staged: Mapping[str, str] = field(default_factory=dict)
    sessions: int = 0
    logon_enabled: bool = True
    lb: str | None = None
    restart_required: bool = False
    update_lock_since: datetime | None = None
    update_lock_reason: str | None = None
    warning_flag_since: datetime | None = None
    warning_flag_reason: str | None = None
    hotfixes_always: bool | None = None
    optional_packages: tuple[str, ...] = ()
    active_run_id: int | None = None
    left_drained_by_run: int | None = None
    reachable: bool = True
    last_error: str | None = None
    observed_at: datetime | None = None
    """When a refresh last stored a change seen on the node (a refresh that sees none
    writes nothing)."""
    version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    id: int
    kind: str
    node: str
    target: str
    actor: str
    status: str
    step: str | None
    progress_done: int
    progress_total: int
    params: Mapping[str, Any]
    error: str | None
    owner: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    run_id: int
    name: str
    status: str
    detail: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    source: str
    action: str
    target: str | None
    detail: str
    run_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceRecord:
    id: int
    node: str
    start: datetime
    reason: str
    origin: str
    disable_logon: bool
    created_by: str
    created_at: datetime
    last_notice_at: datetime | None
    logon_disabled_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    ended_by: str | None
    end_reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRecord:
    node: str
    kind: str
    days: str
    start: str
    end: str | None
    enabled: bool
    updated_by: str
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotRecord:
    cluster: str
    slot: int
    node: str
    run_id: int | None
    owner: str | None
    taken_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRecord:
    id: int
    key: str
    channel: str
    recipient: str
    subject: str
    payload: Mapping[str, Any]
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


def _record(cls: type[R], row: Any) -> R:
    data = dict(row._mapping)
    if cls is NodeRecord:
        data["optional_packages"] = tuple(data.get("optional_packages") or ())
        data["installed"] = dict(data.get("installed") or {})
        data["staged"] = dict(data.get("staged") or {})
    return cls(**data)


def _migrate(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """``async with Store(url) as store``: opens the database and migrates it to the head."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._engine: AsyncEngine | None = None

    @property
    def dialect(self) -> str:
        return make_url(self.url).get_backend_name()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("the store is not open; use `async with Store(url)`")
        return self._engine

    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    async def __aenter__(self) -> Self:
        url = make_url(self.url)
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            # SQLite has one writer: one connection, so that no statement of this process
            # ever waits in SQLite's busy handler for another of its own connections (that
            # wait can block the event loop when a cursor is freed there)
            kwargs["pool_size"] = 1
            kwargs["max_overflow"] = 0
            kwargs["pool_timeout"] = 120
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"timeout": self._connect_timeout}
        engine = create_async_engine(self.url, **kwargs)
        if url.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            async with asyncio.timeout(self._connect_timeout + 20):
                async with engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        # one instance migrates at a time
                        await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(74470501)")
                    await conn.run_sync(_migrate)
        except (OSError, SQLAlchemyError, TimeoutError) as exc:
            await engine.dispose()
            cause = str(getattr(exc, "orig", None) or exc).splitlines()[0] or type(exc).__name__
            raise StoreUnavailableError(self.display_url(), cause) from exc
        self._engine = engine
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._engine is not None:
            await asyncio.shield(self._engine.dispose())
            self._engine = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    async def _all(self, query: Any, cls: type[R]) -> list[R]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_record(cls, r) for r in rows]

    # -- nodes ---------------------------------------------------------------------------

    async def sync_nodes(self, declared: Sequence[tuple[str, str | None, str]]) -> None:
        """Make the node table match the configuration (name, cluster, driver).

        Nodes no longer configured keep their rows (history stays readable) but are not
        listed by ``nodes()`` unless asked.
        """
        async with self.transaction() as conn:
            existing = {r.name for r in await conn.execute(select(t.nodes.c.name))}
            for name, cluster, driver in declared:
                if name in existing:
                    await conn.execute(
                        update(t.nodes)
                        .where(t.nodes.c.name == name)
                        .values(cluster=cluster, driver=driver)
                    )
                else:
                    await conn.execute(
                        insert(t.nodes).values(
                            name=name,
                            cluster=cluster,
                            driver=driver,
                            installed={},
                            staged={},
                            sessions=0,
                            logon_enabled=True,
                            lb="in" if cluster else None,
                            restart_required=False,
                            optional_packages=[],
                            reachable=True,
                            version=0,
                        )
                    )

    async def node(self, name: str) -> NodeRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.nodes).where(t.nodes.c.name == name))).first()
        return None if row is None else _record(NodeRecord, row)

    async def nodes(self, names: Sequence[str] | None = None) -> list[NodeRecord]:
        query = select(t.nodes).order_by(t.nodes.c.name)
        if names is not None:
            query = query.where(t.nodes.c.name.in_(list(names)))
        return await self._all(query, NodeRecord)

    async def update_node(
        self, name: str, *, expect_version: int | None = None, **values: Any
    ) -> NodeRecord:
        """Change a node's row. With ``expect_version`` the change is made only if nobody
        changed the row since that version was read; otherwise the row is left as it is."""
        async with self.transaction() as conn:
            query = update(t.nodes).where(t.nodes.c.name == name)
            if expect_version is not None:
                query = query.where(t.nodes.c.version == expect_version)
            changed = (
                await conn.execute(
                    query.values(version=t.nodes.c.version + 1, **values).returning(t.nodes)
                )
            ).first()
            if changed is None:
                if expect_version is None:
                    raise StoreError(f"node {name} is not in the store")
                row = (await conn.execute(select(t.nodes).where(t.nodes.c.name == name))).one()
                return _record(NodeRecord, row)
        return _record(NodeRecord, changed)

    # -- runs ----------------------------------------------------------------------------

    async def create_run(
        self,
        *,
        kind: str,
        node: str,
        target: str,
        actor: str,
        params: Mapping[str, Any] | None = None,
        owner: str | None = None,
        exclusive: bool = True,
    ) -> int:
        """A new run in state ``queued``; with ``exclusive`` the node is claimed for it.

        Raises ``NodeBusyError`` when the node already has an active run.
        """
        spec = NewRun(
            kind=kind,
            node=node,
            target=target,
            actor=actor,
            params=dict(params or {}),
            owner=owner,
            exclusive=exclusive,
        )
        return (await self.create_runs([spec]))[0]

    async def create_runs(self, specs: Sequence[NewRun]) -> list[int]:
        """Create the runs of one command in one transaction: all of them, or (when one
        node is busy: ``NodeBusyError``) none. Each run's audit record and its place in
        its cluster's slot queue are written with it."""
        now = utcnow()
        ids: list[int] = []
        async with self.transaction() as conn:
            for spec in specs:
                run_id = (
                    await conn.execute(
                        insert(t.runs)
                        .values(
                            kind=spec.kind,
                            node=spec.node,
                            target=spec.target,
                            actor=spec.actor,
                            status="queued",
                            params=dict(spec.params),
                            progress_done=0,
                            progress_total=0,
                            owner=spec.owner,
                            created_at=now,
                        )
                        .returning(t.runs.c.id)
                    )
                ).scalar_one()
                if spec.exclusive:
                    claimed = await conn.execute(
                        update(t.nodes)
                        .where(t.nodes.c.name == spec.node, t.nodes.c.active_run_id.is_(None))
                        .values(active_run_id=run_id)
                    )
                    if claimed.rowcount != 1:
                        busy = (
                            await conn.execute(
                                select(t.nodes.c.active_run_id).where(t.nodes.c.name == spec.node)
                            )
                        ).scalar()
                        await conn.rollback()
                        if busy is None:
                            raise StoreError(f"node {spec.node} is not in the store")
                        raise NodeBusyError(spec.node, int(busy))
                if spec.audit is not None:
                    await conn.execute(
                        _audit_row(
                            at=now,
                            actor=spec.actor,
                            source=spec.audit_source,
                            action=f"run {spec.kind}",
                            target=spec.node,
                            detail=spec.audit.replace("{run}", str(run_id)),
                            run_id=run_id,
                        )
                    )
                if spec.slot_queue is not None:
                    await conn.execute(  # a place left by a run that is gone is stale
                        delete(t.slot_waiters).where(
                            t.slot_waiters.c.cluster == spec.slot_queue,
                            t.slot_waiters.c.node == spec.node,
                        )
                    )
                    await conn.execute(
                        insert(t.slot_waiters).values(
                            cluster=spec.slot_queue, node=spec.node, run_id=run_id, queued_at=now
                        )
                    )
                ids.append(int(run_id))
        return ids

    async def run(self, run_id: int) -> RunRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.runs).where(t.runs.c.id == run_id))).first()
        return None if row is None else _record(RunRecord, row)

    async def runs(
        self,
        *,
        node: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        query = select(t.runs).order_by(t.runs.c.id.desc()).limit(limit)
        if node is not None:
            query = query.where(t.runs.c.node == node)
        if statuses is not None:
            query = query.where(t.runs.c.status.in_(list(statuses)))
        return await self._all(query, RunRecord)

    async def update_run(self, run_id: int, **values: Any) -> None:
        async with self.transaction() as conn:
            await conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))

    async def begin_step(
        self,
        run_id: int,
        name: str,
        detail: str | None = None,
        *,
        after: str | None = None,
    ) -> None:
        """Record that step ``name`` of the run starts; with ``after``, that step ends as
        done in the same transaction (one write per step transition, so that a crash
        leaves either the old step running or the new one started, never neither)."""
        now = utcnow()
        async with self.transaction() as conn:
            if after is not None:
                await self._end_step(conn, run_id, after, status="done", detail=None, now=now)
            await conn.execute(
                insert(t.run_steps).values(
                    run_id=run_id, name=name, status="running", detail=detail, started_at=now
                )
            )
            await conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id)
                .values(
                    step=name,
                    status="running",
                    started_at=func.coalesce(t.runs.c.started_at, now),
                )
            )

    async def end_step(
        self, run_id: int, name: str, *, status: str = "done", detail: str | None = None
    ) -> None:
        async with self.transaction() as conn:
            await self._end_step(conn, run_id, name, status=status, detail=detail, now=utcnow())

    @staticmethod
    async def _end_step(
        conn: AsyncConnection,
        run_id: int,
        name: str,
        *,
        status: str,
        detail: str | None,
        now: datetime,
    ) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": now}
        if detail is not None:
            values["detail"] = detail
        await conn.execute(
            update(t.run_steps)
            .where(
                t.run_steps.c.run_id == run_id,
                t.run_steps.c.name == name,
                t.run_steps.c.status == "running",
            )
            .values(**values)
        )

    async def step_detail(self, run_id: int, name: str, detail: str) -> None:
        """Note what a running step did so far (shown by ``log``); the step goes on."""
        async with self.transaction() as conn:
            await conn.execute(
                update(t.run_steps)
                .where(
                    t.run_steps.c.run_id == run_id,
                    t.run_steps.c.name == name,
                    t.run_steps.c.status == "running",
                )
                .values(detail=detail)
            )

    async def steps(self, run_id: int) -> list[StepRecord]:
        query = (
            select(
                t.run_steps.c.run_id,
                t.run_steps.c.name,
                t.run_steps.c.status,
                t.run_steps.c.detail,
                t.run_steps.c.started_at,
                t.run_steps.c.finished_at,
            )
            .where(t.run_steps.c.run_id == run_id)
            .order_by(t.run_steps.c.id)
        )
        return await self._all(query, StepRecord)

    async def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        error: str | None = None,
        end: RunEnd | None = None,
    ) -> None:
        """End a run and release the node it claimed, in one transaction; with ``end`` the
        outcome goes to the audit log too ("run KIND STATUS": the error, else the message;
        L13)."""
        async with self.transaction() as conn:
            if end is not None:
                await conn.execute(
                    _audit_row(
                        at=utcnow(),
                        actor="tgops",
                        source="system",
                        action=f"run {end.kind} {status}",
                        target=end.node,
                        detail=error or end.message,
                        run_id=run_id,
                    )
                )
            await conn.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id)
                .values(status=status, error=error, finished_at=utcnow())
            )
            await conn.execute(
                update(t.run_steps)
                .where(t.run_steps.c.run_id == run_id, t.run_steps.c.status == "running")
                .values(status="failed" if status == "failed" else "done", finished_at=utcnow())
            )
            await conn.execute(
                update(t.nodes).where(t.nodes.c.active_run_id == run_id).values(active_run_id=None)
            )

    # -- audit ---------------------------------------------------------------------------

    async def audit(
        self,
        *,
        actor: str,
        source: str,
        action: str,
        target: str | None = None,
        detail: str = "",
        run_id: int | None = None,
    ) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                _audit_row(
                    at=utcnow(),
                    actor=actor,
                    source=source,
                    action=action,
                    target=target,
                    detail=detail,
                    run_id=run_id,
                )
            )

    async def audit_log(
        self, *, targets: Sequence[str] | None = None, limit: int = 20
    ) -> list[AuditRecord]:
        query = select(t.audit).order_by(t.audit.c.id.desc()).limit(limit)
        if targets is not None:
            query = query.where(t.audit.c.target.in_(list(targets)))
        return await self._all(query, AuditRecord)

    # -- maintenance ---------------------------------------------------------------------

    async def open_maintenance(
        self,
        *,
        node: str,
        start: datetime,
        reason: str,
        origin: str,
        disable_logon: bool,
        created_by: str,
    ) -> MaintenanceRecord:
        """Schedule maintenance for a node, replacing an open one (which is ended)."""
        now = utcnow()
        async with self.transaction() as conn:
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.node == node, t.maintenance.c.ended_at.is_(None))
                .values(ended_at=now, ended_by=created_by, end_reason="replaced")
            )
            new_id = (
                await conn.execute(
                    insert(t.maintenance)
                    .values(
                        node=node,
                        start=start,
                        reason=reason,
                        origin=origin,
                        disable_logon=disable_logon,
                        created_by=created_by,
                        created_at=now,
                    )
                    .returning(t.maintenance.c.id)
                )
            ).scalar_one()
            row = (
                await conn.execute(select(t.maintenance).where(t.maintenance.c.id == new_id))
            ).one()
        return _record(MaintenanceRecord, row)

    async def maintenance(self, node: str | None = None) -> list[MaintenanceRecord]:
        """Open (not ended) maintenance windows, by start time."""
        query = (
            select(t.maintenance)
            .where(t.maintenance.c.ended_at.is_(None))
            .order_by(t.maintenance.c.start)
        )
        if node is not None:
            query = query.where(t.maintenance.c.node == node)
        return await self._all(query, MaintenanceRecord)

    async def end_maintenance(self, node: str, *, by: str, reason: str) -> MaintenanceRecord | None:
        async with self.transaction() as conn:
            row = (
                await conn.execute(
                    select(t.maintenance).where(
                        t.maintenance.c.node == node, t.maintenance.c.ended_at.is_(None)
                    )
                )
            ).first()
            if row is None:
                return None
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.id == row.id)
                .values(ended_at=utcnow(), ended_by=by, end_reason=reason)
            )
        return _record(MaintenanceRecord, row)

    async def mark_notice(self, maintenance_ids: Sequence[int], at: datetime) -> None:
        """Record that the windows' users got a notice at ``at`` (one statement)."""
        if not maintenance_ids:
            return
        async with self.transaction() as conn:
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.id.in_(list(maintenance_ids)))
                .values(last_notice_at=at)
            )

    async def mark_started(self, maintenance_id: int, at: datetime) -> bool:
        """Record that an open window's start was announced; False if it already was
        (or the window ended): the one who gets True publishes MaintenanceStarted."""
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.maintenance)
                .where(
                    t.maintenance.c.id == maintenance_id,
                    t.maintenance.c.started_at.is_(None),
                    t.maintenance.c.ended_at.is_(None),
                )
                .values(started_at=at)
            )
        return bool(result.rowcount == 1)

    async def mark_logon_disabled(self, maintenance_id: int, at: datetime) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                update(t.maintenance)
                .where(t.maintenance.c.id == maintenance_id)
                .values(logon_disabled_at=at)
            )

    # -- schedules -----------------------------------------------------------------------

    async def set_schedule(
        self, *, node: str, kind: str, days: str, start: str, end: str | None, by: str
    ) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                delete(t.schedules).where(t.schedules.c.node == node, t.schedules.c.kind == kind)
            )
            await conn.execute(
                insert(t.schedules).values(
                    node=node,
                    kind=kind,
                    days=days,
                    start=start,
                    end=end,
                    enabled=True,
                    updated_by=by,
                    updated_at=utcnow(),
                )
            )

    async def disable_schedule(self, *, node: str, kind: str, by: str) -> bool:
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.schedules)
                .where(
                    t.schedules.c.node == node,
                    t.schedules.c.kind == kind,
                    t.schedules.c.enabled.is_(True),
                )
                .values(enabled=False, updated_by=by, updated_at=utcnow())
            )
        return bool(result.rowcount)

    async def schedules(self, node: str | None = None) -> list[ScheduleRecord]:
        query = select(t.schedules).order_by(t.schedules.c.node, t.schedules.c.kind)
        if node is not None:
            query = query.where(t.schedules.c.node == node)
        return await self._all(query, ScheduleRecord)

    # -- hotfix selection ----------------------------------------------------------------

    async def select_hotfixes(self, node: str, ids: Sequence[str], *, by: str) -> list[str]:
        """Select hotfixes for a node; returns the ids that were not selected before."""
        added = []
        async with self.transaction() as conn:
            have = {
                r.hotfix_id
                for r in await conn.execute(
                    select(t.hotfix_selections.c.hotfix_id).where(
                        t.hotfix_selections.c.node == node
                    )
                )
            }
            for hotfix_id in ids:
                if hotfix_id in have:
                    continue
                await conn.execute(
                    insert(t.hotfix_selections).values(
                        node=node, hotfix_id=hotfix_id, selected_by=by, selected_at=utcnow()
                    )
                )
                have.add(hotfix_id)
                added.append(hotfix_id)
        return added

    async def unselect_hotfixes(self, node: str, ids: Sequence[str]) -> list[str]:
        async with self.transaction() as conn:
            have = {
                r.hotfix_id
                for r in await conn.execute(
                    select(t.hotfix_selections.c.hotfix_id).where(
                        t.hotfix_selections.c.node == node
                    )
                )
            }
            removed = [i for i in ids if i in have]
            if removed:
                await conn.execute(
                    delete(t.hotfix_selections).where(
                        t.hotfix_selections.c.node == node,
                        t.hotfix_selections.c.hotfix_id.in_(removed),
                    )
                )
        return removed

    async def selected_hotfixes(self) -> dict[str, list[str]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t.hotfix_selections).order_by(
                        t.hotfix_selections.c.node, t.hotfix_selections.c.hotfix_id
                    )
                )
            ).all()
        selected: dict[str, list[str]] = {}
        for row in rows:
            selected.setdefault(row.node, []).append(row.hotfix_id)
        return selected

    # -- cluster slots (L12) -------------------------------------------------------------

    async def try_take_slot(
        self,
        *,
        cluster: str,
        node: str,
        limit: int,
        run_id: int | None,
        owner: str | None = None,
    ) -> int | None:
        """Take a free slot of the cluster for ``node``; ``None`` when all ``limit`` are held.

        A node that already holds a slot gets it back (idempotent after a restart). Slots
        are rows with a primary key (cluster, slot): two instances can never both insert
        the same one, so the limit holds across processes.
        """
        for _ in range(limit + 1):
            async with self.transaction() as conn:
                held = (
                    await conn.execute(
                        select(t.cluster_slots.c.slot, t.cluster_slots.c.node).where(
                            t.cluster_slots.c.cluster == cluster
                        )
                    )
                ).all()
                for row in held:
                    if row.node == node:
                        return int(row.slot)
                taken = {int(r.slot) for r in held}
                free = [s for s in range(limit) if s not in taken]
                if not free:
                    return None
                try:
                    await conn.execute(
                        insert(t.cluster_slots).values(
                            cluster=cluster,
                            slot=free[0],
                            node=node,
                            run_id=run_id,
                            owner=owner,
                            taken_at=utcnow(),
                        )
                    )
                    await conn.execute(
                        delete(t.slot_waiters).where(
                            t.slot_waiters.c.cluster == cluster, t.slot_waiters.c.node == node
                        )
                    )
                except IntegrityError:
                    await conn.rollback()
                    continue  # another instance took it first: look again
                except OperationalError:
                    await conn.rollback()
                    continue
                return free[0]
        return None

    async def release_slot(self, *, cluster: str, node: str) -> bool:
        async with self.transaction() as conn:
            result = await conn.execute(
                delete(t.cluster_slots).where(
                    t.cluster_slots.c.cluster == cluster, t.cluster_slots.c.node == node
                )
            )
        return bool(result.rowcount)

    async def slots(self, cluster: str | None = None) -> list[SlotRecord]:
        query = select(t.cluster_slots).order_by(t.cluster_slots.c.cluster, t.cluster_slots.c.slot)
        if cluster is not None:
            query = query.where(t.cluster_slots.c.cluster == cluster)
        return await self._all(query, SlotRecord)

    async def wait_for_slot(self, *, cluster: str, node: str, run_id: int | None) -> None:
        """Join the cluster's queue (ordered by arrival) unless already in it."""
        async with self.transaction() as conn:
            present = (
                await conn.execute(
                    select(t.slot_waiters.c.id).where(
                        t.slot_waiters.c.cluster == cluster, t.slot_waiters.c.node == node
                    )
                )
            ).first()
            if present is None:
                await conn.execute(
                    insert(t.slot_waiters).values(
                        cluster=cluster, node=node, run_id=run_id, queued_at=utcnow()
                    )
                )

    async def leave_slot_queue(self, *, cluster: str, node: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                delete(t.slot_waiters).where(
                    t.slot_waiters.c.cluster == cluster, t.slot_waiters.c.node == node
                )
            )

    async def slot_queue(self, cluster: str) -> list[str]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t.slot_waiters.c.node)
                    .where(t.slot_waiters.c.cluster == cluster)
                    .order_by(t.slot_waiters.c.id)
                )
            ).all()
        return [r.node for r in rows]

    # -- outbox --------------------------------------------------------------------------

    async def enqueue(
        self,
        *,
        key: str,
        channel: str,
        recipient: str,
        subject: str = "",
        payload: Mapping[str, Any] | None = None,
        not_before: datetime | None = None,
    ) -> bool:
        """Queue one notification; ``False`` when its idempotency key is already queued."""
        now = utcnow()
        try:
            async with self.transaction() as conn:
                await conn.execute(
                    insert(t.outbox).values(
                        key=key,
                        channel=channel,
                        recipient=recipient,
                        subject=subject,
                        payload=dict(payload or {}),
                        status="pending",
                        attempts=0,
                        next_attempt_at=not_before or now,
                        created_at=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def due_outbox(self, *, now: datetime, limit: int = 100) -> list[OutboxRecord]:
        query = (
            select(t.outbox)
            .where(t.outbox.c.status == "pending", t.outbox.c.next_attempt_at <= now)
            .order_by(t.outbox.c.next_attempt_at, t.outbox.c.id)
            .limit(limit)
        )
        return await self._all(query, OutboxRecord)

    async def outbox(
        self, *, statuses: Sequence[str] | None = None, limit: int = 100
    ) -> list[OutboxRecord]:
        query = select(t.outbox).order_by(t.outbox.c.id.desc()).limit(limit)
        if statuses is not None:
            query = query.where(t.outbox.c.status.in_(list(statuses)))
        return await self._all(query, OutboxRecord)

    async def outbox_result(
        self,
        outbox_id: int,
        *,
        status: str,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "status": status,
            "last_error": error,
            "attempts": t.outbox.c.attempts + 1,
        }
        if status == "sent":
            values["sent_at"] = utcnow()
        if retry_at is not None:
            values["next_attempt_at"] = retry_at
        async with self.transaction() as conn:
            await conn.execute(update(t.outbox).where(t.outbox.c.id == outbox_id).values(**values))

    # -- hotfix announcements ------------------------------------------------------------

    async def mark_announced(self, hotfix_id: str, *, channel: str, urgency: str) -> bool:
        """Record a hotfix as announced; ``False`` when it was announced before."""
        try:
            async with self.transaction() as conn:
                await conn.execute(
                    insert(t.announced_hotfixes).values(
                        hotfix_id=hotfix_id,
                        channel=channel,
                        urgency=urgency,
                        announced_at=utcnow(),
                    )
                )
        except IntegrityError:
            return False
        return True

    # -- small adapter records -------------------------------------------------------------

    async def kv_get(self, namespace: str, key: str) -> Any:
        """The stored value, or None."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t.kv.c.value).where(t.kv.c.namespace == namespace, t.kv.c.key == key)
                )
            ).first()
        return None if row is None else row.value

    async def kv_items(self, namespace: str) -> dict[str, Any]:
        """Every stored value of a namespace, by key."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t.kv.c.key, t.kv.c.value).where(t.kv.c.namespace == namespace)
                )
            ).all()
        return {row.key: row.value for row in rows}

    async def kv_set(self, namespace: str, key: str, value: Any) -> None:
        async with self.transaction() as conn:
            await conn.execute(delete(t.kv).where(t.kv.c.namespace == namespace, t.kv.c.key == key))
            await conn.execute(
                insert(t.kv).values(namespace=namespace, key=key, value=value, updated_at=utcnow())
            )

    async def kv_delete(self, namespace: str, key: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(delete(t.kv).where(t.kv.c.namespace == namespace, t.kv.c.key == key))

    # -- notify: outbox delivery, hotfix announcements, escalations ------------------------

    async def enqueue_many(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        """Queue several notifications in one transaction; returns the keys newly queued.

        Each item has ``key``, ``channel``, ``recipient`` and optionally ``subject``,
        ``payload`` and ``not_before``; keys already queued are left as they are.
        """
        if not items:
            return []
        now = utcnow()
        keys = [str(item["key"]) for item in items]
        rows = [
            {
                "key": str(item["key"]),
                "channel": item["channel"],
                "recipient": item["recipient"],
                "subject": item.get("subject", ""),
                "payload": dict(item.get("payload") or {}),
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": item.get("not_before") or now,
                "created_at": now,
            }
            for item in items
        ]
        try:
            async with self.transaction() as conn:
                have: set[str] = set()
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    have.update(
                        r.key
                        for r in await conn.execute(
                            select(t.outbox.c.key).where(t.outbox.c.key.in_(chunk))
                        )
                    )
                fresh: dict[str, dict[str, Any]] = {}
                for row in rows:
                    if row["key"] not in have:
                        fresh.setdefault(row["key"], row)
                new_rows = list(fresh.values())
                for start in range(0, len(new_rows), 500):
                    await conn.execute(insert(t.outbox), new_rows[start : start + 500])
                return list(fresh)
        except IntegrityError:
            # another instance queued some of them meanwhile: one at a time
            return [
                str(item["key"])
                for item in items
                if await self.enqueue(
                    key=str(item["key"]),
                    channel=item["channel"],
                    recipient=item["recipient"],
                    subject=item.get("subject", ""),
                    payload=item.get("payload"),
                    not_before=item.get("not_before"),
                )
            ]

    async def claim_outbox(
        self, *, channel: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxRecord]:
        """Take due notifications of a channel for delivery (status ``sending``).

        Due are pending ones whose time has come and ``sending`` ones whose lease ran out
        (their sender died). Until ``lease_until`` no one else takes them.
        """
        due = (
            t.outbox.c.channel == channel,
            t.outbox.c.status.in_(("pending", "sending")),
            t.outbox.c.next_attempt_at <= now,
        )
        chosen = (
            select(t.outbox.c.id)
            .where(*due)
            .order_by(t.outbox.c.next_attempt_at, t.outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        async with self.transaction() as conn:
            # one statement: choose, take (due again: another instance may have been first)
            # and read them
            rows = (
                await conn.execute(
                    update(t.outbox)
                    .where(t.outbox.c.id.in_(chosen), *due)
                    .values(status="sending", next_attempt_at=lease_until)
                    .returning(*t.outbox.c)
                )
            ).all()
        return sorted((_record(OutboxRecord, r) for r in rows), key=lambda r: r.id)

    async def next_outbox_due(self, *, channel: str) -> datetime | None:
        """When the next pending (or leased) notification of a channel is due."""
        async with self.engine.connect() as conn:
            value = (
                await conn.execute(
                    select(func.min(t.outbox.c.next_attempt_at)).where(
                        t.outbox.c.channel == channel,
                        t.outbox.c.status.in_(("pending", "sending")),
                    )
                )
            ).scalar_one_or_none()
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    async def outbox_item(self, key: str) -> OutboxRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.outbox).where(t.outbox.c.key == key))).first()
        return None if row is None else _record(OutboxRecord, row)

    async def settle_outbox(
        self,
        results: Sequence[Mapping[str, Any]],
        audits: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Record delivery outcomes and their audit records in one transaction.

        Each result has ``id``, ``status`` (pending, sent, failed), optional ``error``,
        ``retry_at`` (next attempt), and ``attempted`` (default true: counts an attempt).
        Each audit record has the arguments of ``audit``.
        """
        now = utcnow()
        sent = [
            r["id"]
            for r in results
            if r["status"] == "sent" and r.get("attempted", True) and r.get("retry_at") is None
        ]
        done = set(sent)
        async with self.transaction() as conn:
            if sent:  # the common case in one statement
                await conn.execute(
                    update(t.outbox)
                    .where(t.outbox.c.id.in_(sent))
                    .values(
                        status="sent",
                        last_error=None,
                        attempts=t.outbox.c.attempts + 1,
                        sent_at=now,
                    )
                )
            for result in results:
                if result["id"] in done:
                    continue
                values: dict[str, Any] = {
                    "status": result["status"],
                    "last_error": result.get("error"),
                }
                if result.get("attempted", True):
                    values["attempts"] = t.outbox.c.attempts + 1
                if result["status"] == "sent":
                    values["sent_at"] = now
                if result.get("retry_at") is not None:
                    values["next_attempt_at"] = result["retry_at"]
                await conn.execute(
                    update(t.outbox).where(t.outbox.c.id == result["id"]).values(**values)
                )
            if audits:
                await conn.execute(
                    insert(t.audit),
                    [
                        {
                            "at": now,
                            "actor": a["actor"],
                            "source": a["source"],
                            "action": a["action"],
                            "target": a.get("target"),
                            "detail": a.get("detail", ""),
                            "run_id": a.get("run_id"),
                        }
                        for a in audits
                    ],
                )

    async def cancel_outbox(self, key: str, *, reason: str) -> bool:
        """Fail a notification that is still waiting (not being sent); ``False`` otherwise."""
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.outbox)
                .where(t.outbox.c.key == key, t.outbox.c.status == "pending")
                .values(status="failed", last_error=reason)
            )
        return bool(result.rowcount)

    async def announced(self, hotfix_ids: Sequence[str]) -> set[str]:
        """Which of these hotfixes were announced before."""
        if not hotfix_ids:
            return set()
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(t.announced_hotfixes.c.hotfix_id).where(
                    t.announced_hotfixes.c.hotfix_id.in_(list(hotfix_ids))
                )
            )
            return {r.hotfix_id for r in rows}

    async def create_escalation(self, hotfix_id: str) -> bool:
        """Start the escalation of a hotfix (status running); ``False`` when it exists."""
        now = utcnow()
        try:
            async with self.transaction() as conn:
                await conn.execute(
                    insert(t.escalations).values(
                        hotfix_id=hotfix_id,
                        status="running",
                        round=0,
                        position=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def escalation(self, hotfix_id: str) -> dict[str, Any] | None:
        """The escalation row of a hotfix as a mapping of its columns, or None."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t.escalations).where(t.escalations.c.hotfix_id == hotfix_id)
                )
            ).first()
        return None if row is None else dict(row._mapping)

    async def escalations(self, *, statuses: Sequence[str]) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(t.escalations)
                    .where(t.escalations.c.status.in_(list(statuses)))
                    .order_by(t.escalations.c.id)
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    async def update_escalation(
        self, hotfix_id: str, *, expect: Mapping[str, Any], values: Mapping[str, Any]
    ) -> bool:
        """Change an escalation only while its columns still hold ``expect`` (compare and
        set); ``False`` when someone changed it first."""
        allowed = {"status", "round", "position", "call_sid", "acknowledged_by", "acknowledged_at"}
        unknown = (set(expect) | set(values)) - allowed
        if unknown:
            raise ValueError(f"not an escalation column: {', '.join(sorted(unknown))}")
        conditions = [t.escalations.c.hotfix_id == hotfix_id]
        for column, value in expect.items():
            col = t.escalations.c[column]
            if isinstance(value, list | tuple | set | frozenset):
                conditions.append(col.in_(list(value)))
            elif value is None:
                conditions.append(col.is_(None))
            else:
                conditions.append(col == value)
        async with self.transaction() as conn:
            result = await conn.execute(
                update(t.escalations).where(*conditions).values(**dict(values), updated_at=utcnow())
            )
        return bool(result.rowcount)

    # -- monitoring: counts read when /metrics is scraped ----------------------------------

    async def outbox_counts(self) -> dict[tuple[str, str], int]:
        """Notifications in the outbox per (channel, status)."""
        query = select(t.outbox.c.channel, t.outbox.c.status, func.count()).group_by(
            t.outbox.c.channel, t.outbox.c.status
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    async def run_counts(self, statuses: Sequence[str]) -> dict[tuple[str, str], int]:
        """Runs in one of ``statuses`` per (kind, status)."""
        query = (
            select(t.runs.c.kind, t.runs.c.status, func.count())
            .where(t.runs.c.status.in_(list(statuses)))
            .group_by(t.runs.c.kind, t.runs.c.status)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    async def slot_waiter_counts(self) -> dict[str, int]:
        """Nodes waiting for a slot, per cluster."""
        query = select(t.slot_waiters.c.cluster, func.count()).group_by(t.slot_waiters.c.cluster)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {str(r[0]): int(r[1]) for r in rows}


def _audit_row(
    *,
    at: datetime,
    actor: str,
    source: str,
    action: str,
    target: str | None,
    detail: str,
    run_id: int | None,
) -> Any:
    """The INSERT of one audit record (L13)."""
    return insert(t.audit).values(
        at=at,
        actor=actor,
        source=source,
        action=action,
        target=target,
        detail=detail,
        run_id=run_id,
    )
