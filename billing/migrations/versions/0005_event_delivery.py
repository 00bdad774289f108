"""event delivery: the outbox is delivered by email and merchant webhook, with retries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00

Five columns on ``events``: the delivery status (``pending``, ``delivered``, ``skipped``,
``failed``), how each channel went, when a failed delivery is tried again, why the latest try
failed, and when it was given up. ``delivered_at`` and ``delivery_attempts`` keep their meaning.

Existing rows: those with ``delivered_at`` are ``delivered``. Nothing delivered events before
this revision, so every other row would be sent now; those recorded more than a day before the
upgrade (the longest a delivery is retried) are ``skipped`` instead, with the reason in
``last_error``: a deploy must not email every customer a receipt for every invoice ever paid.
The rest stay ``pending`` and are sent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_UNDELIVERED_OLD = "delivered_at IS NULL"
# A failed or skipped event is never delivered: with the old predicate it would stay in the
# deliverer's index forever, and the index would grow with every event that ever failed.
_UNDELIVERED_NEW = "delivery_status = 'pending'"
_STATUSES = "delivery_status IN ('pending', 'delivered', 'skipped', 'failed')"
_BACKLOG = timedelta(days=1)
_SKIPPED_WHY = "recorded more than a day before delivery was installed (migration 0005): not sent"


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "delivery_status", sa.String(length=16), server_default="pending", nullable=False
            )
        )
        batch_op.add_column(sa.Column("delivery_channels", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("next_delivery_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("last_error", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(op.f("ck_events_delivery_status"), sa.text(_STATUSES))
        batch_op.drop_index(
            "ix_events_undelivered",
            postgresql_where=sa.text(_UNDELIVERED_OLD),
            sqlite_where=sa.text(_UNDELIVERED_OLD),
        )
        batch_op.create_index(
            "ix_events_undelivered",
            ["id"],
            unique=False,
            postgresql_where=sa.text(_UNDELIVERED_NEW),
            sqlite_where=sa.text(_UNDELIVERED_NEW),
        )
    op.execute("UPDATE events SET delivery_status = 'delivered' WHERE delivered_at IS NOT NULL")
    cutoff = sa.bindparam("cutoff", datetime.now(UTC) - _BACKLOG, type_=sa.DateTime(timezone=True))
    op.execute(
        sa.text(
            "UPDATE events SET delivery_status = 'skipped', last_error = :why "
            "WHERE delivered_at IS NULL AND created_at < :cutoff"
        ).bindparams(cutoff, why=_SKIPPED_WHY)
    )


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_events_undelivered",
            postgresql_where=sa.text(_UNDELIVERED_NEW),
            sqlite_where=sa.text(_UNDELIVERED_NEW),
        )
        batch_op.create_index(
            "ix_events_undelivered",
            ["id"],
            unique=False,
            postgresql_where=sa.text(_UNDELIVERED_OLD),
            sqlite_where=sa.text(_UNDELIVERED_OLD),
        )
        batch_op.drop_constraint(op.f("ck_events_delivery_status"), type_="check")
        batch_op.drop_column("failed_at")
        batch_op.drop_column("last_error")
        batch_op.drop_column("next_delivery_at")
        batch_op.drop_column("delivery_channels")
        batch_op.drop_column("delivery_status")
