"""The demo console: Tab completes commands, names, hotfix IDs and package names; lines
typed at the prompt are carried out; output while the prompt waits goes above it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.patch_stdout import StdoutProxy

from bot.demo.console import Completer, Console
from core.model import Actor, Role
from tests.service import running, settings_for

NAMES = ["tg1", "tg2", "single", "demo", "all"]


def _completer() -> Completer:
    return Completer(
        NAMES,
        hotfixes=lambda: ["HF-101", "HF-102"],
        optional=lambda: ["ibus-anthy", "ibus-hangul"],
        oldstable=lambda: ["tg-base", "tg-browser", "tg-kernel"],
    )


def test_tab_completes_commands_and_names() -> None:
    c = _completer()
    assert c.candidates("sta") == ["status"]
    assert c.candidates("maintenance sch") == ["schedule"]
    assert c.candidates("auto-update s") == ["single"]
    assert "--yes" in c.candidates("auto-update single -")


def test_tab_completes_hotfix_ids_and_package_names() -> None:
    c = _completer()
    assert c.candidates("hotfixes select tg1 ") == ["HF-101", "HF-102"]
    assert c.candidates("hotfixes unselect tg1 HF-101 HF") == ["HF-102"]  # not twice
    assert c.candidates("install single ib") == ["ibus-anthy", "ibus-hangul"]
    assert c.candidates("install single ibus-h") == ["ibus-hangul"]
    assert c.candidates("oldstable partial single tg-b") == ["tg-base", "tg-browser"]
    # the target itself is still a node name, not a package
    assert c.candidates("install s") == ["single"]


async def test_lines_typed_at_the_prompt_are_carried_out(tmp_path: Path) -> None:
    said: list[tuple[str, bool]] = []

    def say(text: str) -> None:
        # while the prompt runs, output goes through prompt_toolkit's proxy, which
        # prints it above the prompt and draws the prompt again
        said.append((text, isinstance(sys.stdout, StdoutProxy)))

    actor = Actor(name="demo", source="cli", roles=frozenset(Role))
    async with running(settings_for(tmp_path)) as (service, _):
        console = Console(
            service.commands, actor, names=NAMES, history=tmp_path / ".history", say=say
        )
        with create_pipe_input() as pipe:
            pipe.send_text("stauts\rnodes\rquit\r")
            async with asyncio.timeout(30):
                await console.run(asyncio.Event(), input=pipe, output=DummyOutput())
    texts = [t for t, _ in said]
    assert texts[0].startswith("Type a /tg command")
    assert "unknown command 'stauts' (did you mean `status`" in texts[1]
    assert texts[2].startswith("tg1 ")
    assert all(proxied for _, proxied in said[1:])
    assert (tmp_path / ".history").read_text().count("+stauts") == 1  # history kept


async def test_the_console_ends_when_the_demo_stops(tmp_path: Path) -> None:
    actor = Actor(name="demo", source="cli", roles=frozenset(Role))
    stop = asyncio.Event()
    async with running(settings_for(tmp_path)) as (service, _):
        console = Console(
            service.commands, actor, names=NAMES, history=tmp_path / ".h", say=lambda _: None
        )
        with create_pipe_input() as pipe:
            task = asyncio.create_task(
                console.run(stop, input=pipe, output=DummyOutput()), name="console"
            )
            stop.set()
            async with asyncio.timeout(30):
                await task
