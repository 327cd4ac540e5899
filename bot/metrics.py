"""``GET /metrics``: Prometheus metrics of one service instance (prometheus-client).

Every service has its own ``CollectorRegistry`` (several services may share a process in
tests). Besides this instance's own ``tgops_info`` and ``tgops_leader`` (1 while it leads),
two kinds of metrics:

* counted by this instance from its domain events and hooks: runs ended (``RunFinished``),
  run durations, package bytes downloaded (``RunProgress``), download attempts (the retry
  policy's ``on_attempt``);
* read from the store when scraped, by ``FleetCollector`` (the fleet's state, the same
  on every instance of a PostgreSQL store): node states, maintenance, cluster slots, the
  notification outbox, active runs, pending packages and hotfixes, and the service's signs
  of life (the leader's heartbeat, the last successful manifest fetch per channel) for
  the rules in ``config/prometheus-alerts.yml``.

Labels never use ``instance`` or ``job`` (Prometheus sets those on every target); the
instance that answers is ``tgops_instance``. No ``*_created`` series. gzip when asked.

The store is asynchronous and collectors are not: the handler reads a ``FleetSnapshot``
first (bounded by ``SCRAPE_TIMEOUT``) and then renders the registry without awaiting in
between. When the store cannot be read, ``tgops_store_up`` is 0 and the store metrics are
left out; the event counters are served all the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from sqlalchemy.exc import SQLAlchemyError

from bot.nagios import node_pending, saved_manifest
from core import __version__
from core import events as ev
from core.errors import StoreError
from core.lifecycle.engine import MANIFESTS_KV, Engine
from core.lifecycle.heartbeat import Heartbeat, read_heartbeat, read_polls
from core.lifecycle.pending import hotfixes_missing
from core.repository.manifest import Manifest
from core.repository.retry import AttemptOutcome
from core.store import ACTIVE_RUN_STATES, NodeRecord

URGENCIES = ("normal", "urgent")

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 5.0
"""Longest wait for the store when /metrics is scraped."""
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
"""Run durations in seconds: a download takes seconds, a scheduled update hours."""
ATTEMPT_OUTCOMES: tuple[AttemptOutcome, ...] = ("ok", "transient", "fatal")


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSnapshot:
    """The store's state at one scrape."""

    nodes: tuple[NodeRecord, ...]
    maintenance: Mapping[str, datetime]
    """Node → start of its open maintenance window."""
    slots_in_use: Mapping[str, int]
    slot_waiters: Mapping[str, int]
    outbox: Mapping[tuple[str, str], int]
    active_runs: Mapping[tuple[str, str], int]
    pending: Mapping[str, tuple[int, int]] | None
    """Node → (pending updates, pending hotfixes); None without a verified manifest."""
    hotfixes_missing: Mapping[tuple[str, str], tuple[int, datetime | None]] | None
    """(node, urgency) → (hotfixes of the channel not installed, when the oldest of them
    was first seen); None without a verified manifest."""
    heartbeat: Heartbeat | None
    polls: Mapping[str, datetime]
    """Channel → last successful manifest fetch."""
    at: datetime


