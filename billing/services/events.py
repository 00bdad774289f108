"""The outbox: events written in the same transaction as the state change they report.

Notifications (email, push, merchant webhooks) and alerts are delivered from here later; an
event exists if and only if the change it reports was committed. Payloads carry ids and words,
never a card token.

``record_event`` keeps the row with the session's transaction; when that transaction commits,
its rows are written with one multi-row insert (after a flush, so that what they point at
exists). A transaction that rolls back, or a session closed without committing, writes none of
them. Events are not recorded inside a savepoint (whose own rollback could not take them back
alone), and rows recorded in a transaction cannot be read back before it commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import event, insert
from sqlalchemy.orm import Session, SessionTransaction

from billing.models import Event, Invoice, Subscription

_OUTBOX = "billing.outbox"


def record_event(
    session: Session,
    kind: str,
    *,
    now: datetime,
    invoice: Invoice | None = None,
    subscription: Subscription | None = None,
    customer_id: int | None = None,
    payload: dict[str, Any] | None = None,
) -> None:
    if session.in_nested_transaction():
        raise RuntimeError("events are recorded in the outer transaction, not in a savepoint")
    session.connection()  # the row belongs to the transaction open now (begun if need be)
    subscription_id = subscription.id if subscription is not None else None
    if invoice is not None and subscription_id is None:
        subscription_id = invoice.subscription_id
    if subscription is not None and customer_id is None:
        customer_id = subscription.customer_id
    session.info.setdefault(_OUTBOX, []).append(
        {
            "kind": kind,
            "customer_id": customer_id,
            "subscription_id": subscription_id,
            "invoice_id": invoice.id if invoice is not None else None,
            "payload": dict(payload or {}),
            "created_at": now,
        }
    )


@event.listens_for(Session, "before_commit")
def _write_outbox(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: the rows wait for the outer commit
    rows: list[dict[str, Any]] | None = session.info.get(_OUTBOX)
    if rows:
        session.flush()
        session.execute(insert(Event), rows)
    session.info.pop(_OUTBOX, None)


@event.listens_for(Session, "after_transaction_end")
def _drop_unwritten(session: Session, transaction: SessionTransaction) -> None:
    # The outer transaction ended: committed (its rows are written already) or rolled back, or
    # the session closed without committing. Either way no row of it may reach a later one.
    if transaction.parent is None:
        session.info.pop(_OUTBOX, None)
