"""Domain events and the in-process event bus that ``bot`` and ``notify`` subscribe to.

Events are values. The engine persists a change first and publishes the event after;
a subscriber that fails or is slow never blocks or breaks the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)


class _Ids:
    """Event ids: 64 random bits drawn once per process (again in a forked child) and a
    counter, 32 hex digits like a UUID's: two processes share ids only if they draw the
    same 64 bits. A counter step instead of a read of the kernel's random source per
    event (at 1,000 nodes updating, some 15 events each, every read waited for the
    interpreter's lock again afterwards)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_ids = _Ids()


def _new_id() -> str:
    return _ids.new()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every domain event. ``id`` is unique and is the outbox's idempotency root."""

    id: str = field(default_factory=_new_id)
    at: datetime = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandReceived(Event):
    actor: str
    source: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStateChanged(Event):
    """A persisted change of a node's state (lock, flag, logon, maintenance, ...)."""

    node: str
    change: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted(Event):
    run_id: int
    kind: str
    node: str
    actor: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunProgress(Event):
    run_id: int
    node: str
    step: str
    done: int = 0
    total: int = 0
    note: str = ""
    """What the step waits for, when it waits (e.g. why the gate holds the run)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStepDone(Event):
    """What one step of a run did, in a line (``drained``, ``installed tg-base 2.0``);
    the same line is in the audit log (L13)."""

    run_id: int
    node: str
    step: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFinished(Event):
    run_id: int
    kind: str
    node: str
    outcome: str
    message: str = ""
    seconds: float | None = None
    """From the run's start to its end, when the finishing process knows it (subscribers
    read the run from the store otherwise)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GateChecked(Event):
    """The gate was asked for a run on ``node``: ``result`` is clear, blocked, unreachable
    or ignored (``--ignore-alerts``)."""

    node: str
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHeld(Event):
    """A run waits at the gate (``state`` held; again when the reason changes), goes on
    (released), ends skipped after ``gate.max_wait`` (given up) or is stopped while it
    waits (cancelled)."""

    run_id: int
    kind: str
    node: str
    state: str
    since: datetime
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WarningFlagSet(Event):
    node: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateLockSet(Event):
    node: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceScheduled(Event):
    node: str
    start: datetime
    reason: str
    origin: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceStarted(Event):
    """A maintenance window's start time was reached (published once per window)."""

    node: str
    start: datetime
    reason: str
    origin: str
    logon_disabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceEnded(Event):
    node: str
    reason: str
    by: str
    start: datetime | None = None
    """The start of the window that ended (None where it is not known)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestRefused(Event):
    """A channel's signed manifest was refused (rollback, expired); ``key`` is the same for
    the same manifest and cause."""

    channel: str
    reason: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HotfixPublished(Event):
    hotfix_id: str
    package: str
    version: str
    urgency: str
    summary: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HotfixAcknowledged(Event):
    """Someone pressed 1 on an urgent-hotfix call (L14); escalation stops."""

    hotfix_id: str
    by: str
    phone: str = ""


Handler = Callable[[Event], Awaitable[None]]


class LocalEventBus:
    """Delivers every published event to every subscriber, each through its own queue.

    Use as ``async with LocalEventBus() as bus``; leaving the block delivers what is
    queued (bounded by ``drain_timeout``) and stops the delivery tasks.
    """

    def __init__(self, *, queue_size: int = 10_000, drain_timeout: float = 5.0) -> None:
        self._queue_size = queue_size
        self._drain_timeout = drain_timeout
        self._subscribers: list[tuple[str, Handler, asyncio.Queue[Event]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False

    def subscribe(self, name: str, handler: Handler) -> None:
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subscribers.append((name, handler, queue))
        if self._running:
            self._tasks.append(self._start(name, handler, queue))

    async def publish(self, event: Event) -> None:
        for name, _, queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.error(  # noqa: TRY400  (no exception to show: the queue is full)
                    "event subscriber %s is %d events behind; dropped %s",
                    name,
                    queue.qsize(),
                    type(event).__name__,
                )

    def _start(
        self, name: str, handler: Handler, queue: asyncio.Queue[Event]
    ) -> asyncio.Task[None]:
        return asyncio.create_task(self._deliver(name, handler, queue), name=f"events:{name}")

    async def _deliver(self, name: str, handler: Handler, queue: asyncio.Queue[Event]) -> None:
        while True:
            event = await queue.get()
            try:
                await handler(event)
            except Exception:
                log.exception("event subscriber %s failed on %s", name, type(event).__name__)
            finally:
                queue.task_done()

    async def __aenter__(self) -> Self:
        self._running = True
        self._tasks = [self._start(n, h, q) for n, h, q in self._subscribers]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._running = False
        try:
            async with asyncio.timeout(self._drain_timeout):
                await asyncio.shield(asyncio.gather(*(q.join() for _, _, q in self._subscribers)))
        except TimeoutError:
            log.warning("event delivery did not finish within %.0fs", self._drain_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
