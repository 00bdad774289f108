"""Fast benchmark data: customers, card tokens and due subscriptions written with COPY.

``seed_due`` writes ``n`` customers, each with one card token issued by the sandbox (encrypted
with the token vault, its keyed fingerprint, the lifetime a token gets from its issue) and one
active subscription due at ``at``: the rows the per-row services would write, without their
round trips. The three tables are filled with PostgreSQL ``COPY ... FROM STDIN`` on the raw
psycopg connection under the SQLAlchemy engine, in one transaction; the ids are reserved from
the tables' sequences first, so that each card and subscription can name its customer and card
in the same stream.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from billing.crypto import TokenVault
from billing.fatora.sandbox import Sandbox
from billing.models import Plan
from billing.plans import PlansConfig
from billing.runtime import Runtime
from billing.services.customers import TOKEN_LIFETIME
from billing.services.plans_sync import sync_plans


def seed_due(
    rt: Runtime,
    sandbox: Sandbox,
    vault: TokenVault,
    n: int,
    *,
    plans: PlansConfig,
    plan: str,
    at: datetime,
) -> None:
    """``n`` customers, each with one ``success`` card and an active subscription to ``plan``
    (synced from ``plans``) due at ``at``.

    Customer ``g`` (1..n) is ``bench-g`` (``Bench g``, ``benchg@example.com``); every row is
    created at ``at``; the subscriptions are anchored and due at ``at``, in card order.
    """
    with rt.sessions() as session, session.begin():
        sync_plans(session, plans, at)
        plan_id = session.execute(select(Plan.id).where(Plan.code == plan)).scalar_one()
    if n <= 0:
        return
    expires_at = at + TOKEN_LIFETIME
    raw = rt.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        with conn.cursor() as cur:
            customer_ids = _reserve_ids(cur, "customers", n)
            card_ids = _reserve_ids(cur, "card_tokens", n)
            with cur.copy(
                "COPY customers (id, external_id, name, email, created_at) FROM STDIN"
            ) as copy:
                for g, customer_id in enumerate(customer_ids, start=1):
                    copy.write_row(
                        (customer_id, f"bench-{g}", f"Bench {g}", f"bench{g}@example.com", at)
                    )
            with cur.copy(
                "COPY card_tokens (id, customer_id, ciphertext, fingerprint, issued_at, "
                "expires_at, status, created_at) FROM STDIN"
            ) as copy:
                for card_id, customer_id in zip(card_ids, customer_ids, strict=True):
                    token = sandbox.issue_token("success", issued_at=at)
                    copy.write_row(
                        (
                            card_id,
                            customer_id,
                            vault.encrypt(token),
                            vault.fingerprint(token),
                            at,
                            expires_at,
                            "active",
                            at,
                        )
                    )
            with cur.copy(
                "COPY subscriptions (customer_id, plan_id, card_token_id, status, anchor_at, "
                "next_billing_at, cancel_at_period_end, created_at, updated_at) FROM STDIN"
            ) as copy:
                for card_id, customer_id in zip(card_ids, customer_ids, strict=True):
                    copy.write_row((customer_id, plan_id, card_id, "active", at, at, False, at, at))
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


def _reserve_ids(cur: Any, table: str, n: int) -> list[int]:
    """``n`` fresh ids of ``table``'s id sequence, in increasing order."""
    cur.execute(
        "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
        (table, n),
    )
    return sorted(int(row[0]) for row in cur.fetchall())
