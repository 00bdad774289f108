"""What an operator may see of one invoice (its whole story), and do to it: charge it again
now, or void it.

Both lock the subscription, then the invoice (the order every writer uses), and refuse while an
attempt's outcome is unknown: a charge that may have landed is settled by verify first, never
hidden by a void nor doubled by a retry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from billing.lifecycle import InvoiceStatus
from billing.models import ChargeAttempt, Event, Invoice, Refund, Subscription
from billing.services.dunning_flow import unresolved_attempt
from billing.services.errors import BillingError, NotFound
from billing.services.events import record_event


def _locked(session: Session, invoice_id: int) -> Invoice:
    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        raise NotFound(f"no invoice {invoice_id}")
    session.get(Subscription, invoice.subscription_id, with_for_update=True)
    session.refresh(invoice, with_for_update=True)
    unresolved = unresolved_attempt(session, invoice.id)
    if unresolved is not None:
        raise BillingError(
            f"invoice {invoice_id}: the outcome of charge {unresolved.order_id} is not known yet; "
            "run `billing reconcile` (it is settled by verify first)"
        )
    return invoice


def retry_now(session: Session, invoice_id: int, now: datetime) -> Invoice:
    """Charge an open invoice at the next pass instead of at its scheduled time."""
    invoice = _locked(session, invoice_id)
    if invoice.status != InvoiceStatus.OPEN.value:
        raise BillingError(f"invoice {invoice_id} is {invoice.status}: there is nothing to charge")
    if invoice.link_only:
        raise BillingError(
            f"invoice {invoice_id} is paid only through the customer's link "
            f"(`billing invoices link {invoice_id}`): no card is charged for it"
        )
    invoice.next_attempt_at = now
    invoice.updated_at = now
    record_event(session, "invoice.retry_requested", invoice=invoice, now=now, payload={})
    return invoice


def void(session: Session, invoice_id: int, now: datetime) -> Invoice:
    """Write an open or uncollectible invoice off: it is never charged again."""
    invoice = _locked(session, invoice_id)
    if invoice.status not in (InvoiceStatus.OPEN.value, InvoiceStatus.UNCOLLECTIBLE.value):
        raise BillingError(f"invoice {invoice_id} is {invoice.status}: it cannot be voided")
    invoice.status = InvoiceStatus.VOID.value
    invoice.next_attempt_at = None
    invoice.updated_at = now
    record_event(session, "invoice.voided", invoice=invoice, now=now, payload={"by": "operator"})
    return invoice


def story(session: Session, invoice_id: int) -> dict[str, Any]:
    """The invoice, its subscription, every attempt with Fatora's answers (as recorded: clipped
    and with secrets removed), and every event about it with how its delivery went."""
    from billing import serialize
    from billing.services.notifications import describe_event

    invoice = session.get(Invoice, invoice_id)
    if invoice is None:
        raise NotFound(f"no invoice {invoice_id}")
    sub = session.get(Subscription, invoice.subscription_id)
    assert sub is not None
    attempts = session.execute(
        select(ChargeAttempt)
        .where(ChargeAttempt.invoice_id == invoice.id)
        .order_by(ChargeAttempt.id)
    ).scalars()
    about = or_(
        Event.invoice_id == invoice.id,
        # Some events name the invoice in their payload only (invoice.created).
        and_(
            Event.subscription_id == sub.id,
            Event.invoice_id.is_(None),
            Event.payload["invoice_id"].as_integer() == invoice.id,
        ),
    )
    events = session.execute(select(Event).where(about).order_by(Event.id)).scalars()
    refunded = session.execute(
        select(Refund).where(Refund.invoice_id == invoice.id)
    ).scalar_one_or_none()
    return {
        **serialize.invoice(invoice),
        "subscription": serialize.subscription(session, sub),
        "attempts": [serialize.attempt(a) for a in attempts],
        "events": [describe_event(e) for e in events],
        "refund": serialize.refund(refunded) if refunded is not None else None,
    }
