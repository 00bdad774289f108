"""attempt fence: one unresolved attempt per invoice, the send moment, 'not_sent' endings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_UNRESOLVED = "status IN ('in_flight', 'pending', 'unknown')"
_ENDINGS_NEW = (
    "call_ending IS NULL OR call_ending IN ('not_sent', 'answered', 'no_answer', 'accepted')"
)
_ENDINGS_OLD = "call_ending IS NULL OR call_ending IN ('answered', 'no_answer', 'accepted')"


def upgrade() -> None:
    # Before this revision a 5xx or an HTML page counted as 'answered', which made a later
    # 'not found' final at once. Unresolved attempts so marked may have been charged: they are
    # read as unclear from now on.
    op.execute(
        "UPDATE charge_attempts SET call_ending = 'no_answer' "
        "WHERE call_ending = 'answered' AND status IN ('in_flight', 'pending', 'unknown')"
    )
    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_wall_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_constraint(op.f("ck_charge_attempts_call_ending"), type_="check")
        batch_op.create_check_constraint(op.f("ck_charge_attempts_call_ending"), _ENDINGS_NEW)
        batch_op.create_index(
            "uq_charge_attempts_one_unresolved",
            ["invoice_id"],
            unique=True,
            postgresql_where=sa.text(_UNRESOLVED),
            sqlite_where=sa.text(_UNRESOLVED),
        )


def downgrade() -> None:
    op.execute(
        "UPDATE charge_attempts SET call_ending = 'no_answer' WHERE call_ending = 'not_sent'"
    )
    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.drop_index("uq_charge_attempts_one_unresolved")
        batch_op.drop_constraint(op.f("ck_charge_attempts_call_ending"), type_="check")
        batch_op.create_check_constraint(op.f("ck_charge_attempts_call_ending"), _ENDINGS_OLD)
        batch_op.drop_column("sent_wall_at")
