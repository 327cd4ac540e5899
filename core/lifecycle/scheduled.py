"""Time-controlled runs (L4, L5): the scheduled update and the scheduled download.

A scheduled update for update time S is one run, started at ``S - download_lead``:

1. ``check``: lock set → skipped (L6); nothing pending → skipped, "no updates".
2. ``maintenance``: maintenance mode with the reason "Scheduled update", start S (users get
   the maintenance notices from now until S).
3. ``download``: the retry policy; when all attempts fail the warning flag is set and the
   same number of attempts is made again immediately before S; when those fail too both
   schedules are switched off and the update lock is set; a cluster node stays in
   maintenance (only a maint admin ends it), a single system's maintenance ends.
4. ``slot``, ``gate`` and ``drain`` (cluster nodes, ``lb_drain_lead`` before S): the node
   takes a cluster slot first (L12: the slot covers the whole time out of load balancing),
   asks the gate (``core.lifecycle.hold``: held while alerts fire), then leaves load
   balancing. A single system asks the gate at S. While held, maintenance and its notices
   stay; the users are told that the update is held back, and its new time once it goes
   on (a late start after a hold is no missed update).
5. ``logon``: immediately before S a single system disables logon.
6. ``wait``: until S; a lock set by now → skipped; S passed by more than
   ``updates.update_grace`` (the service was down) → skipped.
7. ``notice``, ``disconnect``, ``install``, ``reboot`` (only when a core update asks for
   it), ``verify``, ``undrain``, ``release``.

Success ends the maintenance and enables logon; failure sets the update lock and leaves
the node in maintenance (and out of load balancing) for an admin (L4).

A scheduled download (``schedule download T on DAYS TIME [until TIME]``) fetches and
stages what is pending and stops at its end time, keeping partial files for resume.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from core.errors import DownloadFailedError, DriverError, TgopsError
from core.lifecycle.engine import preparation_due
from core.lifecycle.look import Look
from core.lifecycle.runs import (
    STARTED_PER_TURN,
    Flow,
    RunCancelledError,
    RunContext,
    RunSkippedError,
)
from core.lifecycle.steps import DISRUPTIVE_STEPS, LAZY_STEPS
from core.localtime import local_text
from core.model import Actor
from core.store import NewRun, NodeBusyError
from core.turns import in_turns

if TYPE_CHECKING:
    from core.lifecycle.maintenance import Maintenance
    from core.lifecycle.updates import Lifecycle

log = logging.getLogger(__name__)

T = TypeVar("T")
SCHEDULER = Actor(name="scheduler", source="scheduler")
SCHEDULED_REASON = "Scheduled update"
MANIFEST_TIMEOUT = 30.0
"""Longest an occurrence waits for its one look at the channel's manifest."""
NOTICE_TIMEOUT = 30.0
"""Longest wait for a notice to the users about a held update."""


