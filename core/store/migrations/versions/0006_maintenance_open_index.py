"""maintenance: the open windows and the recently ended ones found by index

Every reminder tick, ``status``, the metrics and the status page read the open windows
(``ended_at IS NULL``), and the calendar feed the windows ended since a time. Windows are
kept after they end (history), so both reads scanned the whole table: a controller of
1,000 nodes updating daily adds 365,000 rows a year. An index on ``ended_at`` serves both
(both stores' indexes hold NULLs and search them with ``IS NULL``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_maintenance_ended", "maintenance", ["ended_at"])


def downgrade() -> None:
    op.drop_index("ix_maintenance_ended", table_name="maintenance")
