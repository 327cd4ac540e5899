"""``GET /maintenance.ics`` of a running service, parsed with icalendar as a calendar app
would: what was scheduled (``maintenance schedule …``, ``schedule update …``) is listed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
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


async def test_feed_lists_maintenance_and_scheduled_updates(tmp_path: Path) -> None:
    # Monday 25 March 2030; Berlin changes to summer time on Sunday 31 March
    async with service_at(tmp_path, datetime(2030, 3, 25, 12, 0, tzinfo=UTC)) as (_, api):
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
        assert str(tg1["status"]) == "CONFIRMED"
        description = str(tg1["description"])
        assert "Node: tg1 (cluster c1)" in description
        assert "Start: 2030-03-27 10:00 (Europe/Berlin)" in description
        assert "from 2030-03-27 08:00 (Europe/Berlin)" in description  # notice_lead 2 h
        assert "Logon is disabled at the start." in description
        assert starts(events, "Maintenance of solo1: Disk swap") == [
            datetime(2030, 4, 2, 20, 30, tzinfo=UTC)  # summer time: UTC+2
        ]

        # 03:00 Berlin on weekdays of the next 14 days, across the change to summer time
        expected = [datetime(2030, 3, d, 2, 0, tzinfo=UTC) for d in (26, 27, 28, 29)] + [
            datetime(2030, 4, d, 1, 0, tzinfo=UTC) for d in (1, 2, 3, 4, 5, 8)
        ]
        for node in ("tg1", "tg2", "tg3"):
            assert starts(events, f"Scheduled update of {node}") == expected, node
        update = next(e for e in events if str(e["summary"]) == "Scheduled update of tg2")
        assert str(update["status"]) == "TENTATIVE"
        assert update.decoded("duration") == HOUR
        assert "it runs only if updates are pending" in str(update["description"])
        assert "leaves load balancing from 2030-03-26 02:00" in str(update["description"])
        assert str(update["uid"]) == "update-tg2-20300326T020000Z@127.0.0.1"
        assert len(events) == 2 + 3 * len(expected)
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
            "Scheduled update of tg1",
            "Maintenance of tg1: Kernel upgrade; reboot",
            "Scheduled update of tg1",
        ]
        _, text = await feed(api, "?target=nosuch", status=404)
        assert "'nosuch' is neither a node nor a cluster" in text
        _, text = await feed(api, "?days=0", status=400)
        assert "from 1 to 62" in text

        assert (await api.command("maintenance cancel tg1"))["ok"]
        assert (await api.command("schedule update tg3 off"))["ok"]
        events, _ = await feed(api)
        summaries = {str(e["summary"]) for e in events}
        assert summaries == {
            "Maintenance of solo1: Disk swap",
            "Scheduled update of tg1",
            "Scheduled update of tg2",
        }


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
            assert [str(e["status"]) for e in events] == ["TENTATIVE", "TENTATIVE"]
            assert events[0].decoded("dtstart") == at.astimezone(UTC)

            # the run started: the node is in maintenance for that update, listed once
            await recorder.wait_for(
                lambda e: isinstance(e, ev.MaintenanceScheduled) and e.node == "solo1"
            )
            events, _ = await feed(api, "?target=solo1&days=2")
            first, *rest = events
            assert str(first["summary"]) == "Maintenance of solo1: Scheduled update"
            assert str(first["status"]) == "CONFIRMED"
            assert str(first["uid"]).startswith("maintenance-")
            assert first.decoded("dtstart") == at.astimezone(UTC)
            assert "opened by a scheduled update" in str(first["description"])
            assert rest and all(e.decoded("dtstart") > at for e in rest)
            assert all(str(e["status"]) == "TENTATIVE" for e in rest)

            done = await recorder.wait_for(
                lambda e: isinstance(e, ev.RunFinished) and e.node == "solo1", within=40
            )
            assert isinstance(done, ev.RunFinished) and done.outcome == "succeeded"
            events, _ = await feed(api, "?target=solo1&days=2")
            assert events and all(str(e["status"]) == "TENTATIVE" for e in events)
            assert all(e.decoded("dtstart") > at for e in events)