class ScheduledRuns:
    def __init__(self, life: Lifecycle, maintenance: Maintenance) -> None:
        self.life = life
        self.maintenance = maintenance
        self.engine = life.engine
        self.store = life.store
        self.schedules_changed: Callable[[], Awaitable[None]] | None = None
        self._opened: set[int] = set()
        """Runs whose maintenance was opened with their occurrence's other nodes."""

    async def start(
        self, kind: str, node: str, *, at: datetime, until: datetime | None = None
    ) -> int | None:
        """Start a scheduled run for the occurrence ``at`` (S, or the download start)."""
        return (await self.start_many(kind, [node], at=at, until=until)).get(node)

    async def start_many(
        self, kind: str, nodes: Sequence[str], *, at: datetime, until: datetime | None = None
    ) -> dict[str, int]:
        """Start the runs of one occurrence (every node scheduled for ``at``) together:
        one look at the nodes and the channel's manifest, the runs created in one
        transaction, and for a scheduled update the maintenance of every node with pending
        updates opened at once (its users are told from ``notice_lead`` before S on,
        whatever the preparation of the other nodes is doing). Returns the runs started."""
        params: dict[str, object] = {"at": at.isoformat(), "packages": []}
        if until is not None:
            params["until"] = until.isoformat()
        seen_at = self.engine.clock.now()
        records = {r.name: r for r in await self.engine.refresh(list(nodes))}
        look = Look(records=dict(records), retry_alone=True, seen_at=seen_at)
        opens: set[str] = set()
        if kind == "scheduled-update":
            opens = await self._pending_maintenance(look, nodes)
        for name in nodes:
            busy = records[name].active_run_id
            if busy is not None:
                await self._busy(kind, NodeBusyError(name, busy))
        free = self._first_rounds_first([n for n in nodes if records[n].active_run_id is None])
        specs = [
            NewRun(
                kind=kind,
                node=name,
                target=name,
                actor=SCHEDULER.name,
                params={**params, "maintenance": True} if name in opens else dict(params),
                owner=self.life.owner,
                audit=f"run #{{run}} started for {self._local(at)}",
                audit_source=SCHEDULER.source,
            )
            for name in free
        ]
        try:
            ids: list[int | None] = list(await self.store.create_runs(specs))
        except NodeBusyError:
            # a command claimed a node meanwhile: the others start one by one
            ids = [await self._create_one(kind, spec) for spec in specs]
        started = {spec.node: run_id for spec, run_id in zip(specs, ids, strict=True) if run_id}
        opened = [n for n in free if n in opens and n in started]
        if opened:
            await self.maintenance.open_many(
                opened, at, SCHEDULED_REASON, origin="scheduled-update", actor=SCHEDULER
            )
            self._opened.update(started[n] for n in opened)
        self.life.share_look(list(started.values()), look)
        async for spec in in_turns(specs, STARTED_PER_TURN):
            run_id = started.get(spec.node)
            if run_id is not None:
                self.life.spawn(
                    run_id=run_id,
                    kind=kind,
                    node=spec.node,
                    actor=SCHEDULER.name,
                    params=dict(spec.params),
                    completed=set(),
                )
        return started

    async def _create_one(self, kind: str, spec: NewRun) -> int | None:
        try:
            (run_id,) = await self.store.create_runs([spec])
        except NodeBusyError as exc:
            await self._busy(kind, exc)
            return None
        return run_id

    async def _busy(self, kind: str, exc: NodeBusyError) -> None:
        await self.engine.record(SCHEDULER, f"{kind} skipped", target=exc.node, detail=str(exc))
        log.warning("%s on %s skipped: %s", kind, exc.node, exc)

    def _first_rounds_first(self, nodes: Sequence[str]) -> list[str]:
        """The nodes in the order they prepare: the first round of every cluster (those
        that leave load balancing at S - ``lb_drain_lead``) before the later rounds."""
        seen: dict[str | None, int] = {}
        keyed = []
        for index, name in enumerate(nodes):
            cluster = self.engine.cluster_of.get(name)
            place = seen.get(cluster, 0)
            seen[cluster] = place + 1
            limit = (
                self.engine.settings.clusters[cluster].max_parallel_updates
                if cluster is not None
                else 1
            )
            keyed.append((place // limit if cluster is not None else 0, index, name))
        return [name for *_, name in sorted(keyed)]

    async def _pending_maintenance(self, look: Look, nodes: Sequence[str]) -> set[str]:
        """The nodes whose scheduled update will open maintenance: updates pending, no
        update lock, no maintenance set by hand. One fetch of the channel's manifest for
        all (when it fails, each run checks on its own with the retry policy)."""
        channel = self.engine.settings.updates.channel
        try:
            async with asyncio.timeout(MANIFEST_TIMEOUT):
                manifest = await look.manifest(channel, self.life.repository_manifest)
        except (TgopsError, TimeoutError) as exc:
            log.warning(
                "scheduled update: the manifest of channel %s could not be fetched (%s); "
                "each node checks on its own",
                channel,
                exc,
            )
            return set()
        look.selected = await self.store.selected_hotfixes()
        manual = {m.node for m in await self.store.maintenance() if m.origin == "manual"}
        opens = set()
        for name in nodes:
            record = look.records[name]
            if (
                record.update_lock_since is not None
                or record.active_run_id is not None
                or name in manual
            ):
                continue
            selected = look.selected.get(name, [])
            if self.life.plan_with("auto-update", manifest, record, [], selected):
                opens.add(name)
        return opens

    async def watch_preparation(self, at: datetime, runs: Mapping[str, int]) -> list[str]:
        """The nodes of the occurrence whose download and staging are not done when they
        should be: at S - ``lb_drain_lead`` (when the first nodes of a cluster leave load
        balancing; at S when downloads start no earlier than that). They are logged as a
        warning and audited ("preparation late"); ``plan`` shows them. Returns them."""
        due = self.ready_by(at)
        await self._sleep_until(due)
        late = self.life.preparing(runs.values())
        names = sorted(late)
        if not names:
            return []
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        log.warning(
            "scheduled update at %s: preparation late on %d node(s): %s",
            self._local(at),
            len(names),
            shown,
        )
        for name in names:
            await self.engine.record(
                SCHEDULER,
                "preparation late",
                target=name,
                run_id=runs[name],
                detail=f"still at step {late[name]} at {self._local(due)} (update at "
                f"{self._local(at)}); it leaves load balancing and installs once it is staged",
            )
        return names

    def ready_by(self, at: datetime) -> datetime:
        """When the nodes of the update at ``at`` should be downloaded and staged."""
        return preparation_due(self.engine.settings, at)

    def _local(self, when: datetime) -> str:
        return local_text(when, self.engine.settings.tz)

    # -- flows -------------------------------------------------------------------------

    def flow(self, kind: str) -> Flow:
        life = self.life
        if kind == "scheduled-download":
            return Flow(
                kind=kind,
                steps=[("download", self._download_window)],
                resumable=frozenset({"download"}),
            )
        return Flow(
            kind=kind,
            steps=[
                ("check", self._check),
                ("maintenance", self._maintenance),
                ("download", self._download),
                ("slot", self._slot),
                *life.gate_steps(self._gate),
                ("drain", life.step_drain),
                ("logon", self._logon),
                ("wait", self._wait),
                ("notice", life.step_notice),
                ("disconnect", life.step_disconnect),
                ("install", life.step_install),
                ("reboot", self._reboot_if_needed),
                ("verify", life.step_verify),
                ("undrain", life.step_undrain),
                ("release", life.step_release),
            ],
            resumable=frozenset(
                {
                    "check",
                    "maintenance",
                    "download",
                    "slot",
                    "gate",
                    "drain",
                    "logon",
                    "wait",
                    "notice",
                    "disconnect",
                    "verify",
                    "undrain",
                    "release",
                }
            ),
            lazy=LAZY_STEPS,
            idle=self._idle,
            on_success=self._succeeded,
            on_failure=self._failed,
            on_cancel=self._skipped,
        )

    def _idle(self, step: str, ctx: RunContext) -> bool:
        # a cluster node's logon step only waits for the update time (``_logon``)
        return step == "logon" and self.engine.cluster_of[ctx.node] is not None

    @staticmethod
    def _at(ctx: RunContext) -> datetime:
        return datetime.fromisoformat(str(ctx.params["at"]))

    async def _sleep_until(self, when: datetime) -> None:
        await self.engine.clock.sleep_until(when)

    # -- steps -------------------------------------------------------------------------

    async def _check(self, ctx: RunContext) -> None:
        look = self.life.look_of(ctx.run_id)
        record = look.record(ctx.node) if look is not None else None
        if record is None:
            record = (await self.engine.refresh([ctx.node]))[0]
        if record.update_lock_since is not None:
            raise RunSkippedError(
                f"skipped: the update lock is in place ({record.update_lock_reason})"
            )
        entries = await self._twice(
            ctx, lambda: self.life.plan_for(ctx.node, self.life.look_of(ctx.run_id))
        )
        if not entries:
            await self.engine.record(
                SCHEDULER,
                "no updates",
                target=ctx.node,
                run_id=ctx.run_id,
                detail=f"nothing pending for the update at {self._local(self._at(ctx))}",
            )
            raise RunSkippedError("no updates")
        ctx.message = f"{len(entries)} package(s) pending"

    async def _maintenance(self, ctx: RunContext) -> None:
        if ctx.run_id in self._opened:
            self._opened.discard(ctx.run_id)
            ctx.message = "opened with the other nodes of this update time"
            return
        manual = [m for m in await self.store.maintenance(ctx.node) if m.origin == "manual"]
        if manual:
            # a window an admin set stays as it is (and is not ended by this run)
            kept = manual[0]
            ctx.message = (
                f"maintenance of {self._local(kept.start)} ({kept.reason}) set by "
                f"{kept.created_by} kept for the scheduled update"
            )
            await self.engine.record(
                SCHEDULER,
                "maintenance kept",
                target=ctx.node,
                run_id=ctx.run_id,
                detail=ctx.message,
            )
            return
        await self.maintenance.open_for(
            ctx.node,
            self._at(ctx),
            SCHEDULED_REASON,
            origin="scheduled-update",
            disable_logon=False,
            actor=SCHEDULER,
        )
        await ctx.save_params(maintenance=True)

    async def _download(self, ctx: RunContext) -> None:
        files = await self._twice(ctx, lambda: self.life.fetch_and_stage(ctx))
        await self.life.clear_warning_flag(ctx.node)
        if not files:
            raise RunSkippedError("no updates")

    async def _twice(self, ctx: RunContext, attempt: Callable[[], Awaitable[T]]) -> T:
        """L5: the retry policy; when it gives up, the warning flag and one more round of
        attempts immediately before the update time; when that fails too, both schedules
        off and the update lock (a cluster node stays in maintenance)."""
        try:
            return await attempt()
        except DownloadFailedError as first:
            self.life.drop_look(ctx.run_id)  # the second round looks afresh
            await self.life.set_warning_flag(ctx.node, str(first))
            policy = self.life.retry
            second_round = self._at(ctx) - timedelta(seconds=policy.attempts * policy.delay)
            await self.engine.record(
                SCHEDULER,
                "download retried later",
                target=ctx.node,
                run_id=ctx.run_id,
                detail=f"{policy.attempts} more attempts from {self._local(second_round)}",
            )
            await self._sleep_until(second_round)
        try:
            return await attempt()
        except DownloadFailedError as second:
            await self._give_up(ctx, second)
            raise

    async def _give_up(self, ctx: RunContext, error: DownloadFailedError) -> None:
        await ctx.save_params(download_gave_up=True)
        off = [
            kind
            for kind in ("download", "update")
            if await self.store.disable_schedule(node=ctx.node, kind=kind, by=SCHEDULER.name)
        ]
        if self.schedules_changed is not None:
            await self.schedules_changed()
        reason = (
            f"scheduled download failed twice ({error}); schedules switched off "
            f"({', '.join(off) or 'none were on'})"
        )
        if self.engine.cluster_of[ctx.node] is not None:
            reason += "; the node stays in maintenance until a maint admin ends it"
            if not ctx.params.get("maintenance"):
                await self.maintenance.open_for(
                    ctx.node,
                    self.engine.clock.now(),
                    "Update download failed: the scheduled update could not run",
                    origin="download-failure",
                    disable_logon=False,
                    actor=SCHEDULER,
                )
        elif ctx.params.get("maintenance"):
            await self.maintenance.end_for(
                ctx.node, actor=SCHEDULER, reason="the scheduled update could not be downloaded"
            )
        await self.life.set_lock(ctx.node, reason, SCHEDULER)

    async def _slot(self, ctx: RunContext) -> None:
        if self.engine.cluster_of[ctx.node] is None:
            return
        lead = timedelta(seconds=self.engine.settings.maintenance.lb_drain_lead)
        wait = timedelta(seconds=self.engine.settings.updates.slot_wait)
        await self._sleep_until(self._at(ctx) - lead)
        # the cluster's nodes take turns (L12); a node left out of load balancing by a
        # failure keeps its slot, so the others wait no longer than slot_wait after S
        await self.life.step_slot(ctx, deadline=self._at(ctx) + wait)

    async def _gate(self, ctx: RunContext) -> None:
        at = self._at(ctx)
        if self.engine.cluster_of[ctx.node] is None:
            await self._sleep_until(at)  # a single system's users keep working until S
        await self.life.step_gate(ctx, on_hold=self._held, on_release=self._released)

    async def _held(self, ctx: RunContext, since: datetime) -> None:
        await self._tell_users(ctx, self.engine.notices.update_held(ctx.node, self._at(ctx)))

    async def _released(self, ctx: RunContext, now: datetime) -> None:
        at = self._at(ctx)
        if now <= at:
            return  # released before the update time: it starts as announced
        await self._tell_users(ctx, self.engine.notices.update_resumes(ctx.node, now))

    async def _tell_users(self, ctx: RunContext, text: str) -> None:
        try:
            async with asyncio.timeout(NOTICE_TIMEOUT):
                await self.engine.drivers[ctx.node].announce(text)
        except (DriverError, TimeoutError) as exc:
            log.warning("notice on %s failed: %s", ctx.node, exc)

    async def _logon(self, ctx: RunContext) -> None:
        await self._sleep_until(self._at(ctx))
        if self.engine.cluster_of[ctx.node] is None:
            await self.engine.set_logon(ctx.node, False, SCHEDULER)
            await ctx.save_params(logon_disabled=True)

    async def _wait(self, ctx: RunContext) -> None:
        at = self._at(ctx)
        await self._sleep_until(at)
        grace = timedelta(seconds=self.engine.settings.updates.update_grace)
        now = self.engine.clock.now()
        released = ctx.params.get("gate_released")
        # a run the gate held is late on purpose: the grace counts from its release
        late_from = max(at, datetime.fromisoformat(str(released))) if released else at
        if now > late_from + grace:
            raise RunSkippedError(
                f"the update time {self._local(at)} passed while tgops was down "
                f"(more than {grace} ago); skipped, the next one is planned"
            )
        record = await self.store.node(ctx.node)
        assert record is not None
        if record.update_lock_since is not None:
            raise RunSkippedError(
                "skipped at the update time: the update lock is in place "
                f"({record.update_lock_reason})"
            )

    async def _reboot_if_needed(self, ctx: RunContext) -> None:
        # the row as the run holds it: its install step set restart_required there
        record = await self.life.held_record(ctx)
        if record.restart_required:
            await self.life.step_reboot(ctx)

    async def _download_window(self, ctx: RunContext) -> None:
        until = ctx.params.get("until")
        try:
            if until is None:
                files = await self.life.fetch_and_stage(ctx)
            else:
                async with asyncio.timeout_at(self._loop_time(datetime.fromisoformat(str(until)))):
                    files = await self.life.fetch_and_stage(ctx)
        except TimeoutError as exc:
            raise RunCancelledError(
                f"stopped at the end time {self._local(datetime.fromisoformat(str(until)))}; "
                "partial files are kept and the next download resumes them"
            ) from exc
        except DownloadFailedError as exc:
            await self.life.set_warning_flag(ctx.node, str(exc))
            raise
        await self.life.clear_warning_flag(ctx.node, ctx.record)
        ctx.message = ctx.message if files else "no updates"

    def _loop_time(self, when: datetime) -> float:
        delay = (when - self.engine.clock.now()).total_seconds()
        return asyncio.get_running_loop().time() + max(0.0, delay)

    # -- outcomes ----------------------------------------------------------------------

    async def _succeeded(self, ctx: RunContext) -> None:
        self._opened.discard(ctx.run_id)
        if ctx.params.get("maintenance"):
            await self.maintenance.end_for(
                ctx.node, actor=SCHEDULER, reason="scheduled update done"
            )
        if ctx.params.get("logon_disabled"):
            ctx.record = await self.engine.set_logon(ctx.node, True, SCHEDULER)
        await self.life.refresh_node(ctx)

    async def _skipped(self, ctx: RunContext) -> None:
        self._opened.discard(ctx.run_id)
        await self.life.undo_slot(ctx)
        if ctx.params.get("maintenance"):
            await self.maintenance.end_for(
                ctx.node, actor=SCHEDULER, reason=f"scheduled update skipped: {ctx.message}"
            )
        if ctx.params.get("logon_disabled"):
            await self.engine.set_logon(ctx.node, True, SCHEDULER)

    async def _failed(self, ctx: RunContext, step: str, exc: BaseException) -> None:
        self._opened.discard(ctx.run_id)
        if ctx.params.get("download_gave_up"):
            await self.life.undo_slot(ctx)
            return
        disruptive = step in DISRUPTIVE_STEPS or bool(ctx.completed & DISRUPTIVE_STEPS)
        # a node whose users were not touched goes back into load balancing, its slot is
        # freed; a disruptive failure sets the update lock there
        await self.life.update_failed(ctx, step, exc)
        if not disruptive:
            # L4: whatever failed, a failed scheduled update leaves the update lock (the
            # next scheduled update waits for an admin) and the node in maintenance
            reason = f"scheduled update run #{ctx.run_id} failed at step {step}: {ctx.message}"
            if ctx.params.get("maintenance"):
                reason += "; the node stays in maintenance until a maint admin ends it"
            await self.life.set_lock(ctx.node, reason, SCHEDULER)
