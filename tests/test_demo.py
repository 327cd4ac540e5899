"""`tgops demo --no-console`: everything starts, the API serves 4 nodes, SIGTERM ends it.

Its setup (repository and nodes) can run again in the same directory.
"""

from __future__ import annotations

import asyncio
import json
import mailbox
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import aiosmtplib
import pytest

from bot.demo.demo import (
    build_repository,
    machine_zone,
    next_version,
    prepare,
    publish_update,
    spoken,
)
from core.errors import PublishError
from core.repository.publish import keygen, publish
from notify.phone import prompt_twiml, say_twiml
from tests.debs import build_deb
from tests.events import until

ROOT = Path(__file__).parent.parent


def _files(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {
        p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def test_the_demo_setup_runs_twice_in_one_directory(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    public_key = await prepare(root)
    repo = _files(root / "repo")
    nodes = _files(root / "nodes")
    said: list[str] = []
    assert await prepare(root, said.append) == public_key
    # the rebuilt packages are the published ones: the repository is left as it was
    assert _files(root / "repo") == repo
    assert _files(root / "nodes") == nodes
    assert said == []


async def test_the_demo_keeps_a_package_an_earlier_build_published(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    key = root / "keys" / "repo.key"
    key.parent.mkdir(parents=True)
    keygen(key)
    earlier = build_deb(tmp_path, "tg-base", "1.5", {"usr/share/tg-base/VERSION": b"earlier\n"})
    publish(root / "repo", "oldstable", key, [earlier])
    said: list[str] = []
    await prepare(root, said.append)
    assert said == ["repository: keeping the published tg-base 1.5 of channel oldstable"]
    pool = root / "repo" / "pool" / "tg-base_1.5_all.deb"
    assert pool.read_bytes() == earlier.read_bytes()
    manifest = json.loads((root / "repo" / "channels" / "stable.json").read_text())
    assert {p["name"] for p in manifest["packages"]} >= {"tg-base", "tg-browser", "tg-vnc"}


@pytest.mark.slow
async def test_demo_starts_serves_and_stops(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with out.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "demo",
            "--dir",
            str(demo),
            "--no-console",
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def running() -> bool:
        assert proc.returncode is None, out.read_text()
        return "running until SIGTERM" in out.read_text()

    try:
        await until(running, within=60)
        config = tomllib.loads((demo / "tgops.toml").read_text())
        token = config["api"]["tokens"]["demo"]["token"]
        port = config["http"]["port"]
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{port}/api/v1/status",
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                status = await response.json()
            assert [n["name"] for n in status["nodes"]] == ["tg1", "tg2", "tg3", "single"]
            single = status["nodes"][3]
            assert single["installed"] == {
                "tg-base": "1.0",
                "tg-browser": "115.0",
                "tg-kernel": "6.1.0",
            }
            assert single["sessions"] == 2 and single["cluster"] is None
            assert status["nodes"][0]["cluster"] == "demo"
            async with session.post(
                f"http://127.0.0.1:{port}/api/v1/command",
                json={"text": "hotfixes single"},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                reply = await response.json()
            assert "HF-102 [urgent] tg-vnc 3.2.1" in reply["text"]

        async def announced() -> bool:
            mails = len(list(mailbox.Maildir(demo / "mail")))
            return mails >= 4 and "[escalation] hotfix HF-102 acknowledged" in out.read_text()

        # both hotfixes e-mailed to both contacts; the urgent one phoned and acknowledged
        await until(announced, within=30)
        assert "[phone] calling +4915100000001" in out.read_text()
        # the mail capture offers PIPELINING, as real sites' servers do (the mails above
        # went pipelined)
        capture = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=config["smtp"]["port"], start_tls=False, timeout=10
        )
        await capture.connect()
        await capture.ehlo()
        assert capture.supports_extension("pipelining")
        await capture.quit()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await proc.wait()
    assert proc.returncode == 0, out.read_text()
    assert "Traceback" not in out.read_text()
    assert "stopping" in out.read_text()


def test_the_demo_runs_in_the_machines_time_zone(tmp_path: Path) -> None:

    assert machine_zone({"TZ": "America/St_Johns"}) == ("America/St_Johns", "TZ")
    assert machine_zone({"TZ": ":Asia/Kolkata"}) == ("Asia/Kolkata", "TZ")
    assert machine_zone({"TZ": "/usr/share/zoneinfo/Europe/Paris"}) == ("Europe/Paris", "TZ")
    # no usable TZ: the system's setting (/etc/localtime, /etc/timezone) or UTC
    zone, origin = machine_zone({"TZ": "Not/AZone"})
    assert origin in {"/etc/localtime", "/etc/timezone", "no zone configured on this machine"}
    ZoneInfo(zone)


def test_publish_update_puts_a_new_update_into_the_demo_repository(tmp_path: Path) -> None:

    assert next_version(["2.0"]) == "2.1"
    assert next_version(["2.0", "2.10", "2.9"]) == "2.11"
    root = tmp_path / "demo"
    with pytest.raises(PublishError, match="start `tgops demo --dir"):
        publish_update(root)
    build_repository(root)
    assert publish_update(root).startswith("published tg-base 2.1 in channel stable")
    assert publish_update(root).startswith("published tg-base 2.2 in channel stable")
    manifest = json.loads((root / "repo" / "channels" / "stable.json").read_text())
    versions = sorted(p["version"] for p in manifest["packages"] if p["name"] == "tg-base")
    assert versions == ["2.0", "2.1", "2.2"]


def test_the_phone_stand_in_says_what_the_callee_hears() -> None:

    twiml = prompt_twiml("Hotfix HF-102 is out. Press 1.", "http://127.0.0.1/g", prefix="Hi. ")
    assert spoken(twiml) == 'says "Hi. Hotfix HF-102 is out. Press 1." and waits for a key'
    assert spoken(say_twiml("Thank you.")) == 'says "Thank you."'
    assert spoken("no xml") == "(not TwiML: 'no xml')"


@pytest.mark.slow
async def test_a_demo_restart_keeps_its_port_and_token(tmp_path: Path) -> None:
    demo = tmp_path / "demo"

    async def run_once(name: str) -> dict[str, object]:
        out = tmp_path / f"{name}.out"
        with out.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot.cli",
                "demo",
                "--dir",
                str(demo),
                "--no-console",
                "--timezone",
                "Pacific/Chatham",
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        async def running() -> bool:
            assert proc.returncode is None, out.read_text()
            return "running until SIGTERM" in out.read_text()

        try:
            await until(running, within=60)
            config = tomllib.loads((demo / "tgops.toml").read_text())
            assert "time zone: Pacific/Chatham (from --timezone)" in out.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await proc.wait()
        return config

    first = await run_once("first")
    second = await run_once("second")
    assert second["http"] == first["http"]
    assert second["api"] == first["api"]
    assert second["timezone"] == "Pacific/Chatham"
