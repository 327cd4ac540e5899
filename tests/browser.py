"""A real headless Chromium (Debian's ``chromium``) driven by Debian's ``chromium-driver``.

``start_browser`` runs chromedriver through selenium with a fresh profile directory, no
network use of its own (no component updates, sync or first-run pages) and the browser's
console log kept, as the SSH tests start their own sshd. Nothing is downloaded: selenium
is given both binaries, so its driver manager is never asked.

``axe`` runs axe-core (the copy the PyPI package ``selenium-axe-python`` carries) in the
page and returns its violations.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_TIMEOUT = 20.0
WAIT = 20.0
T = TypeVar("T")


@contextmanager
def start_browser(
    profile: Path, *, language: str = "en-US", width: int = 1024, javascript: bool = True
) -> Iterator[WebDriver]:
    """A headless Chromium with ``language`` as its Accept-Language."""
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(binary, os.X_OK):
            pytest.fail(
                f"{binary} is missing: the status page tests need a real browser; run "
                f"scripts/setup --dev (it installs the Debian package {package})"
            )
    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--metrics-recording-only",
        f"--user-data-dir={profile}",
        f"--lang={language}",
        f"--window-size={width},900",
    ):
        options.add_argument(flag)
    prefs: dict[str, Any] = {"intl.accept_languages": language}
    if not javascript:
        prefs["profile.managed_default_content_settings.javascript"] = 2
    options.add_experimental_option("prefs", prefs)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = profile / "chromedriver.log"
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log))
    environ = {"SE_AVOID_STATS": "true", "SE_OFFLINE": "true"}
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    """``condition``'s first truthy value, within ``WAIT`` seconds (polled by selenium)."""
    result: T = WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message=what)
    return result


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """What the page wrote to the console at level SEVERE (errors) since the last call."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def axe_script() -> str:
    import selenium_axe_python  # noqa: PLC0415

    path = Path(selenium_axe_python.__file__).parent / "axe-core" / "axe.min.js"
    return path.read_text(encoding="utf-8")


def axe(driver: WebDriver) -> list[dict[str, Any]]:
    """axe-core's violations of WCAG 2.x A and AA (and best practices) on the page."""
    driver.execute_script(axe_script())
    options = {
        "runOnly": {
            "type": "tag",
            "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"],
        }
    }
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"axe.run(document, {json.dumps(options)}).then(r => done(r.violations),"
        " e => done([{id: 'axe-error', impact: 'critical', description: String(e)}]));"
    )
    assert isinstance(result, list)
    return result
