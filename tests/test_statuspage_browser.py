"""The status page in a real browser: Debian's headless Chromium, driven by selenium.

A window scheduled through the API shows; the page changes without a reload when the
window opens and when it ends (Server-Sent Events); with ``Accept-Language: de`` it is
German; without JavaScript it still shows everything; the console stays free of errors;
axe-core finds no serious or critical accessibility violation. A screenshot is written to
``test-artifacts/status-page.png`` (and to ``docs/status-page.png``, the README's, when
``TGOPS_UPDATE_DOCS=1``).

Selenium blocks, so every browser call runs in a thread while the service serves.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from core.clock import ManualClock
from tests.browser import axe, console_errors, start_browser, wait_for
from tests.service import Api, running, settings_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TGOPS_TEST_ARTIFACTS", ROOT / "test-artifacts"))
T = TypeVar("T")


async def off(function: Callable[..., T], *args: Any) -> T:
    """A blocking browser call, in a thread (the service keeps serving meanwhile)."""
    return await asyncio.wait_for(asyncio.to_thread(function, *args), 60)


def section(driver: WebDriver, system: str) -> str:
    """The system's text as shown (read in one step: live updates replace the nodes)."""
    script = "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';"
    return str(driver.execute_script(script, f"system-{system}"))


def badge(driver: WebDriver, system: str) -> str:
    script = "return document.querySelector(arguments[0]).innerText;"
    return str(driver.execute_script(script, f"#system-{system} .badge"))


def serious(violations: list[dict[str, Any]]) -> list[str]:
    return [
        f"{v['id']} ({v.get('impact')}): {v.get('description')} "
        f"{[n.get('target') for n in v.get('nodes', [])][:3]}"
        for v in violations
        if v.get("impact") in {"serious", "critical"}
    ]


async def ok(api: Api, command: str) -> None:
    reply = await api.command(command)
    assert reply["ok"], reply["text"]


def screenshot(driver: WebDriver, path: Path) -> None:
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1000, min(height + 40, 4000))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))


async def test_status_page_in_chromium(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    clock = ManualClock(now)
    settings = settings_for(tmp_path)

    def at(delta: timedelta) -> str:
        return (now + delta).astimezone(settings.tz).strftime("%Y-%m-%d %H:%M:%S")

    async with running(settings, clock=clock) as (service, api):
        page = f"{api.base}/status"
        # history: a window on tg2 that took 1 h 35 min; a recurring update of solo1
        await ok(api, f"maintenance schedule tg2 {at(timedelta(minutes=1))} Disk swap")
        await clock.set(now + timedelta(minutes=96))
        await ok(api, "maintenance cancel tg2")
        await ok(api, "schedule update solo1 on mon-fri 22:00")
        start = timedelta(minutes=100)
        await ok(api, f"maintenance schedule tg1 {at(start)} Kernel update --disable-logon")
        await ok(api, f"maintenance schedule solo1 {at(timedelta(days=2))} New disks")

        with start_browser(tmp_path / "chromium-en", language="en-US") as driver:
            await off(driver.get, page)
            assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
            c1 = section(driver, "c1")
            assert "Kernel update" in c1 and "logon will be disabled" in c1
            assert "available; maintenance planned" in c1
            assert "Disk swap" in driver.page_source
            driver.execute_script("window.tgopsMarker = 42")  # gone if the page reloads

            # the window opens: the page changes by itself
            await clock.set(now + start + timedelta(seconds=5))
            service.maintenance.changed()
            await off(
                wait_for,
                driver,
                lambda d: "1 of 3 nodes in maintenance" in section(d, "c1"),
                "the page shows the window open",
            )
            assert "Maintenance now" in section(driver, "c1")
            assert driver.execute_script("return window.tgopsMarker") == 42
            live = driver.find_element(By.ID, "live").text
            assert live.startswith("Every system is available; some nodes of c1")

            violations = await off(axe, driver)
            assert serious(violations) == []
            await off(screenshot, driver, ARTIFACTS / "status-page.png")
            if os.environ.get("TGOPS_UPDATE_DOCS") == "1":
                docs = ROOT / "docs" / "status-page.png"
                await off(shutil.copyfile, ARTIFACTS / "status-page.png", docs)

            # the window ends
            await ok(api, "maintenance cancel tg1")
            await off(
                wait_for,
                driver,
                lambda d: "Maintenance now" not in section(d, "c1"),
                "the page shows the window ended",
            )
            assert badge(driver, "c1") == "available"
            assert "Kernel update" in section(driver, "c1")  # now among the ended windows
            assert driver.execute_script("return window.tgopsMarker") == 42
            assert await off(console_errors, driver) == []

            # printed: no navigation, subscribe links or live region; black on white
            driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
            shown = driver.execute_script(
                "return ['nav', '.subscribe', '#live'].map("
                "s => getComputedStyle(document.querySelector(s)).display)"
            )
            assert shown == ["none", "none", "none"]
            colour = driver.execute_script(
                "return getComputedStyle(document.querySelector('h2 a')).color"
            )
            assert colour == "rgb(0, 0, 0)"

        with start_browser(tmp_path / "chromium-de", language="de-DE", width=390) as driver:
            await off(driver.get, page)
            assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "de"
            text = driver.find_element(By.TAG_NAME, "body").text
            assert "Wartungsstatus" in text and "Letzte Wartungsfenster" in text
            assert "Nächste Wartung:" in text and "New disks" in text
            for english in ("Maintenance", "available", "Planned", "Subscribe", "logon"):
                assert english not in text, english
            assert serious(await off(axe, driver)) == []
            # nothing wider than a phone's screen
            assert driver.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            )
            assert await off(console_errors, driver) == []

        with start_browser(tmp_path / "chromium-nojs", javascript=False) as driver:
            await off(driver.get, page)
            text = driver.find_element(By.TAG_NAME, "body").text
            assert "New disks" in text and "Last maintenance windows" in text
            assert "solo1" in text and "scheduled update every weekday" in text
            assert await off(console_errors, driver) == []
