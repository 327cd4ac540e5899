"""The values the store returns and takes: one frozen record per row kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEnd:
    """Whose run ended, for its audit record (``Store.finish_run``)."""

    kind: str
    node: str
    message: str = ""
    """What the run did (the detail when it ended without an error)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRun:
    """A run to create (``Store.create_runs``)."""

    kind: str
    node: str
    target: str
    actor: str
    params: Mapping[str, Any]
    owner: str | None = None
    exclusive: bool = True
    audit: str | None = None
    """Detail of the run's audit record ("run KIND"); ``{run}`` is its number. None: none."""
    audit_source: str = "system"
    slot_queue: str | None = None
    """Cluster whose slot queue the node joins with the run (in command order)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    name: str
    cluster: str | None
    driver: str
    installed: Mapping[str, str] = field(default_factory=dict)
    staged: Mapping[str, str] = field(default_factory=dict)
    sessions: int = 0
    logon_enabled: bool = True
    lb: str | None = None
    restart_required: bool = False
    update_lock_since: datetime | None = None
    update_lock_reason: str | None = None
    warning_flag_since: datetime | None = None
    warning_flag_reason: str | None = None
    hotfixes_always: bool | None = None
    optional_packages: tuple[str, ...] = ()
    active_run_id: int | None = None
    left_drained_by_run: int | None = None
    reachable: bool = True
    last_error: str | None = None
    observed_at: datetime | None = None
    """When a refresh last stored a change seen on the node (a refresh that sees none
    writes nothing)."""
    version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    id: int
    kind: str
    node: str
    target: str
    actor: str
    status: str
    step: str | None
    progress_done: int
    progress_total: int
    params: Mapping[str, Any]
    error: str | None
    owner: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    run_id: int
    name: str
    status: str
    detail: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    source: str
    action: str
    target: str | None
    detail: str
    run_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceRecord:
    id: int
    node: str
    start: datetime
    reason: str
    origin: str
    disable_logon: bool
    created_by: str
    created_at: datetime
    last_notice_at: datetime | None
    logon_disabled_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    ended_by: str | None
    end_reason: str | None
    uid: str | None = None
    """The window's calendar UID (a UUID)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRecord:
    node: str
    kind: str
    days: str
    start: str
    end: str | None
    enabled: bool
    updated_by: str
    updated_at: datetime
    uid: str | None = None
    """The schedule's calendar UID (a UUID; kept when the schedule changes)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotRecord:
    cluster: str
    slot: int
    node: str
    run_id: int | None
    owner: str | None
    taken_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRecord:
    id: int
    key: str
    channel: str
    recipient: str
    subject: str
    payload: Mapping[str, Any]
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    transmitting: bool = False
    """Its transmission may have begun (an e-mail's DATA): never sent again automatically."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotRelease:
    """What freeing a node's slot did: whether it held one, and the node of the cluster's
    queue it was handed to (with that node's former place in the queue), if any."""

    released: bool
    slot: int | None = None
    to: str | None = None
    place: int | None = None

    def __bool__(self) -> bool:
        return self.released


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotFingerprint:
    """What a cluster's slots and queue look like, in three numbers: any slot taken or
    freed and any node joining or leaving the queue changes it."""

    held: int
    queued: int
    places: int


def node_record(row: Any) -> NodeRecord:
    """A node's row as its record (JSON columns as plain dicts and tuples)."""
    data = dict(row._mapping)
    data["optional_packages"] = tuple(data.get("optional_packages") or ())
    data["installed"] = dict(data.get("installed") or {})
    data["staged"] = dict(data.get("staged") or {})
    return NodeRecord(**data)
