"""The README's demo walkthrough, followed row by row exactly as it is written there.

The table is read from README.md, so the two cannot drift apart: each row's commands go
through `tgops tg` to `tgops demo --no-console` (started in a time zone far from UTC and
from the configured default), its file edits and second-shell commands are done as
written, and every quoted text the row says you see must show up, in the replies of the
row, on the demo's console, or in the file the row names in brackets.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

ROOT = Path(__file__).parent.parent
ZONE = "America/St_Johns"
"""UTC-03:30 (-02:30 in summer): neither the machine's usual UTC nor the configured
default Europe/Berlin, so a time computed in the wrong zone is refused or late."""
ROW_LIMIT = 300.0
"""Longest wait for what one row says you see (the scheduled rows wait for their time)."""
RUN_LIMIT = 120.0
"""Longest wait for the runs a command started."""


@dataclass(frozen=True)
class Row:
    number: int
    actions: str
    see: str


def walkthrough() -> list[Row]:
    text = (ROOT / "README.md").read_text()
    table = text.split("A walkthrough, in order", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows.append(Row(int(cells[0]), cells[1], cells[2]))
    return rows


def phrase(text: str) -> re.Pattern[str]:
    """A quoted text of the README as a pattern: ``#N`` is a run number, ``…`` anything
    within a line."""
    parts = [re.escape(p) for p in text.split("…")]
    pattern = "[^\n]*?".join(parts).replace(re.escape("#N"), r"#\d+")
    return re.compile(pattern)


def seen(cell: str) -> tuple[list[str], list[str]]:
    """The quoted texts a row says you see, and those it says are gone (``no "…"``)."""
    absent = re.findall(r'\bno "([^"]+)"', cell)
    present = [p for p in re.findall(r'"([^"]+)"', cell) if p not in absent]
    return present, absent


def fill(command: str, part: str, zone: ZoneInfo) -> str:
    """The placeholders of a command: ``YYYY-MM-DD HH:MM`` / ``HH:MM`` as many minutes
    ahead as the row says, in the demo's zone (as `date` shows it to its user)."""
    ahead = re.search(r"(\d+) minutes? ahead", part)
    if ahead is None:
        assert "HH:MM" not in command, command
        return command
    when = datetime.now(zone) + timedelta(minutes=int(ahead[1]))
    command = command.replace("YYYY-MM-DD", when.strftime("%Y-%m-%d"))
    return command.replace("HH:MM", when.strftime("%H:%M"))


@dataclass
class Demo:
    cwd: Path
    out: Path
    proc: asyncio.subprocess.Process
    replies: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.cwd / "tgops-demo"

    def console(self) -> str:
        return self.out.read_text()

    async def cli(self, *words: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            *words,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TZ": ZONE, "PYTHONPATH": str(ROOT)},
        )
        async with asyncio.timeout(60):
            output, _ = await proc.communicate()
        return output.decode()

    async def tg(self, command: str) -> str:
        config = str(self.dir / "tgops.toml")
        reply = await self.cli("tg", "--config", config, *shlex.split(command))
        self.replies.append(reply)
        return reply

    async def runs_end(self, reply: str) -> None:
        """Wait until the runs a reply started have ended (their outcome on the console)."""
        started = re.findall(r"#(\d+) on [\w-]+", reply) if " started: " in reply else []
        deadline = time.monotonic() + RUN_LIMIT
        for run in started:
            ended = re.compile(rf"\[run #{run}\] \S+ on \S+ (succeeded|failed|cancelled|skipped)")
            while not ended.search(self.console()):
                assert time.monotonic() < deadline, f"run #{run} did not end:\n{self.console()}"
                await asyncio.sleep(0.5)


async def do(demo: Demo, row: Row, zone: ZoneInfo) -> None:
    """Carry out the row's "type" cell, part by part (", then ")."""
    for part in row.actions.split(", then "):
        commands = re.findall(r"`([^`]+)`", part)
        if part.startswith("write ") or part.startswith("append "):
            text, target = commands
            path = demo.dir / target.removeprefix("D/")
            assert path.parent.is_dir(), path
            with path.open("w" if part.startswith("write ") else "a") as handle:
                handle.write(text + "\n")
        elif part.startswith("wait "):
            assert not commands, part
        elif commands and commands[0] == "quit":
            demo.proc.send_signal(signal.SIGTERM)  # what `quit` does at the console
            async with asyncio.timeout(30):
                assert await demo.proc.wait() == 0
        elif commands and commands[0].startswith("tgops "):
            demo.replies.append(await demo.cli(*shlex.split(commands[0])[1:]))
        else:
            assert commands, f"row {row.number}: nothing to type in {part!r}"
            reply = await demo.tg(fill(commands[0], part, zone))
            await demo.runs_end(reply)


async def check(demo: Demo, row: Row, first_reply: int) -> None:
    """Wait (bounded) until every quoted text of the row shows; the absent ones must not
    be in its replies."""
    present, absent = seen(row.see)
    assert present, f"row {row.number} says nothing you would see"
    files = [demo.dir / f.removeprefix("D/") for f in re.findall(r"\[`(D/[^`]+)`\]", row.see)]
    deadline = time.monotonic() + ROW_LIMIT
    missing = present
    while True:
        texts = [*demo.replies[first_reply:], demo.console()]
        texts += [f.read_text() for f in files if f.is_file()]
        everything = "\n".join(texts)
        missing = [p for p in missing if not phrase(p).search(everything)]
        if not missing:
            break
        assert time.monotonic() < deadline, (
            f"row {row.number}: not seen {missing}\nreplies:\n"
            + "\n".join(demo.replies[first_reply:])
            + f"\nconsole:\n{demo.console()}"
        )
        await asyncio.sleep(0.5)
    for text in absent:
        replies = "\n".join(demo.replies[first_reply:])
        assert not phrase(text).search(replies), f"row {row.number}: {text!r} still shown"


def test_the_readme_walkthrough_is_a_table_this_test_understands() -> None:
    rows = walkthrough()
    assert [r.number for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) >= 12
    for row in rows:
        assert seen(row.see)[0], row


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_the_readme_walkthrough_works_in_order(tmp_path: Path) -> None:
    zone = ZoneInfo(ZONE)
    out = tmp_path / "console.out"
    with out.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "demo",
            "--no-console",
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TZ": ZONE, "PYTHONPATH": str(ROOT)},
        )
    demo = Demo(cwd=tmp_path, out=out, proc=proc)
    try:
        deadline = time.monotonic() + 90
        while "running until SIGTERM" not in demo.console():
            assert proc.returncode is None, demo.console()
            assert time.monotonic() < deadline, demo.console()
            await asyncio.sleep(0.5)
        # the demo runs in the machine's zone (here: TZ) and says so
        assert f"time zone: {ZONE} (from TZ)" in demo.console()
        assert f'timezone = "{ZONE}"' in (demo.dir / "tgops.toml").read_text()
        for row in walkthrough():
            first = len(demo.replies)
            await do(demo, row, zone)
            await check(demo, row, first)
        # the notices to users carry stamps in the demo's zone
        lines = (demo.dir / "nodes" / "tg3" / "messages.log").read_text().splitlines()
        offsets = {datetime.fromisoformat(line.split(" ", 1)[0]).utcoffset() for line in lines}
        assert offsets and offsets <= {
            timedelta(hours=-3, minutes=-30),
            timedelta(hours=-2, minutes=-30),
        }
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await proc.wait()
    assert "Traceback" not in demo.console()
