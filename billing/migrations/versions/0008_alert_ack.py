"""alert acknowledgement: an alert stays open until an operator acknowledges it

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-04 12:00:00

Three columns on ``events``: when an ``alert.*`` event was acknowledged, by whom, and the note
given (``billing alerts ack``); and a partial index of the open alerts, which ``billing alerts
list`` and ``billing status`` read. Alerts recorded before this revision are open.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None

_OPEN_ALERTS = "kind LIKE 'alert.%' AND acked_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("acked_by", sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column("ack_note", sa.String(length=500), nullable=True))
        batch_op.create_index(
            "ix_events_open_alerts",
            ["id"],
            unique=False,
            postgresql_where=sa.text(_OPEN_ALERTS),
            sqlite_where=sa.text(_OPEN_ALERTS),
        )


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_events_open_alerts",
            postgresql_where=sa.text(_OPEN_ALERTS),
            sqlite_where=sa.text(_OPEN_ALERTS),
        )
        batch_op.drop_column("ack_note")
        batch_op.drop_column("acked_by")
        batch_op.drop_column("acked_at")
