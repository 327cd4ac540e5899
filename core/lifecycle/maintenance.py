"""Maintenance operations (L3): schedule, notices to logged-in users, logon lock, cancel.

From ``notice_lead`` before the start until the start, every ``reminder_interval``, the
users of the node get the reason as a notice. Reminders missed while the service was
down are not replayed: after a restart at most one notice per node is sent, the current
one. With ``disable_logon`` the logon lock is set at the start. When the start is reached,
``MaintenanceStarted`` is published once per window (recorded in the window's row, so
not again after a restart; late when the start passed while the service was down).
Maintenance is never ended automatically in the manual flow; ``cancel`` ends it and tells
the users.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from core import events as ev
from core.background import background
from core.errors import DriverError, TgopsError
from core.lifecycle.engine import Engine
from core.localtime import local_text, to_utc, zoned_text
from core.model import Actor
from core.printable import printable
from core.store import MaintenanceRecord
from core.turns import in_turns, turn_taking

log = logging.getLogger(__name__)

SYSTEM_ACTOR = Actor(name="maintenance", source="system")
"""Who the reminder loop acts as (the start, the logon lock) in the audit log."""
MAX_SLEEP = 30.0
"""Longest sleep of the reminder loop; it also looks at the store this often."""
WAKE_SETTLE = 0.1
"""Seconds the loop waits after a change woke it, so a burst of changes is one tick."""
PUBLISH_TURN = 256
"""Window starts announced in one turn of the event loop at most (an update time of
10,000 nodes starts 10,000 windows at once)."""
NOTICES_AT_ONCE = 16
"""Nodes announced to at once (each announce is bounded by its own timeout)."""


class MaintenanceInputError(TgopsError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Scheduled:
    nodes: list[str]
    start: datetime
    warnings: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancelled:
    nodes: list[str]
    none: list[str]
    problems: list[str]


def notice_text(record: MaintenanceRecord, engine: Engine) -> str:
    return engine.notices.maintenance(record.node, record.start, record.reason)


class Maintenance:
    """Maintenance commands (any instance); ``reminders()`` runs the notices (the leader)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings.maintenance
        self._wake = asyncio.Event()

    def reminders(self) -> AbstractAsyncContextManager[None]:
        """The reminder loop, running while the returned context is open."""
        return background("maintenance-reminders", self._loop)

    def changed(self) -> None:
        """A window was scheduled, moved or opened: the reminder loop looks at the store
        again (``WAKE_SETTLE`` later). A window that ends does not call this: the loop has
        nothing to do for it and no longer sees it at its next look, while a look at
        every open window after each end kept the loop reading the whole table during a
        large update time (each run's end ends its node's window)."""
        self._wake.set()

    # -- commands ----------------------------------------------------------------------

    async def schedule(
        self,
        target: str,
        start_local: datetime,
        reason: str,
        *,
        disable_logon: bool,
        actor: Actor,
        origin: str = "manual",
    ) -> Scheduled:
        engine = self.engine
        names = engine.resolve(target)
        start = to_utc(start_local, engine.settings.tz)
        now = engine.clock.now()
        if origin == "manual" and start <= now:
            raise MaintenanceInputError(
                f"{local_text(start, engine.settings.tz)} is in the past (now "
                f"{zoned_text(now, engine.settings.tz)}, time zone {engine.settings.tz.key}); "
                "give a future date and time in that zone"
            )
        reason = " ".join(printable(reason).split())  # shown on terminals: no escapes
        if not reason:
            raise MaintenanceInputError("the reason is empty; users are shown it, so say why")
        warnings = []
        singles = [n for n in names if engine.cluster_of[n] is None]
        if disable_logon and singles:
            warnings.append(
                f"--disable-logon on single system {', '.join(singles)}: accepted, but it is "
                "only useful for cluster nodes (on a single system no other node takes the "
                "users)."
            )
        tz = engine.settings.tz
        for old in await engine.store.maintenance():
            if old.node in names:
                warnings.append(
                    f"{old.node}: replaces the maintenance of {local_text(old.start, tz)} "
                    f"({old.reason}); a node has one maintenance window at a time"
                )
        for name in names:
            await self.open_for(
                name, start, reason, origin=origin, disable_logon=disable_logon, actor=actor
            )
        self.changed()
        return Scheduled(nodes=names, start=start, warnings=warnings)

    async def cancel(self, target: str, *, actor: Actor, reason: str = "cancelled") -> Cancelled:
        engine = self.engine
        names = engine.resolve(target)
        done: list[str] = []
        none: list[str] = []
        problems: list[str] = []
        for name in names:
            ended = await self.end_for(name, actor=actor, reason=reason, problems=problems)
            (done if ended else none).append(name)
        return Cancelled(nodes=done, none=none, problems=problems)

    async def open_for(
        self,
        name: str,
        start: datetime,
        reason: str,
        *,
        origin: str,
        disable_logon: bool,
        actor: Actor,
    ) -> MaintenanceRecord:
        """Open maintenance on one node (replacing an open one), audited and published."""
        engine = self.engine
        record = await engine.store.open_maintenance(
            node=name,
            start=start,
            reason=reason,
            origin=origin,
            disable_logon=disable_logon,
            created_by=actor.name,
        )
        detail = f"{local_text(start, engine.settings.tz)}: {reason}"
        if disable_logon:
            detail += " (logon disabled at the start)"
        await engine.record(actor, "maintenance scheduled", target=name, detail=detail)
        await engine.events.publish(
            ev.MaintenanceScheduled(node=name, start=start, reason=reason, origin=origin)
        )
        log.info("maintenance %d scheduled on %s", record.id, name)
        self.changed()
        return record

    async def open_many(
        self, names: Sequence[str], start: datetime, reason: str, *, origin: str, actor: Actor
    ) -> None:
        """``open_for`` for several nodes at once (one transaction; no logon lock), as a
        scheduled occurrence opens the maintenance of all its nodes."""
        if not names:
            return
        engine = self.engine
        await engine.store.open_maintenance_many(
            names,
            start=start,
            reason=reason,
            origin=origin,
            created_by=actor.name,
            audit_source=actor.source,
            audit_detail=f"{local_text(start, engine.settings.tz)}: {reason}",
        )
        for name in names:
            await engine.events.publish(
                ev.MaintenanceScheduled(node=name, start=start, reason=reason, origin=origin)
            )
        log.info("maintenance scheduled on %d nodes for %s", len(names), start.isoformat())
        self.changed()

    async def end_for(
        self, name: str, *, actor: Actor, reason: str, problems: list[str] | None = None
    ) -> bool:
        """End the open maintenance of one node and tell its users; False if none was open."""
        engine = self.engine
        record = await engine.store.end_maintenance(
            name, by=actor.name, reason=reason, at=engine.clock.now()
        )
        if record is None:
            return False
        problems = problems if problems is not None else []
        try:
            await engine.drivers[name].announce(engine.notices.maintenance_ended(name))
        except DriverError as exc:
            problems.append(str(exc))
        if record.logon_disabled_at is not None:
            try:
                await engine.set_logon(name, True, actor)
            except DriverError as exc:
                problems.append(str(exc))
        await engine.record(actor, "maintenance ended", target=name, detail=reason)
        await engine.events.publish(
            ev.MaintenanceEnded(node=name, reason=reason, by=actor.name, start=record.start)
        )
        return True

    # -- reminders ---------------------------------------------------------------------

    async def tick(self) -> float:
        """Send what is due now; returns seconds until something is due next."""
        engine = self.engine
        now = engine.clock.now()
        lead = timedelta(seconds=self.settings.notice_lead)
        interval = timedelta(seconds=self.settings.reminder_interval)
        next_due = now + timedelta(seconds=MAX_SLEEP)
        due_now: list[MaintenanceRecord] = []
        starting: list[MaintenanceRecord] = []
        for record in await engine.store.maintenance():
            if record.node not in engine.drivers:
                continue
            window_open = record.start - lead
            if now >= record.start:
                if record.disable_logon and record.logon_disabled_at is None:
                    await self._disable_logon(record, now)
                if record.started_at is None:
                    starting.append(record)
                continue
            if now < window_open:
                next_due = min(next_due, window_open)
                continue
            due = record.last_notice_at is None or now - record.last_notice_at >= interval
            if due:
                due_now.append(record)
                next_due = min(next_due, now + interval, record.start)
            else:
                assert record.last_notice_at is not None
                next_due = min(next_due, record.last_notice_at + interval, record.start)
        if starting:
            await self._started(starting, now)
        if due_now:
            await self._notify(due_now, now)
        return max(0.0, (next_due - engine.clock.now()).total_seconds())

    async def _notify(self, records: list[MaintenanceRecord], now: datetime) -> None:
        """The due notices: marked in one statement first (a crash after it loses one
        reminder rather than repeating it), then announced, ``NOTICES_AT_ONCE`` at a time;
        a notice that fails on one node does not stop the others."""
        await self.engine.store.mark_notice([r.id for r in records], now)
        gate = asyncio.Semaphore(NOTICES_AT_ONCE)

        async def announce(record: MaintenanceRecord) -> None:
            # a simulated node's announce never waits: without a turn in the gate, all of
            # a tick's notices ran in one turn of the loop (1,000 nodes: 0.1 to 0.2 s in
            # which no run's step went on)
            async with turn_taking(gate):
                try:
                    async with asyncio.timeout(30):
                        await self.engine.drivers[record.node].announce(
                            notice_text(record, self.engine)
                        )
                except (DriverError, TimeoutError) as exc:
                    log.warning("maintenance notice on %s failed: %s", record.node, exc)

        async with asyncio.TaskGroup() as group:
            for record in records:
                group.create_task(announce(record), name=f"notice-{record.node}")

    async def _started(self, records: Sequence[MaintenanceRecord], now: datetime) -> None:
        """Windows whose start has come: marked in their rows first, so that each is
        published once (also across restarts and instances; a crash right after the mark
        loses the announcement), all in one transaction, and their audit records in one
        more: a scheduled update starts the windows of all its nodes at once."""
        store = self.engine.store
        marked = await store.mark_started([r.id for r in records], now)
        started = [r for r in records if r.id in marked]
        if not started:
            return
        await store.commit(
            *(
                store.audit_entry(
                    actor=SYSTEM_ACTOR.name,
                    source=SYSTEM_ACTOR.source,
                    action="maintenance started",
                    target=record.node,
                    detail=record.reason,
                )
                for record in started
            )
        )
        async for record in in_turns(started, PUBLISH_TURN):  # thousands at once
            await self.engine.events.publish(
                ev.MaintenanceStarted(
                    id=f"maintenance:{record.id}:started",
                    node=record.node,
                    start=record.start,
                    reason=record.reason,
                    origin=record.origin,
                    logon_disabled=record.disable_logon,
                )
            )
            log.info("maintenance %d on %s started", record.id, record.node)

    async def _disable_logon(self, record: MaintenanceRecord, now: datetime) -> None:
        await self.engine.store.mark_logon_disabled(record.id, now)
        try:
            await self.engine.set_logon(record.node, False, SYSTEM_ACTOR)
        except DriverError as exc:
            log.warning("maintenance on %s: logon lock failed: %s", record.node, exc)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # a change made while the tick runs wakes the next wait
            try:
                delay = await self.tick()
            except Exception:
                log.exception("maintenance reminders failed; trying again shortly")
                delay = 5.0
            try:
                async with asyncio.timeout(min(delay, MAX_SLEEP)):
                    await self._wake.wait()
                # many windows are often opened together (a scheduled update of a cluster):
                # one look at the store for the burst, not one per window
                await asyncio.sleep(WAKE_SETTLE)
            except TimeoutError:
                pass
