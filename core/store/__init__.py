"""The durable store: every state change of the lifecycle is written here first.

One import for the rest of tgops: ``from core.store import Store, NodeRecord, ...``.

- ``base``: the engine (SQLAlchemy 2 asyncio; SQLite by default, PostgreSQL when
  configured), migrations at start-up, transactions.
- one module per aggregate, each a small class over ``base``: ``nodes``, ``runs`` (runs
  and their steps), ``audit``, ``maintenance``, ``schedules``, ``hotfixes`` (selections,
  announcements, escalations), ``slots`` (cluster slots and their queue), ``outbox``, ``kv``;
  ``store`` puts them together as ``Store``.
- ``records``: the frozen records the store returns.
- ``readonly``: the store opened read-only (the Nagios check reads it while tgops runs).
- ``tables`` (SQLAlchemy Core schema) and ``migrations/`` (Alembic).

May import: ``core.errors`` and third-party libraries only.
"""

from core.store.base import (
    ACTIVE_RUN_STATES,
    NodeBusyError,
    StoreBase,
    StoreUnavailableError,
    utcnow,
)
from core.store.journal import NodeChange, RunChange
from core.store.readonly import ReadOnlyStore, StoreUnreadableError
from core.store.records import (
    AuditRecord,
    MaintenanceRecord,
    NewRun,
    NodeRecord,
    OutboxRecord,
    RunEnd,
    RunRecord,
    ScheduleRecord,
    SlotFingerprint,
    SlotRecord,
    SlotRelease,
    StepRecord,
)
from core.store.store import Store

__all__ = [
    "ACTIVE_RUN_STATES",
    "AuditRecord",
    "MaintenanceRecord",
    "NewRun",
    "NodeBusyError",
    "NodeChange",
    "NodeRecord",
    "OutboxRecord",
    "ReadOnlyStore",
    "RunChange",
    "RunEnd",
    "RunRecord",
    "ScheduleRecord",
    "SlotFingerprint",
    "SlotRecord",
    "SlotRelease",
    "StepRecord",
    "Store",
    "StoreBase",
    "StoreUnavailableError",
    "StoreUnreadableError",
    "utcnow",
]
