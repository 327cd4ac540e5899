"""Update runs (L1, L2, L6 to L10, L12, L15): download, auto-update, restart, catch-up from
oldstable, optional packages, integrity; the update lock and the warning flag.

Each command creates one run per node (persisted, see ``core.runs``) and answers at once
with the run numbers; the runs carry on in tasks owned by this object. A cluster target
rolls through its nodes with at most ``max_parallel_updates`` at once; a failing node
stops the rollout of the rest.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from core import events as ev
from core.engine import Engine
from core.errors import DownloadFailedError, DriverError, TgopsError
from core.interfaces import NodeDriver, RepositoryClient
from core.localtime import local_text
from core.manifest import Manifest, PackageEntry
from core.model import Actor, CommandOutput, PackageKind, StagedPackage
from core.pending import catch_up, pending_packages
from core.retry import RetryPolicy
from core.runs import Flow, RunCancelledError, RunContext, RunSkippedError, execute
from core.slots import SlotGate
from core.store import NewRun, NodeBusyError, NodeRecord, RunEnd, RunRecord

if TYPE_CHECKING:
    from core.scheduled import ScheduledRuns

log = logging.getLogger(__name__)

UPDATE_KINDS = frozenset({"auto-update", "oldstable-partial", "oldstable-full", "install"})
DISRUPTIVE_KINDS = UPDATE_KINDS | {"restart"}
DISRUPTIVE_STEPS = frozenset({"disconnect", "install", "restart-services", "verify", "reboot"})
PREPARE_AT_ONCE = 4
"""Runs planning (node status, manifest) at once, and runs staging at once (two separate
gates, so a node that planned does not queue behind every later node's planning); the
others wait in the order they came (FIFO), so the first nodes of a rollout are ready
first instead of all nodes sharing the machine until all are ready. Transfers have their
own bound (``updates.max_parallel_downloads``) and are not held back by this."""
STOP_GRACE = 3.0
ROLLOUTS_KV = "rollouts"
"""kv namespace: a stopped rollout (key: the rollout's key) and why, for recovery."""
OUTPUT_LINES = 20
"""Lines of a failed driver command's output kept in the run's log (the last ones)."""
OUTPUT_LINES_OK = 3
"""The same for a command that succeeded (the log stays readable)."""
OUTPUT_CHARS = 4000
"""Seconds a stopping service waits for runs to finish before it interrupts them."""


class RefusedError(TgopsError):
    """A command that is not carried out; the message says why and what would be accepted."""


class NothingToDoError(TgopsError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    runs: list[tuple[str, int]]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class NeedsConfirmation:
    sessions: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.sessions.values())


@dataclass(slots=True)
class Rollout:
    """Nodes of one cluster updated by one command; the first failure stops the rest."""

    key: str
    failed: str | None = None


def _plan_entry(item: dict[str, Any]) -> StagedPackage:
    return StagedPackage(
        name=item["name"],
        version=item["version"],
        kind=PackageKind(item["kind"]),
        sha256=item["sha256"],
        path=Path(item["path"]),
    )


class Lifecycle:
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
        self._tasks: dict[int, asyncio.Task[str]] = {}
        self._running: dict[int, tuple[RunContext, Flow]] = {}
        self._accepting = False
        self.scheduled: ScheduledRuns | None = None
        self._preparing = asyncio.Semaphore(PREPARE_AT_ONCE)
        self._staging = asyncio.Semaphore(PREPARE_AT_ONCE)

    async def __aenter__(self) -> Self:
        """Start taking work; call ``recover()`` once every subscriber listens."""
        self._accepting = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._accepting = False
        # Runs in a step that is safe to repeat stop now (they resume at the next start);
        # the others (install, reboot) get STOP_GRACE seconds to finish their step.
        for run_id, task in list(self._tasks.items()):
            ctx, flow = self._running[run_id]
            if ctx.step is None or ctx.step in flow.resumable:
                task.cancel()
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def interrupt_all(self) -> None:
        """Stop every run of this instance at once (the store keeps them for recovery)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, run_ids: Sequence[int], limit: float = 60.0) -> list[RunRecord]:
        """Wait until these runs end (for the CLI, the demo and tests)."""
        tasks = [self._tasks[i] for i in run_ids if i in self._tasks]
        if tasks:
            async with asyncio.timeout(limit):
                await asyncio.gather(*tasks, return_exceptions=True)
        return [r for i in run_ids if (r := await self.store.run(i)) is not None]

    # -- manifests ---------------------------------------------------------------------

    def _repo(self) -> RepositoryClient:
        if self.repository is None:
            raise RefusedError(
                "no update repository is usable: set updates.public_key (or public_key_file) "
                "and updates.repository_url"
            )
        return self.repository

    async def manifest(self, channel: str | None = None) -> Manifest:
        channel = channel or self.engine.settings.updates.channel
        manifest = await self.retry.run(
            lambda: self._repo().manifest(channel), describe=f"channel {channel}"
        )
        await self.engine.remember_manifest(manifest)
        return manifest

    async def refresh_manifests(self) -> list[str]:
        """Fetch both channels' manifests (status shows pending and omitted updates from
        them); returns one line per channel that could not be fetched."""
        updates = self.engine.settings.updates
        problems = []
        for channel in (updates.channel, updates.oldstable_channel):
            try:
                await self.engine.remember_manifest(await self._repo().manifest(channel))
            except TgopsError as exc:
                problems.append(str(exc))
        return problems

    async def _plan(
        self, kind: str, record: NodeRecord, packages: Sequence[str]
    ) -> list[PackageEntry]:
        settings = self.engine.settings.updates
        if kind in {"oldstable-partial", "oldstable-full"}:
            oldstable = await self.manifest(settings.oldstable_channel)
            return catch_up(
                record.installed, oldstable, packages if kind == "oldstable-partial" else None
            )
        manifest = await self.manifest()
        selected = (await self.store.selected_hotfixes()).get(record.name, [])
        requested = set(record.optional_packages)
        if kind == "install":
            _only_optional(manifest, packages)
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

    async def _check_names(self, kind: str, packages: Sequence[str]) -> None:
        """Refuse a command naming packages its channel does not have, before any run
        starts (the runs plan again per node, against the manifest of their time)."""
        if kind == "oldstable-partial":
            catch_up(
                {}, await self.manifest(self.engine.settings.updates.oldstable_channel), packages
            )
            return
        _only_optional(await self.manifest(), packages, "; nothing was started")

    # -- commands ----------------------------------------------------------------------

    async def start(
        self,
        kind: str,
        target: str,
        actor: Actor,
        *,
        yes: bool = False,
        packages: Sequence[str] = (),
    ) -> Started | NeedsConfirmation:
        if not self._accepting:
            raise RefusedError("tgops is stopping; try again when it is back")
        engine = self.engine
        names = engine.resolve(target)
        records = await engine.refresh(names)
        if kind in {"download", "auto-update", "oldstable-partial", "oldstable-full", "install"}:
            self._repo()
        if kind in {"install", "oldstable-partial"}:
            await self._check_names(kind, packages)
        if kind in UPDATE_KINDS:
            locked = [r for r in records if r.update_lock_since is not None]
            if locked:
                lines = [f"{r.name}: {r.update_lock_reason}" for r in locked]
                raise RefusedError(
                    "update lock set, nothing was started (L6):\n"
                    + "\n".join(lines)
                    + "\nCheck the node, then `remove-lock T`."
                )
        busy = [r for r in records if r.active_run_id is not None]
        if busy:
            raise RefusedError(
                "; ".join(f"{r.name} is busy with run #{r.active_run_id}" for r in busy)
                + "; nothing was started (see `status`)."
            )
        unreachable = [r for r in records if not r.reachable]
        if kind in DISRUPTIVE_KINDS and unreachable:
            raise RefusedError(
                "; ".join(f"{r.name} is unreachable ({r.last_error})" for r in unreachable)
                + "; nothing was started."
            )
        if kind in DISRUPTIVE_KINDS and not yes:
            sessions = {r.name: r.sessions for r in records if r.sessions}
            if sessions:
                return NeedsConfirmation(sessions=sessions)
        rollouts: dict[str, str] = {}
        specs: list[NewRun] = []
        for record in records:
            params: dict[str, Any] = {"packages": list(packages)}
            queue = None
            if record.cluster is not None and kind in DISRUPTIVE_KINDS:
                key = rollouts.setdefault(
                    record.cluster, f"{uuid.uuid4().hex[:12]}:{record.cluster}"
                )
                params["rollout"] = key
                # queued now, so that the cluster's nodes take their slots in command order
                queue = record.cluster
            specs.append(
                NewRun(
                    kind=kind,
                    node=record.name,
                    target=target,
                    actor=actor.name,
                    params=params,
                    owner=self.owner,
                    audit="run #{run} started",
                    audit_source=actor.source,
                    slot_queue=queue,
                )
            )
        try:
            ids = await self.store.create_runs(specs)
        except NodeBusyError as exc:
            raise RefusedError(f"{exc}; nothing was started") from exc
        runs: list[tuple[str, int]] = []
        for spec, run_id in zip(specs, ids, strict=True):
            runs.append((spec.node, run_id))
            self.spawn(
                run_id=run_id,
                kind=kind,
                node=spec.node,
                actor=actor.name,
                params=dict(spec.params),
                completed=set(),
            )
        return Started(runs=runs)

    # -- locks and flags ---------------------------------------------------------------

    async def set_lock(self, name: str, reason: str, actor: Actor) -> None:
        now = self.engine.clock.now()
        await self.store.update_node(name, update_lock_since=now, update_lock_reason=reason)
        await self.engine.record(actor, "update lock set", target=name, detail=reason)
        await self.engine.events.publish(ev.UpdateLockSet(node=name, reason=reason))

    async def remove_lock(self, target: str, actor: Actor, *, cancel_schedule: bool) -> str:
        names = self.engine.resolve(target)
        lines = []
        for record in await self.store.nodes(names):
            notes = []
            if record.update_lock_since is None:
                lines.append(f"{record.name}: no update lock was set.")
            else:
                await self.store.update_node(
                    record.name, update_lock_since=None, update_lock_reason=None
                )
                await self.engine.record(
                    actor,
                    "update lock removed",
                    target=record.name,
                    detail=record.update_lock_reason or "",
                )
                await self.engine.events.publish(
                    ev.NodeStateChanged(node=record.name, change="update lock removed")
                )
                notes.append("update lock removed")
            if record.left_drained_by_run is not None and record.cluster is not None:
                try:
                    await self.engine.drivers[record.name].undrain()
                    await self.store.update_node(record.name, lb="in", left_drained_by_run=None)
                    await self.slots.release(cluster=record.cluster, node=record.name)
                    notes.append(
                        f"back in load balancing (run #{record.left_drained_by_run} had left it "
                        "out), cluster slot freed"
                    )
                except DriverError as exc:
                    notes.append(f"could not put it back into load balancing: {exc}")
            if cancel_schedule:
                off = [
                    k
                    for k in ("download", "update")
                    if await self.store.disable_schedule(node=record.name, kind=k, by=actor.name)
                ]
                notes.append(
                    f"schedules switched off ({', '.join(off)})" if off else "no schedule was on"
                )
            if notes:
                lines.append(f"{record.name}: {'; '.join(notes)}.")
        clustered = [n for n in names if self.engine.cluster_of[n] is not None]
        in_maint = {m.node for m in await self.store.maintenance()} & set(clustered)
        if clustered:
            extra = f" ({', '.join(sorted(in_maint))} still in maintenance)" if in_maint else ""
            lines.append(
                "Cluster nodes: maintenance mode is not ended by this; a maint admin ends it "
                f"with `maintenance cancel T`{extra}."
            )
        return "\n".join(lines)

    async def set_warning_flag(self, name: str, reason: str) -> None:
        now = self.engine.clock.now()
        await self.store.update_node(name, warning_flag_since=now, warning_flag_reason=reason)
        await self.engine.record(
            Actor(name="tgops", source="system"), "warning flag set", target=name, detail=reason
        )
        await self.engine.events.publish(ev.WarningFlagSet(node=name, reason=reason))

    async def clear_warning_flag(self, name: str) -> None:
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

    # -- runs --------------------------------------------------------------------------

    async def command_output(self, node: str, output: CommandOutput) -> None:
        """A driver command's output and exit status, into the log of the node's run (the
        output sink of ``local``, ``ssh`` and ``sandbox`` drivers); commands outside a
        run (status refreshes) are not recorded."""
        run_id = next((i for i, (c, _) in self._running.items() if c.node == node), None)
        if run_id is None:
            return
        text = "\n".join(
            part.strip() for part in (output.stdout, output.stderr) if part.strip()
        ).splitlines()
        shown = text[-(OUTPUT_LINES if output.exit_status else OUTPUT_LINES_OK) :]
        more = (
            [f"({len(text) - len(shown)} earlier lines not shown)"]
            if len(text) > len(shown)
            else []
        )
        detail = "\n".join([f"$ {output.command}  (exit {output.exit_status})", *more, *shown])[
            :OUTPUT_CHARS
        ]
        await self.engine.record(
            Actor(name="tgops", source="driver"),
            f"command {output.operation}",
            target=node,
            run_id=run_id,
            detail=detail,
        )

    def spawn(
        self,
        *,
        run_id: int,
        kind: str,
        node: str,
        actor: str,
        params: dict[str, Any],
        completed: set[str],
    ) -> None:
        ctx = RunContext(
            run_id=run_id,
            kind=kind,
            node=node,
            actor=actor,
            store=self.store,
            events=self.engine.events,
            params=params,
            completed=completed,
        )
        key = params.get("rollout")
        if key is not None:
            self._rollouts.setdefault(key, Rollout(key=key))
        flow = self._flow(kind)
        task = asyncio.create_task(execute(flow, ctx), name=f"run-{run_id}-{node}")
        self._tasks[run_id] = task
        self._running[run_id] = (ctx, flow)
        task.add_done_callback(lambda t: self._done(run_id, t))

    def _done(self, run_id: int, task: asyncio.Task[str]) -> None:
        self._tasks.pop(run_id, None)
        self._running.pop(run_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("run #%d crashed", run_id, exc_info=task.exception())

    def _flow(self, kind: str) -> Flow:
        if kind.startswith("scheduled-"):
            if self.scheduled is None:
                raise TgopsError(f"{kind} runs need the scheduler, which is not running")
            return self.scheduled.flow(kind)
        if kind == "download":
            return Flow(
                kind=kind,
                steps=[("download", self.step_download)],
                resumable=frozenset({"download"}),
            )
        if kind == "integrity":
            return Flow(
                kind=kind,
                steps=[("integrity", self.step_integrity)],
                resumable=frozenset({"integrity"}),
            )
        if kind == "restart":
            return Flow(
                kind=kind,
                steps=[
                    ("slot", self.step_slot),
                    ("drain", self.step_drain),
                    ("notice", self.step_notice),
                    ("disconnect", self.step_disconnect),
                    ("reboot", self.step_reboot),
                    ("verify", self.step_verify),
                    ("undrain", self.step_undrain),
                    ("release", self.step_release),
                ],
                resumable=frozenset(
                    {"slot", "drain", "notice", "disconnect", "verify", "undrain", "release"}
                ),
                on_failure=self.update_failed,
                on_cancel=self.undo_slot,
            )
        return Flow(
            kind=kind,
            steps=[
                ("download", self.step_download),
                ("slot", self.step_slot),
                ("drain", self.step_drain),
                ("notice", self.step_notice),
                ("disconnect", self.step_disconnect),
                ("install", self.step_install),
                ("restart-services", self.step_restart_services),
                ("verify", self.step_verify),
                ("undrain", self.step_undrain),
                ("release", self.step_release),
            ],
            resumable=frozenset(
                {
                    "download",
                    "slot",
                    "drain",
                    "notice",
                    "disconnect",
                    "restart-services",
                    "verify",
                    "undrain",
                    "release",
                }
            ),
            on_failure=self.update_failed,
            on_cancel=self.undo_slot,
            on_success=self._update_succeeded,
        )

    def _driver(self, ctx: RunContext) -> NodeDriver:
        return self.engine.drivers[ctx.node]

    async def _node(self, ctx: RunContext) -> NodeRecord:
        record = await self.store.node(ctx.node)
        assert record is not None
        return record

    async def step_download(self, ctx: RunContext) -> None:
        try:
            files = await self.fetch_and_stage(ctx)
        except DownloadFailedError as exc:
            await self.set_warning_flag(ctx.node, str(exc))
            raise
        if files or ctx.kind == "download":
            await self.clear_warning_flag(ctx.node)
        if not files and ctx.kind != "download":
            raise RunCancelledError(f"nothing to install on {ctx.node}; nothing was changed")

    async def plan_for(self, node: str) -> list[PackageEntry]:
        """What an update of ``node`` would install now (channel, hotfixes, optional)."""
        record = (await self.engine.refresh([node]))[0]
        return await self._plan("auto-update", record, [])

    async def fetch_and_stage(self, ctx: RunContext) -> list[StagedPackage]:
        """Plan what the node needs, download it (retry policy), stage it on the node.

        The plan is saved in the run for the install step. Raises ``DownloadFailedError``
        when the retry policy gives up; the caller decides about the warning flag.
        """
        plan_kind = ctx.kind if ctx.kind in UPDATE_KINDS else "auto-update"
        async with self._preparing:
            record = (await self.engine.refresh([ctx.node]))[0]
            entries = await self._plan(plan_kind, record, ctx.params.get("packages") or [])
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
                )
            )
        await ctx.progress(total, total)
        async with self._staging:
            await self._driver(ctx).stage(files)
        staged = dict(record.staged)
        staged.update({f.name: f.version for f in files})
        await self.store.update_node(ctx.node, staged=staged)
        await ctx.save_params(
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
        return files

    def _cluster(self, ctx: RunContext) -> str | None:
        return self.engine.cluster_of[ctx.node]

    async def step_slot(self, ctx: RunContext, *, deadline: datetime | None = None) -> None:
        """Take a slot of the node's cluster (L12), waiting in order; a stopped rollout or
        the ``deadline`` ends the wait (the run is cancelled or skipped, nothing touched)."""
        cluster = self._cluster(ctx)
        if cluster is None:
            return
        rollout = self._rollouts.get(ctx.params.get("rollout", ""))

        async def stop() -> None:
            if rollout is not None and rollout.failed is not None:
                raise RunCancelledError(
                    f"rollout stopped: {rollout.failed}; {ctx.node} was not touched"
                )
            if deadline is not None and self.engine.clock.now() > deadline:
                holders = ", ".join(s.node for s in await self.store.slots(cluster))
                raise RunSkippedError(
                    f"no slot of cluster {cluster} became free in time (held by {holders}); "
                    f"{ctx.node} was not touched"
                )

        limit = self.engine.settings.clusters[cluster].max_parallel_updates
        await self.slots.acquire(
            cluster=cluster, node=ctx.node, limit=limit, run_id=ctx.run_id, stop=stop
        )

    async def step_drain(self, ctx: RunContext) -> None:
        if self._cluster(ctx) is None:
            return
        await self._driver(ctx).drain()
        await self.store.update_node(ctx.node, lb="drained")
        await self.engine.events.publish(ev.NodeStateChanged(node=ctx.node, change="drained"))

    async def step_notice(self, ctx: RunContext) -> None:
        what = "restart" if ctx.kind == "restart" else "update"
        await self._driver(ctx).announce(
            f"The {what} of {ctx.node} starts now; your session will be ended. "
            "Please save your work."
        )

    async def step_disconnect(self, ctx: RunContext) -> None:
        ended = await self._driver(ctx).disconnect_sessions()
        await self.store.update_node(ctx.node, sessions=0)
        await self.store.step_detail(ctx.run_id, "disconnect", f"{ended} sessions ended")

    async def step_install(self, ctx: RunContext) -> None:
        plan = [_plan_entry(i) for i in ctx.params.get("plan") or []]
        result = await self._driver(ctx).install(plan)
        record = await self._node(ctx)
        values: dict[str, Any] = {
            "installed": dict(result.installed),
            "staged": {k: v for k, v in record.staged.items() if k not in {p.name for p in plan}},
        }
        if result.restart_required:
            values["restart_required"] = True
        if ctx.kind == "install":
            values["optional_packages"] = sorted(
                set(record.optional_packages) | {p.name for p in plan}
            )
        await self.store.update_node(ctx.node, **values)
        ctx.message = "installed " + ", ".join(f"{p.name} {p.version}" for p in plan)
        if result.restart_required:
            ctx.message += "; restart required (core update): `restart T`"
            await self.engine.events.publish(
                ev.NodeStateChanged(node=ctx.node, change="restart required")
            )

    async def step_restart_services(self, ctx: RunContext) -> None:
        await self._driver(ctx).restart_services()

    async def step_reboot(self, ctx: RunContext) -> None:
        await self._driver(ctx).reboot()
        await self.store.update_node(ctx.node, restart_required=False)
        ctx.message = f"{ctx.node} restarted"

    async def step_verify(self, ctx: RunContext) -> None:
        await self._driver(ctx).post_check()

    async def step_undrain(self, ctx: RunContext) -> None:
        if self._cluster(ctx) is None:
            return
        await self._driver(ctx).undrain()
        await self.store.update_node(ctx.node, lb="in", left_drained_by_run=None)
        await self.engine.events.publish(ev.NodeStateChanged(node=ctx.node, change="undrained"))

    async def step_release(self, ctx: RunContext) -> None:
        cluster = self._cluster(ctx)
        if cluster is not None:
            await self.slots.release(cluster=cluster, node=ctx.node)

    async def step_integrity(self, ctx: RunContext) -> None:
        mismatches = await self._driver(ctx).verify_integrity()
        if mismatches:
            lines = [f"{m.package}: {m.path}: {m.problem}" for m in mismatches[:50]]
            more = f" (and {len(mismatches) - 50} more)" if len(mismatches) > 50 else ""
            raise TgopsError(f"{len(mismatches)} mismatches{more}:\n" + "\n".join(lines))
        ctx.message = "every installed file matches its package"

    async def _update_succeeded(self, ctx: RunContext) -> None:
        # the outcome's audit record is written when the run ends (core.runs.execute)
        await self.engine.refresh([ctx.node])

    async def undo_slot(self, ctx: RunContext) -> None:
        cluster = self._cluster(ctx)
        if cluster is not None:
            await self.store.leave_slot_queue(cluster=cluster, node=ctx.node)
            record = await self._node(ctx)
            if record.lb == "drained" and "drain" in ctx.completed:
                await self._driver(ctx).undrain()
                await self.store.update_node(ctx.node, lb="in")
            await self.slots.release(cluster=cluster, node=ctx.node)

    async def update_failed(self, ctx: RunContext, step: str, exc: BaseException) -> None:
        cluster = self._cluster(ctx)
        rollout = self._rollouts.get(ctx.params.get("rollout", ""))
        if rollout is not None and rollout.failed is None:
            rollout.failed = f"{ctx.node} failed (run #{ctx.run_id})"
            # kept in the store: the rollout stays stopped across a restart
            await self.store.kv_set(ROLLOUTS_KV, rollout.key, {"failed": rollout.failed})
            await self.slots.wake()
        disruptive = step in DISRUPTIVE_STEPS or bool(ctx.completed & DISRUPTIVE_STEPS)
        if not disruptive:
            # nothing on the node changed: put it back as it was
            if cluster is not None:
                await self.store.leave_slot_queue(cluster=cluster, node=ctx.node)
                record = await self._node(ctx)
                if record.lb == "drained" and "drain" in ctx.completed:
                    try:
                        await self._driver(ctx).undrain()
                        await self.store.update_node(ctx.node, lb="in")
                    except DriverError as undrain_error:
                        log.warning("%s", undrain_error)
                        await self.store.update_node(ctx.node, left_drained_by_run=ctx.run_id)
                        return
                await self.slots.release(cluster=cluster, node=ctx.node)
            return
        reason = f"run #{ctx.run_id} ({ctx.kind}) failed at step {step}: {ctx.message}"
        if cluster is not None and "drain" in ctx.completed and "undrain" not in ctx.completed:
            await self.store.update_node(ctx.node, left_drained_by_run=ctx.run_id)
            reason += "; the node stays out of load balancing until `remove-lock`"
        await self.set_lock(ctx.node, reason, Actor(name="tgops", source="system"))

    # -- crash safety (L15) --------------------------------------------------------------

    async def recover(
        self, alive: Callable[[str | None], Awaitable[bool]] | None = None
    ) -> list[str]:
        """Resume or end every run a controller that is gone left unfinished.

        ``alive(owner)`` tells whether a run's owner still runs it (several instances on
        one PostgreSQL); without it every run not running here is taken over.
        """
        notes = []
        for run in reversed(await self.store.runs(statuses=("queued", "running"), limit=10_000)):
            if run.id in self._tasks:
                continue
            if alive is not None and await alive(run.owner):
                continue
            await self.store.update_run(run.id, owner=self.owner)
            if run.node not in self.engine.drivers:
                await self.store.finish_run(
                    run.id,
                    status="failed",
                    error="node no longer configured",
                    end=RunEnd(kind=run.kind, node=run.node),
                )
                continue
            steps = await self.store.steps(run.id)
            completed = {s.name for s in steps if s.status in {"done", "skipped"}}
            interrupted = next((s.name for s in steps if s.status == "running"), None)
            flow = self._flow(run.kind)
            params = dict(run.params)
            key = params.get("rollout")
            if isinstance(key, str) and key not in self._rollouts:
                saved = await self.store.kv_get(ROLLOUTS_KV, key)
                failed = saved.get("failed") if isinstance(saved, dict) else None
                self._rollouts[key] = Rollout(key=key, failed=failed)
            if interrupted is None or interrupted in flow.resumable:
                notes.append(
                    f"run #{run.id} on {run.node} resumed after {interrupted or 'its start'}"
                )
                await self.engine.record(
                    Actor(name="tgops", source="system"),
                    "run resumed",
                    target=run.node,
                    run_id=run.id,
                    detail=f"resumed at {interrupted or 'the start'}",
                )
                self.spawn(
                    run_id=run.id,
                    kind=run.kind,
                    node=run.node,
                    actor=run.actor,
                    params=params,
                    completed=completed,
                )
                continue
            cause = "interrupted by a restart of tgops"
            await self.store.end_step(run.id, interrupted, status="failed", detail=cause)
            ctx = RunContext(
                run_id=run.id,
                kind=run.kind,
                node=run.node,
                actor=run.actor,
                store=self.store,
                events=self.engine.events,
                params=params,
                completed=completed,
                step=interrupted,
                message=f"{cause} during {interrupted}; check the node",
            )
            if flow.on_failure is not None:
                await flow.on_failure(ctx, interrupted, TgopsError(cause))
            await self.store.finish_run(
                run.id,
                status="failed",
                error=f"{interrupted}: {cause}",
                end=RunEnd(kind=run.kind, node=run.node),
            )
            await self.engine.events.publish(
                ev.RunFinished(
                    run_id=run.id,
                    kind=run.kind,
                    node=run.node,
                    outcome="failed",
                    message=ctx.message,
                )
            )
            notes.append(
                f"run #{run.id} on {run.node} ended as failed ({cause} during {interrupted})"
            )
        for note in notes:
            log.warning("%s", note)
        return notes


def _only_optional(manifest: Manifest, packages: Sequence[str], then: str = "") -> None:
    """Refuse names that are no optional package of the channel (L9a)."""
    known = {p.name for p in manifest.packages if p.kind is PackageKind.OPTIONAL}
    unknown = sorted(set(packages) - known)
    if unknown:
        raise RefusedError(
            f"not an optional package of channel {manifest.channel}: {', '.join(unknown)} "
            f"(optional packages: {', '.join(sorted(known)) or 'none'}){then}"
        )


def describe_start(started: Started, kind: str, tz: Any) -> str:
    runs = ", ".join(f"#{run_id} on {node}" for node, run_id in started.runs)
    text = f"{kind} started: {runs}. Follow with `status` or `log`."
    return "\n".join([text, *started.notes])


def describe_confirmation(needs: NeedsConfirmation, command: str) -> str:
    per_node = ", ".join(f"{n}: {c}" for n, c in sorted(needs.sessions.items()))
    return (
        f"{needs.total} user session(s) would be ended ({per_node}). Nothing was done. "
        f"To go ahead: `{command} --yes`."
    )


__all__ = ["Lifecycle", "NeedsConfirmation", "RefusedError", "Started", "local_text"]
