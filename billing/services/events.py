"""The outbox: events written in the same transaction as the state change they report.

Notifications (email, push, merchant webhooks) and alerts are delivered from here later; an
event exists if and only if the change it reports was committed. Payloads carry ids and words,
never a card token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from billing.models import Event, Invoice, Subscription


def record_event(
    session: Session,
    kind: str,
    *,
    now: datetime,
    invoice: Invoice | None = None,
    subscription: Subscription | None = None,
    customer_id: int | None = None,
    payload: dict[str, Any] | None = None,
) -> Event:
    subscription_id = subscription.id if subscription is not None else None
    if invoice is not None and subscription_id is None:
        subscription_id = invoice.subscription_id
    if subscription is not None and customer_id is None:
        customer_id = subscription.customer_id
    event = Event(
        kind=kind,
        customer_id=customer_id,
        subscription_id=subscription_id,
        invoice_id=invoice.id if invoice is not None else None,
        payload=payload or {},
        created_at=now,
    )
    session.add(event)
    return event
