"""quarantine: a subscription or invoice whose processing raises is set aside and retried hourly

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 10:00:00

Three nullable columns on ``subscriptions`` and ``invoices``: since when a row is quarantined,
why, and when it is tried again. Existing rows are not quarantined (all NULL).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_DUE_OLD = "next_billing_at IS NOT NULL"
# The due finder's partial index leaves quarantined subscriptions out. A quarantined row keeps
# its (past) next_billing_at, so with the old predicate it would stay at the head of every due
# scan, read and thrown away by each pass, every minute, for as long as it is quarantined: the
# scan would grow with the number quarantined. Out of the index, the due query (which repeats
# the predicate) reads only rows it can bill; quarantined rows come back through
# ix_subscriptions_quarantined when their retry time has come.
_DUE_NEW = "next_billing_at IS NOT NULL AND quarantined_at IS NULL"
_QUARANTINED = "quarantined_at IS NOT NULL"


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("quarantine_reason", sa.String(length=200), nullable=True),
        sa.Column("quarantine_retry_at", sa.DateTime(timezone=True), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        for column in _columns():
            batch_op.add_column(column)
        batch_op.drop_index(
            "ix_subscriptions_due",
            postgresql_where=sa.text(_DUE_OLD),
            sqlite_where=sa.text(_DUE_OLD),
        )
        batch_op.create_index(
            "ix_subscriptions_due",
            ["next_billing_at"],
            unique=False,
            postgresql_where=sa.text(_DUE_NEW),
            sqlite_where=sa.text(_DUE_NEW),
        )
        batch_op.create_index(
            "ix_subscriptions_quarantined",
            ["quarantine_retry_at"],
            unique=False,
            postgresql_where=sa.text(_QUARANTINED),
            sqlite_where=sa.text(_QUARANTINED),
        )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        for column in _columns():
            batch_op.add_column(column)
        batch_op.create_index(
            "ix_invoices_quarantined",
            ["quarantine_retry_at"],
            unique=False,
            postgresql_where=sa.text(_QUARANTINED),
            sqlite_where=sa.text(_QUARANTINED),
        )


def downgrade() -> None:
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_invoices_quarantined",
            postgresql_where=sa.text(_QUARANTINED),
            sqlite_where=sa.text(_QUARANTINED),
        )
        batch_op.drop_column("quarantine_retry_at")
        batch_op.drop_column("quarantine_reason")
        batch_op.drop_column("quarantined_at")
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_subscriptions_quarantined",
            postgresql_where=sa.text(_QUARANTINED),
            sqlite_where=sa.text(_QUARANTINED),
        )
        batch_op.drop_index(
            "ix_subscriptions_due",
            postgresql_where=sa.text(_DUE_NEW),
            sqlite_where=sa.text(_DUE_NEW),
        )
        batch_op.create_index(
            "ix_subscriptions_due",
            ["next_billing_at"],
            unique=False,
            postgresql_where=sa.text(_DUE_OLD),
            sqlite_where=sa.text(_DUE_OLD),
        )
        batch_op.drop_column("quarantine_retry_at")
        batch_op.drop_column("quarantine_reason")
        batch_op.drop_column("quarantined_at")
