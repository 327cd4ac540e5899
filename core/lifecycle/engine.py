"""The engine: the fleet's state and every change to it.

Each change is persisted first, audited (L13), and then published as a domain event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from core import events as ev
from core.errors import DriverError, TgopsError
from core.interfaces import Clock, EventSink, NodeDriver, NoticeTexts
from core.lifecycle.heartbeat import record_poll
from core.lifecycle.pending import omitted_update, pending_packages
from core.model import SYSTEM, Actor
from core.notices import EnglishNotices
from core.repository.conditional import Verified
from core.repository.freshness import Refusal
from core.repository.manifest import Manifest
from core.settings import Settings
from core.store import NodeRecord, RunRecord, Store
from core.turns import turn_taking

log = logging.getLogger(__name__)

REFRESH_TIMEOUT = 10.0
REFRESH_PARALLEL = 32
MANIFESTS_KV = "manifests"
"""kv namespace: channel → the last verified manifest (``Engine.remember_manifest``)."""
MANIFEST_PROBLEMS_KV = "manifest-problems"
"""kv namespace: channel → why its manifest is refused (rollback, expired), while it is."""


class UnknownTargetError(TgopsError):
    def __init__(self, target: str, nodes: Sequence[str], clusters: Sequence[str]) -> None:
        self.target = target
        known = ", ".join([*clusters, *nodes][:20]) or "none configured"
        super().__init__(f"{target!r} is neither a node nor a cluster (known: {known}; or 'all')")


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class Engine:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        events: EventSink,
        drivers: Mapping[str, NodeDriver],
        clock: Clock,
        notices: NoticeTexts | None = None,
    ) -> None:
        self.settings = settings
        self.notices: NoticeTexts = notices or EnglishNotices(settings.tz)
        """The texts of the notices users on a node read."""
        self.store = store
        self.events = events
        self.drivers = dict(drivers)
        self.clock = clock
        self.node_names = [n.name for n in settings.nodes]
        self.cluster_of = {n.name: n.cluster for n in settings.nodes}
        self._refresh_gate = asyncio.Semaphore(REFRESH_PARALLEL)
        self._asking: dict[str, asyncio.Task[NodeRecord]] = {}
        """Status refreshes under way per node (``fresh``): later requests join them."""
        self._asked_at: dict[str, float] = {}
        """When each node's last status refresh ended (event-loop time)."""
        self.manifests: dict[str, Manifest] = {}
        self.verified: dict[str, Verified] = {}
        """Channel → how its remembered manifest is requested conditionally (validators,
        signature, key), when its repository sent validators."""
        self.manifest_problems: dict[str, dict[str, str]] = {}
        """Channel → the refusal of its manifest in force (``reason``, ``key``, ``since``)."""

    async def remember_manifest(
        self, manifest: Manifest, conditional: Verified | None = None
    ) -> None:
        """The newest verified manifest of a channel, for status and hotfix listings.

        A changed one is also stored (kv ``manifests``, key = channel, value
        ``{"saved_at", "manifest"}``, with ``"conditional"``: the validators, signature and
        key it was verified with, so that the next request for it, also after a restart, is
        conditional) for readers of the store that cannot fetch it themselves, such as
        ``tgops check-versions``, and for the next start. Every call records the time of
        this successful fetch (``heartbeat.record_poll``).
        """
        channel = manifest.channel
        async with asyncio.timeout(REFRESH_TIMEOUT):
            await record_poll(self.store, channel)
        known = self.manifests.get(channel)
        same = known is manifest or known == manifest
        if conditional is not None and conditional.manifest is not manifest:
            conditional = None
        if same and (conditional is None or conditional.same_source(self.verified.get(channel))):
            return
        self.manifests[channel] = manifest
        value: dict[str, Any] = {
            "saved_at": self.clock.now().isoformat(),
            "manifest": manifest.model_dump(mode="json"),
        }
        if conditional is not None:
            self.verified[channel] = conditional
            value["conditional"] = conditional.to_json()
        else:
            self.verified.pop(channel, None)
        async with asyncio.timeout(REFRESH_TIMEOUT):
            await self.store.kv_set(MANIFESTS_KV, channel, value)

    async def start(self) -> None:
        """Register the configured nodes in the store and read their state once."""
        await self.store.sync_nodes([(n.name, n.cluster, n.driver) for n in self.settings.nodes])
        for channel in (self.settings.updates.channel, self.settings.updates.oldstable_channel):
            saved = await self.store.kv_get(MANIFESTS_KV, channel)
            if isinstance(saved, dict):
                try:
                    manifest = Manifest.model_validate(saved["manifest"])
                except (KeyError, ValidationError):
                    log.warning("the stored manifest of channel %s is unreadable; ignored", channel)
                else:
                    self.manifests[channel] = manifest
                    conditional = Verified.from_json(manifest, saved.get("conditional"))
                    if conditional is not None:
                        self.verified[channel] = conditional
            problem = await self.store.kv_get(MANIFEST_PROBLEMS_KV, channel)
            if isinstance(problem, dict) and isinstance(problem.get("reason"), str):
                self.manifest_problems[channel] = problem
        await self.refresh(self.node_names)

    async def manifest_refused(self, refusal: Refusal) -> None:
        """A channel's manifest was refused (rollback, expired): kept for status and
        check-versions (kv ``manifest-problems``), audited and published once."""
        problem = {
            "reason": refusal.reason,
            "key": refusal.key,
            "since": self.clock.now().isoformat(),
        }
        self.manifest_problems[refusal.channel] = problem
        async with asyncio.timeout(REFRESH_TIMEOUT):
            await self.store.kv_set(MANIFEST_PROBLEMS_KV, refusal.channel, problem)
        kept = self.manifests.get(refusal.channel)
        using = (
            f"; the manifest generated {kept.generated_at} stays in use" if kept is not None else ""
        )
        log.warning("channel %s: %s%s", refusal.channel, refusal.reason, using)
        await self.record(
            SYSTEM,
            "manifest refused",
            detail=f"channel {refusal.channel}: {refusal.reason}{using}",
        )
        await self.events.publish(
            ev.ManifestRefused(channel=refusal.channel, reason=refusal.reason, key=refusal.key)
        )

    async def manifest_accepted(self, channel: str) -> None:
        """A channel whose manifest was refused serves a fresh one again."""
        if self.manifest_problems.pop(channel, None) is None:
            return
        async with asyncio.timeout(REFRESH_TIMEOUT):
            await self.store.kv_delete(MANIFEST_PROBLEMS_KV, channel)
        await self.record(
            SYSTEM, "manifest accepted", detail=f"channel {channel}: a fresh manifest again"
        )

    # -- targets ---------------------------------------------------------------------------

    def cluster_nodes(self, cluster: str) -> list[str]:
        return [n for n in self.node_names if self.cluster_of[n] == cluster]

    def resolve(self, target: str | None) -> list[str]:
        """Node names of a target: a node, a cluster or ``all`` (``None`` = all)."""
        if target is None or target == "all":
            return list(self.node_names)
        if target in self.cluster_of:
            return [target]
        if target in self.settings.clusters:
            return self.cluster_nodes(target)
        raise UnknownTargetError(target, self.node_names, list(self.settings.clusters))

    # -- observation -----------------------------------------------------------------------

    async def refresh(self, names: Sequence[str]) -> list[NodeRecord]:
        """Ask the drivers for the nodes' state and persist what changed."""
        rows = {r.name: r for r in await self.store.nodes(list(names))} if names else {}
        return list(await asyncio.gather(*(self._refresh_one(n, rows.get(n)) for n in names)))

    async def fresh(
        self, names: Sequence[str], max_age: float, *, wait: float | None = None
    ) -> tuple[list[NodeRecord], list[str]]:
        """The nodes' state no older than ``max_age`` seconds, for status requests: a node
        asked less than ``max_age`` ago is read from the store, and concurrent requests
        share one refresh per node (so a burst of requests asks each node once). The rows
        of the nodes to ask are read with one statement. With ``wait``, the answers are
        awaited that many seconds at most: a node that has not answered by then is
        returned as last seen (its refresh goes on and serves the next request). Returns
        the records and the nodes returned as last seen."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = [n for n in names if now - self._asked_at.get(n, -math.inf) >= max_age]
        new = [n for n in due if n not in self._asking]
        if new:
            # registered before anything is awaited, so that requests meanwhile join them
            rows = loop.create_task(self._rows(new))
            for name in new:
                task = loop.create_task(self._refresh_from(name, rows))
                self._asking[name] = task
                task.add_done_callback(functools.partial(self._asked, name))
        asking = {n: self._asking[n] for n in due if n in self._asking}
        if asking:
            await asyncio.wait(asking.values(), timeout=wait)
        joined = {n: task.result() for n, task in asking.items() if task.done()}
        late = [n for n in asking if n not in joined]
        rest = [n for n in names if n not in joined]
        stored = {r.name: r for r in await self.store.nodes(rest)} if rest else {}
        return [joined.get(n) or stored[n] for n in names], late

    async def _rows(self, names: Sequence[str]) -> dict[str, NodeRecord]:
        return {r.name: r for r in await self.store.nodes(names)}

    async def _refresh_from(
        self, name: str, rows: asyncio.Task[dict[str, NodeRecord]]
    ) -> NodeRecord:
        return await self._refresh_one(name, (await asyncio.shield(rows)).get(name))

    def _asked(self, name: str, task: asyncio.Task[NodeRecord]) -> None:
        if self._asking.get(name) is task:
            del self._asking[name]
        if not task.cancelled() and task.exception() is None:
            self._asked_at[name] = asyncio.get_running_loop().time()

    async def refresh_held(self, name: str, held: NodeRecord) -> NodeRecord:
        """``refresh`` of a node whose row a run holds, without reading it first: the
        node's answer is compared with the row held, and when the store's row is another
        version by then (a change the run did not make), with the stored row."""
        return await self._refresh_one(name, held, held=True)

    async def _refresh_one(
        self, name: str, before: NodeRecord | None, *, held: bool = False
    ) -> NodeRecord:
        if before is None:
            before = await self.store.node(name)
        assert before is not None
        driver = self.drivers.get(name)
        if driver is None:
            return before
        # a simulated node's status never waits: without a turn in the gate, the refresh
        # of 10,000 nodes at an update time ran in one turn of the loop (about a second)
        async with turn_taking(self._refresh_gate):
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    state = await driver.status()
            except (DriverError, TimeoutError) as exc:
                cause = str(exc) if isinstance(exc, DriverError) else "status timed out"
                log.warning("node %s: status not available: %s", name, cause)
                after = await self.store.update_node(
                    name, reachable=False, last_error=cause, observed_at=self.clock.now()
                )
                if before.reachable:
                    await self._observed(name, "unreachable", cause)
                return after
        seen: dict[str, Any] = {
            "installed": dict(state.installed),
            "staged": dict(state.staged),
            "sessions": len(state.sessions),
            "logon_enabled": state.logon_enabled,
            # a load balancer that cannot be asked (command templates) and was not touched
            # since the start reports None: what the store recorded stands
            "lb": state.lb if state.lb is not None or before.cluster is None else before.lb,
            "restart_required": state.restart_required,
        }
        after, current = await self._store_seen(name, before, seen)
        if held and not current:
            # the row held was older than the stored one: compare with that one instead
            after, _ = await self._store_seen(name, after, seen)
        return after

    async def _store_seen(
        self, name: str, before: NodeRecord, seen: dict[str, Any]
    ) -> tuple[NodeRecord, bool]:
        """Store what the node answered when it differs from ``before`` (the row as read,
        or as a run holds it). Returns the row as stored then, and whether ``before`` was
        that row's version (false: another change came first, and its write stands)."""
        if (
            before.reachable
            and before.last_error is None
            and all(getattr(before, key) == value for key, value in seen.items())
        ):
            # nothing changed: nothing to write (a status of 500 nodes is cheap)
            return before, True
        # a run may have changed the row while the driver answered: its write wins
        now = self.clock.now()
        after = await self.store.update_node(
            name,
            expect_version=before.version,
            reachable=True,
            last_error=None,
            observed_at=now,
            **seen,
        )
        if after.observed_at == now and after.reachable:  # this refresh's view was stored
            if not before.reachable:
                await self._observed(name, "reachable again", "status answered")
            # the first look at a new node's row (created empty) is no change
            first_look = before.version == 0
            if (
                not first_look
                and before.active_run_id is None
                and after.installed != before.installed
            ):
                await self._observed(
                    name, "installed packages changed", _diff(before.installed, after.installed)
                )
            return after, True
        return after, False

    async def _observed(self, name: str, change: str, detail: str) -> None:
        """A change found by asking the node (not made by tgops): audited, published."""
        await self.record(SYSTEM, f"observed: {change}", target=name, detail=detail)
        await self.events.publish(ev.NodeStateChanged(node=name, change=change))

    # -- audit -----------------------------------------------------------------------------

    async def record(
        self,
        actor: Actor,
        action: str,
        *,
        target: str | None = None,
        detail: str = "",
        run_id: int | None = None,
        wait: bool = True,
    ) -> None:
        """An audit record (L13); with ``wait`` false it goes with the store's next
        transaction (``core.store.journal``: a run's lazy steps, a command that only shows
        something)."""
        await self.store.audit(
            actor=actor.name,
            source=actor.source,
            action=action,
            target=target,
            detail=detail,
            run_id=run_id,
            wait=wait,
        )

    async def command_received(
        self, actor: Actor, text: str, target: str | None, *, wait: bool = True
    ) -> None:
        """L13: every command, who sent it and from where, before it is carried out; with
        ``wait`` false (a command that only shows something) the record goes with the
        store's next transaction, within ``core.store.journal.LAZY_FLUSH``, and the answer
        does not wait for a commit behind the runs' records."""
        await self.record(actor, "command", target=target, detail=text, wait=wait)
        await self.events.publish(
            ev.CommandReceived(actor=actor.name, source=actor.source, text=text)
        )

    # -- state changes ---------------------------------------------------------------------

    async def set_logon(self, name: str, enabled: bool, actor: Actor) -> NodeRecord:
        await self.drivers[name].set_logon(enabled)
        record = await self.store.update_node(name, logon_enabled=enabled)
        change = "logon enabled" if enabled else "logon disabled"
        await self.record(actor, "logon", target=name, detail=change)
        await self.events.publish(ev.NodeStateChanged(node=name, change=change))
        return record

    # -- status ----------------------------------------------------------------------------

    async def status(
        self,
        target: str | None = None,
        *,
        refresh: bool = True,
        max_age: float | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """The fleet state as in docs/lifecycle.md "Status JSON" (for a target, or all);
        with ``max_age`` the nodes' state may be that old, and with ``wait`` the nodes'
        answers are awaited that long at most (``fresh``; the others are shown as last
        seen and listed in ``not_answered_yet``)."""
        names = self.resolve(target)
        now = self.clock.now()
        late: list[str] = []
        # runs first: a run that ends while the nodes are read shows its outcome, not a gap
        active = {
            r.id: r for r in await self.store.runs(statuses=("queued", "running"), limit=10_000)
        }
        if not refresh:
            records = await self.store.nodes(names)
        elif max_age is not None:
            records, late = await self.fresh(names, max_age, wait=wait)
        else:
            records = await self.refresh(names)
        by_name = {r.name: r for r in records}
        maintenance = {m.node: m for m in await self.store.maintenance()}
        schedules: dict[str, dict[str, Any]] = {}
        for sched in await self.store.schedules():
            if sched.enabled:
                entry: dict[str, Any] = {"days": sched.days, "start": sched.start}
                if sched.kind == "download":
                    entry["end"] = sched.end
                schedules.setdefault(sched.node, {})[sched.kind] = entry
        selected = await self.store.selected_hotfixes()
        gated = self.settings.gate.prometheus_url is not None
        nodes = []
        for name in names:
            rec = by_name[name]
            maint = maintenance.get(name)
            run = active.get(rec.active_run_id) if rec.active_run_id is not None else None
            nodes.append(
                {
                    "name": name,
                    "cluster": rec.cluster,
                    "driver": rec.driver,
                    "installed": dict(rec.installed),
                    "pending": self.pending(rec, selected.get(name, [])),
                    "staged": [{"name": k, "version": v} for k, v in sorted(rec.staged.items())],
                    "sessions": rec.sessions,
                    "logon": "enabled" if rec.logon_enabled else "disabled",
                    "lb": rec.lb if rec.cluster else None,
                    "maintenance": None
                    if maint is None
                    else {
                        "start": iso(maint.start),
                        "reason": maint.reason,
                        "origin": maint.origin,
                        "disable_logon": maint.disable_logon,
                    },
                    "update_lock": None
                    if rec.update_lock_since is None
                    else {"since": iso(rec.update_lock_since), "reason": rec.update_lock_reason},
                    "warning_flag": None
                    if rec.warning_flag_since is None
                    else {
                        "since": iso(rec.warning_flag_since),
                        "reason": rec.warning_flag_reason,
                    },
                    "restart_required": rec.restart_required,
                    "schedules": {
                        "download": schedules.get(name, {}).get("download"),
                        "update": schedules.get(name, {}).get("update"),
                    },
                    "hotfixes": {
                        "always": self.hotfixes_always(rec),
                        "selected": selected.get(name, []),
                    },
                    "run": None
                    if run is None
                    else {
                        "id": run.id,
                        "kind": run.kind,
                        "step": run.step,
                        "progress": {"done": run.progress_done, "total": run.progress_total},
                    },
                    "omitted_update": self.omitted(rec),
                    "reachable": rec.reachable,
                    "error": rec.last_error,
                }
            )
            if gated:  # with a gate configured: what holds the node's run, if anything
                nodes[-1]["held"] = held_by_gate(run)
            behind = preparation_late(self.settings, run, now)
            if behind is not None:  # only then: a node not downloaded and staged in time
                nodes[-1]["preparation_late"] = behind
        clusters = []
        wanted = {self.cluster_of[n] for n in names if self.cluster_of[n]}
        holding: dict[str, list[str]] = {}
        for held in await self.store.slots():
            holding.setdefault(held.cluster, []).append(held.node)
        queues = await self.store.slot_queues() if wanted else {}
        for cname, cluster in self.settings.clusters.items():
            if cname not in wanted:
                continue
            clusters.append(
                {
                    "name": cname,
                    "max_parallel_updates": cluster.max_parallel_updates,
                    "updating": holding.get(cname, []),
                    "waiting": queues.get(cname, []),
                }
            )
        status: dict[str, Any] = {"nodes": nodes, "clusters": clusters}
        if late:  # only when some nodes had not answered within ``wait``
            status["not_answered_yet"] = late
        if self.manifest_problems:  # only while a channel's manifest is refused
            status["manifest_problems"] = {
                channel: problem["reason"] for channel, problem in self.manifest_problems.items()
            }
        return status

    def hotfixes_always(self, record: NodeRecord) -> bool:
        if record.hotfixes_always is not None:
            return record.hotfixes_always
        return self.settings.updates.always_install_hotfixes

    def pending(self, record: NodeRecord, selected: Sequence[str]) -> list[dict[str, Any]]:
        """Pending packages of a node against the last verified manifest of its channel."""
        manifest = self.manifests.get(self.settings.updates.channel)
        if manifest is None:
            return []
        entries = pending_packages(
            manifest,
            record.installed,
            selected_hotfixes=selected,
            always_hotfixes=self.hotfixes_always(record),
            requested_optional=record.optional_packages,
        )
        return [
            {"name": e.name, "version": e.version, "kind": str(e.kind), "id": e.id} for e in entries
        ]

    def omitted(self, record: NodeRecord) -> list[str]:
        """Packages older than the oldstable channel's: an update was omitted (L9)."""
        manifest = self.manifests.get(self.settings.updates.oldstable_channel)
        return [] if manifest is None else omitted_update(record.installed, manifest)


PREPARING_STEPS = frozenset({"check", "maintenance", "download"})
"""Steps of a scheduled update before its node is ready (planned, downloaded, staged)."""


def preparation_due(settings: Settings, at: datetime) -> datetime:
    """When the nodes of the scheduled update at ``at`` should be downloaded and staged:
    ``lb_drain_lead`` before it (at it when downloads start no earlier than that)."""
    drain = settings.maintenance.lb_drain_lead
    return at - timedelta(seconds=drain if settings.updates.download_lead > drain else 0)


def preparation_late(
    settings: Settings, run: RunRecord | None, now: datetime
) -> dict[str, Any] | None:
    """``{"run", "step", "due"}`` when ``run`` is a scheduled update still preparing after
    its node should have been ready, else None."""
    if run is None or run.kind != "scheduled-update" or not isinstance(run.params.get("at"), str):
        return None
    due = preparation_due(settings, datetime.fromisoformat(str(run.params["at"])))
    step = run.step or "check"
    if now < due or step not in PREPARING_STEPS:
        return None
    return {"run": run.id, "step": step, "due": due.isoformat()}


def held_by_gate(run: RunRecord | None) -> dict[str, Any] | None:
    """What holds a run at the gate (``core.lifecycle.hold``): ``{"since", "reason",
    "until", "run", "kind"}``, or None."""
    held = run.params.get("held") if run is not None else None
    if run is None or not isinstance(held, dict):
        return None
    return {**held, "run": run.id, "kind": run.kind}


def _diff(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """``pkg 1.0 -> 1.1``, ``pkg (new) 2.0``, ``pkg 1.0 (removed)``, comma-separated."""
    parts = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            parts.append(f"{name} (new) {new}")
        elif new is None:
            parts.append(f"{name} {old} (removed)")
        else:
            parts.append(f"{name} {old} -> {new}")
    return ", ".join(parts)
