"""``GET /maintenance.ics`` of a running service, parsed with icalendar as a calendar app
would: what was scheduled (``maintenance schedule …``, ``schedule update …``) is listed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import vobject
from dateutil.rrule import rruleset, rrulestr
from icalendar import Calendar

from bot.service import Service
from core import events as ev
from core.clock import ManualClock
from tests.events import Recorder
from tests.repo_server import serve_repo
from tests.repository import Repo
from tests.service import ADMIN_TOKEN, Api, running, settings_for

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = timedelta(hours=1)


async def feed(api: Api, query: str = "", status: int = 200) -> tuple[list[Any], str]:
    """The feed's VEVENTs and its raw text, fetched without credentials."""
    async with api.session.get(f"{api.base}/maintenance.ics{query}") as response:
        body = await response.text()
        assert response.status == status, body
        if status != 200:
            return [], body
        assert response.headers["Content-Type"] == "text/calendar; charset=utf-8"
    calendar = Calendar.from_ical(body)
    assert str(calendar["version"]) == "2.0"
    return list(calendar.walk("VEVENT")), body


def starts(events: list[Any], summary: str) -> list[datetime]:
    return [e.decoded("dtstart") for e in events if str(e["summary"]) == summary]


@asynccontextmanager
async def service_at(tmp_path: Path, now: datetime) -> AsyncIterator[tuple[Service, Api]]:
    """A service whose clock stands at ``now`` (far from today: no real timer fires)."""
    settings = settings_for(tmp_path)
    async with (
        Service(settings, clock=ManualClock(now)) as service,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        yield service, Api(base=f"http://127.0.0.1:{service.port}", session=session)


def expand(body: str, uid: str, begin: datetime, end: datetime) -> list[datetime]:
    """An event's occurrences between ``begin`` and ``end`` (UTC): its DTSTART (a wall
    time with TZID, decoded by icalendar), RRULE and EXDATE expanded with dateutil, as
    calendar apps that know the IANA zones do. The second parser (vobject) must read the
    same RRULE and DTSTART."""
    (event,) = [e for e in Calendar.from_ical(body).walk("VEVENT") if str(e["uid"]) == uid]
    start = event.decoded("dtstart")
    rules = rruleset()
    rules.rrule(rrulestr(event["rrule"].to_ical().decode(), dtstart=start))
    exdates = event.get("exdate") or []
    for exdate in exdates if isinstance(exdates, list) else [exdates]:
        for item in exdate.dts:
            rules.exdate(item.dt)
    (other,) = [e for e in vobject.readOne(body).vevent_list if e.uid.value == uid]
    assert other.rrule.value == event["rrule"].to_ical().decode()
    assert other.dtstart.value.replace(tzinfo=None) == start.replace(tzinfo=None)
    return [at.astimezone(UTC) for at in rules.between(begin, end, inc=True)]


def is_uuid(text: str) -> bool:
    return str(uuid.UUID(text)) == text


async def test_feed_lists_maintenance_and_scheduled_updates(tmp_path: Path) -> None:
    # Monday 25 March 2030; Berlin changes to summer time on Sunday 31 March
    now = datetime(2030, 3, 25, 12, 0, tzinfo=UTC)
    async with service_at(tmp_path, now) as (_, api):
        for command in (
            "maintenance schedule tg1 2030-03-27 10:00 Kernel upgrade; reboot --disable-logon",
            "maintenance schedule solo1 2030-04-02 22:30 Disk swap",
            "schedule update c1 on mon-fri 03:00",
            "schedule download solo1 on daily 01:00",  # downloads do not touch users: not listed
        ):
            reply = await api.command(command)
            assert reply["ok"], reply["text"]

        events, body = await feed(api)
        tg1 = next(
            e for e in events if str(e["summary"]) == "Maintenance of tg1: Kernel upgrade; reboot"
        )
        assert tg1.decoded("dtstart") == datetime(2030, 3, 27, 9, 0, tzinfo=UTC)
        assert tg1.decoded("duration") == HOUR
        assert (str(tg1["status"]), tg1["sequence"]) == ("CONFIRMED", 0)
        assert is_uuid(str(tg1["uid"]))
        description = str(tg1["description"])
        assert "Node: tg1 (cluster c1)" in description
        assert "Start: 2030-03-27 10:00 (Europe/Berlin)" in description
        assert "from 2030-03-27 08:00 (Europe/Berlin)" in description  # notice_lead 2 h
        assert "Logon is disabled at the start." in description
        assert starts(events, "Maintenance of solo1: Disk swap") == [
            datetime(2030, 4, 2, 20, 30, tzinfo=UTC)  # summer time: UTC+2
        ]

        # one event per node and schedule: 03:00 Berlin on weekdays, an RRULE that follows
        # the change to summer time as the timers do
        expected = [datetime(2030, 3, d, 2, 0, tzinfo=UTC) for d in (26, 27, 28, 29)] + [
            datetime(2030, 4, d, 1, 0, tzinfo=UTC) for d in (1, 2, 3, 4, 5, 8)
        ]
        for node in ("tg1", "tg2", "tg3"):
            (update,) = [e for e in events if str(e["summary"]) == f"Scheduled update of {node}"]
            assert update["rrule"]["FREQ"] == ["WEEKLY"]
            assert update["rrule"]["BYDAY"] == ["MO", "TU", "WE", "TH", "FR"]
            start = update.decoded("dtstart")
            assert (start.tzinfo.key, start.hour, start.minute) == ("Europe/Berlin", 3, 0)
            assert "TZID=Europe/Berlin" in update["dtstart"].to_ical().decode() or (
                update["dtstart"].params["TZID"] == "Europe/Berlin"
            )
            uid = str(update["uid"])
            assert is_uuid(uid)
            assert expand(body, uid, now, now + timedelta(days=14)) == expected, node
        assert "BEGIN:VTIMEZONE" in body and "TZID:Europe/Berlin" in body
        update = next(e for e in events if str(e["summary"]) == "Scheduled update of tg2")
        assert str(update["status"]) == "TENTATIVE"
        assert update.decoded("duration") == HOUR
        assert "it runs only if updates are pending" in str(update["description"])
        assert "It leaves load balancing 1 h before" in str(update["description"])
        assert len(events) == 2 + 3
        assert not [
            e for e in events if "solo1" in str(e["summary"]) and "update" in str(e["summary"])
        ]

        uids = [str(e["uid"]) for e in events]
        assert len(set(uids)) == len(uids)
        again, _ = await feed(api)
        assert [str(e["uid"]) for e in again] == uids  # stable: clients update, not duplicate
        assert ADMIN_TOKEN not in body and "token:" not in body  # no credentials, no actors

        narrowed, _ = await feed(api, "?target=tg1&days=3")
        assert [str(e["summary"]) for e in narrowed] == [
            "Scheduled update of tg1",
            "Maintenance of tg1: Kernel upgrade; reboot",
        ]
        _, text = await feed(api, "?target=nosuch", status=404)
        assert "'nosuch' is neither a node nor a cluster" in text
        _, text = await feed(api, "?days=0", status=400)
        assert "from 1 to 62" in text

        tg3_before = next(e for e in events if str(e["summary"]) == "Scheduled update of tg3")

    # cancelled: kept (30 days) as CANCELLED with a higher SEQUENCE, under the same UID
    async with service_at(tmp_path, now + timedelta(minutes=5)) as (_, api):
        assert (await api.command("maintenance cancel tg1"))["ok"]
        assert (await api.command("schedule update tg3 off"))["ok"]
        events, body = await feed(api)
        by_uid = {str(e["uid"]): e for e in events}
        assert set(by_uid) == set(uids)
        cancelled = by_uid[str(tg1["uid"])]
        assert (str(cancelled["status"]), cancelled["sequence"]) == ("CANCELLED", 1)
        off = by_uid[str(tg3_before["uid"])]
        assert str(off["status"]) == "CANCELLED"
        assert off["sequence"] > tg3_before["sequence"]
        assert {str(e["status"]) for e in events if e not in (cancelled, off)} == {
            "CONFIRMED",
            "TENTATIVE",
        }
        # and a window moved to another time: the old one cancelled, the new one listed
        reply = await api.command("maintenance schedule solo1 2030-04-03 22:30 Disk swap")
        assert reply["ok"], reply["text"]
        events, _ = await feed(api)
        solo1 = [e for e in events if str(e["summary"]) == "Maintenance of solo1: Disk swap"]
        assert sorted((str(e["status"]), e["sequence"]) for e in solo1) == [
            ("CANCELLED", 1),
            ("CONFIRMED", 0),
        ]
    # how long they stay: the store hands the feed the windows called off since a time
    async with service_at(tmp_path, now + timedelta(days=31)) as (service, _):
        ended = await service.store.maintenance_called_off(now - timedelta(days=1))
        assert str(tg1["uid"]) in {w.uid for w in ended}
        assert await service.store.maintenance_called_off(now + timedelta(days=1)) == []


async def test_two_parsers_etag_and_uids_that_survive_a_store_reset(tmp_path: Path) -> None:
    now = datetime(2030, 3, 25, 12, 0, tzinfo=UTC)
    uids = []
    for attempt in ("first", "after-reset"):  # a fresh store each time: ids start at 1 again
        async with service_at(tmp_path / attempt, now) as (_, api):
            reply = await api.command("maintenance schedule tg1 2030-03-27 10:00 Kernel upgrade")
            assert reply["ok"], reply["text"]
            assert (await api.command("schedule update solo1 on daily 02:30"))["ok"]
            async with api.session.get(f"{api.base}/maintenance.ics") as response:
                assert response.status == 200
                etag = response.headers["ETag"]
                body = await response.text()
            # both parsers read the feed the same way
            parsed = Calendar.from_ical(body)
            second = vobject.readOne(body)
            first_events = sorted(str(e["uid"]) for e in parsed.walk("VEVENT"))
            assert first_events == sorted(e.uid.value for e in second.vevent_list)
            for event in second.vevent_list:
                assert event.dtstamp.value.tzinfo is not None
                assert event.summary.value
            uids.extend(first_events)
            # unchanged: 304 without a body; weak and listed tags match too
            for tag in (etag, f"W/{etag}", f'"other", {etag}', "*"):
                headers = {"If-None-Match": tag}
                url = f"{api.base}/maintenance.ics"
                async with api.session.get(url, headers=headers) as response:
                    assert response.status == 304, tag
                    assert response.headers["ETag"] == etag
                    assert await response.read() == b""
            assert (await api.command("maintenance cancel tg1"))["ok"]
            async with api.session.get(
                f"{api.base}/maintenance.ics", headers={"If-None-Match": etag}
            ) as response:
                assert response.status == 200
                assert response.headers["ETag"] != etag
    assert len(set(uids)) == len(uids) == 4  # nothing repeats after the reset


async def test_a_started_scheduled_update_is_listed_once(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server:
        settings = settings_for(
            tmp_path,
            repository_url=server.url,
            public_key=repo.public_key,
            updates={"download_lead": "2s"},
            sections={"maintenance": {"notice_lead": "4s", "reminder_interval": "1s"}},
        )
        async with running(settings) as (service, api):
            recorder = Recorder(service.bus)
            at = (datetime.now(BERLIN) + timedelta(seconds=6)).replace(microsecond=0)
            reply = await api.command(f"schedule update solo1 on daily {at:%H:%M:%S}")
            assert reply["ok"], reply["text"]
            events, _ = await feed(api, "?target=solo1&days=2")
            (schedule,) = events
            assert str(schedule["status"]) == "TENTATIVE"
            assert schedule.decoded("dtstart") == at
            assert schedule["rrule"]["FREQ"] == ["DAILY"]
            assert "exdate" not in schedule

            # the run started: the node is in maintenance for that update, listed once (the
            # schedule's event leaves that occurrence out)
            await recorder.wait_for(
                lambda e: isinstance(e, ev.MaintenanceScheduled) and e.node == "solo1"
            )
            events, body = await feed(api, "?target=solo1&days=2")
            (first,) = [e for e in events if "Maintenance" in str(e["summary"])]
            assert str(first["summary"]) == "Maintenance of solo1: Scheduled update"
            assert str(first["status"]) == "CONFIRMED"
            assert is_uuid(str(first["uid"]))
            assert first.decoded("dtstart") == at.astimezone(UTC)
            assert "opened by a scheduled update" in str(first["description"])
            (schedule,) = [e for e in events if e is not first]
            uid = str(schedule["uid"])
            day = timedelta(days=1)
            assert expand(body, uid, at - day, at + day) == [(at + day).astimezone(UTC)]

            done = await recorder.wait_for(
                lambda e: isinstance(e, ev.RunFinished) and e.node == "solo1", within=40
            )
            assert isinstance(done, ev.RunFinished) and done.outcome == "succeeded"
            events, _ = await feed(api, "?target=solo1&days=2")
            assert [str(e["status"]) for e in events] == ["TENTATIVE"]
            assert str(events[0]["uid"]) == uid
