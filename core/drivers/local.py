"""The local driver: the Debian host tgops runs on, driven by command templates.

Commands run with ``/bin/sh -c`` (``core.drivers.shell``); staging copies the package files
into the staging directory (default ``/var/cache/tgops/staged``) and checks their SHA-256
there with the ``checksum`` template. See ``core.drivers.commands`` for every template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from core.drivers.commands import DEFAULT_STAGING_DIR, CommandDriver
from core.drivers.shell import Completed, run_shell
from core.errors import DriverError
from core.interfaces import OutputSink
from core.settings import NodeSettings

if TYPE_CHECKING:
    from core.drivers.loadbalancer import NodeBalancer


class LocalRunner:
    """Runs commands and moves files on this host."""

    def __init__(self, node: str) -> None:
        self.node = node

    async def run(self, operation: str, command: str, *, limit: float) -> Completed:
        return await run_shell(command, node=self.node, operation=operation, limit=limit)

    async def put(self, operation: str, source: Path, target: str, *, limit: float) -> None:
        try:
            async with asyncio.timeout(limit):
                await asyncio.to_thread(shutil.copyfile, source, target)
        except TimeoutError:
            raise DriverError(
                self.node, operation, f"copying {source} to {target} took over {limit:g}s"
            ) from None
        except OSError as exc:
            raise DriverError(
                self.node, operation, f"cannot copy {source} to {target}: {exc}"
            ) from exc

    async def makedirs(self, operation: str, directory: str, *, limit: float) -> None:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise DriverError(
                self.node, operation, f"cannot create the staging directory {directory}: {exc}"
            ) from exc

    async def listdir(self, operation: str, directory: str, *, limit: float) -> list[str]:
        try:
            return sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DriverError(self.node, operation, f"cannot list {directory}: {exc}") from exc

    async def rename(self, operation: str, source: str, target: str, *, limit: float) -> None:
        try:
            os.replace(source, target)
        except OSError as exc:
            raise DriverError(
                self.node, operation, f"cannot rename {source} to {target}: {exc}"
            ) from exc

    async def remove(self, operation: str, path: str, *, limit: float) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise DriverError(self.node, operation, f"cannot remove {path}: {exc}") from exc

    async def reset(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class LocalDriver(CommandDriver):
    """This host as a node (``driver = "local"``)."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        lb: NodeBalancer | None = None,
        output: OutputSink | None = None,
        staging_dir: str = DEFAULT_STAGING_DIR,
    ) -> None:
        super().__init__(
            settings, LocalRunner(settings.name), lb=lb, output=output, staging_dir=staging_dir
        )
