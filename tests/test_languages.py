"""German and English for everything users and contacts read.

The catalogue is complete (every text marked in the templates and modules has a German
translation, none fuzzy); every text is rendered in both languages, through the templates
and through the running service's status page, Atom feed and calendar; no English is
left in the German output. The phrases of a call (notify/webhooks.py, notify/phone.py)
and the e-mail subjects (notify/notifier.py) are rendered by the end-to-end tests of
tests/test_notify_phone.py and test_notify_email.py in English and by
``test_german_contact_gets_german_mail_and_call`` here in German.
"""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.etree import ElementTree

import pytest

from core.clock import ManualClock
from core.model import Actor
from notify.i18n import Translator, extract, missing, negotiate, translations
from notify.render import Renderer
from tests.service import Api, running, settings_for

NOW = datetime(2030, 3, 25, 12, 0, tzinfo=UTC)  # a Monday
ELSEWHERE = ("notify/webhooks.py", "notify/phone.py", "notify/notifier.py")
"""Modules whose texts the end-to-end notification tests render (see above)."""
HOTFIX = {"id": "HF-7", "package": "tg-vnc", "version": "2.0-1", "urgency": "urgent"}


def template_outputs(language: str) -> list[str]:
    """Every template, with variables that take every branch."""
    renderer = Renderer()
    out: list[str] = []
    for urgent, summary, nodes in ((True, "Fixes a crash.", ["tg1"]), (False, "", [])):
        hotfix = {**HOTFIX, "summary": summary, "urgency": "urgent" if urgent else "normal"}
        variables = {
            "name": "Alice",
            "hotfix": hotfix,
            "urgent": urgent,
            "channel": "stable",
            "nodes": nodes,
        }
        mail = renderer.email("hotfix", variables, language)
        out += [mail.text, mail.html]
        out.append(renderer.text("hotfix_call", variables, language))
        out.append(renderer.text("hotfix_sms", variables, language))
    for event in ("scheduled", "started", "ended"):
        for cluster in ("c1", None):
            variables = {
                "node": "tg1",
                "cluster": cluster,
                "timezone": "Europe/Berlin",
                "reason": "Kernel",
                "event": event,
                "start": "2030-03-25 22:00",
                "origin": "manual",
                "by": "x",
            }
            mail = renderer.email("maintenance", variables, language)
            out += [mail.text, mail.html]
    out.append(
        renderer.text("notice_maintenance", {"node": "tg1", "start": "x", "reason": "y"}, language)
    )
    out.append(renderer.text("notice_ended", {"node": "tg1"}, language))
    for kind in ("update", "restart"):
        out.append(renderer.text("notice_starts", {"node": "tg1", "kind": kind}, language))
    for name in ("notice_held", "notice_resumes"):
        out.append(renderer.text(name, {"node": "tg1", "start": "x"}, language))
    t = Translator(language)  # type: ignore[arg-type]
    out += [t.duration(timedelta(days=2, hours=1, minutes=5)), t.duration(timedelta(seconds=5))]
    out.append(t.duration(timedelta(days=1)))
    return out


