"""The interactive `/tg` console of `tgops demo`: line editing, history, completion.

Each line is one command of the shared grammar (a leading ``/tg`` is optional), carried
out by the same ``CommandService`` as Slack and the API. ``quit``, Ctrl-D or Ctrl-C end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.commands import CommandService
from bot.grammar import SPECS
from core.model import Actor

try:  # line editing where the platform has it
    import readline
except ImportError:  # pragma: no cover - Debian's Python has readline
    readline = None  # type: ignore[assignment]

PROMPT = "tg> "


class Completer:
    """Completes command words from the grammar, then node and cluster names."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = sorted(names)
        self.commands = sorted({spec.name for spec in SPECS})
        self._matches: list[str] = []

    def candidates(self, line: str) -> list[str]:
        words = line.removeprefix("/tg ").split(" ")
        typed = " ".join(words[:-1])
        last = words[-1]
        options: set[str] = set()
        for name in self.commands:
            parts = name.split()
            if len(words) <= len(parts) and " ".join(parts[: len(words) - 1]) == typed:
                options.add(parts[len(words) - 1])
        if typed:
            options.update(self.names)
            options.update({"--yes", "on", "off", "daily", "mon-fri", "enable", "disable"})
        return sorted(o for o in options if o.startswith(last))

    def complete(self, text: str, state: int) -> str | None:
        if state == 0 and readline is not None:
            self._matches = self.candidates(readline.get_line_buffer())
        return self._matches[state] + " " if state < len(self._matches) else None


class Console:
    def __init__(
        self,
        commands: CommandService,
        actor: Actor,
        *,
        names: Sequence[str],
        history: Path,
        say: Callable[[str], None],
    ) -> None:
        self.commands = commands
        self.actor = actor
        self.history = history
        self.say = say
        self.completer = Completer(names)

    def _setup_readline(self) -> None:
        if readline is None:
            return
        readline.set_completer(self.completer.complete)
        readline.set_completer_delims(" ")
        readline.parse_and_bind("tab: complete")
        with contextlib.suppress(OSError):
            readline.read_history_file(self.history)

    def _save_history(self) -> None:
        if readline is None:
            return
        with contextlib.suppress(OSError):
            readline.set_history_length(1000)
            readline.write_history_file(self.history)

    async def run(self, stop: asyncio.Event) -> None:
        """Read and carry out commands until ``quit``, end of input or ``stop``."""
        self._setup_readline()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        answered = threading.Event()  # the next prompt waits until the reply is shown
        answered.set()

        def read() -> None:  # a daemon thread: an unanswered prompt never blocks the exit
            while answered.wait():
                answered.clear()
                try:
                    line: str | None = input(PROMPT)
                except (EOFError, KeyboardInterrupt):
                    line = None
                loop.call_soon_threadsafe(lines.put_nowait, line)
                if line is None:
                    return

        self.say("Type a /tg command (`help` lists them; Tab completes; `quit` ends).")
        threading.Thread(target=read, name="console-input", daemon=True).start()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                getting = asyncio.ensure_future(lines.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return
                line = getting.result()
                if line is None or line.strip() in {"quit", "exit"}:
                    return
                if line.strip():
                    reply = await self.commands.execute(line, self.actor)
                    self.say(reply.text)
                answered.set()
        finally:
            stopping.cancel()
            self._save_history()
