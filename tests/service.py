"""A running tgops service on loopback for end-to-end tests, and a client for its API."""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bot.service import Service
from core.interfaces import Clock
from core.settings import Settings, load_settings

ADMIN_TOKEN = "admin-token-for-tests"
VIEWER_TOKEN = "viewer-token-for-tests"
MAINT_TOKEN = "maint-token-for-tests"


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def fleet_toml(
    root: Path,
    *,
    cluster_nodes: int = 3,
    singles: int = 1,
    max_parallel: int = 1,
    extra: str = "",
    database_url: str | None = None,
    repository_url: str = "http://127.0.0.1:9/",
    public_key: str | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    updates: Mapping[str, Any] | None = None,
) -> str:
    """A configuration with a sandbox cluster ``c1`` of ``tgN`` nodes and ``soloN`` singles."""
    lines = [
        'timezone = "Europe/Berlin"',
        f'database_url = "{database_url or f"sqlite+aiosqlite:///{root}/state.db"}"',
        "[http]",
        'host = "127.0.0.1"',
        "port = 0",
        # every status request looks at the nodes (tests of the cache set it themselves)
        'status_cache = "0s"',
        "[api.tokens.admin]",
        f'token = "{ADMIN_TOKEN}"',
        'roles = ["update", "maint"]',
        "[api.tokens.viewer]",
        f'token = "{VIEWER_TOKEN}"',
        'roles = ["viewer"]',
        "[api.tokens.maint]",
        f'token = "{MAINT_TOKEN}"',
        'roles = ["maint"]',
        "[updates]",
        f'repository_url = "{repository_url}"',
    ]
    tuned = {
        "cache_dir": f"{root}/cache",
        "retry_delay": "0s",
        "download_attempts": 2,
        "connect_timeout": "2s",
        "read_timeout": "2s",
        **(updates or {}),
    }
    if public_key is not None:
        lines.append(f'public_key = "{public_key}"')
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in tuned.items())
    for section, values in (sections or {}).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    lines += ["[clusters.c1]", f"max_parallel_updates = {max_parallel}"]
    for i in range(1, cluster_nodes + 1):
        lines += ["[[nodes]]", f'name = "tg{i}"', 'cluster = "c1"', f'root = "{root}/nodes/tg{i}"']
    for i in range(1, singles + 1):
        lines += ["[[nodes]]", f'name = "solo{i}"', f'root = "{root}/nodes/solo{i}"']
    text = "\n".join(lines) + "\n" + extra
    tomllib.loads(text)  # a broken fixture fails here, not deep inside the service
    return text


def settings_for(
    root: Path, *, environ: Mapping[str, str] | None = None, **kwargs: Any
) -> Settings:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tgops.toml"
    path.write_text(fleet_toml(root, **kwargs))
    return load_settings(path, dict(environ or {}))


@dataclass
class Api:
    """Talks to a running service like `tgops tg` does."""

    base: str
    session: aiohttp.ClientSession

    async def command(self, text: str, token: str = ADMIN_TOKEN) -> dict[str, Any]:
        async with self.session.post(
            f"{self.base}/api/v1/command",
            json={"text": text},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def status(self, token: str = ADMIN_TOKEN) -> dict[str, Any]:
        async with self.session.get(
            f"{self.base}/api/v1/status", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body


@asynccontextmanager
async def running(
    settings: Settings, *, clock: Clock | None = None
) -> AsyncIterator[tuple[Service, Api]]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        Service(settings, clock=clock) as service,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        yield service, Api(base=f"http://127.0.0.1:{service.port}", session=session)
