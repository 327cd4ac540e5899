"""Holding runs at the gate, and the post-update health check.

Before a run's first disruptive step (drain; on a single system the notice and
disconnect) the run asks the gate (``core.gate``). While alerts that count for its node
fire, or the gate cannot be asked (unless ``gate_fail_open``), the run waits in its
``gate`` step and asks again every ``check_interval``; what holds it is kept in the run's
params (``held``: since, reason, until), so that ``status``, ``plan``, the Slack run
message and a restarted service see it, and the waiting time counts from its first hold
across restarts. Cleared: the run goes on ("run released" in the audit log). Still held
after ``max_wait``: the run ends skipped, nothing on the node touched. A run started with
``--ignore-alerts`` asks once, for the record, and goes on ("gate ignored").

After an update, ``health_query`` (PromQL with ``{node}`` and ``{cluster}``) is evaluated
until it is healthy, for at most ``health_wait``; a node that stays unhealthy fails its
``verify`` step (the update lock is set and the rollout stops, like any failed verify).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from core import events as ev
from core.durations import format_duration
from core.errors import TgopsError
from core.gate import Gate, Verdict
from core.lifecycle.engine import Engine
from core.lifecycle.runs import RunCancelledError, RunContext, RunSkippedError
from core.localtime import local_text
from core.model import Actor

log = logging.getLogger(__name__)

GATE = Actor(name="gate", source="system")
"""Who holds and releases runs in the audit log."""
HEALTH_POLL = 5.0
"""Longest time between two evaluations of ``health_query`` while a node is unhealthy."""

Hook = Callable[[RunContext, datetime], Awaitable[None]]


class HealthCheckFailedError(TgopsError):
    """The node did not become healthy within ``gate.health_wait`` after its update."""

    def __init__(self, node: str, wait: float, report: str) -> None:
        self.node = node
        self.report = report
        super().__init__(
            f"health check of {node} failed (gate.health_query, waited "
            f"{format_duration(wait)}): {report}"
        )


def held_text(held: dict[str, Any], tz: Any) -> str:
    """``held: REASON since TIME (skipped at TIME if still blocked)`` for a run's params."""
    since = local_text(datetime.fromisoformat(str(held["since"])), tz)
    until = local_text(datetime.fromisoformat(str(held["until"])), tz)
    return f"held: {held['reason']} (waiting since {since}; skipped at {until} if still held)"


