"""Background work of the Slack bot: named tasks it owns, awaited (bounded) on exit.

Slack wants an answer within 3 s, so the bot acknowledges at once and does the work here.
A job's failure is logged with its name, never lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Jobs:
    def __init__(self, *, grace: float = 3.0) -> None:
        self._grace = grace
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = True

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``work`` in a task owned by this object; ``None`` (logged) once closed."""
        if not self._open:
            work.close()
            log.warning("Slack bot is stopping: %s was not started", name)
            return None
        task = asyncio.create_task(self._run(name, work), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # a task cancelled before it began never started ``work``: close it quietly
        task.add_done_callback(lambda _: work.close())
        return task

    async def _run(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            log.info("%s: cancelled", name)
            raise
        except Exception:
            log.exception("%s failed", name)

    async def aclose(self) -> None:
        """Stop taking jobs, give the running ones ``grace`` seconds, cancel the rest."""
        self._open = False
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("Slack bot stopping: cancelled %d unfinished job(s)", len(pending))
        await asyncio.gather(*pending, return_exceptions=True)
