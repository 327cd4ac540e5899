"""`tgops serve` in a separate process, for tests that kill it, and a client for its API."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.events import until
from tests.ports import free_port
from tests.service import ADMIN_TOKEN

ROOT = Path(__file__).parent.parent


@dataclass
class Remote:
    """The API of a service running in another process."""

    session: aiohttp.ClientSession
    port: int
    proc: Process

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def health(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/healthz") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def status(self) -> dict[str, Any]:
        async with self.session.get(
            f"{self.base}/api/v1/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def node(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(n for n in (await self.status())["nodes"] if n["name"] == name)
        return found

    async def command(self, text: str) -> dict[str, Any]:
        async with self.session.post(
            f"{self.base}/api/v1/command",
            json={"text": text},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await self.proc.wait()


@asynccontextmanager
async def service_process(
    config: Path, workdir: Path, session: aiohttp.ClientSession, *, name: str = "service"
) -> AsyncIterator[Remote]:
    """Start `tgops serve` with ``config`` on a free port; SIGTERM it when the block ends."""
    port = free_port()
    own = workdir / f"{name}.toml"
    text = await asyncio.to_thread(config.read_text)
    await asyncio.to_thread(own.write_text, text.replace("port = 0", f"port = {port}"))
    ready = workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "serve",
            "--config",
            str(own),
            "--ready-file",
            str(ready),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def started() -> bool:
        assert proc.returncode is None, log_path.read_text()
        return ready.exists()

    try:
        await until(started)
        yield Remote(session=session, port=port, proc=proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await proc.wait()
