"""The notifier: ``async with Notifier(...)`` runs everything ``notify`` does.

* hotfix watch (L8): new hotfixes are e-mailed to the contacts of the configured
  clusters; urgent ones are escalated by phone (L14);
* users' mailing list (``notify.users_list``, L3): maintenance scheduled, started and
  ended (one e-mail per event: the outbox key is the event id, and a window's start has a
  fixed id, so a start is never mailed twice);
* admin alerts (``notify.admin_emails``): warning flag, update lock, failed run, a run the
  gate held too long;
* the durable outbox and its workers (e-mail, call, SMS);
* Twilio's webhooks (``add_routes``).

Every instance subscribes to its event bus (events are local: each instance queues the
notifications of its own events) and serves the webhooks. The delivery workers, the
hotfix watch and the escalation runners are the leader's duties (``leader``: a callable
telling whether this instance leads; looked at every ``LEADER_CHECK`` seconds; ``None``:
always). Its tasks live in task groups owned by the context and are cancelled and
awaited when the context is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self

from aiohttp import web

from core import events as ev
from core.interfaces import RepositoryClient
from core.lifecycle.scheduled import SCHEDULED_REASON
from core.localtime import local_text
from core.repository.manifest import PackageEntry
from core.settings import Contact, Settings
from core.store import Store, utcnow
from notify.calls import CallRegistry
from notify.email import EmailChannel
from notify.escalation import Callee, Escalations, hotfix_vars
from notify.i18n import Translator, message_time, translator
from notify.outbox import Backoff, Notification, Outbox, Outcome
from notify.phone import CallChannel, SmsChannel, Twilio
from notify.render import Renderer
from notify.watch import HotfixWatch
from notify.webhooks import TwilioWebhooks

log = logging.getLogger(__name__)

UNCERTAIN_KEY = "delivery-uncertain:"
"""Key prefix of the admin alert about a notification whose delivery is uncertain."""
STOP_GRACE = 5.0
"""How long a stopping notifier lets a message being sent finish (then it is cut off and
sent again at the next start, or reported as delivery uncertain if its DATA had begun)."""
STOP_TIMEOUT = 10.0
"""Bound for the notifier's tasks to end when the service stops."""
LEADER_CHECK = 0.5
"""How often a notifier that does not lead looks whether it leads now (and vice versa)."""


class Bus(Protocol):
    def subscribe(self, name: str, handler: ev.Handler) -> None: ...

    async def publish(self, event: ev.Event) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Audience:
    """A contact and the configured nodes it cares about."""

    contact: Contact
    nodes: tuple[str, ...]


def hotfix_audience(settings: Settings) -> list[Audience]:
    """Contacts whose clusters match the clusters of the configured nodes ("*" = all)."""
    found = []
    for contact in settings.contacts:
        nodes = tuple(n.name for n in settings.nodes if contact.covers(n.cluster))
        if nodes or "*" in contact.clusters:
            found.append(Audience(contact=contact, nodes=nodes))
    return found


