"""``GET /maintenance.ics``: scheduled maintenance as an iCalendar feed (icalendar).

* One VEVENT per open maintenance window (L3, and the windows scheduled updates open),
  ``STATUS:CONFIRMED``, ``SEQUENCE:0``.
* One VEVENT per window called off (cancelled, or replaced by another, before its start)
  in the last ``KEEP_CANCELLED`` (30 days): ``STATUS:CANCELLED``, ``SEQUENCE:1``, so that
  calendars that copied the event remove it.
* One VEVENT per update schedule (L4) and node: ``DTSTART`` the first update time after
  the schedule was set, as wall time with ``TZID`` (and its ``VTIMEZONE``), ``RRULE`` the
  week days, so DST is followed as ``Scheduler`` follows it; ``EXDATE`` for an occurrence
  that opened a window (listed as that window). ``SEQUENCE`` grows with every change of
  the schedule; a schedule switched off stays ``KEEP_CANCELLED`` as ``CANCELLED``.
  Scheduled downloads are left out: they do not touch users.
* ``UID``: a random UUID stored with the window or schedule (column ``uid``), so UIDs never
  repeat, also after a store reset; a schedule keeps its UID when it changes.
* ``DURATION`` ``MAINTENANCE_DURATION`` (1 h): the manual gives maintenance no end.
* ``ETag`` (a hash of the body) and ``304`` for a matching ``If-None-Match``.
* No authentication (calendar apps subscribe without credentials), so the feed holds only
  node and cluster names, times and reasons: no actors, tokens or addresses.

``?target=NODE|CLUSTER`` narrows the feed; ``?days=N`` (1 to ``MAX_DAYS``) is the horizon in
which occurrences that opened windows are looked up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from aiohttp import web
from icalendar import Calendar, Event
from sqlalchemy.exc import SQLAlchemyError

from core.errors import StoreError
from core.lifecycle.engine import Engine, UnknownTargetError
from core.lifecycle.scheduled import SCHEDULED_REASON
from core.lifecycle.scheduler import Occurrence, Scheduler
from core.settings import LANGUAGES
from core.store import MaintenanceRecord, NodeRecord, ScheduleRecord
from core.store.base import utcnow
from notify.i18n import Translator, message_time, translator

log = logging.getLogger(__name__)

FEED_DAYS = 14
"""Scheduled updates of this many days ahead are listed."""
MAX_DAYS = 62
MAINTENANCE_DURATION = timedelta(hours=1)
"""Nominal length of a maintenance or update event in the calendar."""
REFRESH = "PT15M"
"""How often calendar clients are asked to fetch the feed again."""
CONTENT_TYPE = "text/calendar; charset=utf-8"
KEEP_CANCELLED = timedelta(days=30)
"""Cancelled and replaced windows, and schedules switched off, stay in the feed this long."""
SEQUENCE_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
WEEKDAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
FEED_TIMEOUT = 10.0
"""Longest wait for the store while the feed is built."""


def _origin(origin: str, t: Translator) -> str:
    if origin == "manual":
        return t._("scheduled by a maintenance admin")
    if origin == "scheduled-update":
        return t._("opened by a scheduled update")
    if origin == "download-failure":
        return t._("opened because a scheduled update could not be downloaded")
    return origin


def occurrences(
    scheduler: Scheduler, record: ScheduleRecord, now: datetime, horizon: datetime
) -> Iterator[Occurrence]:
    """The schedule's occurrences from ``now`` up to ``horizon``, as the timers plan them."""
    occurrence = scheduler.next_occurrence(record, now)
    for _ in range(400):  # a weekly schedule fires at most daily: bounded by the horizon
        if occurrence.at > horizon:
            return
        yield occurrence
        following = scheduler.next_occurrence(record, occurrence.at)
        if following.at <= occurrence.at:
            return
        occurrence = following


