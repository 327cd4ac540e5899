"""Programs run on this host (the controller, or the node itself for the local driver).

Every run has a timeout; on expiry the whole process group is killed, so a command that
forks (``sh -c 'sleep 1000 &'``) cannot keep a pipe open and hang the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import CommandTimeoutError, DriverError

SHELL = "/bin/sh"
_KILL_WAIT = 5.0
"""Seconds to wait for a killed process group to be reaped."""


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
    shown = display if display is not None else " ".join(argv)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    except OSError as exc:
        raise DriverError(
            node, operation, f"cannot start {argv[0]}: {exc.strerror or exc} (is it installed?)"
        ) from exc
    try:
        async with asyncio.timeout(limit):
            out, err = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT):
                await process.communicate()
        raise CommandTimeoutError(node, operation, shown, limit) from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    status = process.returncode if process.returncode is not None else -1
    return Completed(
        exit_status=status,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
    )


async def run_shell(command: str, *, node: str, operation: str, limit: float) -> Completed:
    """Run a command line with ``/bin/sh -c``."""
    return await run_process(
        [SHELL, "-c", command], node=node, operation=operation, limit=limit, display=command
    )
