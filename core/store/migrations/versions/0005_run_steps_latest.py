"""run_steps: the index on the run also orders its steps (run_id, id)

A run's latest step (``status``, a run's end) and a step's latest row are read in the
order of their ids within the run. With an index on ``run_id`` alone PostgreSQL read the
whole table backwards along its primary key until it met the run's row: at 1,000 runs of
14 steps, about 4,700 rows per read. SQLite keeps every index entry in rowid order (the
id) and needs no change; the index is the same there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_run_steps_run", table_name="run_steps")
    op.create_index("ix_run_steps_run", "run_steps", ["run_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_run_steps_run", table_name="run_steps")
    op.create_index("ix_run_steps_run", "run_steps", ["run_id"])
