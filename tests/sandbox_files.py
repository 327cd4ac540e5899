"""Helpers for driver tests: staged packages built from real ``.deb`` files."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.model import CommandOutput, PackageKind, StagedPackage
from tests.debs import build_deb
from tests.events import until


def staged_package(
    out_dir: Path,
    name: str,
    version: str,
    files: Mapping[str, bytes] | None = None,
    *,
    kind: PackageKind = PackageKind.REGULAR,
) -> StagedPackage:
    """Build a real ``.deb`` and describe it as the engine hands it to a driver."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = build_deb(out_dir, name, version, files)
    return StagedPackage(
        name=name,
        version=version,
        kind=kind,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        path=path,
    )


class OutputLog:
    """An ``OutputSink`` keeping every command's output, as the run log would."""

    def __init__(self) -> None:
        self.entries: list[CommandOutput] = []

    async def __call__(self, output: CommandOutput) -> None:
        self.entries.append(output)

    def operations(self) -> list[str]:
        return [entry.operation for entry in self.entries]


async def process_ended(pid: int, limit: float) -> None:
    """Wait until process ``pid`` has ended (a pidfd becomes readable), at most ``limit`` s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    loop.add_reader(fd, ended.set)
    try:
        async with asyncio.timeout(limit):
            await ended.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def names(directory: Path) -> list[str]:
    """The sorted names in ``directory``."""
    return sorted(p.name for p in directory.iterdir())


def write_file(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


async def cancel_once_started(task: asyncio.Task[Any], pid_file: Path) -> None:
    """Cancel ``task`` once the shell it runs has written its child's pid to ``pid_file``
    (``sleep 60 & echo $! > FILE; wait``); returns when the task has ended cancelled and
    that child is gone."""

    def written() -> int | None:  # the shell's file: another process's state
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        return int(text) if text else None

    async def started() -> bool:
        return written() is not None

    await until(started, within=10, step=0.02)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the task ended without being cancelled")
    pid = written()
    assert pid is not None
    await process_ended(pid, limit=5)
