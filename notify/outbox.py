"""The durable outbox (L15): every notification is stored before it is sent.

``Outbox.put`` writes notifications to the store (idempotency key: event id + channel +
recipient, so a repeated put sends nothing twice) and wakes the channel's worker. One
worker per channel claims due items (status ``sending`` with a lease, so a second
instance or a restarted one does not take them while they are in flight), hands them to
the channel (up to ``parallel`` batches at once), and one recorder per channel writes the
outcomes as they come, all that came within ``RECORD_DELAY`` from every batch in flight in
one transaction:

* sent: status ``sent`` and an audit record "notification sent";
* transient failure (connection refused, SMTP 4xx, Twilio 429/5xx): pending again, next
  attempt after an exponential backoff; after ``max_attempts`` it has failed for good;
* permanent failure (SMTP 5xx, Twilio 4xx, nothing configured): status ``failed`` with its
  reason and an audit record "notification failed";
* released (not tried: the connection was lost before its turn, or the service stops):
  pending again at once, no attempt counted.

The worker sleeps until it is woken or the next item is due (at most ``idle`` seconds,
the bounded look for retries). Items survive restarts; a sender killed mid-batch leaves
its claim to expire after the lease (a service on SQLite, which one instance owns,
releases it when it starts again), then the items are sent again (at least once; an
e-mail keeps its Message-ID so receivers can drop a duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from core.settings import NotifySettings
from core.store import OutboxRecord, Store, utcnow
from notify.errors import DeliveryError, DeliveryTimeoutError, UnexpectedDeliveryError

log = logging.getLogger(__name__)

IDLE = 10.0
"""Longest sleep of a worker with nothing due: it looks at the store at least this often."""
MIN_WAIT = 0.05
"""Shortest sleep when something is due but could not be claimed (another instance has it)."""
RECORD_DELAY = 0.05
"""Outcomes are recorded at most this often while a batch is being sent (one transaction
for all that came meanwhile). A crash loses at most the record of the last ``RECORD_DELAY``
seconds of sends; those messages are sent again, with the same Message-ID."""
PUT_CHUNK = 1000
"""Notifications stored per transaction by ``put``."""
SETTLE_TIMEOUT = 10.0
"""Bound for recording outcomes while the service stops."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification:
    """One message to one recipient over one channel, before it is queued."""

    key: str
    channel: str
    recipient: str
    subject: str = ""
    payload: Mapping[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "channel": self.channel,
            "recipient": self.recipient,
            "subject": self.subject,
            "payload": dict(self.payload),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one claimed item: sent, failed (``error``), or released untried."""

    item: OutboxRecord
    error: DeliveryError | None = None
    released: bool = False
    detail: str = ""

    @property
    def sent(self) -> bool:
        return self.error is None and not self.released


Report = Callable[[Outcome], bool]
"""Called by a channel with each outcome; ``False``: stop here (the outbox is stopping),
the items not reported yet are released."""
Listener = Callable[[Outcome], Awaitable[None]]


class Channel(Protocol):
    """A way to deliver notifications (e-mail, call, SMS)."""

    @property
    def name(self) -> str: ...

    @property
    def lease(self) -> float:
        """Seconds a claimed batch may take; the worker gives up on the rest after that."""

    @property
    def batch_size(self) -> int: ...

    @property
    def parallel(self) -> int:
        """Batches (connections) delivered at once."""

    def describe(self, item: OutboxRecord) -> str:
        """A short line naming the notification, for the audit log."""

    async def deliver(self, items: Sequence[OutboxRecord], report: Report) -> None:
        """Deliver ``items`` in order, calling ``report`` once per item as soon as its fate
        is known, and returning when it answers ``False``. Items not reported when this
        returns or raises count as released."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """When to try again after a transient failure: ``base`` doubled per failed attempt,
    at most ``cap``, with a little jitter; after ``max_attempts`` attempts, give up."""

    base: float
    cap: float
    max_attempts: int
    jitter: float = 0.1

    @classmethod
    def from_settings(cls, settings: NotifySettings) -> Backoff:
        return cls(
            base=settings.retry_base, cap=settings.retry_max, max_attempts=settings.max_attempts
        )

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 = the first)."""
        raw = min(self.cap, self.base * 2.0 ** max(0, attempts - 1))
        spread = raw * self.jitter
        return max(0.0, raw + random.uniform(-spread, spread))  # noqa: S311  (jitter, not crypto)


class Outbox:
    """Queues notifications durably and runs one delivery worker per channel (``run``)."""

    def __init__(
        self,
        store: Store,
        channels: Sequence[Channel],
        backoff: Backoff,
        *,
        idle: float = IDLE,
        actor: str = "notify",
    ) -> None:
        self.store = store
        self.channels = {c.name: c for c in channels}
        self.backoff = backoff
        self.idle = idle
        self.actor = actor
        self._wakes = {name: asyncio.Event() for name in self.channels}
        self._listeners: list[Listener] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopped.set()

    def listen(self, listener: Listener) -> None:
        """``listener(outcome)`` is awaited after each outcome has been recorded."""
        self._listeners.append(listener)

    async def put(self, *notifications: Notification) -> list[str]:
        """Store notifications (before anything is sent) and wake their workers.

        Returns the keys newly queued; a key queued before is left alone (idempotency).
        """
        for note in notifications:
            if note.channel not in self.channels:
                raise ValueError(f"no outbox channel {note.channel!r}")
        fresh: list[str] = []
        for start in range(0, len(notifications), PUT_CHUNK):
            chunk = notifications[start : start + PUT_CHUNK]
            fresh += await self.store.enqueue_many([n.row() for n in chunk])
            for name in {n.channel for n in chunk}:
                self._wakes[name].set()  # the first chunk is on its way while the rest is put
        return fresh

    def wake(self, channel: str | None = None) -> None:
        for name, event in self._wakes.items():
            if channel is None or name == channel:
                event.set()

    async def run(self) -> None:
        """Deliver until stopped (``stop``) or cancelled: one worker task per channel."""
        self._stopping.clear()
        self._stopped.clear()
        try:
            async with asyncio.TaskGroup() as group:
                for channel in self.channels.values():
                    group.create_task(self._worker(channel), name=f"outbox:{channel.name}")
        finally:
            self._stopped.set()

    async def stop(self, grace: float) -> bool:
        """Stop taking work: a message being sent is finished and recorded, the rest of its
        batch released; waits up to ``grace`` seconds. ``True`` when the workers ended."""
        self._stopping.set()
        self.wake()
        try:
            async with asyncio.timeout(grace):
                await self._stopped.wait()
        except TimeoutError:
            return False
        return True

    # -- worker ------------------------------------------------------------------------

    async def _worker(self, channel: Channel) -> None:
        """Claim due batches and deliver them, up to ``channel.parallel`` at once; one
        recorder writes the outcomes of all of them."""
        recorder = _Recorder(self, channel)
        async with asyncio.TaskGroup() as outer:
            outer.create_task(recorder.run(), name=f"outbox:{channel.name}:rec")
            try:
                await self._claim_loop(channel, recorder)
            finally:
                recorder.close()  # ends when the last outcome is written

    async def _claim_loop(self, channel: Channel, recorder: _Recorder) -> None:
        wake = self._wakes[channel.name]
        slots = asyncio.Semaphore(max(1, channel.parallel))
        async with asyncio.TaskGroup() as group:
            while not self._stopping.is_set():
                await slots.acquire()
                wake.clear()
                delay = self.idle
                batch: list[OutboxRecord] = []
                try:
                    now = utcnow()
                    batch = await self.store.claim_outbox(
                        channel=channel.name,
                        now=now,
                        lease_until=now + timedelta(seconds=channel.lease),
                        limit=channel.batch_size,
                    )
                    if not batch:
                        due = await self.store.next_outbox_due(channel=channel.name)
                        if due is not None:
                            delay = min(self.idle, max(MIN_WAIT, (due - utcnow()).total_seconds()))
                except Exception:
                    log.exception("outbox %s: delivery round failed; trying again", channel.name)
                    delay = min(self.idle, 1.0)
                if batch:
                    group.create_task(
                        self._deliver_in_slot(channel, recorder, batch, slots),
                        name=f"outbox:{channel.name}:batch",
                    )
                    continue
                slots.release()
                try:
                    async with asyncio.timeout(delay):
                        await wake.wait()
                except TimeoutError:
                    pass

    async def _deliver_in_slot(
        self,
        channel: Channel,
        recorder: _Recorder,
        batch: Sequence[OutboxRecord],
        slots: asyncio.Semaphore,
    ) -> None:
        """Deliver a batch; its slot is free for the next batch (claim, connection) as soon
        as the channel is done with this one, while the last outcomes are still recorded."""
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed = True
                slots.release()

        try:
            await self._deliver(channel, recorder, batch, free)
        except Exception:
            log.exception("outbox %s: a batch of %d failed unexpectedly", channel.name, len(batch))
        finally:
            free()

    async def _deliver(
        self,
        channel: Channel,
        recorder: _Recorder,
        batch: Sequence[OutboxRecord],
        sent: Callable[[], None],
    ) -> None:
        """Let the channel send the batch while the recorder writes outcomes as they come;
        ``sent()`` is called when the channel has returned. Listeners are told once the
        batch's outcomes are written."""
        run = _Batch(batch, recorder=recorder, stopping=self._stopping, sent=sent)
        try:
            await self._send(channel, run)
            await run.recorded.wait()
        finally:
            await run.detach()
            # reported but not recorded (stopping, or a store error), and never tried
            left = [o for o in run.history if o.item.id not in run.settled]
            left += [Outcome(item=i, released=True) for i in batch if i.id not in run.seen]
            if left:
                await self._settle_shielded(channel, left)
        await self._tell(channel, run.history)

    async def _send(self, channel: Channel, run: _Batch) -> None:
        bound = channel.lease * 0.9
        try:
            async with asyncio.timeout(bound):
                await channel.deliver(run.items, run.report)
        except TimeoutError:
            log.warning(
                "outbox %s: batch of %d took longer than %.0fs; the rest is retried",
                channel.name,
                len(run.items),
                bound,
            )
            run.fail_first_unreported(DeliveryTimeoutError("the batch", bound))
        except Exception as exc:
            log.exception("outbox %s: delivery failed unexpectedly", channel.name)
            run.fail_first_unreported(UnexpectedDeliveryError(exc))
        finally:
            run.finish()
            run.sent()

    async def _settle_shielded(self, channel: Channel, outcomes: list[Outcome]) -> None:
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await asyncio.shield(self._settle(channel, outcomes))
        except (TimeoutError, asyncio.CancelledError) as exc:
            log.warning(
                "outbox %s: %d outcome(s) not recorded in time; those items are sent again "
                "once their lease of %.0fs has run out",
                channel.name,
                len(outcomes),
                channel.lease,
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:
            log.exception("outbox %s: outcomes not recorded", channel.name)

    async def _tell(self, channel: Channel, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            for listener in self._listeners:
                try:
                    await listener(outcome)
                except Exception:
                    log.exception("outbox %s: a listener failed", channel.name)

    async def _settle(self, channel: Channel, outcomes: Sequence[Outcome]) -> None:
        now = utcnow()
        results: list[dict[str, Any]] = []
        audits: list[dict[str, Any]] = []
        for outcome in outcomes:
            item = outcome.item
            target = item.payload.get("target")
            what = channel.describe(item)
            if outcome.released:
                results.append(
                    {"id": item.id, "status": "pending", "attempted": False, "retry_at": now}
                )
                continue
            if outcome.error is None:
                results.append({"id": item.id, "status": "sent"})
                extra = f" ({outcome.detail})" if outcome.detail else ""
                audits.append(self._audit("notification sent", target, f"{what}{extra}"))
                continue
            attempt = item.attempts + 1
            error = str(outcome.error)
            if outcome.error.transient and attempt < self.backoff.max_attempts:
                delay = self.backoff.delay(attempt)
                results.append(
                    {
                        "id": item.id,
                        "status": "pending",
                        "error": error,
                        "retry_at": now + timedelta(seconds=delay),
                    }
                )
                log.warning(
                    "%s: attempt %d of %d failed: %s; next attempt in %.1fs",
                    what,
                    attempt,
                    self.backoff.max_attempts,
                    error,
                    delay,
                )
                continue
            if outcome.error.transient:
                error = f"gave up after {attempt} attempts; last error: {error}"
            results.append({"id": item.id, "status": "failed", "error": error})
            audits.append(self._audit("notification failed", target, f"{what}: {error}"))
            log.warning("%s failed for good: %s", what, error)
        await self.store.settle_outbox(results, audits)

    def _audit(self, action: str, target: Any, detail: str) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "source": "system",
            "action": action,
            "target": None if target is None else str(target)[:128],
            "detail": detail,
        }


class _Recorder:
    """Writes the outcomes of a channel's batches: all that came within ``RECORD_DELAY``
    in one transaction, at once when a batch has ended (its listeners wait for it)."""

    def __init__(self, outbox: Outbox, channel: Channel) -> None:
        self._outbox = outbox
        self._channel = channel
        self._pending: list[tuple[_Batch, Outcome]] = []
        self._more = asyncio.Event()
        self._now = asyncio.Event()
        self._closing = False

    def add(self, batch: _Batch, outcome: Outcome) -> None:
        self._pending.append((batch, outcome))
        self._more.set()

    def withdraw(self, batch: _Batch) -> None:
        """Drop the batch's outcomes not written yet (the batch writes them itself)."""
        self._pending = [entry for entry in self._pending if entry[0] is not batch]

    def flush(self) -> None:
        """Write what is pending without waiting for more (a batch has ended)."""
        self._now.set()
        self._more.set()

    def close(self) -> None:
        """No batch is left: write what is pending, then ``run`` returns."""
        self._closing = True
        self.flush()

    async def run(self) -> None:
        while True:
            await self._more.wait()
            if not self._now.is_set():
                # group commit: outcomes of the next few messages join this write
                try:
                    async with asyncio.timeout(RECORD_DELAY):
                        await self._now.wait()
                except TimeoutError:
                    pass
            self._more.clear()
            self._now.clear()
            chunk, self._pending = self._pending, []
            if chunk:
                await self._write(chunk)
            if self._pending:
                self._more.set()  # came in while writing: the next write, after the delay
            elif self._closing:
                return

    async def _write(self, chunk: list[tuple[_Batch, Outcome]]) -> None:
        batches = list({id(batch): batch for batch, _ in chunk}.values())
        for batch in batches:
            batch.writing += 1
            batch.idle.clear()
        try:
            await self._outbox._settle(self._channel, [outcome for _, outcome in chunk])
        except Exception:
            # each batch writes what is left itself when it ends
            log.exception("outbox %s: outcomes not recorded", self._channel.name)
            for batch in batches:
                self.withdraw(batch)
                batch.detached = True
                batch.recorded.set()
            return
        finally:
            for batch in batches:
                batch.writing -= 1
                if not batch.writing:
                    batch.idle.set()
        for batch, outcome in chunk:
            batch.settled.add(outcome.item.id)
        for batch in batches:
            batch.check_recorded()


class _Batch:
    """The state of one claimed batch while it is sent and recorded."""

    def __init__(
        self,
        items: Sequence[OutboxRecord],
        *,
        recorder: _Recorder,
        stopping: asyncio.Event,
        sent: Callable[[], None],
    ) -> None:
        self.items = items
        self.sent = sent
        self.history: list[Outcome] = []
        self.settled: set[int] = set()
        self.seen: set[int] = set()
        self.finished = False
        self.recorded = asyncio.Event()
        """Set when the batch has ended and every outcome reported is written (or the
        writing failed)."""
        self.detached = False
        """The recorder no longer takes this batch's outcomes (they are written when it
        ends, by ``Outbox._deliver``)."""
        self.writing = 0
        self.idle = asyncio.Event()
        """Set while the recorder is not writing outcomes of this batch."""
        self.idle.set()
        self._recorder = recorder
        self._stopping = stopping

    def report(self, outcome: Outcome) -> bool:
        if outcome.item.id not in self.seen:
            self.seen.add(outcome.item.id)
            self.history.append(outcome)
            if not self.detached:
                self._recorder.add(self, outcome)
        return not self._stopping.is_set()

    async def detach(self) -> None:
        """Take the batch's outcomes back from the recorder: the ones not written yet are
        withdrawn, and a write under way is waited for (bounded), so that no outcome is
        written twice."""
        self.detached = True
        self._recorder.withdraw(self)
        if not self.idle.is_set():
            try:
                async with asyncio.timeout(SETTLE_TIMEOUT):
                    await self.idle.wait()
            except TimeoutError:
                log.warning("outbox: outcomes still being written after %.0fs", SETTLE_TIMEOUT)

    def finish(self) -> None:
        self.finished = True
        self._recorder.flush()
        self.check_recorded()

    def check_recorded(self) -> None:
        if self.finished and len(self.settled) == len(self.history):
            self.recorded.set()

    def fail_first_unreported(self, error: DeliveryError) -> None:
        """The item in flight when a batch broke off gets the failure; the rest is released."""
        for item in self.items:
            if item.id not in self.seen:
                self.report(Outcome(item=item, error=error))
                return
