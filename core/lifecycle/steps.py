"""The steps of an update on one node (L1, L2, L6, L7, L10, L12): plan, download and
stage, slot, drain, notice, disconnect, install, restart, verify, undrain, release, integrity;
and what happens when one fails (the update lock, the rollout stopped).

``Lifecycle`` (``updates``) strings these steps into flows and runs them.

It is over 600 lines on purpose: the steps of one node's update are methods of one
class because they share the preparation state (the look, the planning and staging
gates, the rollouts); the look lives in ``look.py`` and the gate's holding in ``hold.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from core import events as ev
from core.errors import DownloadFailedError, DriverError, TgopsError
from core.gate import Gate
from core.interfaces import NodeDriver, RepositoryClient
from core.lifecycle.engine import Engine
from core.lifecycle.hold import Hold, Hook
from core.lifecycle.look import Look
from core.lifecycle.pending import catch_up, pending_packages
from core.lifecycle.runs import (
    RunCancelledError,
    RunContext,
    RunSkippedError,
    Step,
)
from core.lifecycle.slots import SlotGate
from core.model import Actor, PackageKind, StagedPackage
from core.repository.conditional import KeepsVerified
from core.repository.manifest import Manifest, PackageEntry
from core.repository.retry import RetryPolicy
from core.store import NodeChange, NodeRecord, RunChange

log = logging.getLogger(__name__)

UPDATE_KINDS = frozenset({"auto-update", "oldstable-partial", "oldstable-full", "install"})


DISRUPTIVE_STEPS = frozenset({"disconnect", "install", "restart-services", "verify", "reboot"})

LAZY_STEPS = frozenset(
    {"check", "download", "slot", "gate", "wait", "notice", "verify", "undrain", "release"}
)
"""Steps a run need not wait to have recorded before it carries them out (``Flow.lazy``):
a restart carries them out again. Leaving load balancing, the logon lock and every
disruptive step wait for their own record (L15). ``verify`` only reads (the post-update
check, the gate's health): when it follows ``restart-services`` a crash before its record
is written restarts the services once more and checks again; after an install or a
reboot (steps that are not resumable) its start is still waited for (``runs.execute``),
so that the end of those is durable first."""


PREPARE_AT_ONCE = 4
"""Runs planning (node status, manifest) at once, and runs staging at once (two separate
gates, so a node that planned does not queue behind every later node's planning); the
others wait in the order they came (FIFO), so the first nodes of a rollout are ready
first instead of all nodes sharing the machine until all are ready. Transfers have their
own bound (``updates.max_parallel_downloads``) and are not held back by this."""


LIFECYCLE = Actor(name="tgops", source="lifecycle")
"""Who the lines of a run's steps are from in the audit log."""


ROLLOUTS_KV = "rollouts"
"""kv namespace: a stopped rollout (key: the rollout's key) and why, for recovery."""


class RefusedError(TgopsError):
    """A command that is not carried out; the message says why and what would be accepted."""


FIRST_ROUND_WAIT = 2.0
"""Seconds the nodes behind a rollout's first round wait at most before they prepare
(``Rollout.behind_first_round``)."""


@dataclass(slots=True)
class Rollout:
    """Nodes of one cluster updated by one command; the first failure stops the rest.

    The nodes of its first round (the first ``max_parallel_updates`` in command order)
    prepare at once; the others start preparing once every node of the first round has
    begun installing or has ended (``FIRST_ROUND_WAIT`` seconds at most), so that the
    first round's drains, notices and disconnects, which its users and the load balancer
    wait for, do not queue behind the preparation of every other node of the rollout.
    """

    key: str
    failed: str | None = None
    first_round: set[int] = field(default_factory=set)
    """Runs of the first round that have not begun installing nor ended yet (empty after a
    restart: nobody waits then)."""
    _passed: asyncio.Event = field(default_factory=asyncio.Event)

    def ahead(self, run_ids: Iterable[int]) -> None:
        """The runs of the first round (a rollout's key is new with its command)."""
        self.first_round.update(run_ids)

    def passed(self, run_id: int) -> None:
        """Run ``run_id`` has begun installing or has ended."""
        self.first_round.discard(run_id)
        if not self.first_round:
            self._passed.set()

    async def behind_first_round(self, run_id: int) -> None:
        """Return once the first round has passed (at once for a run of the first round;
        ``FIRST_ROUND_WAIT`` seconds at most)."""
        if run_id in self.first_round or not self.first_round:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_ROUND_WAIT):
                await self._passed.wait()


def _plan_entry(item: dict[str, Any]) -> StagedPackage:
    return StagedPackage(
        name=item["name"],
        version=item["version"],
        kind=PackageKind(item["kind"]),
        sha256=item["sha256"],
        path=Path(item["path"]),
    )


def only_optional(manifest: Manifest, packages: Sequence[str], then: str = "") -> None:
    """Refuse names that are no optional package of the channel (L9a)."""
    known = {p.name for p in manifest.packages if p.kind is PackageKind.OPTIONAL}
    unknown = sorted(set(packages) - known)
    if unknown:
        raise RefusedError(
            f"not an optional package of channel {manifest.channel}: {', '.join(unknown)} "
            f"(optional packages: {', '.join(sorted(known)) or 'none'}){then}"
        )


class UpdateSteps:
    """The steps of an update on one node, and what they need: manifests, the plan,
    the update lock and the warning flag. ``Lifecycle`` builds runs from these steps."""

    def __init__(
        self,
        *,
        engine: Engine,
        repository: RepositoryClient | None,
        retry: RetryPolicy,
        owner: str,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.repository = repository
        self.retry = retry
        self.owner = owner
        self.slots = SlotGate(engine.store, owner=owner)
        self._rollouts: dict[str, Rollout] = {}
        self._preparing = asyncio.Semaphore(PREPARE_AT_ONCE)
        self._staging = asyncio.Semaphore(PREPARE_AT_ONCE)
        self._looks: dict[int, Look] = {}
        """The look a run shares with the other runs of its command or occurrence (until
        its plan is made)."""
        self.hold = Hold(engine, Gate.from_settings(engine.settings.gate))

    def _repo(self) -> RepositoryClient:
        if self.repository is None:
            raise RefusedError(
                "no update repository is usable: set updates.public_key (or public_key_file) "
                "and updates.repository_url (`tgops keygen` and `tgops publish` make a signed "
                "repository; `tgops demo` runs a complete one with its own configuration)"
            )
        return self.repository

    async def manifest(self, channel: str | None = None, *, look: Look | None = None) -> Manifest:
        """The channel's verified manifest (retry policy); with ``look``, the one fetched
        for the runs of that look (fetched by the first run that asks)."""
        channel = channel or self.engine.settings.updates.channel
        if look is not None:
            if look.retry_alone:
                return await look.manifest(channel, self.repository_manifest, self._fetch_manifest)
            return await look.manifest(channel, self._fetch_manifest)
        return await self._fetch_manifest(channel)

    async def _fetch_manifest(self, channel: str) -> Manifest:
        manifest = await self.retry.run(
            lambda: self._repo().manifest(channel), describe=f"channel {channel}"
        )
        await self.remember(manifest)
        return manifest

    async def remember(self, manifest: Manifest) -> None:
        """Keep ``manifest`` (just fetched) with what makes its next request conditional."""
        repo = self._repo()
        kept = repo.verified_record(manifest) if isinstance(repo, KeepsVerified) else None
        await self.engine.remember_manifest(manifest, kept)

    async def interactive_manifest(self, channel: str | None = None) -> Manifest:
        """For a command someone waits for: one fetch, and when the repository does not
        answer, the last verified manifest (never the scheduled retry policy)."""
        channel = channel or self.engine.settings.updates.channel
        try:
            return await self.repository_manifest(channel)
        except TgopsError as exc:
            known = self.engine.manifests.get(channel)
            if known is None:
                raise
            log.warning("channel %s: %s; the last verified manifest is used", channel, exc)
            return known

    async def repository_manifest(self, channel: str) -> Manifest:
        """One attempt at the channel's verified manifest (no retries), counted as an
        attempt (metrics) and remembered."""
        repo = self._repo()
        manifest = await self.retry.once(
            lambda: repo.manifest(channel), describe=f"channel {channel}"
        )
        await self.remember(manifest)
        return manifest

    def look_of(self, run_id: int) -> Look | None:
        return self._looks.get(run_id)

    def share_look(self, run_ids: Sequence[int], look: Look) -> None:
        """The runs ``run_ids`` plan against ``look`` (one command or occurrence)."""
        for run_id in run_ids:
            self._looks[run_id] = look

    def drop_look(self, run_id: int) -> None:
        self._looks.pop(run_id, None)

    async def refresh_manifests(self) -> list[str]:
        """Fetch both channels' manifests (status shows pending and omitted updates from
        them); returns one line per channel that could not be fetched."""
        updates = self.engine.settings.updates
        problems = []
        for channel in (updates.channel, updates.oldstable_channel):
            try:
                await self.remember(await self._repo().manifest(channel))
            except TgopsError as exc:
                problems.append(str(exc))
        return problems

    async def _plan(
        self, kind: str, record: NodeRecord, packages: Sequence[str], look: Look | None = None
    ) -> list[PackageEntry]:
        settings = self.engine.settings.updates
        if kind in {"oldstable-partial", "oldstable-full"}:
            oldstable = await self.manifest(settings.oldstable_channel, look=look)
            return catch_up(
                record.installed, oldstable, packages if kind == "oldstable-partial" else None
            )
        manifest = await self.manifest(look=look)
        read = self.store.selected_hotfixes
        chosen = await look.selections(read) if look is not None else await read()
        return self.plan_with(kind, manifest, record, packages, chosen.get(record.name, []))

    def plan_with(
        self,
        kind: str,
        manifest: Manifest,
        record: NodeRecord,
        packages: Sequence[str],
        selected: Sequence[str],
    ) -> list[PackageEntry]:
        """What ``kind`` installs on the node against ``manifest`` (not oldstable)."""
        requested = set(record.optional_packages)
        if kind == "install":
            only_optional(manifest, packages)
            entries = pending_packages(
                manifest,
                record.installed,
                selected_hotfixes=(),
                always_hotfixes=False,
                requested_optional=set(packages),
            )
            return [e for e in entries if e.name in packages]
        return pending_packages(
            manifest,
            record.installed,
            selected_hotfixes=selected,
            always_hotfixes=self.engine.hotfixes_always(record),
            requested_optional=requested,
        )

    async def _check_names(self, kind: str, packages: Sequence[str], look: Look) -> None:
        """Refuse a command naming packages its channel does not have, before any run
        starts (the runs plan per node against the same manifest)."""
        if kind == "oldstable-partial":
            channel = self.engine.settings.updates.oldstable_channel
            catch_up({}, await look.manifest(channel, self.interactive_manifest), packages)
            return
        channel = self.engine.settings.updates.channel
        manifest = await look.manifest(channel, self.interactive_manifest)
        only_optional(manifest, packages, "; nothing was started")

    async def set_lock(self, name: str, reason: str, actor: Actor) -> None:
        now = self.engine.clock.now()
        await self.store.update_node(name, update_lock_since=now, update_lock_reason=reason)
        await self.engine.record(actor, "update lock set", target=name, detail=reason)
        await self.engine.events.publish(ev.UpdateLockSet(node=name, reason=reason))

    async def set_warning_flag(self, name: str, reason: str) -> None:
        now = self.engine.clock.now()
        await self.store.update_node(name, warning_flag_since=now, warning_flag_reason=reason)
        await self.engine.record(
            Actor(name="tgops", source="system"), "warning flag set", target=name, detail=reason
        )
        await self.engine.events.publish(ev.WarningFlagSet(node=name, reason=reason))

    async def clear_warning_flag(self, name: str, record: NodeRecord | None = None) -> None:
        """Clear the node's warning flag if it is set (``record``: the node's row as the
        caller's run holds it; otherwise it is read)."""
        if record is None:
            record = await self.store.node(name)
        if record is not None and record.warning_flag_since is not None:
            await self.store.update_node(name, warning_flag_since=None, warning_flag_reason=None)
            await self.engine.record(
                Actor(name="tgops", source="system"),
                "warning flag cleared",
                target=name,
                detail="a complete download cleared it",
            )
            await self.engine.events.publish(
                ev.NodeStateChanged(node=name, change="warning flag cleared")
            )

    def _driver(self, ctx: RunContext) -> NodeDriver:
        return self.engine.drivers[ctx.node]

    async def _published(self, ctx: RunContext, text: str) -> None:
        await self.engine.events.publish(
            ev.RunStepDone(run_id=ctx.run_id, node=ctx.node, step=ctx.step or "", text=text)
        )

    async def note(self, ctx: RunContext, text: str) -> None:
        """One line of what the run did on its node, as it happens: in the audit log (L13)
        and published (the demo's console and Slack show it)."""
        await self.engine.record(
            LIFECYCLE,
            ctx.step or "step",
            target=ctx.node,
            run_id=ctx.run_id,
            detail=text,
            wait=not ctx.lazy,
        )
        await self.engine.events.publish(
            ev.RunStepDone(run_id=ctx.run_id, node=ctx.node, step=ctx.step or "", text=text)
        )

    async def _node(self, ctx: RunContext) -> NodeRecord:
        record = await self.store.node(ctx.node)
        assert record is not None
        return record

    async def _recent_record(self, ctx: RunContext) -> NodeRecord:
        """The node's row as the run holds it when the node was asked for its state no
        longer ago than the leader's ``node_check`` period (as fresh as the store's row
        is kept), else read from the store."""
        held = ctx.record
        if held is not None and ctx.seen_at is not None:
            age = (self.engine.clock.now() - ctx.seen_at).total_seconds()
            if age <= self.engine.settings.leader.node_check:
                return held
        return await self._node(ctx)

    async def held_record(self, ctx: RunContext) -> NodeRecord:
        """The node's row as the run holds it (read once if it holds none)."""
        if ctx.record is None:
            ctx.record = await self._node(ctx)
        return ctx.record

    async def _changed(
        self,
        ctx: RunContext,
        text: str,
        values: Mapping[str, Any] | None = None,
        *,
        derive: Callable[[NodeRecord], Mapping[str, Any]] | None = None,
        params: bool = False,
    ) -> None:
        """Change the run's node (``values``, and ``derive``d from its current row), save
        the run's parameters (``params``) and note ``text`` (audit), committed together
        with other runs' records (the run journal); then publish the note."""
        entries: list[Any] = []
        if values or derive is not None:
            entries.append(NodeChange(name=ctx.node, values=dict(values or {}), derive=derive))
            if ctx.record is not None:
                # the store counts the row's version up with each change
                held = replace(ctx.record, **(values or {}), version=ctx.record.version + 1)
                ctx.record = replace(held, **derive(held)) if derive is not None else held
        if params:
            entries.append(RunChange(run_id=ctx.run_id, values={"params": dict(ctx.params)}))
        entries.append(
            self.store.audit_entry(
                actor=LIFECYCLE.name,
                source=LIFECYCLE.source,
                action=ctx.step or "step",
                target=ctx.node,
                run_id=ctx.run_id,
                detail=text,
            )
        )
        await self.store.commit(*entries, wait=not ctx.lazy)

    async def step_download(self, ctx: RunContext) -> None:
        rollout = self._rollout(ctx)
        if rollout is not None:
            await rollout.behind_first_round(ctx.run_id)
            _cancel_if_stopped(rollout, ctx)  # a node ahead failed meanwhile: stage nothing
        try:
            files = await self.fetch_and_stage(ctx)
        except DownloadFailedError as exc:
            await self.set_warning_flag(ctx.node, str(exc))
            raise
        if files or ctx.kind == "download":
            await self.clear_warning_flag(ctx.node, ctx.record)
        if not files and ctx.kind != "download":
            raise RunCancelledError(f"nothing to install on {ctx.node}; nothing was changed")

    async def plan_for(self, node: str, look: Look | None = None) -> list[PackageEntry]:
        """What an update of ``node`` would install now (channel, hotfixes, optional);
        with ``look``, against the state and manifest read for its command or occurrence."""
        record = look.record(node) if look is not None else None
        if record is None:
            record = (await self.engine.refresh([node]))[0]
        return await self._plan("auto-update", record, [], look)

    async def fetch_and_stage(self, ctx: RunContext) -> list[StagedPackage]:
        """Plan what the node needs, download it (retry policy), stage it on the node.

        The plan is saved in the run for the install step. Raises ``DownloadFailedError``
        when the retry policy gives up; the caller decides about the warning flag.
        """
        plan_kind = ctx.kind if ctx.kind in UPDATE_KINDS else "auto-update"
        look = self._looks.pop(ctx.run_id, None)
        record = look.record(ctx.node) if look is not None else None
        packages = ctx.params.get("packages") or []
        if record is not None:
            # the state read when the command or occurrence started, and its manifest
            assert look is not None
            ctx.seen_at = look.seen_at
            entries = await self._plan(plan_kind, record, packages, look)
        else:
            async with self._preparing:
                ctx.seen_at = self.engine.clock.now()
                record = (await self.engine.refresh([ctx.node]))[0]
                entries = await self._plan(plan_kind, record, packages)
        ctx.record = record
        if not entries:
            await ctx.save_params(plan=[])
            ctx.message = "nothing pending"
            return []
        total = sum(e.size for e in entries)
        done_before = 0
        files: list[StagedPackage] = []
        repo = self._repo()
        for entry in entries:
            base = done_before

            async def progress(done: int, _total: int, base: int = base) -> None:
                await ctx.progress(base + done, total)

            def fetch(entry: PackageEntry = entry, progress: Any = progress) -> Any:
                return repo.download(entry, progress)

            path = await self.retry.run(fetch, describe=f"package {entry.name} {entry.version}")
            done_before += entry.size
            files.append(
                StagedPackage(
                    name=entry.name,
                    version=entry.version,
                    kind=entry.kind,
                    sha256=entry.sha256,
                    path=path,
                    size=entry.size,
                )
            )
        await ctx.progress(total, total)
        async with self._staging:
            await self._driver(ctx).stage(files)
        new = {f.name: f.version for f in files}
        ctx.params.update(
            plan=[
                {
                    "name": f.name,
                    "version": f.version,
                    "kind": str(f.kind),
                    "sha256": f.sha256,
                    "path": str(f.path),
                }
                for f in files
            ]
        )
        ctx.message = "staged " + ", ".join(f"{f.name} {f.version}" for f in files)
        # the staged packages, the plan (for the install step) and the note: one commit
        await self._changed(
            ctx,
            "downloaded and " + ctx.message,
            derive=lambda row: {"staged": {**row.staged, **new}},
            params=True,
        )
        await self._published(ctx, "downloaded and " + ctx.message)
        return files

    def _cluster(self, ctx: RunContext) -> str | None:
        return self.engine.cluster_of[ctx.node]

    def _rollout(self, ctx: RunContext) -> Rollout | None:
        """The rollout the run belongs to (a command over a cluster), if any."""
        return self._rollouts.get(ctx.params.get("rollout", ""))

    def _limit(self, cluster: str) -> int | None:
        """The cluster's ``max_parallel_updates`` (a freed slot is handed on below it)."""
        settings = self.engine.settings.clusters.get(cluster)
        return None if settings is None else settings.max_parallel_updates

    async def step_slot(self, ctx: RunContext, *, deadline: datetime | None = None) -> None:
        """Take a slot of the node's cluster (L12), waiting in order; a stopped rollout or
        the ``deadline`` ends the wait (the run is cancelled or skipped, nothing touched)."""
        cluster = self._cluster(ctx)
        if cluster is None:
            return
        rollout = self._rollout(ctx)

        async def stop() -> None:
            _cancel_if_stopped(rollout, ctx)
            if deadline is not None and self.engine.clock.now() > deadline:
                holders = ", ".join(s.node for s in await self.store.slots(cluster))
                raise RunSkippedError(
                    f"no slot of cluster {cluster} became free in time (held by {holders}); "
                    f"{untouched(ctx)}"
                )

        limit = self.engine.settings.clusters[cluster].max_parallel_updates

        async def waiting(ahead: list[str]) -> None:
            count = len(ahead)
            await self.note(
                ctx,
                f"waiting for a slot of {cluster} behind {count} node{'s' if count != 1 else ''}"
                f" ({', '.join(ahead)})",
            )

        slot = await self.slots.acquire(
            cluster=cluster,
            node=ctx.node,
            limit=limit,
            run_id=ctx.run_id,
            stop=stop,
            waiting=waiting,
        )
        await self.note(ctx, f"slot taken ({slot + 1} of {limit} of cluster {cluster})")

    def gate_steps(self, step: Step | None = None) -> list[tuple[str, Step]]:
        """The ``gate`` step (``step``, default ``step_gate``) when a gate is configured;
        without one a run's steps are what they always were."""
        return [] if self.hold.gate is None else [("gate", step or self.step_gate)]

    async def step_gate(
        self,
        ctx: RunContext,
        *,
        on_hold: Hook | None = None,
        on_release: Hook | None = None,
    ) -> None:
        """Ask the gate before the first disruptive step (``core.lifecycle.hold``); a
        stopped rollout ends the wait, and a node held too long stops its rollout."""
        rollout = self._rollout(ctx)

        def stopped() -> str | None:
            if rollout is not None and rollout.failed is not None:
                return f"rollout stopped: {rollout.failed}; {ctx.node} was not touched"
            return None

        async def give_up(ctx: RunContext, why: str) -> None:
            if rollout is not None:
                held = f"{ctx.node} was held too long by the gate (run #{ctx.run_id})"
                await self._stop_rollout(rollout, held)

        await self.hold.wait(
            ctx, stopped=stopped, on_hold=on_hold, on_release=on_release, on_give_up=give_up
        )

    async def _stop_rollout(self, rollout: Rollout, why: str) -> None:
        if rollout.failed is not None:
            return
        rollout.failed = why
        # kept in the store: the rollout stays stopped across a restart
        await self.store.kv_set(ROLLOUTS_KV, rollout.key, {"failed": rollout.failed})
        await self.slots.wake()

    async def step_drain(self, ctx: RunContext) -> None:
        if self._cluster(ctx) is None:
            return
        await self._driver(ctx).drain()
        text = "drained (out of load balancing)"
        await self._changed(ctx, text, {"lb": "drained"})
        await self.engine.events.publish(ev.NodeStateChanged(node=ctx.node, change="drained"))
        await self._published(ctx, text)

    async def step_notice(self, ctx: RunContext) -> None:
        await self._driver(ctx).announce(self.engine.notices.work_starts(ctx.node, ctx.kind))
        users = (await self._recent_record(ctx)).sessions
        await self.note(
            ctx, f"notice sent to the logged-in users ({users} session{'s' if users != 1 else ''})"
        )

    async def step_disconnect(self, ctx: RunContext) -> None:
        ended = await self._driver(ctx).disconnect_sessions()
        # how many: in the step's audit line (with the run), not written again as the
        # step's detail (one statement fewer in the journal's next transaction)
        await self._changed(ctx, f"sessions ended ({ended})", {"sessions": 0})
        await self._published(ctx, f"sessions ended ({ended})")

    async def step_install(self, ctx: RunContext) -> None:
        rollout = self._rollout(ctx)
        if rollout is not None:
            rollout.passed(ctx.run_id)  # the nodes behind it prepare now
        plan = [_plan_entry(i) for i in ctx.params.get("plan") or []]
        result = await self._driver(ctx).install(plan)
        names = {p.name for p in plan}
        values: dict[str, Any] = {"installed": dict(result.installed)}
        if result.restart_required:
            values["restart_required"] = True
        optional = ctx.kind == "install"

        def derive(row: NodeRecord) -> dict[str, Any]:
            # from the row as it is when written: what the node has staged meanwhile stays
            derived: dict[str, Any] = {
                "staged": {k: v for k, v in row.staged.items() if k not in names}
            }
            if optional:
                derived["optional_packages"] = sorted(set(row.optional_packages) | names)
            return derived

        ctx.message = "installed " + ", ".join(f"{p.name} {p.version}" for p in plan)
        await self._changed(ctx, ctx.message, values, derive=derive)
        await self._published(ctx, ctx.message)
        if result.restart_required:
            ctx.message += f"; restart required (core update): `restart {ctx.node}`"
            await self.engine.events.publish(
                ev.NodeStateChanged(node=ctx.node, change="restart required")
            )

    async def step_restart_services(self, ctx: RunContext) -> None:
        await self._driver(ctx).restart_services()
        await self.note(ctx, "services restarted")

    async def step_reboot(self, ctx: RunContext) -> None:
        await self._driver(ctx).reboot()
        if ctx.message.startswith("installed "):
            # an update that reboots (scheduled, core update): its outcome keeps what it
            # installed, and no restart is required any more
            ctx.message = ctx.message.split("; restart required")[0] + "; rebooted"
        else:
            ctx.message = f"{ctx.node} restarted"
        await self._changed(ctx, "rebooted", {"restart_required": False})
        await self._published(ctx, "rebooted")

    async def step_verify(self, ctx: RunContext) -> None:
        await self._driver(ctx).post_check()
        await self.hold.health(ctx)
        await self.note(ctx, "verified (the post-update check passed)")

    async def step_undrain(self, ctx: RunContext) -> None:
        if self._cluster(ctx) is None:
            return
        await self._driver(ctx).undrain()
        text = "undrained (back in load balancing)"
        await self._changed(ctx, text, {"lb": "in", "left_drained_by_run": None})
        await self.engine.events.publish(ev.NodeStateChanged(node=ctx.node, change="undrained"))
        await self._published(ctx, text)

    async def step_release(self, ctx: RunContext) -> None:
        cluster = self._cluster(ctx)
        if cluster is not None and await self.slots.release(
            cluster=cluster, node=ctx.node, limit=self._limit(cluster)
        ):
            await self.note(ctx, f"slot of cluster {cluster} freed")

    async def step_integrity(self, ctx: RunContext) -> None:
        mismatches = await self._driver(ctx).verify_integrity()
        if mismatches:
            lines = [f"{m.package}: {m.path}: {m.problem}" for m in mismatches[:50]]
            more = f" (and {len(mismatches) - 50} more)" if len(mismatches) > 50 else ""
            count = len(mismatches)
            noun = "mismatch" if count == 1 else "mismatches"
            raise TgopsError(f"{count} {noun}{more}:\n" + "\n".join(lines))
        ctx.message = "every installed file matches its package"

    async def _update_succeeded(self, ctx: RunContext) -> None:
        # the outcome's audit record is written when the run ends (core.lifecycle.runs.execute)
        await self.refresh_node(ctx)

    async def refresh_node(self, ctx: RunContext) -> None:
        """Ask the run's node for its state once the run is done, and store what differs
        from the row the run holds (not read again; ``Engine.refresh_held``)."""
        if ctx.record is not None:
            ctx.record = await self.engine.refresh_held(ctx.node, ctx.record)
        else:
            ctx.record = (await self.engine.refresh([ctx.node]))[0]

    async def undo_slot(self, ctx: RunContext) -> None:
        cluster = self._cluster(ctx)
        if cluster is not None:
            await self.slots.leave(cluster=cluster, node=ctx.node)
            record = await self._node(ctx)
            if record.lb == "drained" and "drain" in ctx.completed:
                await self._driver(ctx).undrain()
                await self.store.update_node(ctx.node, lb="in")
            await self.slots.release(cluster=cluster, node=ctx.node, limit=self._limit(cluster))

    async def update_failed(self, ctx: RunContext, step: str, exc: BaseException) -> None:
        cluster = self._cluster(ctx)
        rollout = self._rollout(ctx)
        if rollout is not None:
            await self._stop_rollout(rollout, f"{ctx.node} failed (run #{ctx.run_id})")
        disruptive = step in DISRUPTIVE_STEPS or bool(ctx.completed & DISRUPTIVE_STEPS)
        if not disruptive:
            # nothing on the node changed: put it back as it was
            if cluster is not None:
                await self.slots.leave(cluster=cluster, node=ctx.node)
                record = await self._node(ctx)
                if record.lb == "drained" and "drain" in ctx.completed:
                    try:
                        await self._driver(ctx).undrain()
                        await self.store.update_node(ctx.node, lb="in")
                    except DriverError as undrain_error:
                        log.warning("%s", undrain_error)
                        await self.store.update_node(ctx.node, left_drained_by_run=ctx.run_id)
                        return
                await self.slots.release(cluster=cluster, node=ctx.node, limit=self._limit(cluster))
            return
        reason = f"run #{ctx.run_id} ({ctx.kind}) failed at step {step}: {ctx.message}"
        if cluster is not None and "drain" in ctx.completed and "undrain" not in ctx.completed:
            await self.store.update_node(ctx.node, left_drained_by_run=ctx.run_id)
            reason += "; the node stays out of load balancing until `remove-lock`"
        await self.set_lock(ctx.node, reason, Actor(name="tgops", source="system"))


def _cancel_if_stopped(rollout: Rollout | None, ctx: RunContext) -> None:
    """Cancel the run (``RunCancelledError``, saying what it left on its node) when its
    rollout was stopped by a node that failed."""
    if rollout is not None and rollout.failed is not None:
        raise RunCancelledError(f"rollout stopped: {rollout.failed}; {untouched(ctx)}")


def untouched(ctx: RunContext) -> str:
    """What a run that stopped before anything disruptive left on its node."""
    staged = ctx.params.get("plan") or []
    if not staged:
        return f"{ctx.node} was not touched"
    names = ", ".join(f"{p['name']} {p['version']}" for p in staged)
    return (
        f"{ctx.node} was not touched apart from staging {names} (nothing installed, no "
        "user disturbed; the staged packages stay for its next update)"
    )
