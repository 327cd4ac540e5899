"""The store's schema (SQLAlchemy Core). The Alembic migrations in ``migrations/`` create it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def stored_utc(value: datetime) -> datetime:
    """``value`` as the store keeps it: in UTC; a naive datetime is refused."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store; use an aware UTC datetime")
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = stored_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def new_uid() -> str:
    """A calendar UID (RFC 5545, a UUID as RFC 7986 recommends): random, so it stays
    unique when a store is reset and ids start again."""
    return str(uuid.uuid4())


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Id = BigInteger().with_variant(Integer(), "sqlite")

nodes = Table(
    "nodes",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("cluster", String(128), nullable=True),
    Column("driver", String(32), nullable=False),
    Column("installed", JSON, nullable=False, default=dict),
    Column("staged", JSON, nullable=False, default=dict),
    Column("sessions", Integer, nullable=False, default=0),
    Column("logon_enabled", Boolean, nullable=False, default=True),
    Column("lb", String(16), nullable=True),
    Column("restart_required", Boolean, nullable=False, default=False),
    Column("update_lock_since", UTCDateTime, nullable=True),
    Column("update_lock_reason", Text, nullable=True),
    Column("warning_flag_since", UTCDateTime, nullable=True),
    Column("warning_flag_reason", Text, nullable=True),
    Column("hotfixes_always", Boolean, nullable=True),
    Column("optional_packages", JSON, nullable=False, default=list),
    Column("active_run_id", Id, nullable=True),
    Column("left_drained_by_run", Id, nullable=True),
    Column("reachable", Boolean, nullable=False, default=True),
    Column("last_error", Text, nullable=True),
    Column("observed_at", UTCDateTime, nullable=True),
    Column("version", Integer, nullable=False, default=0),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("node", String(128), nullable=False),
    Column("target", String(128), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("status", String(16), nullable=False),  # queued running succeeded failed skipped
    # the step it is at: read from run_steps (its latest row), written here when it ends
    Column("step", String(64), nullable=True),
    Column("progress_done", BigInteger, nullable=False, default=0),
    Column("progress_total", BigInteger, nullable=False, default=0),
    Column("params", JSON, nullable=False, default=dict),
    Column("error", Text, nullable=True),
    Column("owner", String(128), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Index("ix_runs_status", "status"),
    Index("ix_runs_node", "node"),
)

run_steps = Table(
    "run_steps",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", Id, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # running done failed skipped
    Column("detail", Text, nullable=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Index("ix_run_steps_run", "run_id", "id"),  # a run's steps in order (0005)
)

audit = Table(
    "audit",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("source", String(32), nullable=False),  # slack api cli system
    Column("action", String(64), nullable=False),
    Column("target", String(128), nullable=True),
    Column("detail", Text, nullable=False, default=""),
    Column("run_id", Id, nullable=True),
    Index("ix_audit_target", "target"),
)

schedules = Table(
    "schedules",
    metadata,
    Column("node", String(128), primary_key=True),
    Column("kind", String(16), primary_key=True),  # download update
    Column("days", String(64), nullable=False),
    Column("start", String(8), nullable=False),
    Column("end", String(8), nullable=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("updated_by", String(256), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("uid", String(36), nullable=True, default=new_uid),  # the calendar event's UID
)

maintenance = Table(
    "maintenance",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("node", String(128), nullable=False),
    Column("start", UTCDateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("origin", String(32), nullable=False),  # manual scheduled-update download-failure
    Column("disable_logon", Boolean, nullable=False, default=False),
    Column("created_by", String(256), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_notice_at", UTCDateTime, nullable=True),
    Column("logon_disabled_at", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),  # MaintenanceStarted published
    Column("ended_at", UTCDateTime, nullable=True),
    Column("ended_by", String(256), nullable=True),
    Column("end_reason", Text, nullable=True),
    Column("uid", String(36), nullable=True, default=new_uid),  # the calendar event's UID
    Index("ix_maintenance_node_open", "node", "ended_at"),
    # the open windows (ended_at IS NULL) and those ended since a time (0006): the table
    # keeps every window ever opened
    Index("ix_maintenance_ended", "ended_at"),
)

hotfix_selections = Table(
    "hotfix_selections",
    metadata,
    Column("node", String(128), primary_key=True),
    Column("hotfix_id", String(128), primary_key=True),
    Column("selected_by", String(256), nullable=False),
    Column("selected_at", UTCDateTime, nullable=False),
)

cluster_slots = Table(
    "cluster_slots",
    metadata,
    Column("cluster", String(128), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("node", String(128), nullable=False),
    Column("run_id", Id, nullable=True),
    Column("owner", String(128), nullable=True),
    Column("taken_at", UTCDateTime, nullable=False),
    UniqueConstraint("cluster", "node", name="uq_cluster_slots_cluster_node"),
)

slot_waiters = Table(
    "slot_waiters",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("cluster", String(128), nullable=False),
    Column("node", String(128), nullable=False),
    Column("run_id", Id, nullable=True),
    Column("queued_at", UTCDateTime, nullable=False),
    UniqueConstraint("cluster", "node", name="uq_slot_waiters_cluster_node"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("key", String(512), nullable=False, unique=True),
    Column("channel", String(16), nullable=False),  # email call sms slack
    Column("recipient", String(256), nullable=False),
    Column("subject", Text, nullable=False, default=""),
    Column("payload", JSON, nullable=False, default=dict),
    Column(
        "status", String(16), nullable=False
    ),  # pending sending transmitting sent failed uncertain
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime, nullable=True),
    # sending and its transmission (an e-mail's DATA) may have begun: never sent again
    Column("transmitting", Boolean, nullable=False, default=False, server_default=false()),
    # the due items of a channel in the order a claim takes them (0008)
    Index("ix_outbox_claim", "status", "channel", "next_attempt_at", "id"),
)

announced_hotfixes = Table(
    "announced_hotfixes",
    metadata,
    Column("hotfix_id", String(128), primary_key=True),
    Column("channel", String(64), nullable=False),
    Column("urgency", String(16), nullable=False),
    Column("announced_at", UTCDateTime, nullable=False),
)

escalations = Table(
    "escalations",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("hotfix_id", String(128), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # running acknowledged exhausted
    Column("round", Integer, nullable=False, default=0),
    Column("position", Integer, nullable=False, default=0),
    Column("call_sid", String(64), nullable=True),
    Column("acknowledged_by", String(256), nullable=True),
    Column("acknowledged_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

kv = Table(
    "kv",
    metadata,
    Column("namespace", String(64), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("value", JSON, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
"""Small durable records of the adapters (e.g. the Slack message of a run, call state)."""
