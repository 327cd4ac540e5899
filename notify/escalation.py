"""Escalation of urgent hotfixes (L14): call the phone contacts until someone presses 1.

The e-mails to every contact are queued first (by the notifier). Then the phone contacts
(``urgent_calls = true`` with a phone number) are called one after another: each call
waits up to ``escalation.ack_wait`` for a 1; a call that fails, is busy or is not answered
gets an SMS (``sms_fallback``) and the next contact is called; after ``call_rounds``
rounds through the list the escalation is exhausted (audited, admins alerted).

Pressing 1 records who acknowledged (``escalations`` table), stops the escalation,
writes an audit record and publishes ``HotfixAcknowledged``.

State lives in the store: the ``escalations`` row (status, round, position, current
call) and a snapshot of the hotfix and the contacts (``kv``); calls and SMS go through
the outbox with keys per round, so a restarted service continues where it was, without
calling anyone twice for the same round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from core.events import HotfixAcknowledged, HotfixPublished
from core.interfaces import EventSink
from core.settings import EscalationSettings
from core.store import Store, utcnow
from notify.calls import UNREACHED_STATUSES, CallRecord, CallRegistry
from notify.outbox import Notification, Outbox, Outcome
from notify.render import Renderer

log = logging.getLogger(__name__)

SNAPSHOTS = "notify.escalations"
"""kv namespace: hotfix id → the hotfix and the contacts to call, as at the start."""
MAX_WAIT = 5.0
"""Longest sleep while waiting on a call; the state in the store is looked at this often."""
PLACING_GRACE = 1.0

Spawn = Callable[[Coroutine[Any, Any, None], str], None]
Alert = Callable[..., Awaitable[None]]
CallResult = Literal["stopped", "answered", "unreached"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Callee:
    name: str
    phone: str
    language: str = "en"


@dataclass(frozen=True, slots=True, kw_only=True)
class Acknowledgement:
    """What pressing 1 did: ``new`` when it stopped the escalation, else who did before."""

    hotfix: str
    by: str
    new: bool


def hotfix_vars(event: HotfixPublished) -> dict[str, str]:
    return {
        "id": event.hotfix_id,
        "package": event.package,
        "version": event.version,
        "urgency": event.urgency,
        "summary": event.summary,
    }


class Escalations:
    def __init__(
        self,
        *,
        store: Store,
        outbox: Outbox,
        events: EventSink,
        registry: CallRegistry,
        renderer: Renderer,
        settings: EscalationSettings,
        alert: Alert,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.events = events
        self.registry = registry
        self.renderer = renderer
        self.settings = settings
        self.alert = alert
        self._pokes: dict[str, asyncio.Event] = {}
        self._running: set[str] = set()
        self._spawn: Spawn | None = None
        self._waiting: list[str] = []

    # -- tasks ---------------------------------------------------------------------------

    def bind(self, spawn: Spawn | None) -> None:
        """Runners are started through ``spawn`` (the notifier's task group)."""
        self._spawn = spawn
        waiting, self._waiting = self._waiting, []
        for hotfix_id in waiting:
            self._launch(hotfix_id)

    def _launch(self, hotfix_id: str) -> None:
        if hotfix_id in self._running:
            return
        if self._spawn is None:
            self._waiting.append(hotfix_id)
            return
        self._running.add(hotfix_id)
        self._spawn(self._run(hotfix_id), f"escalation:{hotfix_id}")

    def active(self) -> set[str]:
        """Hotfix ids whose escalation runs in this instance now."""
        return set(self._running)

    def poke(self, hotfix_id: str) -> None:
        event = self._pokes.get(hotfix_id)
        if event is not None:
            event.set()

    async def resume(self) -> list[str]:
        """Continue every escalation that was running when the service stopped."""
        ids = [r["hotfix_id"] for r in await self.store.escalations(statuses=("running",))]
        for hotfix_id in ids:
            log.info("escalation of hotfix %s continues", hotfix_id)
            self._launch(hotfix_id)
        return ids

    # -- start ---------------------------------------------------------------------------

    async def start(self, event: HotfixPublished, callees: Sequence[Callee]) -> bool:
        """Begin the escalation of a hotfix; ``False`` when it was begun before."""
        if await self.store.escalation(event.hotfix_id) is not None:
            return False
        unique: dict[str, Callee] = {}
        for callee in callees:
            unique.setdefault(callee.phone, callee)
        snapshot = {
            "event": event.id,
            "hotfix": hotfix_vars(event),
            "callees": [
                {"name": c.name, "phone": c.phone, "language": c.language} for c in unique.values()
            ],
        }
        await self.store.kv_set(SNAPSHOTS, event.hotfix_id, snapshot)
        if not await self.store.create_escalation(event.hotfix_id):
            return False
        names = ", ".join(c.name for c in unique.values()) or "nobody"
        await self.store.audit(
            actor="notify",
            source="system",
            action="escalation started",
            target=event.hotfix_id,
            detail=(
                f"urgent hotfix {event.hotfix_id}: calling {names} one after another, "
                f"up to {self.settings.call_rounds} round(s), {self.settings.ack_wait:g}s "
                "each, until someone presses 1"
            ),
        )
        self._launch(event.hotfix_id)
        return True

    # -- what Twilio tells us ----------------------------------------------------------

    async def on_outcome(self, outcome: Outcome) -> None:
        """Outbox listener: a call of an escalation was placed or failed."""
        hotfix_id = outcome.item.payload.get("escalation")
        if outcome.item.channel == "call" and isinstance(hotfix_id, str):
            self.poke(hotfix_id)

    async def call_status(self, sid: str, status: str) -> CallRecord | None:
        """A status callback: remember the call's status, wake its escalation."""
        call = await self.registry.set_status(sid, status)
        if call is None:
            return None
        if status in UNREACHED_STATUSES:
            await self.store.audit(
                actor="notify",
                source="system",
                action="notification failed",
                target=call.hotfix,
                detail=f"call to {call.name} ({call.phone}): {status}",
            )
        if call.hotfix is not None:
            self.poke(call.hotfix)
        return call

    async def acknowledge(self, call: CallRecord) -> Acknowledgement | None:
        """The callee pressed 1; ``None`` when the call belongs to no escalation."""
        if call.hotfix is None:
            return None
        hotfix_id = call.hotfix
        row = await self.store.escalation(hotfix_id)
        if row is None:
            return None
        if row["status"] == "acknowledged":
            return Acknowledgement(hotfix=hotfix_id, by=str(row["acknowledged_by"]), new=False)
        now = utcnow()
        done = await self.store.update_escalation(
            hotfix_id,
            expect={"status": ("running", "exhausted")},
            values={"status": "acknowledged", "acknowledged_by": call.name, "acknowledged_at": now},
        )
        if not done:
            row = await self.store.escalation(hotfix_id)
            by = str(row["acknowledged_by"]) if row else call.name
            return Acknowledgement(hotfix=hotfix_id, by=by, new=False)
        await self.store.audit(
            actor=call.name,
            source="phone",
            action="hotfix acknowledged",
            target=hotfix_id,
            detail=f"{call.name} ({call.phone}) pressed 1 on call {call.sid}; escalation stopped",
        )
        log.info("hotfix %s acknowledged by %s", hotfix_id, call.name)
        await self.events.publish(
            HotfixAcknowledged(hotfix_id=hotfix_id, by=call.name, phone=call.phone)
        )
        self.poke(hotfix_id)
        return Acknowledgement(hotfix=hotfix_id, by=call.name, new=True)

    async def speech(self, call: CallRecord) -> str | None:
        """What the call says (for a repeated prompt)."""
        snapshot = await self.store.kv_get(SNAPSHOTS, call.hotfix or "")
        if not isinstance(snapshot, dict):
            return None
        return self.renderer.text(
            "hotfix_call", {"name": call.name, "hotfix": snapshot["hotfix"]}, call.language
        ).strip()

    # -- the runner --------------------------------------------------------------------

    async def _run(self, hotfix_id: str) -> None:
        poke = self._pokes.setdefault(hotfix_id, asyncio.Event())
        try:
            await self._escalate(hotfix_id, poke)
        except Exception:
            log.exception(
                "escalation of hotfix %s stopped by an error; it resumes at the next start",
                hotfix_id,
            )
        finally:
            self._pokes.pop(hotfix_id, None)
            self._running.discard(hotfix_id)

    async def _escalate(self, hotfix_id: str, poke: asyncio.Event) -> None:
        snapshot = await self.store.kv_get(SNAPSHOTS, hotfix_id)
        if not isinstance(snapshot, dict):
            log.error("escalation of hotfix %s has no record of whom to call", hotfix_id)
            await self._exhausted(hotfix_id, [], "no record of whom to call")
            return
        callees = [
            Callee(name=c["name"], phone=c["phone"], language=c.get("language", "en"))
            for c in snapshot["callees"]
        ]
        event_id = str(snapshot["event"])
        key = ""
        while True:
            row = await self.store.escalation(hotfix_id)
            if row is None or row["status"] != "running":
                break
            round_, position = int(row["round"]), int(row["position"])
            if not callees:
                await self._exhausted(
                    hotfix_id, callees, "no contact with a phone number and urgent_calls = true"
                )
                break
            if round_ >= self.settings.call_rounds:
                await self._exhausted(hotfix_id, callees, "nobody pressed 1")
                break
            callee = callees[position % len(callees)]
            key = f"{event_id}:call:{callee.phone}:r{round_ + 1}"
            variables = {"name": callee.name, "hotfix": snapshot["hotfix"]}
            await self.outbox.put(
                Notification(
                    key=key,
                    channel="call",
                    recipient=callee.phone,
                    subject=f"urgent hotfix {hotfix_id}",
                    payload={
                        "template": "hotfix_call",
                        "vars": variables,
                        "name": callee.name,
                        "target": hotfix_id,
                        "escalation": hotfix_id,
                        "round": round_,
                        "position": position,
                        "language": callee.language,
                    },
                )
            )
            result = await self._wait_for_call(hotfix_id, key, round_, position, poke)
            if result == "stopped":
                continue
            if result == "unreached" and self.settings.sms_fallback:
                await self.outbox.put(
                    Notification(
                        key=f"{event_id}:sms:{callee.phone}:r{round_ + 1}",
                        channel="sms",
                        recipient=callee.phone,
                        subject=f"urgent hotfix {hotfix_id}",
                        payload={
                            "template": "hotfix_sms",
                            "vars": variables,
                            "name": callee.name,
                            "target": hotfix_id,
                            "escalation": hotfix_id,
                            "language": callee.language,
                        },
                    )
                )
            position += 1
            next_round = round_
            if position >= len(callees):
                position, next_round = 0, round_ + 1
            await self.store.update_escalation(
                hotfix_id,
                expect={"status": "running", "round": round_, "position": int(row["position"])},
                values={"round": next_round, "position": position, "call_sid": None},
            )
        if key:
            # stopped (acknowledged): a call not placed yet is not needed any more
            await self.store.cancel_outbox(key, reason="escalation stopped: acknowledged")

    async def _wait_for_call(
        self, hotfix_id: str, key: str, round_: int, position: int, poke: asyncio.Event
    ) -> CallResult:
        wait = timedelta(seconds=self.settings.ack_wait)
        while True:
            poke.clear()
            row = await self.store.escalation(hotfix_id)
            if row is None or row["status"] != "running":
                return "stopped"
            item = await self.store.outbox_item(key)
            now = utcnow()
            if item is None or item.status == "failed":
                return "unreached"
            if item.status == "sent":
                call = await self.registry.by_key(key)
                status = call.status if call is not None else "queued"
                if call is not None and row["call_sid"] != call.sid:
                    await self.store.update_escalation(
                        hotfix_id,
                        expect={"status": "running", "round": round_, "position": position},
                        values={"call_sid": call.sid},
                    )
                if status in UNREACHED_STATUSES:
                    return "unreached"
                if status == "completed":
                    return "answered"  # answered, but no 1 was pressed
                deadline = (item.sent_at or now) + wait
                if now >= deadline:
                    return "answered" if status == "in-progress" else "unreached"
            else:
                # not placed yet: being placed, or waiting for a retry after an error
                deadline = item.created_at + wait
                if now >= deadline:
                    if await self.store.cancel_outbox(
                        key,
                        reason="escalation moved on: the call was not placed within "
                        "escalation.ack_wait",
                    ):
                        return "unreached"
                    deadline = now + timedelta(seconds=PLACING_GRACE)
            timeout = min(MAX_WAIT, max(0.0, (deadline - utcnow()).total_seconds()))
            try:
                async with asyncio.timeout(timeout):
                    await poke.wait()
            except TimeoutError:
                pass

    async def _exhausted(self, hotfix_id: str, callees: Sequence[Callee], why: str) -> None:
        done = await self.store.update_escalation(
            hotfix_id, expect={"status": "running"}, values={"status": "exhausted"}
        )
        if not done:
            return
        rounds = self.settings.call_rounds
        detail = (
            f"{why}: {rounds} round(s) through {len(callees)} phone contact(s)" if callees else why
        )
        await self.store.audit(
            actor="notify",
            source="system",
            action="escalation exhausted",
            target=hotfix_id,
            detail=f"urgent hotfix {hotfix_id} not acknowledged: {detail}",
        )
        log.warning("escalation of hotfix %s exhausted: %s", hotfix_id, detail)
        await self.alert(
            key=f"escalation:{hotfix_id}:exhausted",
            title=f"Urgent hotfix {hotfix_id} was not acknowledged by phone",
            node="(all)",
            target=hotfix_id,
            detail=detail,
            hint=(
                "Nobody pressed 1 on the escalation calls. Make sure someone knows about the "
                "hotfix (see the hotfix e-mail), and check the phone numbers in [[contacts]]."
            ),
        )
