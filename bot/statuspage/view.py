"""What the status page shows, computed from the store and the schedules, in a language.

Per system (a cluster with its nodes, or a single system): is it available, in
maintenance (since, reason, expected end) or is maintenance planned (when, reason, whether
logon will be disabled); the windows of the next ``DAYS`` days, recurring scheduled
updates as such, and the last ``HISTORY`` ended windows with how long they took.

Only names, times and reasons are shown: no actors, contacts, lock causes or commands.
Versions only when ``statuspage.show_versions`` is set.

"Expected end": the manual gives maintenance no end (an administrator ends it), so the
page estimates it from the system's ended windows (the median of their durations, of the
same origin when there are such); without any it says that an administrator ends it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote, urlencode

from bot.calendar_feed import occurrences
from core.lifecycle.engine import Engine
from core.lifecycle.scheduled import SCHEDULED_REASON
from core.lifecycle.scheduler import Scheduler
from core.store import MaintenanceRecord, NodeRecord, ScheduleRecord
from notify.i18n import Translator

DAYS = 14
"""Windows planned this many days ahead are listed."""
HISTORY = 10
"""Ended windows listed per system."""
MAX_PLANNED = 50
"""Planned entries listed per system at most (the page stays small)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    node: str
    start: str
    start_iso: str
    reason: str
    logon_disabled: bool
    expected_end: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Recurring:
    """A recurring scheduled update, with its next occurrence in the listed days."""

    node: str
    text: str
    next: str = ""
    next_iso: str = ""
    logon_disabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Past:
    node: str
    start: str
    start_iso: str
    duration: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Versions:
    node: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemView:
    name: str
    label: str
    url: str
    ics_url: str
    state: str
    """``available``, ``partial`` (some nodes of a cluster in maintenance), ``maintenance``
    or ``planned`` (available, maintenance within the listed days)."""
    state_text: str
    now: tuple[Window, ...]
    planned: tuple[Window, ...]
    recurring: tuple[Recurring, ...]
    history: tuple[Past, ...]
    versions: tuple[Versions, ...]
    next_start: datetime | None
    next_text: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class System:
    """One entry of the page: a cluster, a single system, or one node of a cluster."""

    name: str
    nodes: tuple[str, ...]
    cluster: bool


def reason_text(reason: str, t: Translator) -> str:
    return t._("Scheduled update") if reason == SCHEDULED_REASON else reason


def schedule_text(schedule: ScheduleRecord, t: Translator) -> str:
    """``update every weekday at 22:00`` (days as configured: daily, mon-fri, a list)."""
    at = schedule.start.removesuffix(":00") if schedule.start.count(":") == 2 else schedule.start
    if t.language == "de":
        at = f"{at} Uhr"
    days = schedule.days.strip().lower()
    if days == "daily":
        return t._("scheduled update daily at %(time)s", time=at)
    if days == "mon-fri":
        return t._("scheduled update every weekday (Mon to Fri) at %(time)s", time=at)
    names = t.weekdays([d.strip() for d in days.split(",")])
    return t._("scheduled update every %(days)s at %(time)s", days=names, time=at)


