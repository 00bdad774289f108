"""refunds, who paused a subscription, and invoices paid only through the link

``refunds``: the full refund of a paid invoice, written before Fatora is asked.
``subscriptions.paused_by``: 'merchant' or 'dunning'; a payment lifts the dunning ladder's pause
only. Subscriptions paused before this revision are taken as paused by the merchant (NULL):
nothing resumes them but a resume.
``invoices.link_only``: a first period started on the hosted page, or a renewal paid ahead: no
worker charges it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refunds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("invoice_id", sa.Integer(), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("transaction_id", sa.String(length=120), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("refund_transaction_id", sa.String(length=120), nullable=True),
        sa.Column("description", sa.String(length=500), nullable=True),
        sa.Column("tries", sa.Integer(), server_default="1", nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_wall_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('requested', 'pending', 'completed', 'rejected')",
            name=op.f("ck_refunds_status"),
        ),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["charge_attempts.id"],
            name=op.f("fk_refunds_attempt_id_charge_attempts"),
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_refunds_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        sa.UniqueConstraint("invoice_id", name=op.f("uq_refunds_invoice_id")),
    )

    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("paused_by", sa.String(length=16), nullable=True))
        batch_op.create_check_constraint(
            op.f("ck_subscriptions_paused_by"),
            "paused_by IS NULL OR paused_by IN ('merchant', 'dunning')",
        )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("link_only", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_column("link_only")
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_subscriptions_paused_by"), type_="check")
        batch_op.drop_column("paused_by")
    op.drop_table("refunds")