class FleetCollector:
    """A prometheus-client collector serving the last ``FleetSnapshot`` it was given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.snapshot: FleetSnapshot | None = None

    async def read(self) -> FleetSnapshot:
        """Everything the store metrics show, read now (raise on store trouble)."""
        engine = self.engine
        store = engine.store
        names = engine.node_names
        nodes = tuple(await store.nodes(names))
        maintenance = {m.node: m.start for m in await store.maintenance()}
        in_use: dict[str, int] = {}
        for slot in await store.slots():
            in_use[slot.cluster] = in_use.get(slot.cluster, 0) + 1
        selected = await store.selected_hotfixes()
        manifest = await self._manifest()
        pending = None
        missing = None
        if manifest is not None:
            pending = {}
            for record in nodes:
                found = node_pending(
                    record,
                    manifest,
                    selected=selected.get(record.name, []),
                    always_hotfixes=engine.hotfixes_always(record),
                )
                pending[record.name] = (len(found.updates), len(found.hotfixes))
            missing = await self._hotfixes_missing(nodes, manifest)
        return FleetSnapshot(
            nodes=nodes,
            maintenance=maintenance,
            slots_in_use=in_use,
            slot_waiters=await store.slot_waiter_counts(),
            outbox=await store.outbox_counts(),
            active_runs=await store.run_counts(ACTIVE_RUN_STATES),
            pending=pending,
            hotfixes_missing=missing,
            heartbeat=await read_heartbeat(store),
            polls=await read_polls(store),
            at=engine.clock.now(),
        )

    async def _hotfixes_missing(
        self, nodes: Sequence[NodeRecord], manifest: Manifest
    ) -> dict[tuple[str, str], tuple[int, datetime | None]]:
        """Per node and urgency: hotfixes not installed, and the oldest one's first sight."""
        ids = [e.id for e in manifest.hotfixes() if e.id]
        seen = await self.engine.store.announced_at(ids)
        result: dict[tuple[str, str], tuple[int, datetime | None]] = {}
        for record in nodes:
            for urgency in URGENCIES:
                entries = [
                    e
                    for e in hotfixes_missing(manifest, record.installed)
                    if (e.urgency or "normal") == urgency
                ]
                times = [seen[e.id] for e in entries if e.id in seen]
                result[record.name, urgency] = (len(entries), min(times) if times else None)
        return result

    async def _manifest(self) -> Manifest | None:
        """The newest verified manifest: this instance's, else the one saved in the store."""
        channel = self.engine.settings.updates.channel
        manifest = self.engine.manifests.get(channel)
        if manifest is not None:
            return manifest
        saved = saved_manifest(await self.engine.store.kv_get(MANIFESTS_KV, channel))
        return None if saved is None else saved.manifest

    def describe(self) -> list[Metric]:
        return []  # names vary with the snapshot; nothing to check for clashes up front

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "tgops_store_up", "1 when the store could be read at this scrape, else 0"
        )
        snap = self.snapshot
        up.add_metric([], 0.0 if snap is None else 1.0)
        yield up
        if snap is None:
            return
        yield from self._node_metrics(snap)
        yield from self._cluster_metrics(snap)
        yield from self._liveness_metrics(snap)
        yield from self._hotfix_metrics(snap)
        outbox = GaugeMetricFamily(
            "tgops_outbox_items",
            "Notifications in the outbox by channel and status (pending and sending: the "
            "depth; failed: delivery given up; uncertain: may have gone out, not sent again)",
            labels=["channel", "status"],
        )
        for (channel, status), count in sorted(snap.outbox.items()):
            outbox.add_metric([channel, status], count)
        yield outbox
        active = GaugeMetricFamily(
            "tgops_runs_active",
            "Runs queued or running, by kind and status",
            labels=["kind", "status"],
        )
        for (kind, status), count in sorted(snap.active_runs.items()):
            active.add_metric([kind, status], count)
        yield active

    def _node_metrics(self, snap: FleetSnapshot) -> Iterator[Metric]:
        labels = ["node", "cluster"]
        flag = GaugeMetricFamily(
            "tgops_node_warning_flag",
            "1 while the node's warning flag is set (L7: Update download failed)",
            labels=labels,
        )
        lock = GaugeMetricFamily(
            "tgops_node_update_lock", "1 while the node's update lock is set (L6)", labels=labels
        )
        restart = GaugeMetricFamily(
            "tgops_node_restart_required",
            "1 while a core update waits for a restart of the node",
            labels=labels,
        )
        in_maintenance = GaugeMetricFamily(
            "tgops_node_in_maintenance",
            "1 while the node is in maintenance (an open window whose start has come)",
            labels=labels,
        )
        maintenance_start = GaugeMetricFamily(
            "tgops_node_maintenance_start_timestamp_seconds",
            "Start of the node's open maintenance window (Unix time; absent without one)",
            labels=labels,
        )
        reachable = GaugeMetricFamily(
            "tgops_node_reachable", "1 when the node answered its last status query", labels=labels
        )
        pending = GaugeMetricFamily(
            "tgops_node_pending_packages",
            "Packages the node should install (kind: update or hotfix), from the last "
            "verified manifest; absent until one was fetched",
            labels=[*labels, "kind"],
        )
        for record in snap.nodes:
            values = [record.name, record.cluster or ""]
            flag.add_metric(values, float(record.warning_flag_since is not None))
            lock.add_metric(values, float(record.update_lock_since is not None))
            restart.add_metric(values, float(record.restart_required))
            start = snap.maintenance.get(record.name)
            in_maintenance.add_metric(values, float(start is not None and start <= snap.at))
            if start is not None:
                maintenance_start.add_metric(values, start.timestamp())
            reachable.add_metric(values, float(record.reachable))
            if snap.pending is not None:
                updates, hotfixes = snap.pending.get(record.name, (0, 0))
                pending.add_metric([*values, "update"], updates)
                pending.add_metric([*values, "hotfix"], hotfixes)
        yield from (flag, lock, restart, in_maintenance, maintenance_start, reachable, pending)

    def _liveness_metrics(self, snap: FleetSnapshot) -> Iterator[Metric]:
        if snap.heartbeat is not None:
            beat = GaugeMetricFamily(
                "tgops_heartbeat_timestamp_seconds",
                "When the leading instance last wrote its heartbeat into the store (Unix "
                "time; every leader.heartbeat while an instance leads)",
            )
            beat.add_metric([], snap.heartbeat.at.timestamp())
            yield beat
        updates = self.engine.settings.updates
        polled = GaugeMetricFamily(
            "tgops_manifest_last_success_timestamp_seconds",
            "When the channel's signed manifest was last fetched and verified (Unix time; "
            "0 when never)",
            labels=["channel"],
        )
        # the main channel always (0 until fetched); others once they were fetched
        channels = {updates.channel, *snap.polls}
        for channel in sorted(channels):
            at = snap.polls.get(channel)
            polled.add_metric([channel], 0.0 if at is None else at.timestamp())
        yield polled
        interval = GaugeMetricFamily(
            "tgops_manifest_poll_interval_seconds",
            "updates.poll_interval: how often the channels' manifests are fetched (0: never, "
            "or no repository configured)",
        )
        polling = updates.public_key is not None or updates.public_key_file is not None
        interval.add_metric([], updates.poll_interval if polling else 0.0)
        yield interval

    def _hotfix_metrics(self, snap: FleetSnapshot) -> Iterator[Metric]:
        if snap.hotfixes_missing is None:
            return
        pending = GaugeMetricFamily(
            "tgops_hotfix_pending",
            "Hotfixes of the channel not installed on the node, selected or not, by urgency "
            "(absent until a verified manifest was fetched)",
            labels=["node", "urgency"],
        )
        since = GaugeMetricFamily(
            "tgops_hotfix_pending_since_timestamp_seconds",
            "When the oldest hotfix of this urgency not installed on the node was first seen "
            "by tgops (Unix time; absent when none is pending)",
            labels=["node", "urgency"],
        )
        for (node, urgency), (count, first) in sorted(snap.hotfixes_missing.items()):
            pending.add_metric([node, urgency], count)
            if count and first is not None:
                since.add_metric([node, urgency], first.timestamp())
        yield from (pending, since)

    def _cluster_metrics(self, snap: FleetSnapshot) -> Iterator[Metric]:
        in_use = GaugeMetricFamily(
            "tgops_cluster_slots_in_use",
            "Nodes of the cluster out of load balancing for an update (L12 slots held)",
            labels=["cluster"],
        )
        limit = GaugeMetricFamily(
            "tgops_cluster_slots_limit", "max_parallel_updates of the cluster", labels=["cluster"]
        )
        waiting = GaugeMetricFamily(
            "tgops_cluster_slot_waiters",
            "Nodes waiting for a slot of the cluster",
            labels=["cluster"],
        )
        for name, cluster in sorted(self.engine.settings.clusters.items()):
            in_use.add_metric([name], snap.slots_in_use.get(name, 0))
            limit.add_metric([name], cluster.max_parallel_updates)
            waiting.add_metric([name], snap.slot_waiters.get(name, 0))
        yield from (in_use, limit, waiting)


