"""Update runs (L1, L2, L6 to L10, L12, L15): download, auto-update, restart, catch-up from
oldstable, optional packages, integrity; the update lock and the warning flag.

Each command creates one run per node (persisted, see ``core.lifecycle.runs``) and answers at once
with the run numbers; the runs carry on in tasks owned by this object. A cluster target
rolls through its nodes with at most ``max_parallel_updates`` at once; a failing node
stops the rollout of the rest.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from core import events as ev
from core.errors import DriverError, TgopsError
from core.interfaces import RepositoryClient
from core.lifecycle.engine import PREPARING_STEPS, Engine
from core.lifecycle.look import Look
from core.lifecycle.runs import (
    STARTED_PER_TURN,
    Flow,
    FlowSource,
    RunContext,
    execute,
)
from core.lifecycle.steps import (
    LAZY_STEPS,
    ROLLOUTS_KV,
    UPDATE_KINDS,
    RefusedError,
    Rollout,
    UpdateSteps,
)
from core.localtime import local_text
from core.model import Actor, CommandOutput
from core.repository.retry import RetryPolicy
from core.store import NewRun, NodeBusyError, RunEnd, RunRecord
from core.turns import in_turns

log = logging.getLogger(__name__)


DISRUPTIVE_KINDS = UPDATE_KINDS | {"restart"}
STOP_GRACE = 3.0
OUTPUT_LINES = 20
"""Lines of a failed driver command's output kept in the run's log (the last ones)."""
OUTPUT_LINES_OK = 3
"""The same for a command that succeeded (the log stays readable)."""
OUTPUT_CHARS = 4000
"""Seconds a stopping service waits for runs to finish before it interrupts them."""


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


class Lifecycle(UpdateSteps):
    def __init__(
        self,
        *,
        engine: Engine,
        repository: RepositoryClient | None,
        retry: RetryPolicy,
        owner: str,
    ) -> None:
        super().__init__(engine=engine, repository=repository, retry=retry, owner=owner)
        self._tasks: dict[int, asyncio.Task[str]] = {}
        self._running: dict[int, tuple[RunContext, Flow]] = {}
        self._run_on: dict[str, int] = {}  # node -> its run in self._running
        self._accepting = False
        self.scheduled: FlowSource | None = None

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
        return await self.store.runs_of(run_ids)

    # -- commands ----------------------------------------------------------------------

    async def start(
        self,
        kind: str,
        target: str,
        actor: Actor,
        *,
        yes: bool = False,
        packages: Sequence[str] = (),
        ignore_alerts: bool = False,
    ) -> Started | NeedsConfirmation:
        """Create and start one run per node of ``target``; ``ignore_alerts``: the runs
        pass the gate (``core.lifecycle.hold``), audited as such."""
        if not self._accepting:
            raise RefusedError("tgops is stopping; try again when it is back")
        engine = self.engine
        names = engine.resolve(target)
        seen_at = engine.clock.now()
        records = await engine.refresh(names)
        # the runs of this command share this look at the nodes and the repository
        look = Look(records={r.name: r for r in records}, seen_at=seen_at)
        if kind in {"download", "auto-update", "oldstable-partial", "oldstable-full", "install"}:
            self._repo()
        if kind in {"install", "oldstable-partial"}:
            await self._check_names(kind, packages, look)
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
            if ignore_alerts:
                params["ignore_alerts"] = True
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
        self.share_look(ids, look)
        self._first_rounds(specs, ids)
        runs: list[tuple[str, int]] = []
        async for spec, run_id in in_turns(list(zip(specs, ids, strict=True)), STARTED_PER_TURN):
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
                    await self.slots.release(
                        cluster=record.cluster,
                        node=record.name,
                        limit=self._limit(record.cluster),
                    )
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
        in_maint = sorted({m.node for m in await self.store.maintenance()} & set(clustered))
        if in_maint:
            # L6: the lock is gone, the maintenance of a cluster node stays until ended by hand
            verb = "is" if len(in_maint) == 1 else "are"
            lines.append(
                f"{', '.join(in_maint)} {verb} still in maintenance: maintenance mode is not "
                f"ended by this; a maint admin ends it with `maintenance cancel {in_maint[0]}`"
                + (" (and likewise for the others)." if len(in_maint) > 1 else ".")
            )
        return "\n".join(lines)

    # -- runs --------------------------------------------------------------------------

    async def command_output(self, node: str, output: CommandOutput) -> None:
        """A driver command's output and exit status, into the log of the node's run (the
        output sink of ``local``, ``ssh`` and ``sandbox`` drivers); commands outside a
        run (status refreshes) are not recorded."""
        run_id = self._run_on.get(node)
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
        # not waited for: written with the run's next record that is (its next step, its
        # end), or within the journal's LAZY_FLUSH (0.1 s) when none comes sooner
        await self.engine.record(
            Actor(name="tgops", source="driver"),
            f"command {output.operation}",
            target=node,
            run_id=run_id,
            detail=detail,
            wait=False,
        )

    def _first_rounds(self, specs: Sequence[NewRun], ids: Sequence[int]) -> None:
        """Each rollout's first round: its first ``max_parallel_updates`` runs, in command
        order (``Rollout``)."""
        rounds: dict[str, list[int]] = {}
        for spec, run_id in zip(specs, ids, strict=True):
            key = spec.params.get("rollout")
            cluster = self.engine.cluster_of.get(spec.node)
            limit = None if cluster is None else self._limit(cluster)
            if isinstance(key, str) and limit is not None:
                first = rounds.setdefault(key, [])
                if len(first) < limit:
                    first.append(run_id)
        for key, first in rounds.items():
            self._rollouts.setdefault(key, Rollout(key=key)).ahead(first)

    def spawn(
        self,
        *,
        run_id: int,
        kind: str,
        node: str,
        actor: str,
        params: dict[str, Any],
        completed: set[str],
        began: datetime | None = None,
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
            began=began,
        )
        key = params.get("rollout")
        if key is not None:
            self._rollouts.setdefault(key, Rollout(key=key))
        flow = self._flow(kind)
        task = asyncio.create_task(execute(flow, ctx), name=f"run-{run_id}-{node}")
        self._tasks[run_id] = task
        self._running[run_id] = (ctx, flow)
        self._run_on[node] = run_id
        task.add_done_callback(lambda t: self._done(run_id, t))

    def _done(self, run_id: int, task: asyncio.Task[str]) -> None:
        self._tasks.pop(run_id, None)
        done = self._running.pop(run_id, None)
        if done is not None and self._run_on.get(done[0].node) == run_id:
            del self._run_on[done[0].node]
        if done is not None and (rollout := self._rollout(done[0])) is not None:
            rollout.passed(run_id)  # ended: the nodes behind it need not wait for it
        self.drop_look(run_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("run #%d crashed", run_id, exc_info=task.exception())

    def preparing(self, run_ids: Iterable[int]) -> dict[str, str]:
        """Of these runs (of this instance), the nodes still planning, downloading or
        staging, with the step they are at."""
        found = {}
        for run_id in run_ids:
            running = self._running.get(run_id)
            if running is None:
                continue
            ctx, _ = running
            if "download" not in ctx.completed and (ctx.step or "check") in PREPARING_STEPS:
                found[ctx.node] = ctx.step or "check"
        return found

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
                    *self.gate_steps(),
                    ("drain", self.step_drain),
                    ("notice", self.step_notice),
                    ("disconnect", self.step_disconnect),
                    ("reboot", self.step_reboot),
                    ("verify", self.step_verify),
                    ("undrain", self.step_undrain),
                    ("release", self.step_release),
                ],
                resumable=frozenset(
                    {
                        "slot",
                        "gate",
                        "drain",
                        "notice",
                        "disconnect",
                        "verify",
                        "undrain",
                        "release",
                    }
                ),
                lazy=LAZY_STEPS,
                on_failure=self.update_failed,
                on_cancel=self.undo_slot,
            )
        return Flow(
            kind=kind,
            steps=[
                ("download", self.step_download),
                ("slot", self.step_slot),
                *self.gate_steps(),
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
                    "gate",
                    "drain",
                    "notice",
                    "disconnect",
                    "restart-services",
                    "verify",
                    "undrain",
                    "release",
                }
            ),
            lazy=LAZY_STEPS,
            on_failure=self.update_failed,
            on_cancel=self.undo_slot,
            on_success=self._update_succeeded,
        )

    # -- crash safety (L15) --------------------------------------------------------------

    async def recover(
        self, alive: Callable[[str | None], Awaitable[bool]] | None = None
    ) -> list[str]:
        """Resume or end every run a controller that is gone left unfinished.

        ``alive(owner)`` tells whether a run's owner still runs it (several instances on
        one PostgreSQL); without it every run not running here is taken over.
        """
        notes = []
        # with ``alive``, this instance's own runs count as alive: they are not read (the
        # leader looks every quarter of ``leader.takeover``, and an update time of 10,000
        # nodes has 10,000 runs of its own in flight)
        mine = self.owner if alive is not None else None
        active = await self.store.runs(statuses=("queued", "running"), limit=10_000, not_owner=mine)
        for run in reversed(active):
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
                    began=run.started_at,
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
