"""attempt fence: one unresolved attempt per invoice, the send moment, 'not_sent' endings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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


# Attempts written off as 'never charged' this recently under the old rules are verified again.
_REVERIFY_WITHIN = timedelta(days=7)


def _refuse_duplicates() -> None:
    """The fence cannot be built over the old bug's traces: name them instead of failing on a
    unique violation."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT invoice_id FROM charge_attempts "
            "WHERE status IN ('in_flight', 'pending', 'unknown') "
            "GROUP BY invoice_id HAVING count(*) > 1 ORDER BY invoice_id"
        )
    )
    invoices = [str(row[0]) for row in rows]
    if invoices:
        raise RuntimeError(
            "cannot upgrade: invoice(s) "
            + ", ".join(invoices[:50])
            + " have more than one charge attempt whose outcome is unknown. With every worker "
            "stopped, run `billing reconcile` on the previous release until they are settled "
            "(or settle them by hand from the Fatora dashboard), then upgrade again."
        )


def _reverify_recent_write_offs() -> None:
    """Before this revision a 5xx or an HTML page counted as an answer and the grace was five
    minutes: a charge written off as 'never charged' may have landed after all. The latest such
    write-off of each invoice from the last week is made unknown again, for the janitor to
    verify once more (the money, if any, is then recorded, or reported as a duplicate)."""
    bind = op.get_bind()
    cutoff = datetime.now(UTC) - _REVERIFY_WITHIN
    if bind.dialect.name == "sqlite":
        cutoff = cutoff.replace(tzinfo=None)
    bind.execute(
        sa.text(
            "UPDATE charge_attempts SET status = 'unknown', call_ending = 'no_answer', "
            "settled_at = NULL, next_verify_at = created_at "
            "WHERE status = 'failed' AND description = 'not found at gateway' "
            "AND created_wall_at > :cutoff "
            "AND id = (SELECT max(c.id) FROM charge_attempts c "
            "          WHERE c.invoice_id = charge_attempts.invoice_id AND c.status = 'failed' "
            "          AND c.description = 'not found at gateway') "
            "AND NOT EXISTS (SELECT 1 FROM charge_attempts u "
            "          WHERE u.invoice_id = charge_attempts.invoice_id "
            "          AND u.status IN ('in_flight', 'pending', 'unknown'))"
        ),
        {"cutoff": cutoff},
    )


def upgrade() -> None:
    _refuse_duplicates()
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
    _reverify_recent_write_offs()


def downgrade() -> None:
    op.execute(
        "UPDATE charge_attempts SET call_ending = 'no_answer' WHERE call_ending = 'not_sent'"
    )
    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.drop_index("uq_charge_attempts_one_unresolved")
        batch_op.drop_constraint(op.f("ck_charge_attempts_call_ending"), type_="check")
        batch_op.create_check_constraint(op.f("ck_charge_attempts_call_ending"), _ENDINGS_OLD)
        batch_op.drop_column("sent_wall_at")