async def service_outputs(tmp_path: Path, language: str) -> list[str]:
    """The status page (every state), its Atom feed and the calendar, from a service."""
    out: list[str] = []
    settings = settings_for(tmp_path, sections={"statuspage": {"show_versions": True}})
    clock = ManualClock(NOW)

    def at(delta: timedelta) -> str:
        return (NOW + delta).astimezone(settings.tz).strftime("%Y-%m-%d %H:%M")

    async def fetch(api: Api, path: str) -> str:
        async with api.session.get(f"{api.base}{path}") as response:
            assert response.status == 200, await response.text()
            return await response.text()

    async with running(settings, clock=clock) as (service, api):
        query = f"?lang={language}"
        out.append(await fetch(api, f"/status{query}"))  # nothing planned
        out.append(await fetch(api, f"/status/feed.atom{query}"))  # no entries
        for node, hours in (("tg2", 1), ("tg3", 1), ("solo1", 1)):
            await api.command(f"maintenance schedule {node} {at(timedelta(hours=hours))} Swap")
        await clock.set(NOW + timedelta(hours=1, minutes=30))
        for node in ("tg2", "tg3", "solo1"):
            await api.command(f"maintenance cancel {node}")
        await clock.set(NOW)
        await api.command("schedule update solo1 on mon-fri 22:00")
        await api.command("schedule update tg2 on daily 21:00")
        await api.command("schedule update tg3 on sat,sun 21:00")
        await api.command(
            f"maintenance schedule tg1 {at(timedelta(hours=2))} Kernel --disable-logon"
        )
        out.append(await fetch(api, f"/status{query}"))  # planned
        out.append(await fetch(api, f"/status/feed.atom{query}"))
        # windows opened by scheduled updates, and a locked node (the calendar says so)
        system = Actor(name="test", source="system")
        for origin in ("scheduled-update", "download-failure"):
            await service.maintenance.open_for(
                "tg3" if origin == "download-failure" else "tg2",
                NOW + timedelta(days=3),
                "Scheduled update",
                origin=origin,
                disable_logon=False,
                actor=system,
            )
        await service.lifecycle.set_lock("solo1", "install failed", system)
        out.append(await fetch(api, f"/maintenance.ics{query}"))
        await clock.set(NOW + timedelta(hours=2, minutes=1))
        service.maintenance.changed()
        await service.maintenance.tick()
        out.append(await fetch(api, f"/status{query}"))  # one node of c1 down
        out.append(await fetch(api, f"/status/tg1{query}"))  # tg1 down
        out.append(await fetch(api, f"/status/feed.atom{query}"))
        await api.command(f"maintenance schedule solo1 {at(timedelta(hours=2, minutes=3))} Disk")
        await clock.set(NOW + timedelta(hours=2, minutes=4))
        service.maintenance.changed()
        await service.maintenance.tick()
        out.append(await fetch(api, f"/status/solo1{query}"))  # expected end: history
        out.append(await fetch(api, f"/maintenance.ics{query}"))
    settings = settings_for(tmp_path / "none", sections={"statuspage": {"systems": []}})
    async with running(settings, clock=ManualClock(NOW)) as (_, api):
        out.append(await fetch(api, f"/status?lang={language}"))  # nothing to show
    return out


def _flat(texts: list[str]) -> str:
    """Texts as one string: HTML and iCalendar escapes undone, whitespace collapsed."""
    joined = "\n".join(texts).replace("\r\n ", "").replace("\\,", ",").replace("\\;", ";")
    return " ".join(html.unescape(joined).replace("\\n", " ").split())


def _fragments(message: str) -> list[str]:
    """The literal pieces of a text between its placeholders."""
    return [p.strip() for p in re.split(r"%\(\w+\)[sd]", message) if p.strip()]


async def test_every_text_in_both_languages(tmp_path: Path) -> None:
    template = extract()
    english = _flat(template_outputs("en") + await service_outputs(tmp_path / "en", "en"))
    german = _flat(template_outputs("de") + await service_outputs(tmp_path / "de", "de"))
    de = translations("de")
    not_rendered, left_in_german = [], []
    for message in template:
        if not message.id:
            continue
        ids = [message.id] if isinstance(message.id, str) else list(message.id)
        if all(path.startswith(ELSEWHERE) for path, _ in message.locations):
            continue
        for text in ids:
            if not all(f in english for f in _fragments(text)):
                not_rendered.append(text)
            if de.gettext(text) == text:
                continue  # the same word in German ("Hotfix", "System", "normal")
            for fragment in _fragments(text):
                if " " in fragment and len(fragment) >= 8 and fragment in german:
                    left_in_german.append(fragment)
    assert not_rendered == [], not_rendered
    assert left_in_german == [], left_in_german
    assert "Hallo Alice," in german and "Geplantes Update" in german
    assert "25.03.2030, 15:00 Uhr" in german and "25 Mar 2030, 15:00" in english


def test_catalogue_is_complete() -> None:
    assert missing("de") == []
    assert translations("de").gettext("Scheduled update") == "Geplantes Update"
    assert translations("en").gettext("Scheduled update") == "Scheduled update"


