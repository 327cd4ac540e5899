"""The timers of the time-controlled lifecycle (APScheduler 3.11, timers only).

The store is the source of truth: the schedules live there, and the timer jobs are
rebuilt from it at start and on every change. Each schedule has one job, set for its
next occurrence; when it fires it starts the run and plans the next one.

After downtime reminders are not replayed (see ``core.lifecycle.maintenance``); a scheduled update
whose download start passed while the service was down still starts if its update time is
less than ``updates.update_grace`` ago (it is late, so every wait passes at once); older
ones are skipped and logged, and the next one is planned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from types import TracebackType
from typing import Any, Self

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from core.background import background
from core.durations import format_duration
from core.lifecycle.calendar import Weekly, days_text, parse_days_text, parse_time_text, time_text
from core.lifecycle.engine import Engine, held_by_gate, preparation_late
from core.lifecycle.hold import held_text
from core.lifecycle.scheduled import SCHEDULER, ScheduledRuns
from core.localtime import local_text, zone_note
from core.model import Actor
from core.store import ScheduleRecord

log = logging.getLogger(__name__)

FIRE_SETTLE = 0.05
"""Seconds the first timer of an occurrence waits for the others due at the same time."""
FIRED = "schedule-fired"
"""kv namespace: the last occurrence each schedule fired for (``KIND:NODE`` → ISO time)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Occurrence:
    node: str
    kind: str
    at: datetime  # the update time S, or the download start
    fire_at: datetime  # when the run starts
    until: datetime | None = None


