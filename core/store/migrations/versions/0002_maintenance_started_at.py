"""maintenance.started_at: when MaintenanceStarted was published for a window

Windows whose start passed before this migration count as started (they are not
announced again after the upgrade).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import core.store.tables


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("maintenance", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("started_at", core.store.tables.UTCDateTime(timezone=True), nullable=True)
        )
    maintenance = sa.table(
        "maintenance",
        sa.column("start", core.store.tables.UTCDateTime(timezone=True)),
        sa.column("started_at", core.store.tables.UTCDateTime(timezone=True)),
    )
    op.execute(
        maintenance.update()
        .where(maintenance.c.start <= sa.literal(datetime.now(UTC), core.store.tables.UTCDateTime()))
        .values(started_at=maintenance.c.start)
    )


def downgrade() -> None:
    with op.batch_alter_table("maintenance", schema=None) as batch_op:
        batch_op.drop_column("started_at")