def test_dates_per_language() -> None:
    when = datetime(2026, 12, 24, 21, 0, tzinfo=UTC)
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    berlin = ZoneInfo("Europe/Berlin")
    assert Translator("de").datetime_text(when, berlin) == "24.12.2026, 22:00 Uhr"
    assert Translator("en").datetime_text(when, berlin) == "24 Dec 2026, 22:00"
    assert Translator("de").duration(timedelta(hours=1, minutes=20)) == "1 Std. 20 Min."
    assert Translator("en").duration(timedelta(days=2, minutes=1)) == "2 days 1 min"


def test_accept_language() -> None:
    assert negotiate("de-AT,de;q=0.9,en;q=0.8") == "de"
    assert negotiate("fr-FR, en;q=0.3, de;q=0.2") == "en"
    assert negotiate("fr") == "en"
    assert negotiate("fr", "de") == "de"
    assert negotiate("de;q=0, en") == "en"
    assert negotiate("*") == "en"
    assert negotiate(None) == "en"


def test_templates_dir_overrides_per_language(tmp_path: Path) -> None:
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "notice_ended.txt").write_text("Fertig: {{ node }}.\n")
    (tmp_path / "notice_starts.txt").write_text("Now: {{ node }} ({{ kind }})\n")
    renderer = Renderer(overrides=tmp_path)
    assert renderer.text("notice_ended", {"node": "tg1"}, "de") == "Fertig: tg1.\n"
    assert "has ended" in renderer.text("notice_ended", {"node": "tg1"}, "en")
    assert renderer.text("notice_starts", {"node": "tg1", "kind": "update"}, "de") == (
        "Now: tg1 (update)\n"
    )


async def test_german_contact_gets_german_mail_and_call(tmp_path: Path) -> None:
    from tests.test_notify_phone import service_of, world  # noqa: PLC0415

    anna = {
        "name": "Anna",
        "email": "anna@example.org",
        "phone": "+4917000000009",
        "language": "de",
    }
    bob = {"name": "Bob", "email": "bob@example.org"}
    async with world(tmp_path, [anna, bob]) as w, service_of(w) as (s, _api, _seen):
        w.publish_urgent(summary="Behebt einen VNC-Absturz.")
        await w.smtp.wait_messages(2)
        mail = w.smtp.to("anna@example.org")[0].message
        assert mail["Subject"] == (
            "[tgops] DRINGENDER Hotfix HF-7 für tg-vnc 2.0-1: Behebt einen VNC-Absturz."
        )
        text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        text = text.replace("\r\n", "\n")
        assert text.startswith("Hallo Anna,\n\nauf dem Update-Kanal „stable“ wurde ein DRINGENDER")
        assert "  Dringlichkeit:  dringend\n" in text and "Er betrifft diese Systeme: tg1" in text
        assert "Telefonkontakte nacheinander angerufen" in text
        page = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert '<html lang="de">' in page and "Paket" in page
        other = w.smtp.to("bob@example.org")[0].message
        assert other["Subject"].startswith("[tgops] URGENT hotfix HF-7")

        (call,) = await w.twilio.wait_calls(1)
        assert call.to == anna["phone"]
        says = list(ElementTree.fromstring(call.twiml).iter("Say"))  # noqa: S314
        assert {say.attrib.get("language") for say in says} == {"de-DE"}
        assert call.speech.startswith("Hallo Anna, hier ist tgops mit einem dringenden Hotfix.")
        assert "Hotfix HF-7 für tg-vnc, Version 2.0-1, wurde veröffentlicht." in call.speech
        assert call.speech.endswith("Drücken Sie die 1, um ihn zu bestätigen.")
        assert "Es wurde keine Taste gedrückt. Auf Wiederhören." in call.twiml

        await w.twilio.report(call, "in-progress", s.port or 0)
        status, body = await w.twilio.press(call, "5", s.port or 0)
        assert status == 200 and 'language="de-DE">Sie haben 5 gedrückt. Hallo Anna' in body
        status, body = await w.twilio.press(call, "1", s.port or 0)
        assert status == 200
        assert "Danke, Anna. Hotfix HF-7 ist bestätigt. Auf Wiederhören." in body
        status, body = await w.twilio.press(call, "1", s.port or 0)
        assert "Hotfix HF-7 wurde bereits von Anna bestätigt." in body


