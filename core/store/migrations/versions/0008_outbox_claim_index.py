"""outbox: the due items of a channel found in the order they are taken

A claim takes the first due items of a channel, the pending ones and those whose
sender's lease ran out, each in the order (next_attempt_at, id). The index on (status,
next_attempt_at) gave that order on SQLite (its rowid, the id, ends every index) but not
on PostgreSQL: without the id and the channel in the index, PostgreSQL read every due
item and sorted them for each claim of 100 (10,000 queued: 2.5 ms of the server per
claim, quadratic in the queue). The index on (status, channel, next_attempt_at, id)
replaces it; it serves every other read of the outbox by status as well.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_claim", "outbox", ["status", "channel", "next_attempt_at", "id"])
    op.drop_index("ix_outbox_due", table_name="outbox")


def downgrade() -> None:
    op.create_index("ix_outbox_due", "outbox", ["status", "next_attempt_at"])
    op.drop_index("ix_outbox_claim", table_name="outbox")