class StatusView:
    """Builds the page's systems from the engine's store and the scheduler."""

    def __init__(self, engine: Engine, scheduler: Scheduler, *, show_versions: bool) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.show_versions = show_versions
        self.settings = engine.settings

    async def systems(
        self, systems: Sequence[System], t: Translator, urls: Urls
    ) -> list[SystemView]:
        engine = self.engine
        names = sorted({n for s in systems for n in s.nodes})
        now = engine.clock.now()
        horizon = now + timedelta(days=DAYS)
        windows = [w for w in await engine.store.maintenance() if w.node in names]
        history = [
            h
            for system in systems
            for h in await engine.store.maintenance_history(system.nodes, limit=HISTORY)
        ]
        schedules = [
            s
            for s in await engine.store.schedules()
            if s.enabled and s.kind == "update" and s.node in names
        ]
        records = {r.name: r for r in await engine.store.nodes(names)} if self.show_versions else {}
        return [
            self._system(
                s,
                t=t,
                urls=urls,
                now=now,
                horizon=horizon,
                windows=windows,
                history=history,
                schedules=schedules,
                records=records,
            )
            for s in systems
        ]

    def _system(
        self,
        system: System,
        *,
        t: Translator,
        urls: Urls,
        now: datetime,
        horizon: datetime,
        windows: Sequence[MaintenanceRecord],
        history: Sequence[MaintenanceRecord],
        schedules: Sequence[ScheduleRecord],
        records: dict[str, NodeRecord],
    ) -> SystemView:
        tz = self.settings.tz
        mine = set(system.nodes)
        past = [h for h in history if h.node in mine]
        now_windows: list[Window] = []
        planned: list[tuple[datetime, str, Window]] = []
        opened = set()
        for w in windows:
            if w.node not in mine:
                continue
            if w.origin == "scheduled-update":
                opened.add((w.node, w.start))
            if w.start <= now:
                now_windows.append(
                    Window(
                        node=w.node,
                        start=t.datetime_text(w.start, tz),
                        start_iso=w.start.isoformat(),
                        reason=reason_text(w.reason, t),
                        logon_disabled=w.disable_logon,
                        expected_end=self._expected_end(w, past, t),
                    )
                )
            elif w.start <= horizon:
                planned.append((w.start, w.node, self._window(w.node, w.start, w.reason, w, t)))
        recurring = []
        nexts: list[tuple[datetime, str]] = [(when, w.start) for when, _, w in planned]
        for schedule in schedules:
            if schedule.node not in mine:
                continue
            upcoming = [
                o.at
                for o in occurrences(self.scheduler, schedule, now, horizon)
                if (schedule.node, o.at) not in opened
            ]
            first = upcoming[0] if upcoming else None
            recurring.append(
                Recurring(
                    node=schedule.node,
                    text=schedule_text(schedule, t),
                    next="" if first is None else t.datetime_text(first, tz),
                    next_iso="" if first is None else first.isoformat(),
                    logon_disabled=self.engine.cluster_of.get(schedule.node) is None,
                )
            )
            if first is not None:
                nexts.append((first, t.datetime_text(first, tz)))
        planned.sort(key=lambda p: (p[0], p[1]))
        nexts.sort()
        down = {w.node for w in now_windows}
        if not down:
            state = "planned" if nexts else "available"
        elif down >= mine:
            state = "maintenance"
        else:
            state = "partial"
        texts = {
            "available": t._("available"),
            "planned": t._("available; maintenance planned"),
            "maintenance": t._("maintenance now"),
            "partial": t.n_(
                "available; %(count)d of %(total)d nodes in maintenance",
                "available; %(count)d of %(total)d nodes in maintenance",
                len(down),
                total=len(mine),
            ),
        }
        versions = tuple(
            Versions(
                node=name,
                text=", ".join(f"{p} {v}" for p, v in sorted(records[name].installed.items()))
                or t._("nothing installed"),
            )
            for name in system.nodes
            if name in records
        )
        cluster = self.engine.cluster_of.get(system.nodes[0]) if system.nodes else None
        if system.cluster:
            label = t._("Cluster %(name)s", name=system.name)
        elif cluster is not None:
            label = t._("%(node)s (cluster %(cluster)s)", node=system.name, cluster=cluster)
        else:
            label = system.name
        return SystemView(
            name=system.name,
            label=label,
            url=urls.system(system.name),
            ics_url=urls.calendar(system.name),
            state=state,
            state_text=texts[state],
            now=tuple(now_windows),
            planned=tuple(p[2] for p in planned[:MAX_PLANNED]),
            recurring=tuple(recurring),
            history=tuple(
                Past(
                    node=h.node,
                    start=t.datetime_text(h.start, tz),
                    start_iso=h.start.isoformat(),
                    duration=t.duration(_took(h)),
                    reason=reason_text(h.reason, t),
                )
                for h in past[:HISTORY]
            ),
            versions=versions,
            next_start=nexts[0][0] if nexts else None,
            next_text=nexts[0][1] if nexts else "",
        )

    def _window(
        self, node: str, start: datetime, reason: str, w: MaintenanceRecord, t: Translator
    ) -> Window:
        tz = self.settings.tz
        single = self.engine.cluster_of.get(node) is None
        return Window(
            node=node,
            start=t.datetime_text(start, tz),
            start_iso=start.isoformat(),
            reason=reason_text(reason, t),
            logon_disabled=w.disable_logon or (single and w.origin == "scheduled-update"),
        )

    def _expected_end(
        self, window: MaintenanceRecord, past: Sequence[MaintenanceRecord], t: Translator
    ) -> str:
        same = [_took(h) for h in past if h.node == window.node and h.origin == window.origin]
        spans = same or [_took(h) for h in past if h.origin == window.origin]
        if not spans:
            return t._("not known (an administrator ends the maintenance)")
        median = timedelta(seconds=statistics.median(s.total_seconds() for s in spans))
        end = window.start + median
        return t._(
            "about %(time)s (from %(count)s earlier windows)",
            time=t.datetime_text(end, self.settings.tz),
            count=len(spans),
        )


def _took(window: MaintenanceRecord) -> timedelta:
    assert window.ended_at is not None
    return max(timedelta(0), window.ended_at - window.start)


class Urls:
    """Links of the page (under ``base``), carrying the token and the asked language."""

    def __init__(self, *, base: str, token: str | None, lang: str | None) -> None:
        self.base = base
        self.token = token
        self.lang = lang

    def query(self) -> str:
        params = {}
        if self.lang:
            params["lang"] = self.lang
        if self.token:
            params["token"] = self.token
        return f"?{urlencode(params)}" if params else ""

    def system(self, name: str) -> str:
        return f"{self.base}/status/{quote(name)}{self.query()}"

    def calendar(self, name: str) -> str:
        params = {"target": name} | ({"lang": self.lang} if self.lang else {})
        return f"{self.base}/maintenance.ics?{urlencode(params)}"
