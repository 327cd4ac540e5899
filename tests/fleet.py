"""A running service with a sandbox fleet and a signed repository on loopback, and what
a test needs to look at it as an operator would (replies, status, the nodes' own files)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.service import Service
from core import events as ev
from tests.events import Recorder
from tests.repo_server import RepoServer, serve_repo
from tests.repository import Repo
from tests.service import Api, running, settings_for


def run_ids(text: str) -> list[int]:
    """The run numbers a reply names (``#12``)."""
    return [int(word.strip("#,.")) for word in text.split() if word.startswith("#")]


@dataclass
class Fleet:
    root: Path
    repo: Repo
    server: RepoServer
    service: Service
    api: Api
    events: Recorder

    @property
    def config(self) -> Path:
        return self.root / "tgops.toml"

    def node(self, name: str) -> Path:
        path = self.root / "nodes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def state(self, name: str) -> dict[str, Any]:
        """The sandbox node's state.json (the driver's defaults before it first wrote it)."""
        path = self.node(name) / "state.json"
        if not path.exists():
            return {"installed": {}, "logon_enabled": True, "staged": {}}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def login(self, name: str, *users: str) -> None:
        (self.node(name) / "sessions.json").write_text(json.dumps([{"user": u} for u in users]))

    def messages(self, name: str) -> list[str]:
        path = self.node(name) / "messages.log"
        return path.read_text().splitlines() if path.exists() else []

    def fault(self, name: str, faults: dict[str, Any] | str) -> None:
        text = faults if isinstance(faults, str) else json.dumps(faults)
        (self.node(name) / "faults.json").write_text(text)

    async def run(self, text: str, *, ok: bool = True) -> dict[str, Any]:
        """Send a command that starts runs and wait until they end; the reply gets
        ``runs``: node -> run record."""
        reply = await self.api.command(text)
        assert reply["ok"] is ok, reply["text"]
        records = await self.service.lifecycle.wait(run_ids(reply["text"]), limit=60)
        reply["runs"] = {r.node: r for r in records}
        return reply

    async def outcomes(self, text: str) -> dict[str, str]:
        """Like ``run``: each node's final run status."""
        return {node: r.status for node, r in (await self.run(text))["runs"].items()}

    async def node_status(self, name: str) -> dict[str, Any]:
        status = await self.api.status()
        return next(n for n in status["nodes"] if n["name"] == name)

    async def finished(self, node: str, within: float = 40.0) -> ev.RunFinished:
        """The end of the next scheduled run on ``node``."""
        event = await self.events.wait_for(
            lambda e: (
                isinstance(e, ev.RunFinished) and e.node == node and e.kind.startswith("scheduled-")
            ),
            within,
        )
        assert isinstance(event, ev.RunFinished)
        return event


@asynccontextmanager
async def fleet(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Fleet]:
    """``tg-base 1.0`` published in ``stable``; ``kwargs`` go to ``settings_for`` (except
    ``clock``: the service's clock)."""
    clock = kwargs.pop("clock", None)
    repo = Repo(tmp_path)
    repo.add("tg-base", "1.0")
    async with serve_repo(repo.root) as server:
        settings = settings_for(
            tmp_path, repository_url=server.url, public_key=repo.public_key, **kwargs
        )
        async with running(settings, clock=clock) as (service, api):
            yield Fleet(
                root=tmp_path,
                repo=repo,
                server=server,
                service=service,
                api=api,
                events=Recorder(service.bus),
            )