class Hold:
    """The gate as the lifecycle uses it (``gate`` None: no gate configured)."""

    def __init__(self, engine: Engine, gate: Gate | None) -> None:
        self.engine = engine
        self.gate = gate

    async def _checked(self, node: str, result: str) -> None:
        await self.engine.events.publish(ev.GateChecked(node=node, result=result))

    async def wait(
        self,
        ctx: RunContext,
        *,
        stopped: Callable[[], str | None] = lambda: None,
        on_hold: Hook | None = None,
        on_release: Hook | None = None,
        on_give_up: Callable[[RunContext, str], Awaitable[None]] | None = None,
    ) -> None:
        """The ``gate`` step: return when the run may go on; ``RunSkippedError`` after
        ``max_wait``; ``RunCancelledError`` when ``stopped()`` names a reason (a rollout
        stopped while this run waited)."""
        gate = self.gate
        if gate is None:
            return
        node = ctx.node
        cluster = self.engine.cluster_of[node]
        if ctx.params.get("ignore_alerts"):
            verdict = await gate.check(node, cluster)
            await self._checked(node, "ignored")
            await self.engine.record(
                GATE,
                "gate ignored",
                target=node,
                run_id=ctx.run_id,
                detail=f"--ignore-alerts given by {ctx.actor}; the gate said: {verdict.text}",
            )
            ctx.message = f"gate ignored (--ignore-alerts): {verdict.text}"
            return
        clock = self.engine.clock
        held = ctx.params.get("held")
        since = datetime.fromisoformat(str(held["since"])) if isinstance(held, dict) else None
        reason = ""  # a resumed run says again why it waits (audit, Slack, metrics)
        interval = max(gate.check_interval, 0.05)
        checks = int(gate.max_wait / interval) + 2
        for _ in range(checks):
            why = stopped()
            if why:
                if since is not None:
                    await self._state(ctx, "cancelled", since, why)
                raise RunCancelledError(why)
            verdict = await gate.check(node, cluster)
            await self._checked(node, verdict.result)
            now = clock.now()
            if verdict.passes:
                await self._passed(ctx, verdict, since, now, on_release)
                return
            if since is None:
                since = now
                if on_hold is not None:
                    await on_hold(ctx, since)
            if verdict.text != reason:
                reason = verdict.text
                await self._held(ctx, since, reason)
            waited = (now - since).total_seconds()
            if waited >= gate.max_wait:
                break
            await asyncio.sleep(min(interval, gate.max_wait - waited))
        assert since is not None
        await self._give_up(ctx, since, reason, on_give_up)

    async def _passed(
        self,
        ctx: RunContext,
        verdict: Verdict,
        since: datetime | None,
        now: datetime,
        on_release: Hook | None,
    ) -> None:
        if verdict.result == "unreachable":
            await self.engine.record(
                GATE, "gate unreachable", target=ctx.node, run_id=ctx.run_id, detail=verdict.text
            )
        if since is None:
            return
        waited = format_duration(round((now - since).total_seconds()))
        detail = (
            f"{verdict.text if verdict.result != 'clear' else 'alerts cleared'} after {waited} "
            f"(held since {local_text(since, self.engine.settings.tz)}); going on"
        )
        await ctx.save_params(held=None, gate_released=now.isoformat())
        await self.engine.record(
            GATE, "run released", target=ctx.node, run_id=ctx.run_id, detail=detail
        )
        await self._state(ctx, "released", since, detail)
        await ctx.events.publish(ev.RunProgress(run_id=ctx.run_id, node=ctx.node, step="gate"))
        if on_release is not None:
            await on_release(ctx, now)

    async def _held(self, ctx: RunContext, since: datetime, reason: str) -> None:
        gate = self.gate
        assert gate is not None
        until = since + timedelta(seconds=gate.max_wait)
        held = {"since": since.isoformat(), "reason": reason, "until": until.isoformat()}
        await ctx.save_params(held=held)
        text = held_text(held, self.engine.settings.tz)
        await self.engine.record(
            GATE,
            "run held",
            target=ctx.node,
            run_id=ctx.run_id,
            detail=f"{text}; re-checked every {format_duration(gate.check_interval)}",
        )
        await self._state(ctx, "held", since, reason)
        await ctx.events.publish(
            ev.RunProgress(run_id=ctx.run_id, node=ctx.node, step="gate", note=text)
        )
        log.info("run #%d on %s %s", ctx.run_id, ctx.node, text)

    async def _give_up(
        self,
        ctx: RunContext,
        since: datetime,
        reason: str,
        on_give_up: Callable[[RunContext, str], Awaitable[None]] | None,
    ) -> None:
        gate = self.gate
        assert gate is not None
        why = (
            f"held for {format_duration(gate.max_wait)} (gate.max_wait) since "
            f"{local_text(since, self.engine.settings.tz)}: {reason}; skipped, "
            f"{ctx.node} was not touched"
        )
        await self._state(ctx, "given up", since, why)
        if on_give_up is not None:
            await on_give_up(ctx, why)
        raise RunSkippedError(why)

    async def _state(self, ctx: RunContext, state: str, since: datetime, reason: str) -> None:
        await ctx.events.publish(
            ev.RunHeld(
                run_id=ctx.run_id,
                kind=ctx.kind,
                node=ctx.node,
                state=state,
                since=since,
                reason=reason,
            )
        )

    # -- after the update ----------------------------------------------------------------

    async def health(self, ctx: RunContext) -> None:
        """Part of ``verify``: wait until ``health_query`` says the node is healthy, at most
        ``health_wait``; ``HealthCheckFailedError`` when it does not."""
        gate = self.gate
        if gate is None or gate.health_query is None:
            return
        cluster = self.engine.cluster_of[ctx.node]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gate.health_wait
        poll = max(min(HEALTH_POLL, gate.check_interval), 0.05)
        report = None
        for _ in range(int(gate.health_wait / poll) + 2):
            report = await gate.health(ctx.node, cluster)
            if report.healthy:
                await ctx.store.step_detail(ctx.run_id, ctx.step or "verify", report.text)
                return
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(poll, left))
        assert report is not None
        raise HealthCheckFailedError(ctx.node, gate.health_wait, report.text)
