"""Runs: long work on one node, persisted step by step (L13, L15).

A run is a list of named steps. Before a step starts and after it ends the store is
written, so that a restarted controller knows where each run stood. Steps listed as
``resumable`` are safe to carry out again; a run interrupted inside another step ends as
failed, and its flow decides what that means for the node (usually: update lock set).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from core import events as ev
from core import logfields
from core.errors import TgopsError
from core.interfaces import EventSink
from core.store import NodeRecord, RunEnd, Store

log = logging.getLogger(__name__)

STARTED_PER_TURN = 50
"""Runs started together at most before the event loop takes a turn (``core.turns``): the
runs started so far take their first steps (some 0.1 ms each until they first wait)
before more are started."""


class RunCancelledError(TgopsError):
    """The run was stopped before doing anything disruptive (e.g. a rollout stopped)."""


class RunSkippedError(RunCancelledError):
    """A scheduled run found nothing to do, or was not allowed to (logged, not a failure)."""


class StepFailedError(TgopsError):
    def __init__(self, step: str, cause: str) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"{step}: {cause}")


@dataclass(slots=True, kw_only=True)
class RunContext:
    """What a step sees: its run, the node, and a place to leave data for later steps."""

    run_id: int
    kind: str
    node: str
    actor: str
    store: Store
    events: EventSink
    params: dict[str, Any]
    completed: set[str] = field(default_factory=set)
    step: str | None = None
    message: str = ""
    record: NodeRecord | None = None
    """The node's row as this run last read or wrote it (``None``: read it from the
    store); steps use it instead of reading the row again."""
    seen_at: datetime | None = None
    """When the node was asked for the state in ``record`` (``None``: not known)."""
    lazy: bool = False
    """The records the current step makes (audit lines, node and run changes) need not be
    waited for (``core.store.journal``): they are committed with the next transition or
    the run's end, before anything else the run does."""
    began: datetime | None = None
    """When the run started (its ``started_at``; ``None``: when its first step begins)."""
    _progress_saved: float = field(default=float("-inf"), init=False, repr=False)
    _progress_last: tuple[int, int] = field(default=(-1, -1), init=False, repr=False)

    async def progress(self, done: int, total: int) -> None:
        """Publish the progress; store it at most every ``PROGRESS_SAVE_INTERVAL`` seconds
        (and always when done), so a fast transfer does not write the run for every chunk."""
        if (done, total) == self._progress_last:
            return  # told already (the end of a transfer is reported twice)
        self._progress_last = (done, total)
        now = asyncio.get_running_loop().time()
        if done >= total or now - self._progress_saved >= PROGRESS_SAVE_INTERVAL:
            self._progress_saved = now
            await self.store.change_run(
                self.run_id, progress_done=done, progress_total=total, wait=not self.lazy
            )
        await self.events.publish(
            ev.RunProgress(
                run_id=self.run_id, node=self.node, step=self.step or "", done=done, total=total
            )
        )

    async def save_params(self, **values: Any) -> None:
        """Persist data a later step (or a resumed run) needs."""
        self.params.update(values)
        await self.store.change_run(self.run_id, params=dict(self.params), wait=not self.lazy)


PROGRESS_SAVE_INTERVAL = 1.0