class MaintenanceFeed:
    """Builds the feed from the store and the schedules; ``add_routes`` serves it."""

    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.settings = engine.settings
        self.domain = urlsplit(self.settings.http.public_url).hostname or "tgops"

    def _local(self, when: datetime, t: Translator) -> str:
        return f"{message_time(t, when, self.settings.tz)} ({self.settings.timezone})"

    def _where(self, node: str, t: Translator) -> str:
        cluster = self.engine.cluster_of.get(node)
        if cluster:
            return t._("%(node)s (cluster %(cluster)s)", node=node, cluster=cluster)
        return t._("%(node)s (single system)", node=node)

    async def calendar(
        self, target: str | None = None, days: int = FEED_DAYS, language: str | None = None
    ) -> Calendar:
        """The feed for ``target`` (node, cluster, ``all``; None = all), in ``language``
        (default ``notify.language``)."""
        t = translator(language or self.settings.notify.language)
        engine = self.engine
        names = set(engine.resolve(target))
        now = engine.clock.now()
        horizon = now + timedelta(days=days)
        # the store stamps some ends with its own time: whichever clock is behind
        kept_since = min(now, utcnow()) - KEEP_CANCELLED
        windows = [m for m in await engine.store.maintenance() if m.node in names]
        called_off = [
            m for m in await engine.store.maintenance_called_off(kept_since) if m.node in names
        ]
        schedules = [
            s
            for s in await engine.store.schedules()
            if s.kind == "update" and s.node in names and (s.enabled or s.updated_at >= kept_since)
        ]
        locks = {r.name: r for r in await engine.store.nodes(sorted(names))}
        events = [self._window(w, t) for w in windows]
        events += [self._window(w, t, cancelled=True) for w in called_off]
        # an occurrence that has opened its window is listed as that window
        opened = {(w.node, w.start) for w in windows if w.origin == "scheduled-update"}
        for schedule in schedules:
            skipped = [
                o.at
                for o in occurrences(self.scheduler, schedule, now, horizon)
                if (schedule.node, o.at) in opened
            ]
            events.append(self._update(schedule, skipped, locks.get(schedule.node), t))
        cal = Calendar()
        cal.add("prodid", "-//tgops//maintenance feed//EN")
        cal.add("version", "2.0")
        cal.add("calscale", "GREGORIAN")
        cal.add("method", "PUBLISH")
        cal.add("x-wr-calname", t._("tgops maintenance"))
        cal.add(
            "x-wr-caldesc",
            t._(
                "Maintenance windows and the scheduled updates of the next %(days)s days", days=days
            ),
        )
        cal.add("x-wr-timezone", self.settings.timezone)
        cal.add("refresh-interval", REFRESH, parameters={"VALUE": "DURATION"})
        cal.add("x-published-ttl", REFRESH)
        for item in sorted(events, key=lambda e: (e.decoded("dtstart"), str(e["uid"]))):
            cal.add_component(item)
        cal.add_missing_timezones()  # VTIMEZONE for the schedules' local DTSTART
        return cal

    def _window(
        self, window: MaintenanceRecord, t: Translator, *, cancelled: bool = False
    ) -> Event:
        maint = self.settings.maintenance
        notices_from = window.start - timedelta(seconds=maint.notice_lead)
        reason = t._(SCHEDULED_REASON) if window.reason == SCHEDULED_REASON else window.reason
        lines = [
            t._("Node: %(where)s", where=self._where(window.node, t)),
            t._("Reason: %(reason)s", reason=reason),
            t._("Start: %(start)s", start=self._local(window.start, t)),
            t._(
                "Logged-in users get notices every %(interval)s from %(start)s until the start.",
                interval=_span(maint.reminder_interval, t),
                start=self._local(notices_from, t),
            ),
        ]
        if window.disable_logon:
            lines.append(t._("Logon is disabled at the start."))
        lines.append(t._("Origin: %(origin)s.", origin=_origin(window.origin, t)))
        lines.append(
            t._(
                "It lasts until a maintenance admin ends it; the calendar shows a nominal "
                "%(span)s.",
                span=_span(MAINTENANCE_DURATION.total_seconds(), t),
            )
        )
        event = self._event(
            uid=window.uid or f"maintenance-{window.id}@{self.domain}",
            stamp=window.ended_at if cancelled and window.ended_at else window.created_at,
            start=window.start,
            summary=t._("Maintenance of %(node)s: %(reason)s", node=window.node, reason=reason),
            lines=lines,
            node=window.node,
            t=t,
        )
        # called off: kept KEEP_CANCELLED as CANCELLED with a higher SEQUENCE, so that
        # calendars that copied the event remove it instead of keeping it
        event.add("status", "CANCELLED" if cancelled else "CONFIRMED")
        event.add("sequence", 1 if cancelled else 0)
        event.add("categories", ["tgops", "maintenance"])
        return event

    def _update(
        self,
        schedule: ScheduleRecord,
        skipped: Sequence[datetime],
        record: NodeRecord | None,
        t: Translator,
    ) -> Event:
        """One event for a schedule: its first update time as DTSTART (local time with
        TZID, so DST is followed as the timers follow it), an RRULE for the week days, an
        EXDATE for each occurrence listed as the window it opened."""
        settings = self.settings
        weekly = self.scheduler.weekly(schedule)
        first = self.scheduler.next_occurrence(schedule, schedule.updated_at)
        lead = timedelta(seconds=settings.updates.download_lead)
        lines = [
            t._("Node: %(where)s", where=self._where(schedule.node, t)),
            t._("Reason: %(reason)s", reason=t._(SCHEDULED_REASON)),
            t._(
                "Schedule: update on %(days)s %(start)s (%(timezone)s).",
                days=schedule.days,
                start=schedule.start,
                timezone=settings.timezone,
            ),
            t._(
                "%(lead)s before each update time the node checks for updates; it runs only "
                "if updates are pending, and then downloads them.",
                lead=_span(lead.total_seconds(), t),
            ),
            t._(
                "Logged-in users get maintenance notices from %(lead)s before; their "
                "sessions end at the update time.",
                lead=_span(min(lead.total_seconds(), settings.maintenance.notice_lead), t),
            ),
        ]
        cluster = self.engine.cluster_of.get(schedule.node)
        if cluster is not None:
            limit = settings.clusters[cluster].max_parallel_updates
            lines.append(
                t._(
                    "It leaves load balancing %(lead)s before; at most %(limit)s node(s) of "
                    "%(cluster)s update at once, the others wait their turn.",
                    lead=_span(settings.maintenance.lb_drain_lead, t),
                    limit=limit,
                    cluster=cluster,
                )
            )
        else:
            lines.append(t._("Logon is disabled immediately before the update time."))
        if record is not None and record.update_lock_since is not None:
            lines.append(
                t._("The update lock is set: this update is skipped unless it is removed.")
            )
        event = self._event(
            uid=schedule.uid or f"update-{schedule.node}@{self.domain}",
            stamp=schedule.updated_at,
            start=first.at.astimezone(settings.tz),
            summary=t._("Scheduled update of %(node)s", node=schedule.node),
            lines=lines,
            node=schedule.node,
            t=t,
        )
        days = sorted(weekly.days)
        if len(days) == len(WEEKDAYS):
            event.add("rrule", {"FREQ": "DAILY"})
        else:
            event.add("rrule", {"FREQ": "WEEKLY", "BYDAY": [WEEKDAYS[d] for d in days]})
        for at in skipped:
            event.add("exdate", at.astimezone(settings.tz))
        event.add("status", "TENTATIVE" if schedule.enabled else "CANCELLED")
        # switched off within the second it was set: still a higher SEQUENCE
        event.add("sequence", _sequence(schedule.updated_at) + (0 if schedule.enabled else 1))
        event.add("categories", ["tgops", "scheduled-update"])
        return event

    def _event(
        self,
        *,
        uid: str,
        stamp: datetime,
        start: datetime,
        summary: str,
        lines: Sequence[str],
        node: str,
        t: Translator,
    ) -> Event:
        event = Event()
        event.add("uid", uid)
        event.add("dtstamp", stamp)
        event.add("dtstart", start)
        event.add("duration", MAINTENANCE_DURATION)
        event.add("summary", summary)
        event.add("description", "\n".join(lines))
        event.add("location", self._where(node, t))
        event.add("transp", "OPAQUE")
        return event

    # -- HTTP -------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/maintenance.ics", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        target = request.query.get("target") or None
        language = request.query.get("lang") or None
        if language is not None and language not in LANGUAGES:
            raise web.HTTPBadRequest(
                text=f"lang={language!r}: the feed speaks {', '.join(LANGUAGES)}"
            )
        raw_days = request.query.get("days", str(FEED_DAYS))
        try:
            days = int(raw_days)
        except ValueError:
            days = 0
        if not 1 <= days <= MAX_DAYS:
            raise web.HTTPBadRequest(
                text=f"days={raw_days!r}: give a whole number of days from 1 to {MAX_DAYS}"
            )
        try:
            async with asyncio.timeout(FEED_TIMEOUT):
                cal = await self.calendar(target, days, language)
        except UnknownTargetError as exc:
            raise web.HTTPNotFound(text=str(exc)) from exc
        except (StoreError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("maintenance feed: store not readable: %s", exc)
            raise web.HTTPServiceUnavailable(
                text="the store cannot be read just now; try again later"
            ) from exc
        body = cal.to_ical()
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if _matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=body,
            headers={
                **headers,
                "Content-Type": CONTENT_TYPE,
                "Content-Disposition": 'inline; filename="maintenance.ics"',
            },
        )


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether ``If-None-Match`` names this ETag (or ``*``); weak ETags compare too."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _sequence(changed: datetime) -> int:
    """A SEQUENCE that grows with every change of a schedule: seconds since 2024."""
    return max(0, int((changed - SEQUENCE_EPOCH).total_seconds()))


def _span(seconds: float, t: Translator) -> str:
    """``15 min``, ``1 h``, ``90 s``: a duration for people."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return t._("%(count)s h", count=format(seconds / 3600, "g"))
    if seconds >= 60 and seconds % 60 == 0:
        return t._("%(count)s min", count=format(seconds / 60, "g"))
    return t._("%(count)s s", count=format(seconds, "g"))
