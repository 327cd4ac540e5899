"""The interactive `/tg` console of `tgops demo`: line editing, history, completion.

Each line is one command of the shared grammar (a leading ``/tg`` is optional), carried
out by the same ``CommandService`` as Slack and the API. ``quit``, Ctrl-D or Ctrl-C end it.

On a terminal the prompt is prompt_toolkit's: output that arrives while you type (run
steps, mails, calls) is printed above the prompt, which is drawn again below it with what
you typed so far. Without a terminal (input from a pipe) lines are read plainly.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completion
from prompt_toolkit.completion import Completer as _PromptCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout

from bot.commands import CommandService
from bot.grammar import SPECS
from core.model import Actor

PROMPT = "tg> "
KEYWORDS = ("--yes", "on", "off", "daily", "mon-fri", "enable", "disable")

Words = Callable[[], Iterable[str]]
"""Names known at the moment of completion (hotfix IDs, package names of a channel)."""


class Completer(_PromptCompleter):
    """Completes command words from the grammar, then node and cluster names; hotfix IDs
    after ``hotfixes select|unselect T``, optional packages after ``install T``, the
    oldstable channel's packages after ``oldstable partial T``."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        hotfixes: Words = tuple,
        optional: Words = tuple,
        oldstable: Words = tuple,
    ) -> None:
        self.names = sorted(names)
        self.commands = sorted({spec.name for spec in SPECS})
        self.hotfixes = hotfixes
        self.optional = optional
        self.oldstable = oldstable

    def _ids(self, words: list[str]) -> Iterable[str] | None:
        """Hotfix IDs or package names where the command expects them (None: elsewhere)."""
        if len(words) < 4 and words[:1] != ["install"]:
            return None
        head = " ".join(words[:2]).lower()
        if head in {"hotfixes select", "hotfixes unselect"}:
            return self.hotfixes()
        if head == "oldstable partial":
            return self.oldstable()
        if words[0].lower() == "install" and len(words) >= 3:
            return self.optional()
        return None

    def candidates(self, line: str) -> list[str]:
        words = line.removeprefix("/tg ").split(" ")
        typed = " ".join(words[:-1])
        last = words[-1]
        ids = self._ids(words)
        if ids is not None:
            chosen = set(words[:-1])
            return sorted(i for i in set(ids) if i.startswith(last) and i not in chosen)
        options: set[str] = set()
        for name in self.commands:
            parts = name.split()
            if len(words) <= len(parts) and " ".join(parts[: len(words) - 1]) == typed:
                options.add(parts[len(words) - 1])
        if typed:
            options.update(self.names)
            options.update(KEYWORDS)
        return sorted(o for o in options if o.startswith(last))

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        line = document.text_before_cursor
        last = line.split(" ")[-1]
        for candidate in self.candidates(line):
            yield Completion(candidate, start_position=-len(last))


class Console:
    def __init__(
        self,
        commands: CommandService,
        actor: Actor,
        *,
        names: Sequence[str],
        history: Path,
        say: Callable[[str], None],
        hotfixes: Words = tuple,
        optional: Words = tuple,
        oldstable: Words = tuple,
    ) -> None:
        self.commands = commands
        self.actor = actor
        self.history = history
        self.say = say
        self.completer = Completer(names, hotfixes=hotfixes, optional=optional, oldstable=oldstable)

    async def run(
        self, stop: asyncio.Event, *, input: Input | None = None, output: Output | None = None
    ) -> None:
        """Read and carry out commands until ``quit``, end of input or ``stop``.

        ``input``/``output`` replace the terminal (tests); without them and without a
        terminal, lines are read plainly from standard input."""
        self.say("Type a /tg command (`help` lists them; Tab completes; `quit` ends).")
        if input is None and not sys.stdin.isatty():
            await self._plain(stop)
            return
        session: PromptSession[str] = PromptSession(
            history=FileHistory(str(self.history)),
            completer=self.completer,
            complete_while_typing=False,
            input=input,
            output=output,
        )
        with patch_stdout(raw=True):  # output while typing goes above the prompt
            while True:
                line = await self._next(session.prompt_async(PROMPT), stop)
                if line is None or line.strip() in {"quit", "exit"}:
                    return
                if line.strip():
                    reply = await self.commands.execute(line, self.actor)
                    self.say(reply.text)

    @staticmethod
    async def _next(prompt: Awaitable[str | None], stop: asyncio.Event) -> str | None:
        """The next line, or None at Ctrl-D, Ctrl-C or ``stop``."""
        reading = asyncio.ensure_future(prompt)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            return None
        try:
            line = reading.result()
        except (EOFError, KeyboardInterrupt):
            return None
        return line

    async def _plain(self, stop: asyncio.Event) -> None:
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        answered = threading.Event()  # the next line is read once the reply is shown
        answered.set()

        def read() -> None:  # a daemon thread: a pending read never blocks the exit
            while answered.wait():
                answered.clear()
                line = sys.stdin.readline()
                loop.call_soon_threadsafe(lines.put_nowait, line or None)
                if not line:
                    return

        threading.Thread(target=read, name="console-input", daemon=True).start()
        while True:
            line = await self._next(lines.get(), stop)
            if line is None or line.strip() in {"quit", "exit"}:
                return
            if line.strip():
                reply = await self.commands.execute(line, self.actor)
                self.say(reply.text)
            answered.set()
