"""``GET /status`` of a running service over HTTP: what it shows, in which language, its
caching headers, token, live-update stream and Atom feed (the browser's view of it is
tests/test_statuspage_browser.py)."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from bot.service import Service
from core.clock import ManualClock
from tests.service import Api, running, settings_for

BERLIN = ZoneInfo("Europe/Berlin")
ATOM = "{http://www.w3.org/2005/Atom}"
NOW = datetime(2030, 3, 25, 12, 0, tzinfo=UTC)  # a Monday; far from today: no timer fires


@asynccontextmanager
async def service_at(
    tmp_path: Path, *, statuspage: dict[str, Any] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Service, Api, ManualClock]]:
    sections = {"statuspage": statuspage} if statuspage else None
    settings = settings_for(tmp_path, sections=sections, **kwargs)
    clock = ManualClock(NOW)
    async with running(settings, clock=clock) as (service, api):
        yield service, api, clock


async def get(
    api: Api, path: str, *, status: int = 200, headers: dict[str, str] | None = None
) -> tuple[str, aiohttp.typedefs.LooseHeaders]:
    async with api.session.get(f"{api.base}{path}", headers=headers or {}) as response:
        body = await response.text()
        assert response.status == status, body
        return body, response.headers


async def page_until(api: Api, path: str, text: str) -> str:
    """The page once it shows ``text`` (the reminder loop acts on its own; 10 s at most)."""
    for _ in range(100):
        html, _ = await get(api, path)
        if text in html:
            return html
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never showed {text!r}:\n{html}")


def local(when: datetime) -> str:
    return when.astimezone(BERLIN).strftime("%Y-%m-%d %H:%M")


async def ok(api: Api, command: str) -> str:
    reply = await api.command(command)
    assert reply["ok"], reply["text"]
    return str(reply["text"])


async def past_window(service: Service, api: Api, clock: ManualClock, node: str) -> None:
    """A window on ``node`` that started at NOW + 1 h and was ended 95 min later."""
    start = NOW + timedelta(hours=1)
    await ok(api, f"maintenance schedule {node} {local(start)} Disk swap")
    await clock.set(start + timedelta(minutes=95))
    await ok(api, f"maintenance cancel {node}")
    await clock.set(NOW)


async def test_page_shows_now_planned_recurring_and_ended_windows(tmp_path: Path) -> None:
    async with service_at(tmp_path) as (service, api, clock):
        html, _ = await get(api, "/status")
        assert "Every system is available. No maintenance planned in the next 14 days." in html
        assert "Cluster c1" in html and "solo1" in html

        await past_window(service, api, clock, "tg2")
        await ok(api, "schedule update solo1 on mon-fri 22:00")
        start = NOW + timedelta(hours=2)
        await ok(api, f"maintenance schedule tg1 {local(start)} Kernel update --disable-logon")
        html, _ = await get(api, "/status")
        assert "Next maintenance: 25 Mar 2030, 15:00 (c1)." in html
        assert "Kernel update" in html and "logon will be disabled" in html
        # the recurring schedule, once as such, and its occurrences of the next 14 days
        assert "scheduled update every weekday (Mon to Fri) at 22:00" in html
        assert html.count("scheduled update every weekday") == 1  # not once per occurrence
        assert 'next: <time datetime="2030-03-25T21:00:00+00:00">25 Mar 2030, 22:00</time>' in html
        # the ended window and how long it took
        assert "Disk swap" in html and "1 h 35 min" in html

        await clock.set(start + timedelta(minutes=1))
        service.maintenance.changed()
        html = await page_until(api, "/status", "available; 1 of 3 nodes in maintenance")
        assert "since <time" in html and "logon is disabled" in html
        # the expected end comes from the node's ended windows (none on tg1: the cluster's)
        assert "about 25 Mar 2030, 16:35 (from 1 earlier windows)" in html

        html, _ = await get(api, "/status/tg1")
        assert "Maintenance now: tg1." in html and "tg1 (cluster c1)" in html
        assert "solo1" not in html
        html, _ = await get(api, "/status/solo1")
        assert "Kernel update" not in html and "scheduled update every weekday" in html
        body, _ = await get(api, "/status/nope", status=404)
        assert "'nope' is not a system this status page shows" in body


async def test_no_operator_data_unless_versions_are_asked_for(tmp_path: Path) -> None:
    contacts = '[[contacts]]\nname = "Alice Secret"\nemail = "alice@example.org"\n'
    async with service_at(tmp_path, extra=contacts) as (_service, api, _):
        await ok(api, "logon disable solo1")
        html, _ = await get(api, "/status")
        main = html.split('<main id="main">')[1].split("</main>")[0]
        for secret in ("Alice", "alice@example.org", "token", "sandbox", "admin", "lock"):
            assert secret not in html.replace("display:block", ""), secret
            assert secret not in main, secret
    async with service_at(tmp_path / "v", statuspage={"show_versions": True}) as (_s, api, _):
        html, _ = await get(api, "/status")
        assert "Installed versions" in html and "nothing installed" in html


async def test_language_from_accept_language_and_lang(tmp_path: Path) -> None:
    async with service_at(tmp_path) as (_, api, _clock):
        start = NOW + timedelta(hours=2)
        await ok(api, f"maintenance schedule solo1 {local(start)} Neuer Kernel --disable-logon")
        html, headers = await get(api, "/status", headers={"Accept-Language": "de-DE,de;q=0.9"})
        assert '<html lang="de">' in html and headers["Content-Language"] == "de"
        assert "Nächste Wartung: 25.03.2030, 15:00 Uhr (solo1)." in html
        assert "Anmeldung wird gesperrt" in html and "Wartungsstatus" in html
        assert "Every system" not in html and "logon will be disabled" not in html
        html, _ = await get(api, "/status", headers={"Accept-Language": "fr, en;q=0.5, de;q=0.4"})
        assert '<html lang="en">' in html
        html, _ = await get(api, "/status?lang=de", headers={"Accept-Language": "en"})
        assert '<html lang="de">' in html and 'href="/status/solo1?lang=de"' in html
        body, _ = await get(api, "/status?lang=fr", status=400)
        assert "lang='fr': this page speaks en, de" in body


async def test_caching_headers_size_and_304(tmp_path: Path) -> None:
    async with service_at(tmp_path) as (_, api, _clock):
        for i in range(1, 4):
            start = NOW + timedelta(days=i)
            await ok(api, f"maintenance schedule tg{i} {local(start)} Kernel update {i}")
        await ok(api, "schedule update solo1 on daily 22:00")
        html, headers = await get(api, "/status")
        assert len(html.encode()) < 50 * 1024
        assert headers["Cache-Control"] == "public, max-age=10, must-revalidate"
        assert "Accept-Language" in headers["Vary"]
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "script-src 'sha256-" in headers["Content-Security-Policy"]
        etag = headers["ETag"]
        async with api.session.get(
            f"{api.base}/status", headers={"If-None-Match": etag}
        ) as response:
            assert response.status == 304 and await response.read() == b""
        await ok(api, "maintenance cancel tg1")
        _, changed = await get(api, "/status", headers={"If-None-Match": etag})
        assert changed["ETag"] != etag
        # without JavaScript the page refreshes itself
        assert '<noscript><meta http-equiv="refresh" content="60"></noscript>' in html


async def test_token_and_disabled_page(tmp_path: Path) -> None:
    async with service_at(tmp_path, statuspage={"token": "s3cret", "title": "Our systems"}) as (
        _,
        api,
        _clock,
    ):
        body, headers = await get(api, "/status", status=401)
        assert "add ?token=TOKEN" in body and headers["WWW-Authenticate"].startswith("Bearer")
        await get(api, "/status?token=wrong", status=401)
        await get(api, "/status/feed.atom", status=401)
        await get(api, "/status/events", status=401)
        html, headers = await get(api, "/status?token=s3cret")
        assert "<h1>Our systems</h1>" in html and 'href="/status/solo1?token=s3cret"' in html
        assert headers["Cache-Control"].startswith("private")
        html, _ = await get(api, "/status", headers={"Authorization": "Bearer s3cret"})
        assert "Our systems" in html
    async with service_at(tmp_path / "off", statuspage={"enabled": False}) as (_, api, _clock):
        await get(api, "/status", status=404)


async def test_systems_setting_limits_the_page(tmp_path: Path) -> None:
    async with service_at(tmp_path, statuspage={"systems": ["solo1"]}) as (_, api, _clock):
        html, _ = await get(api, "/status")
        assert "solo1" in html and "Cluster c1" not in html
        await get(api, "/status/tg1", status=404)


async def test_events_stream_tells_of_changes(tmp_path: Path) -> None:
    async with (
        service_at(tmp_path) as (_, api, _clock),
        api.session.get(f"{api.base}/status/events") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        assert first.startswith(b"retry: ")
        start = NOW + timedelta(hours=3)
        await ok(api, f"maintenance schedule tg3 {local(start)} Firmware")
        event = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        assert event == b"event: change\ndata: tg3\n\n"


async def test_atom_feed(tmp_path: Path) -> None:
    async with service_at(tmp_path) as (service, api, clock):
        await past_window(service, api, clock, "tg2")
        start = NOW + timedelta(hours=2)
        await ok(api, f"maintenance schedule solo1 {local(start)} Neuer Kernel --disable-logon")
        body, headers = await get(api, "/status/feed.atom?lang=de")
        assert headers["Content-Type"] == "application/atom+xml; charset=utf-8"
        feed = ET.fromstring(body)  # noqa: S314  (the service's own answer)
        assert feed.tag == f"{ATOM}feed"
        entries = feed.findall(f"{ATOM}entry")
        titles = {e.findtext(f"{ATOM}title") for e in entries}
        assert titles == {"Wartung von solo1: Neuer Kernel", "Wartung von tg2: Disk swap"}
        contents = {e.findtext(f"{ATOM}content") for e in entries}
        assert contents == {
            "Wartung von solo1 geplant für 25.03.2030, 15:00 Uhr: Neuer Kernel "
            "Während der Wartung ist die Anmeldung gesperrt.",
            "Wartung von tg2 ab 25.03.2030, 14:00 Uhr dauerte 1 Std. 35 Min.: Disk swap",
        }
        ids = [e.findtext(f"{ATOM}id") for e in entries]
        assert all(i and i.startswith("tag:127.0.0.1,2026:maintenance-") for i in ids)
        newest = max(e.findtext(f"{ATOM}updated") or "" for e in entries)
        assert feed.findtext(f"{ATOM}updated") == newest
