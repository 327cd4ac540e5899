"""`tgops serve`: the engine, its drivers, the store and the HTTP server, as one context."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from bot.calendar_feed import MaintenanceFeed
from bot.commands import CommandService
from bot.connections import ConnectionLimits, LimitedSite, quiet_accept_errors, raise_file_limit
from bot.http import build_app
from bot.metrics import ServiceMetrics
from bot.slack.app import slack_bot
from bot.statuspage import StatusPage
from core import heap
from core.background import background
from core.clock import SystemClock
from core.drivers import make_driver
from core.durations import format_duration
from core.errors import TgopsError
from core.events import LocalEventBus
from core.interfaces import Clock, NodeDriver, OutputSink
from core.lifecycle.engine import REFRESH_PARALLEL, REFRESH_TIMEOUT, Engine
from core.lifecycle.heartbeat import heartbeats
from core.lifecycle.leader import PostgresElection, election_for
from core.lifecycle.maintenance import Maintenance
from core.lifecycle.scheduled import ScheduledRuns
from core.lifecycle.scheduler import Scheduler
from core.lifecycle.updates import Lifecycle
from core.model import CommandOutput
from core.repository.cache import Downloader
from core.repository.client import HttpRepository
from core.repository.freshness import Freshness
from core.repository.retry import RetryPolicy
from core.settings import Settings
from core.store import Store, utcnow
from notify.notices import NodeNotices
from notify.notifier import Notifier
from notify.render import Renderer

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 4.0
AUDIT_PRUNE_INTERVAL = 86400.0
"""How often audit records past ``[audit] retention`` are removed."""


EVENTS_PER_NODE = 20
"""Events a subscriber may fall behind per configured node before events are dropped (and
logged): 10,000 nodes starting at one update time queue up to about 5 each."""


class Service:
    """``async with Service(settings) as service``: everything `tgops serve` runs."""

    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, freeze: bool = False
    ) -> None:
        """``freeze``: once started, what start-up made (settings, drivers, modules) is
        left out of the garbage collector's later passes (``gc.freeze``): it lives as long
        as the service, and with thousands of nodes a full pass over it stalls the event
        loop; and the youngest generation is collected less often (``core.heap``; the
        thresholds before are restored when the service ends). ``tgops serve`` sets it; a
        process that starts many services (the tests) should not, as frozen objects are
        never collected."""
        self.settings = settings
        self.clock = clock or SystemClock()
        self._freeze = freeze
        self._thresholds: tuple[int, int, int] | None = None
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self._stack = AsyncExitStack()
        self.port: int | None = None

    async def __aenter__(self) -> Self:
        stack = self._stack
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        if self._freeze:
            self._thresholds = heap.settle_start_up()
        return self

    async def _start(self, stack: AsyncExitStack) -> None:
        settings = self.settings
        self.store = await stack.enter_async_context(Store(settings.database_url))
        self.election = await stack.enter_async_context(
            election_for(
                settings.database_url,
                self.instance,
                self.store,
                interval=settings.leader.takeover / 4,
            )
        )
        self._duties: AsyncExitStack | None = None
        # room for every subscriber to fall behind by a few events per node: thousands of
        # runs that start at one update time publish faster than a busy loop delivers
        backlog = max(10_000, EVENTS_PER_NODE * len(settings.nodes))
        self.bus = await stack.enter_async_context(LocalEventBus(queue_size=backlog))
        drivers: dict[str, NodeDriver] = {}
        for node in settings.nodes:
            cluster = settings.clusters.get(node.cluster) if node.cluster else None
            driver = make_driver(node, cluster, output=self._output_sink(node.name), tz=settings.tz)
            drivers[node.name] = driver
            stack.push_async_callback(driver.aclose)
        self.renderer = Renderer(overrides=settings.notify.templates_dir)
        self.engine = Engine(
            settings=settings,
            store=self.store,
            events=self.bus,
            drivers=drivers,
            clock=self.clock,
            notices=NodeNotices(settings, self.renderer),
        )
        await self.engine.start()
        self.metrics = ServiceMetrics(
            engine=self.engine, instance=self.instance, leader=lambda: self.election.is_leader
        )
        self.repository = await self._repository(stack)
        self.lifecycle = await stack.enter_async_context(
            Lifecycle(
                engine=self.engine,
                repository=self.repository,
                retry=RetryPolicy.from_settings(
                    settings.updates, on_attempt=self.metrics.download_attempt
                ),
                owner=self.instance,
            )
        )
        self.maintenance = Maintenance(self.engine)
        scheduled = ScheduledRuns(self.lifecycle, self.maintenance)
        self.lifecycle.scheduled = scheduled
        self.scheduler = Scheduler(self.engine, scheduled)
        self.commands = CommandService(
            self.engine,
            lifecycle=self.lifecycle,
            maintenance=self.maintenance,
            scheduler=self.scheduler,
            election=self.election,
        )
        # Adapters subscribe to the event bus here, before any run resumes, so that they see
        # everything (notify: e-mail, phone, outbox; bot: Slack).
        self.metrics.subscribe(self.bus)
        self.statuspage = StatusPage(
            engine=self.engine, scheduler=self.scheduler, renderer=self.renderer
        )
        self.statuspage.subscribe(self.bus)
        self.notifier = await stack.enter_async_context(
            Notifier(
                settings=settings,
                store=self.store,
                bus=self.bus,
                repository=self.repository,
                leader=lambda: self.election.is_leader,
            )
        )
        self.slack = await stack.enter_async_context(
            slack_bot(settings, engine=self.engine, commands=self.commands, bus=self.bus)
        )

        limits = ConnectionLimits(
            limit=settings.http.max_connections, header_timeout=settings.http.header_timeout
        )
        app = build_app(
            settings=settings,
            commands=self.commands,
            health=self._health,
            middlewares=[limits.middleware()],
        )
        # Adapters add their HTTP routes to ``app`` here (Slack events, Twilio webhooks).
        self.metrics.add_routes(app)  # GET /metrics
        MaintenanceFeed(self.engine, self.scheduler).add_routes(app)  # GET /maintenance.ics
        self.statuspage.add_routes(app)  # GET /status, /status/events, /status/feed.atom
        self.notifier.add_routes(app)
        if self.slack is not None:
            self.slack.routes(app)  # POST /slack/events

        if self.repository is not None:
            # status shows pending and omitted updates from the channels' manifests
            await stack.enter_async_context(background("manifests", self._watch_manifests))
        self.election.on_elected = self._lead
        self.election.on_demoted = self._step_down
        self.election.on_disconnected = self.lifecycle.interrupt_all
        await self.election.start()

        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            keepalive_timeout=settings.http.idle_timeout,
        )
        await runner.setup()
        stack.enter_context(quiet_accept_errors())  # until after the server is closed
        stack.push_async_callback(runner.cleanup)
        stack.callback(self.statuspage.close)  # before the server waits for handlers
        site = LimitedSite(runner, settings.http.host, settings.http.port, limits=limits)
        await site.start()
        self.port = site.bound_port
        log.info(
            "tgops serving on http://%s:%s (store %s, %d nodes)",
            settings.http.host,
            self.port,
            self.store.display_url(),
            len(settings.nodes),
        )

    def _output_sink(self, node: str) -> OutputSink:
        """Driver commands' output goes to the log of the node's run (once the lifecycle
        runs: drivers are made before it)."""

        async def sink(output: CommandOutput) -> None:
            # the engine's first refresh comes before the lifecycle exists (and no run)
            lifecycle: Lifecycle | None = getattr(self, "lifecycle", None)
            if lifecycle is not None:
                await lifecycle.command_output(node, output)

        return sink

    async def _repository(self, stack: AsyncExitStack) -> HttpRepository | None:
        updates = self.settings.updates
        key = updates.verification_key()
        if key is None:
            log.warning(
                "updates.public_key is not set: downloads and updates are unavailable "
                "(`tgops keygen`/`tgops publish` make a signed repository; `tgops demo` runs "
                "a complete one)"
            )
            return None
        downloader = await stack.enter_async_context(Downloader.from_settings(updates))
        freshness = Freshness(
            accepted=self.engine.manifests,
            refused={c: p["key"] for c, p in self.engine.manifest_problems.items()},
            on_refused=self.engine.manifest_refused,
            on_accepted=self.engine.manifest_accepted,
        )
        return HttpRepository(
            updates.repository_url,
            key,
            downloader,
            freshness=freshness,
            verified=self.engine.verified,
        )

    async def _lead(self) -> None:
        """This instance became the leader: recover orphaned runs, start the timers."""
        duties = AsyncExitStack()
        await duties.__aenter__()
        self._duties = duties
        leader = self.settings.leader
        await duties.enter_async_context(
            background("heartbeat", lambda: heartbeats(self.store, self.instance, leader.heartbeat))
        )
        several = isinstance(self.election, PostgresElection)
        await self.lifecycle.recover(self.election.alive if several else None)
        if several:
            await duties.enter_async_context(background("orphaned-runs", self._adopt_orphans))
        await duties.enter_async_context(self.maintenance.reminders())
        await duties.enter_async_context(self.scheduler)
        await duties.enter_async_context(background("node-check", self._check_nodes))
        await duties.enter_async_context(background("audit-retention", self._prune_audit))

    async def _check_nodes(self) -> None:
        """Read every node's state each ``leader.node_check`` (an unreachable node shows in
        monitoring and in the audit log without anyone asking for its status)."""
        interval = self.settings.leader.node_check
        names = self.engine.node_names
        limit = REFRESH_TIMEOUT * (len(names) // REFRESH_PARALLEL + 2)  # rounds of the gate
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(limit):
                    await self.engine.refresh(names)
            except (TgopsError, SQLAlchemyError, OSError, TimeoutError) as exc:
                log.warning("node check: %s", exc or type(exc).__name__)

    async def _watch_manifests(self) -> None:
        while True:
            for problem in await self.lifecycle.refresh_manifests():
                log.warning("%s", problem)
            await asyncio.sleep(self.settings.updates.poll_interval)

    async def _prune_audit(self) -> None:
        """``[audit] retention``: older audit records are removed, at start and daily."""
        retention = self.settings.audit.retention
        while True:
            # audit records carry the time of the store (utcnow), not of the service clock
            before = utcnow() - timedelta(seconds=retention)
            try:
                removed = await self.store.prune_audit(before)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("audit retention: %s (tried again in a day)", exc)
                removed = 0
            if removed:
                log.info(
                    "audit: %d record(s) older than %s removed (audit.retention)",
                    removed,
                    format_duration(retention),
                )
            await asyncio.sleep(AUDIT_PRUNE_INTERVAL)

    async def _adopt_orphans(self) -> None:
        """Runs of an instance that died are resumed here (once: only the leader does it)."""
        while True:
            await asyncio.sleep(self.settings.leader.takeover / 4)
            await self.lifecycle.recover(self.election.alive)

    async def _step_down(self) -> None:
        duties, self._duties = self._duties, None
        if duties is not None:
            await duties.aclose()

    async def _health(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "leader": await self.election.leader(),
            "is_leader": self.election.is_leader,
            "nodes": len(self.settings.nodes),
        }

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            if self._thresholds is not None:
                heap.restore(self._thresholds)
                self._thresholds = None


async def serve(settings: Settings, *, ready: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT; then stop taking work and shut down within 5 s."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    raise_file_limit()
    with quiet_accept_errors():  # also for asyncio's accept retries due after the close
        async with Service(settings, freeze=True) as service:
            if ready is not None:
                await asyncio.to_thread(ready.write_text, str(service.port))
            await stop.wait()
            log.info("stopping")
