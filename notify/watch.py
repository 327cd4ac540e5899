"""The hotfix watch (L8): poll the channel's manifest, announce each new hotfix once.

Every ``updates.poll_interval`` the signed manifest of ``updates.channel`` is fetched
through the service's repository client. A hotfix id not announced before is handed to
``announce`` (which queues the e-mails, starts the escalation of an urgent one and
publishes ``HotfixPublished``) and then recorded as announced, so it is announced once,
also across restarts (the outbox keys make a repeated announcement after a crash send
nothing twice).

First poll of a channel on a fresh store: with ``notify.announce_existing_hotfixes``
(default true) the hotfixes already published are announced like new ones (they are
new to this installation); with false they are only recorded as known.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.errors import TgopsError
from core.interfaces import RepositoryClient
from core.repository.manifest import PackageEntry
from core.settings import UpdatesSettings
from core.store import Store, utcnow

log = logging.getLogger(__name__)

WATCH = "notify.watch"
"""kv namespace: ``first-poll:<channel>`` → when and what the first poll found."""

Announce = Callable[[PackageEntry, str], Awaitable[None]]


class HotfixWatch:
    def __init__(
        self,
        *,
        store: Store,
        repository: RepositoryClient | None,
        updates: UpdatesSettings,
        announce: Announce,
        announce_existing: bool,
    ) -> None:
        self.store = store
        self.repository = repository
        self.channel = updates.channel
        self.interval = updates.poll_interval
        self.fetch_timeout = updates.connect_timeout + 2 * updates.read_timeout + 5
        self.announce = announce
        self.announce_existing = announce_existing
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Poll now instead of at the end of the interval."""
        self._wake.set()

    async def run(self) -> None:
        if self.repository is None:
            log.info("hotfix watch disabled: updates.public_key is not set")
            return
        if self.interval <= 0:
            log.info("hotfix watch disabled: updates.poll_interval is 0")
            return
        while True:
            self._wake.clear()
            try:
                await self.poll()
            except TgopsError as exc:
                log.warning("hotfix watch: %s; trying again in %gs", exc, self.interval)
            except TimeoutError:
                log.warning(
                    "hotfix watch: channel %s not fetched within %gs; trying again in %gs",
                    self.channel,
                    self.fetch_timeout,
                    self.interval,
                )
            except Exception:
                log.exception("hotfix watch: poll failed; trying again in %gs", self.interval)
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def poll(self) -> list[str]:
        """Fetch the manifest once; returns the ids of hotfixes announced now."""
        assert self.repository is not None
        async with asyncio.timeout(self.fetch_timeout):
            manifest = await self.repository.manifest(self.channel)
        hotfixes = [e for e in manifest.hotfixes() if e.id]
        first_key = f"first-poll:{self.channel}"
        first = await self.store.kv_get(WATCH, first_key) is None
        known = await self.store.announced([e.id for e in hotfixes if e.id])
        fresh = [e for e in hotfixes if e.id not in known]
        announced: list[str] = []
        for entry in fresh:
            assert entry.id is not None
            if first and not self.announce_existing:
                await self.store.mark_announced(
                    entry.id, channel=self.channel, urgency=entry.urgency or "normal"
                )
                continue
            await self.announce(entry, self.channel)
            await self.store.mark_announced(
                entry.id, channel=self.channel, urgency=entry.urgency or "normal"
            )
            announced.append(entry.id)
        if first:
            await self.store.kv_set(
                WATCH,
                first_key,
                {
                    "at": utcnow().isoformat(),
                    "hotfixes": [e.id for e in fresh],
                    "announced": self.announce_existing,
                },
            )
            if fresh and not self.announce_existing:
                log.info(
                    "hotfix watch: first poll of %s: %d hotfix(es) already published are "
                    "recorded as known, not announced (notify.announce_existing_hotfixes)",
                    self.channel,
                    len(fresh),
                )
        return announced
