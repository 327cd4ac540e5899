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
  pending again at once, no attempt counted;
* uncertain (its transmission had begun, e.g. an e-mail's DATA, when it broke off):
  status ``uncertain`` and an audit record "delivery uncertain"; never sent again.

Before a channel starts the transmission of an item (``begin``: an e-mail's DATA), the
item is marked ``transmitting`` in the store. Markers are written ahead (``MARK_AHEAD``
items of a batch, the first ones while the server answers the first message's envelope,
the next ones while it answers earlier messages, and topped up by any write for another
batch), in the recorder's transactions, so they cost no waiting. An item marked
``transmitting`` is never sent again automatically: after a crash (``recover``, or its
lease running out on a store several instances share) it becomes
``uncertain``, is audited as "delivery uncertain" and the listeners are told (the notifier
alerts the admins). A crash therefore leaves uncertain: the messages under way, those
sent whose outcome was not written yet, and at most ``MARK_AHEAD`` marked ahead per batch.

The worker sleeps until it is woken or the next item is due (at most ``idle`` seconds,
the bounded look for retries). Items survive restarts; a sender killed mid-batch leaves
its claim to expire after the lease (a service on SQLite, which one instance owns,
releases it when it starts again), then the items not marked ``transmitting`` are sent
(they never reached the point of no return).

It is over 600 lines on purpose: the claim loop, the per-channel workers, the outcome
recorder and the recovery after a crash share one lease and marker protocol; kept in one
module, its at-most-once and at-least-once rules are read together.
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
from notify.errors import (
    DeliveryError,
    DeliveryTimeoutError,
    DeliveryUncertainError,
    MarkerNotRecordedError,
    UnexpectedDeliveryError,
)

log = logging.getLogger(__name__)

IDLE = 10.0
"""Longest sleep of a worker with nothing due: it looks at the store at least this often."""
MIN_WAIT = 0.05
"""Shortest sleep when something is due but could not be claimed (another instance has it)."""
RECORD_DELAY = 0.05
"""Outcomes are recorded at most this often while a batch is being sent (one transaction
for all that came meanwhile). A crash loses at most the record of the last ``RECORD_DELAY``
seconds of sends; those messages are sent again, with the same Message-ID."""
PUT_CHUNK = 200
"""Notifications stored per transaction by ``put``. Each chunk holds the event loop while
its rows are made and bound (3 to 5 ms for 200; 15 to 19 ms for the 1,000 of before), so
that the deliveries already under way, which need the loop for every SMTP reply, go on
between the chunks of a large announcement (bench/RESULTS.md, "Twenty-fifth pass")."""
SETTLE_TIMEOUT = 10.0
"""Bound for recording outcomes while the service stops."""
MARK_AHEAD = 20
"""Items of a batch marked ``transmitting`` ahead of the one being sent (written when
``MARK_AGAIN`` or fewer are left, and topped up whenever the recorder writes): the
marker of a message is durable before its turn without a wait, and
a crash leaves at most this many per batch marked that had not begun."""
MARK_AGAIN = 5
"""A batch's markers are written again when this many or fewer items from the one being
sent on are marked: one write per 15 messages of a connection (every write is a
transaction, about 0.2 ms of the outbox's CPU on SQLite: with one per 10 messages, 10,000
e-mails over one connection without PIPELINING took 9.37 instead of 8.44 s, bench/RESULTS.md,
"Twenty-fourth pass"), while the 5 messages left give the write time to be durable before
the first of them needs its marker."""
CRASHED = "the service stopped while it was being transmitted; the server may have taken it"
"""Why an item found ``transmitting`` after a crash is uncertain."""


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
    uncertain: bool = False
    """The transmission had begun when it broke off (``error`` says how): not sent again."""
    detail: str = ""

    @property
    def sent(self) -> bool:
        return self.error is None and not self.released and not self.uncertain


Report = Callable[[Outcome], bool]
"""Called by a channel with each outcome; ``False``: stop here (the outbox is stopping),
the items not reported yet are released."""
Listener = Callable[[Outcome], Awaitable[None]]
Begin = Callable[[OutboxRecord], Awaitable[None]]
"""Awaited by a channel right before the point of no return of an item (an e-mail's
DATA): returns once the store says the item is ``transmitting``; raises
``MarkerNotRecordedError`` when it could not record that (then do not transmit)."""


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

    async def deliver(self, items: Sequence[OutboxRecord], report: Report, begin: Begin) -> None:
        """Deliver ``items`` in order, calling ``report`` once per item as soon as its fate
        is known, and returning when it answers ``False``. A channel that must not repeat
        an item whose transmission had begun awaits ``begin(item)`` right before that
        point. Items not reported when this returns or raises count as released, or as
        uncertain when ``begin`` had returned for them."""


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

    async def recover(self, *, single_instance: bool) -> tuple[int, int]:
        """At start: items left ``transmitting`` by a crash become ``uncertain`` (audited,
        listeners told), and with ``single_instance`` (SQLite: nobody else sends them) the
        items left ``sending`` are due at once. (released, uncertain)"""
        now = utcnow()
        released = await self.store.release_outbox(now=now) if single_instance else 0
        found = await self.store.transmitting_outbox(now=None if single_instance else now)
        uncertain = await self._make_uncertain(found)
        return released, uncertain

    async def _make_uncertain(self, items: Sequence[OutboxRecord]) -> int:
        """Settle items found ``transmitting`` with no sender left as uncertain."""
        items = [i for i in items if i.channel in self.channels]
        if not items:
            return 0
        audits = {
            i.id: self._audit(
                "delivery uncertain",
                i.payload.get("target"),
                f"{self.channels[i.channel].describe(i)}: {CRASHED}; not sent again",
            )
            for i in items
        }
        done = set(await self.store.settle_uncertain(audits, error=CRASHED))
        for item in items:
            if item.id in done:
                log.warning(
                    "%s: delivery uncertain (%s); not sent again",
                    self.channels[item.channel].describe(item),
                    CRASHED,
                )
        outcomes = [
            Outcome(item=i, uncertain=True, error=DeliveryUncertainError(CRASHED))
            for i in items
            if i.id in done
        ]
        for name in {o.item.channel for o in outcomes}:
            await self._tell(self.channels[name], [o for o in outcomes if o.item.channel == name])
        return len(outcomes)

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
        swept = asyncio.get_running_loop().time()
        async with asyncio.TaskGroup() as group:
            while not self._stopping.is_set():
                await slots.acquire()
                if self._stopping.is_set():  # began while a batch had every slot
                    slots.release()
                    break
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
                    if not batch and asyncio.get_running_loop().time() - swept >= self.idle:
                        # another instance died while transmitting: its lease has run out
                        swept = asyncio.get_running_loop().time()
                        await self._make_uncertain(
                            await self.store.transmitting_outbox(channel=channel.name, now=now)
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
            left += [run.untried(i) for i in batch if i.id not in run.seen]
            if left:
                await self._settle_shielded(channel, left)
        await self._tell(channel, run.history)

    async def _send(self, channel: Channel, run: _Batch) -> None:
        bound = channel.lease * 0.9
        try:
            async with asyncio.timeout(bound):
                await channel.deliver(run.items, run.report, run.begin)
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

    async def _settle(
        self, channel: Channel, outcomes: Sequence[Outcome], marks: Sequence[int] = ()
    ) -> None:
        """Write outcomes, and the ``transmitting`` markers ``marks``, in one transaction."""
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
            if outcome.uncertain:
                error = str(outcome.error) if outcome.error is not None else CRASHED
                results.append({"id": item.id, "status": "uncertain", "error": error})
                audits.append(self._audit("delivery uncertain", target, f"{what}: {error}"))
                log.warning("%s: %s", what, error)
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
        await self.store.settle_outbox(results, audits, transmitting=marks)

    def _audit(self, action: str, target: Any, detail: str) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "source": "system",
            "action": action,
            "target": None if target is None else str(target)[:128],
            "detail": detail,
        }


class _Marks:
    """``transmitting`` markers requested for the items of a batch before ``upto``."""

    def __init__(self, ids: list[int], upto: int) -> None:
        self.ids = ids
        self.upto = upto
        self.done = asyncio.Event()
        self.error: str | None = None

    def settle(self, error: str | None) -> None:
        self.error = error
        self.done.set()


class _Recorder:
    """Writes the outcomes of a channel's batches: all that came within ``RECORD_DELAY``
    in one transaction, at once when a batch has ended (its listeners wait for it), and
    the ``transmitting`` markers at once (with the outcomes that came meanwhile). Each
    write also tops up the markers of every batch being sent, so that batches sent at
    once share their marker writes instead of each writing its own."""

    def __init__(self, outbox: Outbox, channel: Channel) -> None:
        self._outbox = outbox
        self._channel = channel
        self._pending: list[tuple[_Batch, Outcome]] = []
        self._marks: list[tuple[_Batch, _Marks]] = []
        self.sending: set[_Batch] = set()
        """Batches whose items are being sent (``_Batch.begin`` called, not detached)."""
        self._more = asyncio.Event()
        self._now = asyncio.Event()
        self._closing = False

    def add(self, batch: _Batch, outcome: Outcome) -> None:
        self._pending.append((batch, outcome))
        self._more.set()

    def mark(self, batch: _Batch, marks: _Marks) -> None:
        self._marks.append((batch, marks))
        self.flush()

    def withdraw(self, batch: _Batch) -> None:
        """Drop the batch's outcomes and markers not written yet (the batch writes its
        outcomes itself; markers are no longer needed)."""
        self._pending = [entry for entry in self._pending if entry[0] is not batch]
        self.sending.discard(batch)
        for owner, marks in self._marks:
            if owner is batch:
                marks.settle("the batch has ended")
        self._marks = [entry for entry in self._marks if entry[0] is not batch]

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
            if chunk or self._marks:
                for batch in list(self.sending):
                    if (topped := batch.top_up()) is not None:
                        self._marks.append((batch, topped))
            marks, self._marks = self._marks, []
            if chunk or marks:
                await self._write(chunk, marks)
            if self._marks:
                self._now.set()
            if self._pending or self._marks:
                self._more.set()  # came in while writing: the next write, after the delay
            elif self._closing:
                return

    async def _write(
        self, chunk: list[tuple[_Batch, Outcome]], marks: list[tuple[_Batch, _Marks]]
    ) -> None:
        batches = list({id(batch): batch for batch, _ in chunk + marks}.values())
        for batch in batches:
            batch.writing += 1
            batch.idle.clear()
        try:
            await self._outbox._settle(
                self._channel,
                [outcome for _, outcome in chunk],
                [i for _, m in marks for i in m.ids],
            )
        except Exception as exc:
            # each batch writes what is left itself when it ends
            log.exception("outbox %s: outcomes not recorded", self._channel.name)
            for _, m in marks:
                m.settle(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
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
        for _, m in marks:
            m.settle(None)
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
        self._index = {item.id: n for n, item in enumerate(items)}
        self._requested = 0
        """``items[:_requested]`` have their ``transmitting`` marker requested."""
        self._position: int | None = None
        """The item whose ``begin`` came last (None: none yet)."""
        self._marks: list[_Marks] = []
        self.begun: set[int] = set()
        """Items whose transmission may have begun (``begin`` returned for them)."""

    def mark_ahead(self, position: int) -> None:
        """Request markers up to ``MARK_AHEAD`` items past ``position`` when at most
        ``MARK_AGAIN`` from ``position`` on are requested already."""
        if self.detached or self._requested >= len(self.items):
            return
        if self._requested - position > MARK_AGAIN:
            return
        self._recorder.mark(self, self._request(position))

    def top_up(self) -> _Marks | None:
        """Markers up to ``MARK_AHEAD`` items past the item being sent that are not
        requested yet, for a write the recorder makes anyway (none before the batch's
        first ``begin``: its connection may not come)."""
        position = self._position
        if self.detached or position is None or self._requested >= len(self.items):
            return None
        if self._requested >= position + MARK_AHEAD:
            return None
        return self._request(position)

    def _request(self, position: int) -> _Marks:
        end = min(len(self.items), position + MARK_AHEAD)
        marks = _Marks([i.id for i in self.items[self._requested : end]], end)
        self._requested = end
        self._marks.append(marks)
        return marks

    def begin(self, item: OutboxRecord) -> asyncio.Future[None]:
        """``Begin`` for this batch: done at once when the item's marker is written
        already (the common case: markers are written ahead), otherwise once it is."""
        position = self._index[item.id]
        if self._position is None and not self.detached:
            self._recorder.sending.add(self)
        self._position = position
        self.mark_ahead(position)
        marks = next((m for m in self._marks if m.upto > position), None)
        if marks is None:
            return _failed(MarkerNotRecordedError("an earlier write to the store failed"))
        if not marks.done.is_set():
            return asyncio.ensure_future(self._begin_later(item, marks))
        if marks.error is not None:
            return _failed(MarkerNotRecordedError(marks.error))
        self.begun.add(item.id)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def _begin_later(self, item: OutboxRecord, marks: _Marks) -> None:
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await marks.done.wait()
        except TimeoutError:
            raise MarkerNotRecordedError(f"no answer within {SETTLE_TIMEOUT:.0f}s") from None
        if marks.error is not None:
            raise MarkerNotRecordedError(marks.error)
        self.begun.add(item.id)

    def untried(self, item: OutboxRecord) -> Outcome:
        """The outcome of an item the channel did not report: released, or uncertain
        when its transmission may have begun."""
        if item.id in self.begun:
            error = DeliveryUncertainError("the transmission broke off")
            return Outcome(item=item, uncertain=True, error=error)
        return Outcome(item=item, released=True)

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
        self._recorder.sending.discard(self)
        self._recorder.flush()
        self.check_recorded()

    def check_recorded(self) -> None:
        if self.finished and len(self.settled) == len(self.history):
            self.recorded.set()

    def fail_first_unreported(self, error: DeliveryError) -> None:
        """The item in flight when a batch broke off gets the failure; the rest is released."""
        for item in self.items:
            if item.id not in self.seen:
                if item.id in self.begun:
                    uncertain = DeliveryUncertainError(str(error))
                    self.report(Outcome(item=item, uncertain=True, error=uncertain))
                else:
                    self.report(Outcome(item=item, error=error))
                return


def _failed(error: BaseException) -> asyncio.Future[None]:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future