class Notifier:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        bus: Bus,
        repository: RepositoryClient | None,
        leader: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.leader = leader
        self.store = store
        self.bus = bus
        self.renderer = Renderer(overrides=settings.notify.templates_dir)
        self.twilio = Twilio(settings.twilio)
        self.registry = CallRegistry(store)
        public_url = settings.http.public_url
        ring = max(5, min(60, int(settings.escalation.ack_wait)))
        self.outbox = Outbox(
            store,
            [
                EmailChannel(
                    settings.smtp, renderer=self.renderer, batch_size=settings.notify.batch_size
                ),
                CallChannel(
                    self.twilio,
                    renderer=self.renderer,
                    registry=self.registry,
                    public_url=public_url,
                    ring_seconds=ring,
                ),
                SmsChannel(self.twilio, renderer=self.renderer, public_url=public_url),
            ],
            Backoff.from_settings(settings.notify),
        )
        self.escalations = Escalations(
            store=store,
            outbox=self.outbox,
            events=bus,
            registry=self.registry,
            renderer=self.renderer,
            settings=settings.escalation,
            alert=self.alert_admins,
        )
        self.outbox.listen(self.escalations.on_outcome)
        self.outbox.listen(self._on_uncertain)
        self.watch = HotfixWatch(
            store=store,
            repository=repository,
            updates=settings.updates,
            announce=self.announce_hotfix,
            announce_existing=settings.notify.announce_existing_hotfixes,
        )
        self.webhooks = TwilioWebhooks(
            settings=settings, store=store, registry=self.registry, escalations=self.escalations
        )
        self._stack = AsyncExitStack()
        self._task: asyncio.Task[None] | None = None

    # -- context -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        try:
            await self._stack.enter_async_context(self.twilio)
            if self.settings.smtp.host is None:
                log.warning("smtp.host is not set: e-mails are recorded as failed, not sent")
            missing = self.twilio.missing()
            if missing:
                log.warning(
                    "twilio.%s not set: urgent hotfixes are not phoned", ", twilio.".join(missing)
                )
            # one instance per SQLite store: what is "sending" was this service's own
            # when it died, due at once instead of after its lease; what was being
            # transmitting is "delivery uncertain" (never sent twice) and the admins are told
            released, uncertain = await self.outbox.recover(
                single_instance=self.store.dialect == "sqlite"
            )
            if released:
                log.info(
                    "outbox: %d notification(s) left in delivery by a crash are due again",
                    released,
                )
            if uncertain:
                log.warning(
                    "outbox: %d notification(s) were being transmitted when the service "
                    "stopped: delivery uncertain, not sent again (see log)",
                    uncertain,
                )
            self.bus.subscribe("notify", self._on_event)
            self._task = asyncio.create_task(self._run(), name="notify")
            self._task.add_done_callback(_report_end)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not await self.outbox.stop(STOP_GRACE):
                log.warning("notifications still being sent after %gs are interrupted", STOP_GRACE)
            if self._task is not None:
                self._task.cancel()
                try:
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await asyncio.gather(self._task, return_exceptions=True)
                except TimeoutError:
                    log.warning("notifier tasks did not stop within %gs", STOP_TIMEOUT)
                self._task = None
        finally:
            await self._stack.__aexit__(exc_type, exc, tb)

    async def _run(self) -> None:
        if self.leader is None:
            await self._duties()
            return
        while True:
            await self._until_leader(True)
            async with asyncio.TaskGroup() as group:
                duties = group.create_task(self._duties(), name="notify:duties")
                await self._until_leader(False)
                log.info("not the leader any more: notification delivery stops here")
                await self.outbox.stop(STOP_GRACE)
                duties.cancel()

    async def _until_leader(self, leads: bool) -> None:
        assert self.leader is not None
        # the election's hooks belong to the service; a flag is all a notifier may look at
        while self.leader() is not leads:  # noqa: ASYNC110
            await asyncio.sleep(LEADER_CHECK)

    async def _duties(self) -> None:
        """Delivery workers, hotfix watch, escalation runners: one instance runs them."""
        try:
            async with asyncio.TaskGroup() as group:

                def spawn(coro: Any, name: str) -> None:
                    group.create_task(coro, name=name)

                self.escalations.bind(spawn)
                group.create_task(self.outbox.run(), name="notify:outbox")
                group.create_task(self.watch.run(), name="notify:hotfix-watch")
                await self.escalations.resume()
        finally:
            self.escalations.bind(None)

    def add_routes(self, app: web.Application) -> None:
        """Twilio's webhooks: ``POST /twilio/voice/gather`` and ``POST /twilio/status``."""
        self.webhooks.add_routes(app)

    # -- hotfixes (L8, L14) ----------------------------------------------------------------

    async def announce_hotfix(self, entry: PackageEntry, channel: str) -> None:
        """E-mail a hotfix to its contacts, escalate an urgent one, publish the event.

        Idempotent: the event id, and so every outbox key, is derived from the hotfix id.
        """
        assert entry.id is not None
        event = ev.HotfixPublished(
            id=f"hotfix:{channel}:{entry.id}",
            hotfix_id=entry.id,
            package=entry.name,
            version=entry.version,
            urgency=entry.urgency or "normal",
            summary=entry.summary,
        )
        urgent = event.urgency == "urgent"
        audience = hotfix_audience(self.settings)
        mails = []
        callees = []
        problems = []
        for who in audience:
            contact = who.contact
            language = self.settings.contact_language(contact)
            variables = {
                "name": contact.name,
                "hotfix": hotfix_vars(event),
                "urgent": urgent,
                "channel": channel,
                "nodes": list(who.nodes),
            }
            if contact.email:
                mails.append(
                    Notification(
                        key=f"{event.id}:email:{contact.email}",
                        channel="email",
                        recipient=contact.email,
                        subject=_hotfix_subject(event, translator(language)),
                        payload={
                            "template": "hotfix",
                            "vars": variables,
                            "name": contact.name,
                            "target": entry.id,
                            "language": language,
                        },
                    )
                )
            else:
                problems.append(f"contact {contact.name} has no e-mail address: not e-mailed")
            if urgent and contact.urgent_calls:
                if contact.phone:
                    callees.append(
                        Callee(name=contact.name, phone=contact.phone, language=language)
                    )
                else:
                    problems.append(
                        f"contact {contact.name} has urgent_calls but no phone number: not called"
                    )
        if not audience:
            problems.append("no [[contacts]] entry covers the configured clusters: nobody told")
        fresh = await self.outbox.put(*mails)
        log.info(
            "hotfix %s (%s) announced: %d e-mail(s)%s",
            entry.id,
            event.urgency,
            len(mails),
            f", {len(callees)} phone contact(s)" if urgent else "",
        )
        missing = self.twilio.missing()
        if urgent and callees and missing:
            problems.append(
                f"{', '.join(f'twilio.{k}' for k in missing)} not configured: nobody phoned"
            )
        elif urgent:
            await self.escalations.start(event, callees)
        await self._audit_problems(entry.id, problems, first=bool(fresh) or not mails)
        await self.bus.publish(event)

    async def _audit_problems(self, hotfix_id: str, problems: list[str], *, first: bool) -> None:
        """Who was not told, once per hotfix (not again when a crash repeats the announcement)."""
        if not first:
            return
        for problem in problems:
            await self.store.audit(
                actor="notify",
                source="system",
                action="notification failed",
                target=hotfix_id,
                detail=f"hotfix {hotfix_id}: {problem}",
            )

    # -- users' mailing list (L3) ------------------------------------------------------------

    async def _maintenance(
        self, event: ev.MaintenanceScheduled | ev.MaintenanceStarted | ev.MaintenanceEnded
    ) -> None:
        address = self.settings.notify.users_list
        if address is None:
            return
        tz = self.settings.tz
        language = self.settings.notify.language
        t = translator(language)
        entry = self.settings.node(event.node)
        cluster = entry.cluster if entry is not None else None
        variables: dict[str, Any] = {
            "node": event.node,
            "cluster": cluster,
            "timezone": self.settings.timezone,
            "reason": event.reason,
        }
        reason = _reason(event.reason, t)
        variables["reason"] = reason
        if isinstance(event, ev.MaintenanceScheduled):
            start = message_time(t, event.start, tz)
            variables |= {"event": "scheduled", "start": start, "origin": event.origin}
            subject = t._(
                "[tgops] Maintenance of %(node)s on %(start)s: %(reason)s",
                node=event.node,
                start=start,
                reason=reason,
            )
        elif isinstance(event, ev.MaintenanceStarted):
            start = message_time(t, event.start, tz)
            variables |= {"event": "started", "start": start, "origin": event.origin}
            subject = t._(
                "[tgops] Maintenance of %(node)s has started: %(reason)s",
                node=event.node,
                reason=reason,
            )
        else:
            variables |= {"event": "ended", "by": event.by}
            subject = t._("[tgops] Maintenance of %(node)s has ended", node=event.node)
        # the mails of one window (scheduled, started, ended or cancelled) are one thread
        thread = (
            f"maintenance:{event.node}:{event.start.astimezone(UTC):%Y%m%dT%H%M%SZ}"
            if event.start is not None
            else None
        )
        await self.outbox.put(
            Notification(
                key=f"{event.id}:email:{address}",
                channel="email",
                recipient=address,
                subject=subject,
                payload={
                    "template": "maintenance",
                    "vars": variables,
                    "target": event.node,
                    "language": language,
                    **({"thread": thread} if thread else {}),
                },
            )
        )

    # -- admin alerts --------------------------------------------------------------------

    async def alert_admins(
        self,
        *,
        key: str,
        title: str,
        node: str,
        target: str,
        detail: str,
        hint: str,
        at: datetime | None = None,
    ) -> None:
        """E-mail ``notify.admin_emails``; ``key`` makes it idempotent."""
        addresses = self.settings.notify.admin_emails
        if not addresses:
            return
        variables = {
            "title": title,
            "node": node,
            "detail": detail or "(none)",
            "hint": hint,
            "at": local_text(at or utcnow(), self.settings.tz),
            "timezone": self.settings.timezone,
        }
        await self.outbox.put(
            *(
                Notification(
                    key=f"{key}:email:{address}",
                    channel="email",
                    recipient=address,
                    subject=f"[tgops] {title}",
                    payload={"template": "admin_alert", "vars": variables, "target": target},
                )
                for address in addresses
            )
        )

    async def _on_uncertain(self, outcome: Outcome) -> None:
        """Outbox listener: a notification whose delivery is uncertain (it may have gone out;
        it is not sent again) is reported to the admins, once."""
        item = outcome.item
        if not outcome.uncertain or item.key.startswith(UNCERTAIN_KEY):
            return  # not about an alert of this kind (no chain of alerts)
        channel = self.outbox.channels.get(item.channel)
        what = (
            channel.describe(item) if channel is not None else f"{item.channel} to {item.recipient}"
        )
        target = str(item.payload.get("target") or "-")
        await self.alert_admins(
            key=f"{UNCERTAIN_KEY}{item.key}",
            title=f"Delivery uncertain: {what}",
            node=target,
            target=target,
            detail=str(outcome.error) if outcome.error is not None else "",
            hint=(
                "Its transmission had begun when it broke off, so the recipient may or may not "
                "have it. tgops does not send it again (no duplicates); check with the "
                "recipient and send it by hand if it is missing."
            ),
        )

    async def _admin_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.WarningFlagSet):
            title = f"Warning flag set on {event.node}: update download failed"
            hint = (
                "The download is tried again immediately before the next update run; a "
                "complete download clears the flag (L7). Check that the update repository is "
                "reachable from tgops."
            )
            node, detail = event.node, event.reason
        elif isinstance(event, ev.UpdateLockSet):
            title = f"{event.node} is locked against updates (update lock)"
            hint = (
                f"Updates of {event.node} are blocked until an update admin removes the lock "
                f"(/tg remove-lock {event.node}; add --cancel-schedule to switch the schedules "
                "off too). A cluster node stays in maintenance until a maint admin ends it."
            )
            node, detail = event.node, event.reason
        elif isinstance(event, ev.RunHeld) and event.state == "given up":
            title = f"Run #{event.run_id} ({event.kind}) on {event.node} held too long by the gate"
            hint = (
                f"The run was skipped: nothing on {event.node} was changed, no lock is in "
                "place, and a schedule's next run is planned as usual. When the alerts are "
                f"understood, run it by hand (/tg auto-update {event.node}; --ignore-alerts "
                "passes the gate)."
            )
            node, detail = event.node, event.reason
        elif isinstance(event, ev.ManifestRefused):
            title = f"Manifest of channel {event.channel} refused"
            hint = (
                "tgops keeps using the last good manifest of the channel. A rollback means "
                "the repository or a mirror serves an old copy; an expired manifest must be "
                f"re-signed by the vendor (tgops publish --channel {event.channel} without "
                "files re-signs it)."
            )
            await self.alert_admins(
                key=f"manifest-refused:{event.key}",
                title=title,
                node=f"channel {event.channel}",
                target=event.channel,
                detail=event.reason,
                hint=hint,
                at=event.at,
            )
            return
        elif isinstance(event, ev.RunFinished) and event.outcome == "failed":
            title = f"Run #{event.run_id} ({event.kind}) on {event.node} failed"
            hint = f"The steps of the run are in /tg log {event.node}."
            node, detail = event.node, event.message
        else:
            return
        await self.alert_admins(
            key=event.id, title=title, node=node, target=node, detail=detail, hint=hint, at=event.at
        )

    # -- events --------------------------------------------------------------------------

    async def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.MaintenanceScheduled | ev.MaintenanceStarted | ev.MaintenanceEnded):
            await self._maintenance(event)
        elif isinstance(
            event,
            ev.WarningFlagSet | ev.UpdateLockSet | ev.RunFinished | ev.RunHeld | ev.ManifestRefused,
        ):
            await self._admin_event(event)


def _hotfix_subject(event: ev.HotfixPublished, t: Translator) -> str:
    values = {"id": event.hotfix_id, "package": event.package, "version": event.version}
    if event.urgency == "urgent":
        subject = t._("[tgops] URGENT hotfix %(id)s for %(package)s %(version)s", **values)
    else:
        subject = t._("[tgops] Hotfix %(id)s for %(package)s %(version)s", **values)
    return f"{subject}: {event.summary}" if event.summary else subject


def _reason(reason: str, t: Translator) -> str:
    """A reason users read: the one tgops gives itself translated, an admin's as written."""
    return t._("Scheduled update") if reason == SCHEDULED_REASON else reason


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the notifier stopped unexpectedly", exc_info=task.exception())
