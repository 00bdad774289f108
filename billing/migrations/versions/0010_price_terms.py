"""price terms: a price change applies to new subscribers only, or to everyone from their next
period; a subscription keeps the price it signed up at

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 09:00:00

``plan_prices.price_change`` says who a price row applies to: ``new_subscribers`` (created from
its moment on) or ``next_period`` (also every existing subscription, from its next period).
``subscriptions.price_id`` is the price a subscription signed up at, which it keeps until a
``next_period`` row moves it (``billing.plans.subscriber_price``).

Rows of one moment are allowed (a test clock that stands still while a price changes, a
subscription signs up at it, and the price changes again): the unique (plan, effective_from)
becomes a plain index, and rows are read in (effective_from, id) order.

Existing rows: every price written before this revision moved every subscriber, so each is
``next_period``. Each existing subscription signs up at the price in force at the earlier of its
creation and its next billing (its plan's first price if none was): no future invoice is billed
at another amount than before the upgrade.

Downgrade: the schema before this revision cannot grandfather anyone, so every price moves
everyone again; of the rows of one moment, only the latest is kept.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TERMS = "price_change IN ('new_subscribers', 'next_period')"

# Each subscription signs up at the price in force at the earlier of its creation and its next
# billing (rows of one moment: the latest written).
_BACKFILL_IN_FORCE = """
UPDATE subscriptions SET price_id = (
    SELECT pp.id FROM plan_prices pp
    WHERE pp.plan_id = subscriptions.plan_id
      AND pp.effective_from <= CASE
          WHEN subscriptions.next_billing_at < subscriptions.created_at
          THEN subscriptions.next_billing_at ELSE subscriptions.created_at END
    ORDER BY pp.effective_from DESC, pp.id DESC LIMIT 1)
"""
# ... or, with none in force then, its plan's first price.
_BACKFILL_FIRST = (
    "UPDATE subscriptions SET price_id = ("
    " SELECT pp.id FROM plan_prices pp WHERE pp.plan_id = subscriptions.plan_id"
    " ORDER BY pp.effective_from, pp.id LIMIT 1)"
    " WHERE price_id IS NULL"
)
_DROP_SAME_MOMENT = (
    "DELETE FROM plan_prices WHERE EXISTS ("
    " SELECT 1 FROM plan_prices later WHERE later.plan_id = plan_prices.plan_id"
    " AND later.effective_from = plan_prices.effective_from AND later.id > plan_prices.id)"
)


def upgrade() -> None:
    with op.batch_alter_table("plan_prices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "price_change",
                sa.String(length=16),
                server_default="next_period",
                nullable=False,
            )
        )
        batch_op.create_check_constraint(op.f("ck_plan_prices_price_change"), sa.text(_TERMS))
        batch_op.drop_constraint(op.f("uq_plan_prices_plan_id_effective_from"), type_="unique")
        batch_op.create_index(
            "ix_plan_prices_plan_id_effective_from", ["plan_id", "effective_from"], unique=False
        )
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("price_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_subscriptions_price_id_plan_prices"),
            "plan_prices",
            ["price_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index(batch_op.f("ix_subscriptions_price_id"), ["price_id"], unique=False)
    op.execute(_BACKFILL_IN_FORCE)
    op.execute(_BACKFILL_FIRST)


def downgrade() -> None:
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscriptions_price_id"))
        batch_op.drop_constraint(op.f("fk_subscriptions_price_id_plan_prices"), type_="foreignkey")
        batch_op.drop_column("price_id")
    op.execute(_DROP_SAME_MOMENT)
    with op.batch_alter_table("plan_prices", schema=None) as batch_op:
        batch_op.drop_index("ix_plan_prices_plan_id_effective_from")
        batch_op.create_unique_constraint(
            op.f("uq_plan_prices_plan_id_effective_from"), ["plan_id", "effective_from"]
        )
        batch_op.drop_constraint(op.f("ck_plan_prices_price_change"), type_="check")
        batch_op.drop_column("price_change")