GATE_RESULTS = ("clear", "blocked", "unreachable", "ignored")


class ServiceMetrics:
    """The metrics of one service: ``subscribe`` to its bus, ``add_routes`` to its app,
    and ``download_attempt`` as the retry policy's ``on_attempt``."""

    def __init__(
        self, *, engine: Engine, instance: str, leader: Callable[[], bool] | None = None
    ) -> None:
        # the *_created series double every counter and histogram for no use
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        registry = self.registry
        # "instance" would clash with the label Prometheus gives every target
        Info("tgops", "This tgops instance", registry=registry).info(
            {"version": __version__, "tgops_instance": instance}
        )
        if leader is not None:
            Gauge(
                "tgops_leader",
                "1 while this instance leads (runs the timers, reminders, outbox and hotfix "
                "watch), else 0",
                ["tgops_instance"],
                registry=registry,
            ).labels(instance).set_function(lambda: float(leader()))
        self.runs = Counter(
            "tgops_runs",
            "Runs ended, by kind and outcome (succeeded, failed, cancelled, skipped)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.run_seconds = Histogram(
            "tgops_run_duration_seconds",
            "Duration of ended runs, from their first step to their end",
            ["kind", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.download_bytes = Counter(
            "tgops_download_bytes",
            "Package bytes made ready for nodes by download steps (bytes found in the "
            "content cache count too)",
            ["node"],
            registry=registry,
        )
        self.attempts = Counter(
            "tgops_download_attempts",
            "Attempts of the download retry policy (manifests and packages) by outcome: "
            "ok, transient (retried unless it was the last), fatal (not retried)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ATTEMPT_OUTCOMES:
            self.attempts.labels(outcome)
        self.gate_blocked = Gauge(
            "tgops_gate_blocked",
            "1 while the gate holds a run of this node (alerts firing, or the gate unreachable)",
            ["target"],
            registry=registry,
        )
        self.gate_checks = Counter(
            "tgops_gate_checks",
            "Questions to the gate before disruptive steps, by result: clear, blocked, "
            "unreachable, ignored (--ignore-alerts)",
            ["result"],
            registry=registry,
        )
        if engine.settings.gate.prometheus_url is not None:
            for result in GATE_RESULTS:
                self.gate_checks.labels(result)
            for node in engine.node_names:
                self.gate_blocked.labels(node).set(0)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.fleet = FleetCollector(engine)
        registry.register(self.fleet)
        self.engine = engine
        self._progress: dict[int, int] = {}

    # -- counted from events and hooks ----------------------------------------------------

    def subscribe(self, bus: ev.LocalEventBus) -> None:
        bus.subscribe("metrics", self.on_event)

    def download_attempt(self, outcome: AttemptOutcome) -> None:
        self.attempts.labels(outcome).inc()

    async def on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunProgress):
            self._count_bytes(event)
        elif isinstance(event, ev.GateChecked):
            self.gate_checks.labels(event.result).inc()
        elif isinstance(event, ev.RunHeld):
            self.gate_blocked.labels(event.node).set(1 if event.state == "held" else 0)
        elif isinstance(event, ev.RunFinished):
            self._progress.pop(event.run_id, None)
            self.runs.labels(event.kind, event.outcome).inc()
            await self._observe_duration(event)

    def _count_bytes(self, event: ev.RunProgress) -> None:
        """Bytes grow within a download; a smaller value starts a new step or attempt."""
        last = self._progress.get(event.run_id, 0)
        if event.done > last:
            self.download_bytes.labels(event.node).inc(event.done - last)
        self._progress[event.run_id] = event.done

    async def _observe_duration(self, event: ev.RunFinished) -> None:
        if event.seconds is not None:  # the finishing run knew it
            self.run_seconds.labels(event.kind, event.outcome).observe(max(0.0, event.seconds))
            return
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                run = await self.engine.store.run(event.run_id)
        except (StoreError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("metrics: duration of run #%d not read: %s", event.run_id, exc)
            return
        if run is None or run.finished_at is None:
            return
        began = run.started_at or run.created_at
        seconds = max(0.0, (run.finished_at - began).total_seconds())
        self.run_seconds.labels(event.kind, event.outcome).observe(seconds)

    # -- HTTP -------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.handle)

    async def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry rendered for a scraper's ``Accept`` header: body, content type."""
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                snapshot: FleetSnapshot | None = await self.fleet.read()
        except (StoreError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("metrics: store not readable, store metrics left out: %s", exc)
            snapshot = None
        encoder, content_type = choose_encoder(accept)
        # no await from here on: the snapshot and the rendering belong together
        self.fleet.snapshot = snapshot
        return encoder(self.registry), content_type

    async def handle(self, request: web.Request) -> web.Response:
        body, content_type = await self.exposition(request.headers.get("Accept", ""))
        response = web.Response(body=body, headers={"Content-Type": content_type})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            # Prometheus asks for gzip on every scrape; aiohttp compresses off the loop
            # for large bodies and sets Content-Encoding and Vary
            response.enable_compression(web.ContentCoding.gzip)
        return response
