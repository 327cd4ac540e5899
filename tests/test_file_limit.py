"""With its file descriptors exhausted by idle connections, `tgops serve` logs the failing
``accept()`` at most once a minute (not a traceback per attempt), closes the idle
connections at their header deadline and answers again."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.service import VIEWER_TOKEN, fleet_toml
from tests.test_notify_crash import free_port

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow

LIMIT = 100
"""The open-files limit of the service process in this test (soft and hard)."""
SERVE = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))
from bot.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_accept_errors_are_logged_once_and_the_service_recovers(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "tgops.toml"
    text = fleet_toml(tmp_path, cluster_nodes=1, singles=0).replace("port = 0", f"port = {port}")
    config.write_text(text)
    log = tmp_path / "service.log"
    ready = tmp_path / "ready"
    env = {
        "TGOPS_HTTP__HEADER_TIMEOUT": "2s",
        "TGOPS_HTTP__IDLE_TIMEOUT": "2s",
        "PATH": "/usr/bin:/bin",
    }
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SERVE, "serve", "--config", str(config),
            "--ready-file", str(ready),
            cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    writers: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(30):
            while not ready.exists():
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.1)
        for _ in range(LIMIT + 50):  # more than the service has descriptors for
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
        await asyncio.sleep(1.5)  # the service meanwhile retries accept() every second

        async def answers() -> bool:
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
                    session.get(
                        f"http://127.0.0.1:{port}/api/v1/status",
                        headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
                    ) as response,
                ):
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        async with asyncio.timeout(30):
            while not await answers():  # noqa: ASYNC110  (another process: nothing to await)
                await asyncio.sleep(0.2)
    finally:
        for writer in writers:
            writer.close()
        if proc.returncode is None:
            proc.terminate()
            async with asyncio.timeout(15):
                await proc.wait()
    output = log.read_text()
    assert output.count("cannot accept connections") == 1, output[-3000:]
    assert "out of system resource" not in output
    assert "Traceback" not in output