Step = Callable[[RunContext], Awaitable[None]]
FailureHook = Callable[[RunContext, str, BaseException], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    kind: str
    steps: Sequence[tuple[str, Step]]
    resumable: frozenset[str]
    lazy: frozenset[str] = frozenset()
    """Steps whose start a run need not wait to be committed: resumable steps that touch
    neither the node's users nor its packages, which a restart simply runs again
    (``core.store.journal``); their start goes with the next transaction (what any step
    records does). A step that leaves load balancing or touches the node waits for its
    start."""
    idle: Callable[[str, RunContext], bool] | None = None
    """Whether a step (by name) does nothing on the run's node (a cluster node's logon
    step: its users leave through the load balancer): a resumable one is then carried out
    like a lazy step, its start not waited for (each waited start holds the run until a
    transaction of the journal ends: at a large update time one more hold per node and
    round)."""
    on_failure: FailureHook | None = None
    on_success: Step | None = None
    on_cancel: Step | None = None


class FlowSource(Protocol):
    """Where the flows of run kinds defined outside ``updates`` come from (the scheduled ones)."""

    def flow(self, kind: str) -> Flow: ...


async def execute(flow: Flow, ctx: RunContext) -> str:
    """Carry out the steps not completed yet; returns the run's final status. What is
    logged meanwhile names the run, its node and who started it (``core.logfields``)."""
    with logfields.bound(run=ctx.run_id, node=ctx.node, actor=ctx.actor):
        return await _execute(flow, ctx)


async def _execute(flow: Flow, ctx: RunContext) -> str:
    await ctx.events.publish(
        ev.RunStarted(run_id=ctx.run_id, kind=flow.kind, node=ctx.node, actor=ctx.actor)
    )
    status, error = "succeeded", None
    current = ""
    ended: str | None = None
    """A step that is done but not yet recorded as done: that is written together with
    the start of the next step (one transaction per transition)."""
    last: str | None = None
    """The last step once it is carried out (at ``last_at``); the run's end records it
    done (a resumable one is not ended on its own: a crash before the run's end carries
    it out again)."""
    last_at: datetime | None = None
    try:
        for name, step in flow.steps:
            if name in ctx.completed:
                continue
            current = name
            if ctx.began is None:
                ctx.began = datetime.now(UTC)
            # ctx.step changes only once the store has the transition (or, for a lazy step
            # after a resumable one, has it queued: a crash makes the run carry out the
            # previous step again): a stopping service treats the run as being in the
            # step the store says it is in
            lazy = (
                name in flow.resumable
                and (name in flow.lazy or (flow.idle is not None and flow.idle(name, ctx)))
                and (ended is None or ended in flow.resumable)
            )
            await ctx.store.begin_step(ctx.run_id, name, after=ended, wait=not lazy)
            ctx.step = name
            # what a step records need not be waited for: the next transition (waited
            # for before any disruptive step, and always after a step that is not
            # resumable) or the run's end commits it first; after a crash a resumable
            # step runs again and records it again, and one that is not resumable is
            # ended as interrupted whatever it had recorded
            ctx.lazy = True
            ended = None
            await ctx.events.publish(ev.RunProgress(run_id=ctx.run_id, node=ctx.node, step=name))
            await step(ctx)
            ctx.completed.add(name)
            ended = name
        if ended is not None and ended not in flow.resumable:
            await ctx.store.end_step(ctx.run_id, ended)
        # a resumable last step is recorded done with the run's end: one write less per run
        last, last_at, ended = ended, datetime.now(UTC), None
        if flow.on_success is not None:
            await flow.on_success(ctx)
    except RunCancelledError as exc:
        status = "skipped" if isinstance(exc, RunSkippedError) else "cancelled"
        error = str(exc)
        ctx.message = str(exc)
        if last is None:
            await ctx.store.end_step(ctx.run_id, current, status="skipped", detail=str(exc))
        if flow.on_cancel is not None:
            await _shielded(flow.on_cancel(ctx), ctx, "cancel")
    except asyncio.CancelledError:
        # the service is stopping: leave the run as it is in the store, recovery resumes it
        log.info("run #%d on %s interrupted at step %s", ctx.run_id, ctx.node, current)
        raise
    except Exception as exc:
        status = "failed"
        error = await _failed(flow, ctx, current, exc, step_done=last is not None)
    await _shielded(
        ctx.store.finish_run(
            ctx.run_id,
            status=status,
            error=error,
            end=RunEnd(kind=flow.kind, node=ctx.node, message=ctx.message),
            done=last,
            done_at=last_at,
        ),
        ctx,
        "finish",
    )
    await _announce_end(flow, ctx, status)
    return status


async def _failed(
    flow: Flow, ctx: RunContext, current: str, exc: Exception, *, step_done: bool
) -> str:
    """Record that the run failed in step ``current`` (``step_done``: the step itself was
    carried out, the success hook failed) and run the failure hook; returns the error."""
    cause = str(exc) if isinstance(exc, TgopsError) else f"{type(exc).__name__}: {exc}"
    error = f"{current}: {cause}" if current else cause
    ctx.message = error
    if not isinstance(exc, TgopsError):
        log.exception("run #%d on %s failed unexpectedly", ctx.run_id, ctx.node)
    if not step_done:
        await _shielded(
            ctx.store.end_step(ctx.run_id, current, status="failed", detail=cause), ctx, "record"
        )
    if flow.on_failure is not None:
        await _shielded(flow.on_failure(ctx, current, exc), ctx, "failure handling")
    return error


async def _announce_end(flow: Flow, ctx: RunContext, status: str) -> None:
    """Log the run's outcome and publish ``RunFinished``."""
    log.log(
        logging.WARNING if status == "failed" else logging.INFO,
        "run #%d %s on %s %s%s",
        ctx.run_id,
        flow.kind,
        ctx.node,
        status,
        f": {ctx.message}" if ctx.message else "",
    )
    began = ctx.began
    await ctx.events.publish(
        ev.RunFinished(
            run_id=ctx.run_id,
            kind=flow.kind,
            node=ctx.node,
            outcome=status,
            message=ctx.message,
            seconds=None if began is None else (datetime.now(UTC) - began).total_seconds(),
        )
    )


async def _shielded(work: Awaitable[Any], ctx: RunContext, what: str) -> None:
    """Bookkeeping that must finish even while the service stops (bounded)."""
    try:
        async with asyncio.timeout(30):
            await asyncio.shield(work)
    except Exception:
        log.exception("run #%d on %s: %s did not complete", ctx.run_id, ctx.node, what)
