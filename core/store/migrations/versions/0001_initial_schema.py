"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import core.store.tables


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "announced_hotfixes",
        sa.Column("hotfix_id", sa.String(length=128), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("urgency", sa.String(length=16), nullable=False),
        sa.Column("announced_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hotfix_id", name=op.f("pk_announced_hotfixes")),
    )
    op.create_table(
        "audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
    )
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.create_index("ix_audit_target", ["target"], unique=False)

    op.create_table(
        "cluster_slots",
        sa.Column("cluster", sa.String(length=128), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("taken_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("cluster", "slot", name=op.f("pk_cluster_slots")),
        sa.UniqueConstraint("cluster", "node", name="uq_cluster_slots_cluster_node"),
    )
    op.create_table(
        "escalations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("hotfix_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("call_sid", sa.String(length=64), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=256), nullable=True),
        sa.Column("acknowledged_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_escalations")),
        sa.UniqueConstraint("hotfix_id", name=op.f("uq_escalations_hotfix_id")),
    )
    op.create_table(
        "hotfix_selections",
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("hotfix_id", sa.String(length=128), nullable=False),
        sa.Column("selected_by", sa.String(length=256), nullable=False),
        sa.Column("selected_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node", "hotfix_id", name=op.f("pk_hotfix_selections")),
    )
    op.create_table(
        "kv",
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "key", name=op.f("pk_kv")),
    )
    op.create_table(
        "maintenance",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("start", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("origin", sa.String(length=32), nullable=False),
        sa.Column("disable_logon", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("created_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_notice_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("logon_disabled_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ended_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(length=256), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_maintenance")),
    )
    with op.batch_alter_table("maintenance", schema=None) as batch_op:
        batch_op.create_index("ix_maintenance_node_open", ["node", "ended_at"], unique=False)

    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("cluster", sa.String(length=128), nullable=True),
        sa.Column("driver", sa.String(length=32), nullable=False),
        sa.Column("installed", sa.JSON(), nullable=False),
        sa.Column("staged", sa.JSON(), nullable=False),
        sa.Column("sessions", sa.Integer(), nullable=False),
        sa.Column("logon_enabled", sa.Boolean(), nullable=False),
        sa.Column("lb", sa.String(length=16), nullable=True),
        sa.Column("restart_required", sa.Boolean(), nullable=False),
        sa.Column("update_lock_since", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("update_lock_reason", sa.Text(), nullable=True),
        sa.Column("warning_flag_since", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("warning_flag_reason", sa.Text(), nullable=True),
        sa.Column("hotfixes_always", sa.Boolean(), nullable=True),
        sa.Column("optional_packages", sa.JSON(), nullable=False),
        sa.Column(
            "active_run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "left_drained_by_run",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("reachable", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("observed_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_nodes")),
    )
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("recipient", sa.String(length=256), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("key", name=op.f("uq_outbox_key")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_due", ["status", "next_attempt_at"], unique=False)

    op.create_table(
        "runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=True),
        sa.Column("progress_done", sa.BigInteger(), nullable=False),
        sa.Column("progress_total", sa.BigInteger(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("created_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index("ix_runs_node", ["node"], unique=False)
        batch_op.create_index("ix_runs_status", ["status"], unique=False)

    op.create_table(
        "schedules",
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("days", sa.String(length=64), nullable=False),
        sa.Column("start", sa.String(length=8), nullable=False),
        sa.Column("end", sa.String(length=8), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("updated_by", sa.String(length=256), nullable=False),
        sa.Column("updated_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node", "kind", name=op.f("pk_schedules")),
    )
    op.create_table(
        "slot_waiters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("cluster", sa.String(length=128), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("queued_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slot_waiters")),
        sa.UniqueConstraint("cluster", "node", name="uq_slot_waiters_cluster_node"),
    )
    op.create_table(
        "run_steps",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("started_at", core.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", core.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_steps_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_steps")),
    )
    with op.batch_alter_table("run_steps", schema=None) as batch_op:
        batch_op.create_index("ix_run_steps_run", ["run_id"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("run_steps", schema=None) as batch_op:
        batch_op.drop_index("ix_run_steps_run")

    op.drop_table("run_steps")
    op.drop_table("slot_waiters")
    op.drop_table("schedules")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_status")
        batch_op.drop_index("ix_runs_node")

    op.drop_table("runs")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_due")

    op.drop_table("outbox")
    op.drop_table("nodes")
    with op.batch_alter_table("maintenance", schema=None) as batch_op:
        batch_op.drop_index("ix_maintenance_node_open")

    op.drop_table("maintenance")
    op.drop_table("kv")
    op.drop_table("hotfix_selections")
    op.drop_table("escalations")
    op.drop_table("cluster_slots")
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_target")

    op.drop_table("audit")
    op.drop_table("announced_hotfixes")
