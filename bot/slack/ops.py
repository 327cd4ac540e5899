"""The ops channel (``slack.channel``): one message per run, updated in place, and alerts.

RunStarted posts the run's message; RunProgress updates it (``chat.update``) with the step
and a progress bar, at most once per ``interval`` per run (bursts coalesce into the latest
state); RunFinished writes the outcome. The message's channel and ts are kept in the store
(``kv`` namespace ``slack.run``), so that a run resumed after a restart updates the same
message; when the outcome cannot be written into it (Slack still failing after the
retries), the record keeps the outcome, a warning is logged, and the next start tries
again (``FINAL_ATTEMPTS`` in all). Failures, WarningFlagSet, UpdateLockSet,
HotfixAcknowledged, MaintenanceStarted, MaintenanceEnded and a run the gate held too long
(RunHeld "given up") get messages too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bot.slack.api import SlackApi
from bot.slack.blocks import RunView, notice_message, run_message, who
from bot.slack.jobs import Jobs
from core import events as ev
from core.store import Store

log = logging.getLogger(__name__)

KV_RUNS = "slack.run"
PROGRESS_INTERVAL = 1.0
"""Seconds between two progress updates of one run's message."""
FINAL_ATTEMPTS = 3
"""Tries to write a run's outcome into its message: at its end, then at the next starts."""


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
        elif isinstance(event, ev.RunHeld) and event.state == "given up":
            await self._post(
                notice_message(
                    ":fast_forward:",
                    f"Run #{event.run_id} {event.kind} on {event.node} skipped: held too long",
                    event.reason,
                ),
                f"held run #{event.run_id}",
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
        elif isinstance(event, ev.MaintenanceStarted):
            detail = event.reason + (" (logon disabled)" if event.logon_disabled else "")
            await self._post(
                notice_message(":construction:", f"Maintenance of {event.node} started", detail),
                f"maintenance start of {event.node}",
            )
        elif isinstance(event, ev.MaintenanceEnded):
            await self._post(
                notice_message(
                    ":white_check_mark:",
                    f"Maintenance of {event.node} ended",
                    event.reason,
                    by=event.by,
                ),
                f"maintenance end of {event.node}",
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
        if record is None or "final" in record:  # none, or the run ended: not updated
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
        live.view = replace(
            live.view, step=event.step, done=event.done, total=event.total, note=event.note
        )
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

    async def _update(self, live: _Live) -> bool:
        """``chat.update`` of the run's message; False (logged) when it finally failed."""
        async with live.lock:
            live.last = time.monotonic()
            answer = await self.api.call(
                "chat.update",
                f"run #{live.view.run_id}",
                channel=live.channel,
                ts=live.ts,
                **run_message(live.view),
            )
        return answer is not None

    async def _keep_final(self, live: _Live, attempts: int = 1) -> None:
        """The outcome could not be written into the run's message: say so, and keep it to
        try again at the next start (``FINAL_ATTEMPTS`` in all)."""
        view = live.view
        left = FINAL_ATTEMPTS - attempts
        log.warning(
            "Slack: the ops channel message of run #%d (%s on %s) could not be updated with "
            "its outcome (%s%s); it still shows the run as running. %s",
            view.run_id,
            view.kind,
            view.node,
            view.outcome,
            f": {view.message}" if view.message else "",
            f"Tried again at the next start ({left} more time(s))."
            if left > 0
            else "Given up; see `log` for the outcome.",
        )
        if left <= 0:
            await self.store.kv_delete(KV_RUNS, str(view.run_id))
            return
        await self.store.kv_set(
            KV_RUNS,
            str(view.run_id),
            {
                "channel": live.channel,
                "ts": live.ts,
                "kind": view.kind,
                "node": view.node,
                "actor": view.actor,
                "final": {"outcome": view.outcome, "message": view.message},
                "attempts": attempts,
            },
        )

    async def retry_final_updates(self) -> None:
        """Write outcomes whose final ``chat.update`` failed before into their messages."""
        for key, record in sorted((await self.store.kv_items(KV_RUNS)).items()):
            final = record.get("final") if isinstance(record, dict) else None
            if not isinstance(final, dict) or not key.isdigit():
                continue
            view = RunView(
                run_id=int(key),
                kind=str(record.get("kind", "run")),
                node=str(record.get("node", "?")),
                actor=str(record.get("actor", "")),
                outcome=str(final.get("outcome") or "?"),
                message=str(final.get("message") or ""),
            )
            live = _Live(view=view, channel=str(record["channel"]), ts=str(record["ts"]))
            if await self._update(live):
                await self.store.kv_delete(KV_RUNS, key)
                log.info("Slack: run #%s's message now shows its outcome", key)
            else:
                await self._keep_final(live, int(record.get("attempts") or 1) + 1)

    async def _finished(self, event: ev.RunFinished) -> None:
        live = await self._known(event.run_id, event.node)
        self._live.pop(event.run_id, None)
        self._unknown.discard(event.run_id)
        if live is not None:
            if live.flush is not None:
                live.flush.cancel()
                await asyncio.gather(live.flush, return_exceptions=True)
                live.flush = None
            live.view = replace(
                live.view, kind=event.kind, outcome=event.outcome, message=event.message
            )
            # the message's record is kept until the outcome is shown in it
            if await self._update(live):
                await self.store.kv_delete(KV_RUNS, str(event.run_id))
            else:
                await self._keep_final(live)
        else:
            await self.store.kv_delete(KV_RUNS, str(event.run_id))
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
