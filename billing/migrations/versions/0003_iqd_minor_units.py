"""IQD amounts in ISO 4217 minor units (3 decimals, was 0)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 02:30:00

Amounts are stored as integers in the currency's minor unit. IQD used to be read with Babel's
0 display decimals; card networks and the gateway follow ISO 4217, which gives it 3. A stored
12 (12 dinars) must become 12000, or it would be charged as 0.012 IQD.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("plan_prices", "invoices", "charge_attempts")


def upgrade() -> None:
    for table in _TABLES:
        op.execute(
            f"UPDATE {table} SET amount_minor = amount_minor * 1000 "  # noqa: S608 (fixed names)
            "WHERE currency = 'IQD'"
        )


def downgrade() -> None:
    # Fractions of a dinar had no representation before: they are dropped.
    for table in _TABLES:
        op.execute(
            f"UPDATE {table} SET amount_minor = amount_minor / 1000 "  # noqa: S608 (fixed names)
            "WHERE currency = 'IQD'"
        )
