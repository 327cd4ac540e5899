"""``Store``: every aggregate's methods over one engine, the one object the service opens.

``async with Store(url) as store`` opens the database (SQLite by default, PostgreSQL when
configured) and migrates it to the head. Each aggregate lives in a module of its own
(``nodes``, ``runs``, ``audit``, ``maintenance``, ``schedules``, ``hotfixes``, ``slots``,
``outbox``, ``kv``) over the shared engine of ``base``.
"""

from __future__ import annotations

from core.store.audit import AuditStore
from core.store.hotfixes import HotfixesStore
from core.store.kv import KvStore
from core.store.maintenance import MaintenanceStore
from core.store.nodes import NodesStore
from core.store.outbox import OutboxStore
from core.store.runs import RunsStore
from core.store.schedules import SchedulesStore
from core.store.slots import SlotsStore


class Store(
    NodesStore,
    RunsStore,
    AuditStore,
    MaintenanceStore,
    SchedulesStore,
    HotfixesStore,
    SlotsStore,
    OutboxStore,
    KvStore,
):
    """``async with Store(url) as store``: opens the database and migrates it to the head."""