class Scheduler:
    """``async with Scheduler(engine, runs)``: timers for every enabled schedule."""

    def __init__(
        self, engine: Engine, runs: ScheduledRuns, *, resync_interval: float = 1.0
    ) -> None:
        self.engine = engine
        self._resync_interval = resync_interval
        self._fingerprint: str | None = None
        self._stack = AsyncExitStack()
        self.runs = runs
        self.store = engine.store
        self._timers = AsyncIOScheduler(timezone="UTC")
        self._lock = asyncio.Lock()
        runs.schedules_changed = self.rebuild
        self.fired_late: list[float] = []
        """Seconds each occurrence's timer fired after its planned time (for the benchmark)."""
        self._due: dict[tuple[str, datetime, datetime | None], list[Occurrence]] = {}
        """Occurrences whose timers fired, by (kind, time, end): started together."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._groups: dict[tuple[str, datetime], list[Occurrence]] = {}
        """Occurrences planned for the same moment, by (kind, moment): one timer each
        (1,000 nodes of one update time are one timer, not 1,000 for the timer library
        to start one after another)."""
        self._group_of: dict[tuple[str, str], tuple[str, datetime]] = {}
        """(kind, node) -> the group its next occurrence is planned in."""

    async def __aenter__(self) -> Self:
        self._timers.start()
        await self.catch_up()
        await self.rebuild()
        self._stack = AsyncExitStack()
        # schedules changed through another instance reach the timers within this interval
        await self._stack.enter_async_context(background("scheduler-resync", self._resync))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()
        self._timers.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            if await self._schedule_fingerprint() != self._fingerprint:
                await self.rebuild()

    async def _schedule_fingerprint(self) -> str | None:
        """The mark of the store's latest schedule change (one row, whatever the fleet's
        size; a change by another instance sharing the store shows as a new mark)."""
        return await self.store.schedules_mark()

    # -- occurrences -------------------------------------------------------------------

    def weekly(self, record: ScheduleRecord) -> Weekly:
        """The schedule's days and wall time."""
        return self._weekly(record)

    def _weekly(self, record: ScheduleRecord) -> Weekly:
        return Weekly(
            days=parse_days_text(record.days),
            at=parse_time_text(record.start),
            tz=self.engine.settings.tz,
        )

    def next_occurrence(self, record: ScheduleRecord, after: datetime) -> Occurrence:
        """The next occurrence after ``after``. An update whose download start has passed
        but whose update time has not still counts: its run starts at once (late)."""
        weekly = self._weekly(record)
        if record.kind == "update":
            lead = timedelta(seconds=self.engine.settings.updates.download_lead)
            at = weekly.next_after(after)
            return Occurrence(node=record.node, kind="update", at=at, fire_at=at - lead)
        at = weekly.next_after(after)
        until = None
        if record.end is not None:
            end = Weekly(
                days=tuple(range(7)), at=parse_time_text(record.end), tz=self.engine.settings.tz
            )
            until = end.next_after(at)
        return Occurrence(node=record.node, kind="download", at=at, fire_at=at, until=until)

    # -- timers ------------------------------------------------------------------------

    async def rebuild(self) -> None:
        """Replace every timer with the ones the store's schedules call for."""
        async with self._lock:
            self._fingerprint = await self._schedule_fingerprint()
            self._timers.remove_all_jobs()
            self._groups.clear()
            self._group_of.clear()
            now = self.engine.clock.now()
            for record in await self.store.schedules():
                if record.enabled and record.node in self.engine.drivers:
                    self._plan(self.next_occurrence(record, now))

    def _plan(self, occurrence: Occurrence) -> None:
        """Plan the occurrence's timer: it joins the timer of the occurrences of the same
        kind planned for the same moment (replacing the node's earlier plan, if any)."""
        planned = max(occurrence.fire_at, self.engine.clock.now())
        mine = (occurrence.kind, occurrence.node)
        earlier = self._group_of.pop(mine, None)
        if earlier is not None and earlier in self._groups:
            self._groups[earlier] = [o for o in self._groups[earlier] if o.node != mine[1]]
        key = (occurrence.kind, planned)
        members = self._groups.get(key)
        if members is None:
            members = self._groups[key] = []
            self._timers.add_job(
                self._fire_group,
                DateTrigger(run_date=planned),
                args=[key],
                id=f"{occurrence.kind}:{planned.isoformat()}",
                replace_existing=True,
                misfire_grace_time=int(self.engine.settings.updates.update_grace) or 1,
            )
        members.append(occurrence)
        self._group_of[mine] = key

    async def _fire_group(self, key: tuple[str, datetime]) -> None:
        """The timer of the occurrences planned for one moment."""
        for occurrence in self._groups.pop(key, []):
            if self._group_of.get((occurrence.kind, occurrence.node)) == key:
                del self._group_of[(occurrence.kind, occurrence.node)]
            await self._fire(occurrence, key[1])

    async def _fire(self, occurrence: Occurrence, planned: datetime) -> None:
        """A schedule's timer: its occurrence joins the others due at the same time, and
        they start together shortly after (one look, one transaction for all)."""
        self.fired_late.append((self.engine.clock.now() - planned).total_seconds())
        key = (occurrence.kind, occurrence.at, occurrence.until)
        due = self._due.get(key)
        if due is None:
            due = self._due[key] = []
            self._spawn(self._start_due(key), f"scheduled-{occurrence.kind}-{occurrence.at}")
        due.append(occurrence)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_due(self, key: tuple[str, datetime, datetime | None]) -> None:
        await asyncio.sleep(FIRE_SETTLE)  # the other timers of this occurrence fire meanwhile
        occurrences = self._due.pop(key)
        kind, at, _ = key
        runs: dict[str, int] = {}
        try:
            runs = await self._start(occurrences)
        except Exception:
            log.exception(
                "scheduled %s at %s did not start on %s",
                kind,
                at,
                ", ".join(o.node for o in occurrences[:20]),
            )
        nodes = {o.node for o in occurrences}
        async with self._lock:
            for record in await self.store.schedules():
                if record.node in nodes and record.kind == kind and record.enabled:
                    self._plan(self.next_occurrence(record, at))
        if kind == "update" and runs:
            await self.runs.watch_preparation(at, runs)

    async def _start(self, occurrences: Sequence[Occurrence]) -> dict[str, int]:
        """Start the runs of occurrences of one kind and time; an occurrence that already
        ran (another instance, or before a restart) is left out."""
        if not occurrences:
            return {}
        first = occurrences[0]
        by_key = {f"{o.kind}:{o.node}": o for o in occurrences}
        fresh = await self.store.kv_claim(FIRED, list(by_key), first.at.isoformat())
        kind = "scheduled-update" if first.kind == "update" else "scheduled-download"
        return await self.runs.start_many(
            kind, [by_key[k].node for k in fresh], at=first.at, until=first.until
        )

    async def catch_up(self) -> None:
        """Start a scheduled update missed while the service was down, if within grace."""
        now = self.engine.clock.now()
        lead = timedelta(seconds=self.engine.settings.updates.download_lead)
        grace = timedelta(seconds=self.engine.settings.updates.update_grace)
        late: dict[datetime, list[Occurrence]] = {}
        for record in await self.store.schedules():
            if not record.enabled or record.kind != "update":
                continue
            if record.node not in self.engine.drivers:
                continue
            at = self._weekly(record).previous_at_or_before(now + lead)
            if at is None or at - lead <= record.updated_at:
                continue  # it was not yet scheduled then
            key = f"update:{record.node}"
            if await self.store.kv_get(FIRED, key) == at.isoformat():
                continue
            if now <= at + grace:
                log.warning(
                    "scheduled update of %s at %s is late; starting it now", record.node, at
                )
                late.setdefault(at, []).append(
                    Occurrence(node=record.node, kind="update", at=at, fire_at=at - lead)
                )
            else:
                await self.store.kv_set(FIRED, key, at.isoformat())
                await self.engine.record(
                    SCHEDULER,
                    "scheduled update missed",
                    target=record.node,
                    detail=f"the update at {local_text(at, self.engine.settings.tz)} passed "
                    "while tgops was down; skipped, the next one is planned",
                )
        for occurrences in late.values():
            await self._start(occurrences)

    # -- commands ----------------------------------------------------------------------

    async def set(
        self,
        target: str,
        kind: str,
        *,
        days: tuple[int, ...],
        at: time,
        until: time | None,
        actor: Actor,
    ) -> list[str]:
        names = self.engine.resolve(target)
        detail = f"on {days_text(days)} {time_text(at)}" + (
            f" until {time_text(until)}" if until else ""
        )
        # every node's schedule and its audit record in one transaction (10,000 nodes:
        # one commit instead of 20,000)
        await self.store.set_schedules(
            names,
            kind=kind,
            days=days_text(days),
            start=time_text(at),
            end=None if until is None else time_text(until),
            by=actor.name,
            audit=self.store.audit_entry(
                actor=actor.name, source=actor.source, action=f"schedule {kind} on", detail=detail
            ),
        )
        await self.rebuild()
        return names

    async def disable(self, target: str, kind: str, *, actor: Actor) -> tuple[list[str], list[str]]:
        names = self.engine.resolve(target)
        off = await self.store.disable_schedules(
            names,
            kind=kind,
            by=actor.name,
            audit=self.store.audit_entry(
                actor=actor.name, source=actor.source, action=f"schedule {kind} off"
            ),
        )
        switched = set(off)
        await self.rebuild()
        return off, [name for name in names if name not in switched]

    async def listing(self) -> str:
        now = self.engine.clock.now()
        tz = self.engine.settings.tz
        lines = []
        for record in await self.store.schedules():
            if not record.enabled:
                continue
            nxt = self.next_occurrence(record, now)
            if record.kind == "update":
                lines.append(
                    f"{record.node}: update on {record.days} {record.start} — next "
                    f"{local_text(nxt.at, tz)} (download from "
                    f"{local_text(nxt.fire_at, tz)})"
                )
            else:
                end = f" until {record.end}" if record.end else ""
                lines.append(
                    f"{record.node}: download on {record.days} {record.start}{end} — "
                    f"next {local_text(nxt.at, tz)}"
                )
        if not lines:
            return "No schedules are on."
        return "\n".join([*lines, f"({zone_note(tz)})"])

    async def plan(self, target: str | None) -> str:
        """The timeline of the next scheduled runs, with the expected wait for slots."""
        names = self.engine.resolve(target)
        now = self.engine.clock.now()
        tz = self.engine.settings.tz
        settings = self.engine.settings
        notice = timedelta(seconds=settings.maintenance.notice_lead)
        drain = timedelta(seconds=settings.maintenance.lb_drain_lead)
        events: list[tuple[datetime, str]] = []
        updates: list[Occurrence] = []
        schedules = [r for r in await self.store.schedules() if r.enabled and r.node in names]
        idle = await self._nothing_pending(
            sorted({r.node for r in schedules if r.kind == "update"})
        )
        for record in schedules:
            occ = self.next_occurrence(record, now)
            if record.kind == "download":
                until = f" until {local_text(occ.until, tz)}" if occ.until else ""
                events.append((occ.at, f"{occ.node}: scheduled download{until}"))
                continue
            if occ.node in idle:
                # the check finds nothing, logs "no updates" and ends (L4)
                events.append(
                    (
                        occ.fire_at,
                        f"{occ.node}: checks for updates; nothing is pending now, so nothing "
                        "else happens unless an update is published before then",
                    )
                )
                continue
            updates.append(occ)
            events.append(
                (
                    occ.fire_at,
                    f"{occ.node}: checks for updates and downloads them; "
                    "maintenance mode if any are pending",
                )
            )
            events.append(
                (
                    max(occ.at - notice, occ.fire_at),
                    f"{occ.node}: maintenance notices to users every "
                    f"{format_duration(settings.maintenance.reminder_interval)} until the update",
                )
            )
        held = await self._held(names)
        if not events:
            return "\n".join([*held, "Nothing is scheduled for " + (target or "the fleet") + "."])
        duration = await self._typical_update()
        events += await self._late(updates, now)
        for occ in updates:
            cluster = self.engine.cluster_of[occ.node]
            if cluster is None:
                events.append((occ.at, f"{occ.node}: logon disabled, sessions ended, install"))
                continue
            limit = settings.clusters[cluster].max_parallel_updates
            same = sorted(
                o.node
                for o in updates
                if o.at == occ.at and self.engine.cluster_of[o.node] == cluster
            )
            rounds = same.index(occ.node) // limit
            if rounds == 0:
                events.append(
                    (
                        occ.at - drain,
                        f"{occ.node}: takes a slot of {cluster}, leaves load balancing",
                    )
                )
                events.append((occ.at, f"{occ.node}: sessions ended, install"))
                continue
            if duration is None:
                wait = f"after {rounds} round(s) of {limit} node(s) of {cluster}"
                events.append(
                    (
                        occ.at,
                        f"{occ.node}: waits for a slot of {cluster}; "
                        f"leaves load balancing and installs {wait}",
                    )
                )
            else:
                start = occ.at + timedelta(seconds=rounds * duration)
                late = ""
                if rounds * duration > settings.updates.slot_wait:
                    late = (
                        f"; longer than updates.slot_wait "
                        f"({format_duration(settings.updates.slot_wait)}): it would be skipped"
                    )
                events.append(
                    (
                        start,
                        f"{occ.node}: expected to get a slot of {cluster} "
                        f"(waits {about(rounds * duration)}{late}), leaves load "
                        "balancing, sessions ended, install",
                    )
                )
        lines = [*held, *(f"{local_text(when, tz)}  {text}" for when, text in sorted(events))]
        if duration is not None:
            lines.append(f"(estimates use the median update duration here: {about(duration, '')})")
        return "\n".join([*lines, *await self._gate_now(updates), f"({zone_note(tz)})"])

    async def _nothing_pending(self, names: list[str]) -> frozenset[str]:
        """Nodes with nothing to install as far as the last manifest tells (none known:
        nothing is claimed)."""
        if not names or self.engine.settings.updates.channel not in self.engine.manifests:
            return frozenset()
        selected = await self.store.selected_hotfixes()
        return frozenset(
            record.name
            for record in await self.store.nodes(names)
            if not self.engine.pending(record, selected.get(record.name, []))
        )

    async def _late(
        self, updates: Sequence[Occurrence], now: datetime
    ) -> list[tuple[datetime, str]]:
        """Lines for the nodes whose scheduled update is under way but not yet downloaded
        and staged although it should be by now."""
        if not updates:
            return []
        active = {
            r.node: r
            for r in await self.store.runs(statuses=("queued", "running"), limit=100_000)
            if r.kind == "scheduled-update"
        }
        lines = []
        for occ in updates:
            run = active.get(occ.node)
            if run is None or run.params.get("at") != occ.at.isoformat():
                continue
            late = preparation_late(self.engine.settings, run, now)
            if late is not None:
                due = local_text(datetime.fromisoformat(late["due"]), self.engine.settings.tz)
                text = (
                    f"{occ.node}: preparation late: run #{run.id} still at step "
                    f"{late['step']} (due by {due})"
                )
                lines.append((now, text))
        return lines

    async def _held(self, names: list[str]) -> list[str]:
        """Runs the gate holds now (``core.lifecycle.hold``), one line each."""
        tz = self.engine.settings.tz
        lines = []
        for run in await self.store.runs(statuses=("queued", "running"), limit=10_000):
            held = held_by_gate(run)
            if held is not None and run.node in names:
                lines.append(
                    f"{local_text(self.engine.clock.now(), tz)}  {run.node}: run #{run.id} "
                    f"{run.kind} {held_text(held, tz)}"
                )
        return sorted(lines)

    async def _gate_now(self, updates: list[Occurrence]) -> list[str]:
        """What the gate would say now for the nodes with an update planned."""
        gate = self.runs.life.hold.gate
        if gate is None or not updates:
            return []
        verdicts = await gate.check_many({o.node: self.engine.cluster_of[o.node] for o in updates})
        return [
            f"(the gate would hold {node} if it were asked now: {verdict.text})"
            for node, verdict in sorted(verdicts.items())
            if not verdict.passes
        ]

    async def _typical_update(self) -> float | None:
        spans = sorted(
            (r.finished_at - r.started_at).total_seconds()
            for r in await self.store.runs(statuses=("succeeded",), limit=200)
            if r.kind in {"auto-update", "scheduled-update"}
            and r.started_at is not None
            and r.finished_at is not None
        )
        return spans[len(spans) // 2] if spans else None


def about(seconds: float, prefix: str = "~") -> str:
    """A duration as an estimate: ``less than a minute``, ``~40s``, ``~12 min``."""
    if seconds < 1:
        return "less than a second"
    if seconds < 90:
        return f"{prefix}{round(seconds)}s"
    return f"{prefix}{round(seconds / 60)} min"
