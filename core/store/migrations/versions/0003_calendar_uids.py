"""maintenance.uid, schedules.uid: calendar UIDs (UUIDs) that survive a store reset

Existing windows and schedules get a random UUID each.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("maintenance", "schedules"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("uid", sa.String(length=36), nullable=True))
    connection = op.get_bind()
    maintenance = sa.table("maintenance", sa.column("id", sa.Integer), sa.column("uid", sa.String))
    for (row_id,) in connection.execute(sa.select(maintenance.c.id)).all():
        connection.execute(
            maintenance.update().where(maintenance.c.id == row_id).values(uid=str(uuid.uuid4()))
        )
    schedules = sa.table(
        "schedules", sa.column("node", sa.String), sa.column("kind", sa.String), sa.column("uid")
    )
    for node, kind in connection.execute(sa.select(schedules.c.node, schedules.c.kind)).all():
        connection.execute(
            schedules.update()
            .where(schedules.c.node == node, schedules.c.kind == kind)
            .values(uid=str(uuid.uuid4()))
        )


def downgrade() -> None:
    for table in ("maintenance", "schedules"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("uid")