def test_bad_language_settings_are_named(tmp_path: Path) -> None:
    from core.errors import ConfigError  # noqa: PLC0415

    for kwargs, expected in (
        ({"sections": {"notify": {"language": "fr"}}}, "notify.language: Input should be"),
        ({"extra": '[[contacts]]\nname = "x"\nlanguage = "fr"\n'}, "contacts[0].language: "),
        (
            {"sections": {"statuspage": {"systems": ["c9"]}}},
            "statuspage.systems: 'c9' is neither a cluster nor a node",
        ),
        ({"sections": {"statuspage": {"refresh": "1s"}}}, "statuspage.refresh: must be from 5s"),
    ):
        with pytest.raises(ConfigError) as caught:
            settings_for(tmp_path, **kwargs)
        assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


async def test_german_fleet_gets_german_notices_and_maintenance_mails(tmp_path: Path) -> None:
    from tests.notify_env import notify_settings  # noqa: PLC0415
    from tests.smtp_server import smtp_server  # noqa: PLC0415

    clock = ManualClock(NOW)
    users = "nutzer@example.org"
    async with smtp_server() as server:
        settings = notify_settings(
            tmp_path,
            smtp={"host": "127.0.0.1", "port": server.port},
            notify={"users_list": users, "language": "de"},
        )
        start = NOW + timedelta(hours=1)
        when = start.astimezone(settings.tz).strftime("%Y-%m-%d %H:%M")
        async with running(settings, clock=clock) as (service, api):
            reply = await api.command(f"maintenance schedule tg1 {when} Neuer Kernel")
            assert reply["ok"], reply["text"]
            assert "scheduled" in reply["text"]  # the operator's reply stays English
            (scheduled,) = await server.wait_messages(1)
            assert scheduled.message["Subject"] == (
                "[tgops] Wartung von tg1 am 25.03.2030, 14:00 Uhr: Neuer Kernel"
            )
            text = scheduled.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert "für tg1 (Cluster c1) ist eine Wartung geplant:" in text
            assert "Beginn:  25.03.2030, 14:00 Uhr (Europe/Berlin)" in text
            await clock.set(start - timedelta(minutes=30))
            service.maintenance.changed()
            await service.maintenance.tick()
            reply = await api.command("maintenance cancel tg1")
            assert reply["ok"], reply["text"]
            _, ended = await server.wait_messages(2)
            assert ended.message["Subject"] == "[tgops] Wartung von tg1 beendet"
        notices = (tmp_path / "nodes" / "tg1" / "messages.log").read_text()
        assert (
            "Wartung von tg1 am 25.03.2030, 14:00 Uhr: Neuer Kernel. Bitte sichern Sie Ihre "
            "Arbeit; Ihre Sitzung wird beendet." in notices
        )
        assert "Die Wartung von tg1 ist beendet; tg1 ist wieder verfügbar." in notices


def test_notice_language_per_node_and_cluster(tmp_path: Path) -> None:
    from core.settings import load_settings  # noqa: PLC0415

    path = tmp_path / "tgops.toml"
    path.write_text(
        '[notify]\nlanguage = "en"\n'
        '[clusters.c1]\nlanguage = "de"\n'
        '[[nodes]]\nname = "a"\ncluster = "c1"\nroot = "a"\n'
        '[[nodes]]\nname = "b"\ncluster = "c1"\nroot = "b"\nlanguage = "en"\n'
        '[[nodes]]\nname = "c"\nroot = "c"\n'
        '[[contacts]]\nname = "x"\nlanguage = "de"\n'
        '[[contacts]]\nname = "y"\n'
    )
    settings = load_settings(path, {})
    assert [settings.notice_language(n) for n in ("a", "b", "c")] == ["de", "en", "en"]
    assert [settings.contact_language(c) for c in settings.contacts] == ["de", "en"]
