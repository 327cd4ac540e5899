"""One look per command or scheduled occurrence: what its runs share.

The runs of one command (``auto-update c1``) or of one scheduled occurrence (every node
scheduled for the same update time) plan against the same repository state: each
channel's manifest is fetched and its signature verified once for all of them (the first
run that needs it fetches it, the others wait for that fetch; when that fetch fails, each
run fetches on its own with its retry policy), and each node's state is
the one read when the command or occurrence started, instead of one more status query per
run. A look lives only in memory: a run resumed after a restart plans afresh. A look's
fetch is a conditional request (``core.repository.conditional``): when the manifest has
not changed since the last look, command or poll, the repository answers 304 and the
manifest verified then is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.errors import TgopsError
from core.repository.manifest import Manifest
from core.store import NodeRecord

Fetch = Callable[[str], Awaitable[Manifest]]


@dataclass(slots=True, eq=False)
class Look:
    """The node records read at the start, and each channel's manifest once fetched."""

    records: dict[str, NodeRecord]
    seen_at: datetime | None = None
    """When the nodes were asked for the state in ``records``."""
    selected: Mapping[str, list[str]] | None = None
    """Hotfixes selected per node, read once (None: not read yet; ``selections``)."""
    fetches: int = 0
    """Manifest fetches made for this look (one per channel at most)."""
    retry_alone: bool = False
    """When the shared fetch fails, each run fetches again on its own with the retry policy
    (a scheduled occurrence: its shared fetch is one early attempt); otherwise the shared
    fetch is the retry policy itself and its failure is every run's (one command)."""
    _manifests: dict[str, asyncio.Future[Manifest]] = field(default_factory=dict)
    _selecting: asyncio.Future[Mapping[str, list[str]]] | None = None

    async def selections(
        self, read: Callable[[], Awaitable[Mapping[str, list[str]]]]
    ) -> Mapping[str, list[str]]:
        """The hotfixes selected per node: read once (``read``) by the first run that
        asks, the runs planning meanwhile wait for that read."""
        if self.selected is not None:
            return self.selected
        if self._selecting is None or (self._selecting.done() and self._selecting.exception()):
            self._selecting = asyncio.ensure_future(read())
        self.selected = await asyncio.shield(self._selecting)
        return self.selected

    async def manifest(
        self, channel: str, attempt: Fetch, on_its_own: Fetch | None = None
    ) -> Manifest:
        """The channel's manifest: one fetch (``attempt``) made by the first run that asks
        and shared with the others. When that one fails, each run fetches on its own
        (``on_its_own``, with its retry policy), as it would without a look (L5); without
        ``on_its_own`` the failure is raised.
        """
        shared = self._manifests.get(channel)
        if shared is None:
            self.fetches += 1
            shared = asyncio.ensure_future(attempt(channel))
            self._manifests[channel] = shared
        try:
            # a run that is stopped while it waits does not stop the others' fetch
            return await asyncio.shield(shared)
        except TgopsError:
            if on_its_own is None:
                raise
            return await on_its_own(channel)

    def record(self, node: str) -> NodeRecord | None:
        return self.records.get(node)

    def close(self) -> None:
        """Drop what is held (a fetch still under way is stopped)."""
        tasks: list[asyncio.Future[Any]] = list(self._manifests.values())
        if self._selecting is not None:
            tasks.append(self._selecting)
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" warning
        self._manifests.clear()
        self._selecting = None
        self.records.clear()
