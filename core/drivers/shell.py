"""Programs run on this host (the controller, or the node itself for the local driver).

Every run has a timeout; on expiry the whole process group is killed, so a command that
forks (``sh -c 'sleep 1000 &'``) cannot keep a pipe open and hang the caller.

A program is started, fed and reaped on a thread of a pool of its own, not on the event
loop: starting a process there costs the loop the fork and, with Python 3.11's child
watcher, a new thread per process; here the loop only hands the work over and gets the
result back. ``Programs`` hands over several programs (and the work between them) at once:
``run_process`` is one program handed over that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from core.errors import CommandTimeoutError, DriverError

SHELL = "/bin/sh"
_KILL_WAIT = 5.0
"""Seconds to wait for a killed process group to be reaped."""
RUNNERS = 64
"""Programs that run at the same time; more wait for a free thread (their timeout starts
when they start)."""
_runners = ThreadPoolExecutor(max_workers=RUNNERS, thread_name_prefix="tgops-process")

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    """What a finished command left behind."""

    exit_status: int
    stdout: str
    stderr: str


async def run_process(
    argv: Sequence[str],
    *,
    node: str,
    operation: str,
    limit: float,
    display: str | None = None,
) -> Completed:
    """Run ``argv`` with ``LC_ALL=C`` (parsable output) and no stdin, bounded by ``limit`` seconds.

    Raises ``CommandTimeoutError`` on expiry and ``DriverError`` when the program cannot be
    started; a non-zero exit status is returned, not raised.
    """
    programs = Programs(node=node, operation=operation, limit=limit)
    return await programs.hand_over(lambda each: each.run(argv, display=display))


class _Started:
    """The process of one run, shared by the thread that runs it and the caller: a caller
    that is cancelled kills it, whether it has started yet or not."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.pid is not None:
            _kill_group(self.pid)

    def begin(self, pid: int) -> None:
        self.pid = pid
        if self.cancelled:
            _kill_group(pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _run(argv: list[str], limit: float, started: _Started) -> Completed | None:
    """On a thread of the pool: run ``argv`` to its end; None when ``limit`` expired (its
    process group is then killed and reaped)."""
    if started.cancelled:
        return None
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    started.begin(process.pid)
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=_KILL_WAIT)
        return None
    return Completed(
        exit_status=process.returncode if process.returncode is not None else -1,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
    )


class Programs:
    """Programs run one after another on one thread of the pool by work handed over with
    ``hand_over``: the event loop is involved once for the whole sequence instead of once
    per program (and per step between them)."""

    def __init__(self, *, node: str, operation: str, limit: float) -> None:
        self._node = node
        self._operation = operation
        self._limit = limit
        self._started = _Started()
        self.ran: list[tuple[list[str], Completed]] = []
        """Each program run so far with what it left, in order (also when the work failed
        or timed out later)."""

    def run(self, argv: Sequence[str], *, display: str | None = None) -> Completed:
        """On the pool's thread: run ``argv`` as ``run_process`` does (same errors;
        ``display`` is how a timeout names the command, ``argv`` joined by default)."""
        command = list(argv)
        try:
            finished = _run(command, self._limit, self._started)
        except OSError as exc:
            raise DriverError(
                self._node,
                self._operation,
                f"cannot start {command[0]}: {exc.strerror or exc} (is it installed?)",
            ) from exc
        if finished is None:
            shown = display if display is not None else " ".join(command)
            raise CommandTimeoutError(self._node, self._operation, shown, self._limit)
        self.ran.append((command, finished))
        return finished

    async def hand_over(self, work: Callable[[Programs], T]) -> T:
        """``work(self)`` on a thread of the pool, each program it runs bounded by the
        limit. A caller that is cancelled kills the program running then, and no further
        one starts."""
        try:
            return await asyncio.get_running_loop().run_in_executor(_runners, work, self)
        except asyncio.CancelledError:
            self._started.cancel()
            raise


async def run_shell(command: str, *, node: str, operation: str, limit: float) -> Completed:
    """Run a command line with ``/bin/sh -c``."""
    return await run_process(
        [SHELL, "-c", command], node=node, operation=operation, limit=limit, display=command
    )
