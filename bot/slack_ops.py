"""The ops channel (``slack.channel``): one message per run, updated in place, and alerts.

RunStarted posts the run's message; RunProgress updates it (``chat.update``) with the step
and a progress bar, at most once per ``interval`` per run (bursts coalesce into the latest
state); RunFinished writes the outcome. The message's channel and ts are kept in the store
(``kv`` namespace ``slack.run``), so that a run resumed after a restart updates the same
message. Failures, WarningFlagSet, UpdateLockSet and HotfixAcknowledged get messages too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bot.blocks import RunView, notice_message, run_message, who
from bot.slack_api import SlackApi
from bot.slack_jobs import Jobs
from core import events as ev
from core.store import Store

log = logging.getLogger(__name__)

KV_RUNS = "slack.run"
PROGRESS_INTERVAL = 1.0
"""Seconds between two progress updates of one run's message."""


@dataclass(slots=True)
class _Live:
    view: RunView
    channel: str
    ts: str
    last: float = 0.0
    flush: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class OpsChannel:
    def __init__(
        self,
        *,
        api: SlackApi,
        store: Store,
        channel: str,
        jobs: Jobs,
        interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.api = api
        self.store = store
        self.channel = channel
        self.jobs = jobs
        self.interval = interval
        self._live: dict[int, _Live] = {}
        self._unknown: set[int] = set()  # runs without a message: not looked up again

    async def on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            await self._started(event)
        elif isinstance(event, ev.RunProgress):
            await self._progress(event)
        elif isinstance(event, ev.RunFinished):
            await self._finished(event)
        elif isinstance(event, ev.WarningFlagSet):
            await self._post(
                notice_message(":warning:", f"Update download error on {event.node}", event.reason),
                f"warning flag of {event.node}",
            )
        elif isinstance(event, ev.UpdateLockSet):
            title = f"Update lock set on {event.node}"  # noqa: S608  (a Slack message, not SQL)
            await self._post(
                notice_message(":lock:", title, event.reason),
                f"update lock of {event.node}",
            )
        elif isinstance(event, ev.HotfixAcknowledged):
            by = who(event.by) + (f" ({event.phone})" if event.phone else "")
            await self._post(
                notice_message(
                    ":telephone_receiver:",
                    f"Hotfix {event.hotfix_id} acknowledged",
                    f"by {by}; the escalation stops.",
                ),
                f"acknowledgement of hotfix {event.hotfix_id}",
            )

    async def _post(self, message: dict[str, Any], what: str) -> dict[str, Any] | None:
        return await self.api.call("chat.postMessage", what, channel=self.channel, **message)

    # -- one message per run -------------------------------------------------------------

    async def _record(self, run_id: int) -> dict[str, Any] | None:
        value = await self.store.kv_get(KV_RUNS, str(run_id))
        return value if isinstance(value, dict) else None

    async def _started(self, event: ev.RunStarted) -> None:
        view = RunView(run_id=event.run_id, kind=event.kind, node=event.node, actor=event.actor)
        record = await self._record(event.run_id)
        if record is not None:  # resumed after a restart: the message exists
            live = _Live(view=view, channel=record["channel"], ts=record["ts"])
            self._live[event.run_id] = live
            await self._update(live)
            return
        posted = await self._post(run_message(view), f"run #{event.run_id}")
        if posted is None or not posted.get("ts"):
            return  # logged by the API; the outcome is posted anew at the end
        channel = str(posted.get("channel") or self.channel)
        ts = str(posted["ts"])
        await self.store.kv_set(
            KV_RUNS,
            str(event.run_id),
            {
                "channel": channel,
                "ts": ts,
                "kind": event.kind,
                "node": event.node,
                "actor": event.actor,
            },
        )
        self._live[event.run_id] = _Live(view=view, channel=channel, ts=ts, last=time.monotonic())

    async def _known(self, run_id: int, node: str) -> _Live | None:
        live = self._live.get(run_id)
        if live is not None or run_id in self._unknown:
            return live
        record = await self._record(run_id)
        if record is None:
            self._unknown.add(run_id)
            return None
        view = RunView(
            run_id=run_id,
            kind=str(record.get("kind", "run")),
            node=str(record.get("node", node)),
            actor=str(record.get("actor", "")),
        )
        live = _Live(view=view, channel=record["channel"], ts=record["ts"])
        self._live[run_id] = live
        return live

    async def _progress(self, event: ev.RunProgress) -> None:
        live = await self._known(event.run_id, event.node)
        if live is None:
            return
        live.view = replace(live.view, step=event.step, done=event.done, total=event.total)
        wait = live.last + self.interval - time.monotonic()
        if wait <= 0 and live.flush is None:
            await self._update(live)
        elif live.flush is None:
            live.flush = self.jobs.spawn(
                f"slack-progress-{event.run_id}", self._flush_later(live, wait)
            )

    async def _flush_later(self, live: _Live, wait: float) -> None:
        # a rate limit, not a wait for something: the newest state goes out after it
        await asyncio.sleep(max(wait, 0.0))
        live.flush = None
        await self._update(live)

    async def _update(self, live: _Live) -> None:
        async with live.lock:
            live.last = time.monotonic()
            await self.api.call(
                "chat.update",
                f"run #{live.view.run_id}",
                channel=live.channel,
                ts=live.ts,
                **run_message(live.view),
            )

    async def _finished(self, event: ev.RunFinished) -> None:
        live = await self._known(event.run_id, event.node)
        self._live.pop(event.run_id, None)
        self._unknown.discard(event.run_id)
        # forget the message first: once the outcome is shown nothing updates it any more
        await self.store.kv_delete(KV_RUNS, str(event.run_id))
        if live is not None:
            if live.flush is not None:
                live.flush.cancel()
                await asyncio.gather(live.flush, return_exceptions=True)
                live.flush = None
            live.view = replace(
                live.view, kind=event.kind, outcome=event.outcome, message=event.message
            )
            await self._update(live)
        else:
            view = RunView(
                run_id=event.run_id,
                kind=event.kind,
                node=event.node,
                actor="?",
                outcome=event.outcome,
                message=event.message,
            )
            await self._post(run_message(view), f"run #{event.run_id}")
        if event.outcome == "failed":
            await self._post(
                notice_message(
                    ":red_circle:",
                    f"Run #{event.run_id} {event.kind} on {event.node} failed",
                    event.message,
                ),
                f"failure of run #{event.run_id}",
            )
