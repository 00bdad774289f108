"""checkout attempts: a payment the customer makes on Fatora's hosted page for an open invoice

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 03:00:00

An attempt is either a collect on a stored card (``kind`` 'collect') or a checkout the customer
pays on the hosted page (``kind`` 'checkout'), which has no card yet and keeps the page's URL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="collect", nullable=False)
        )
        batch_op.add_column(sa.Column("checkout_url", sa.String(length=500), nullable=True))
        batch_op.alter_column("card_token_id", existing_type=sa.Integer(), nullable=True)
        batch_op.create_check_constraint(
            op.f("ck_charge_attempts_kind"), "kind IN ('collect', 'checkout')"
        )


def downgrade() -> None:
    op.execute("DELETE FROM charge_attempts WHERE kind = 'checkout' AND card_token_id IS NULL")
    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_charge_attempts_kind"), type_="check")
        batch_op.alter_column("card_token_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("checkout_url")
        batch_op.drop_column("kind")
