"""The due finder: subscriptions whose ``next_billing_at`` has passed become invoices.

Each pass claims due subscriptions in bounded batches, ordered by ``next_billing_at`` over the
partial index on it, so its cost grows with the number due and not with the table. On
PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED``: two schedulers take disjoint batches. The
invoice's unique constraint on (subscription, period start) is the last word: a race that got
past the claim inserts nothing (``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from billing.db import insert_for
from billing.lifecycle import (
    InvoiceStatus,
    SubscriptionEvent,
    SubscriptionState,
    SubscriptionStatus,
    apply,
)
from billing.models import Customer, Invoice, Plan, Subscription
from billing.periods import Period, first_period, next_period
from billing.runtime import Runtime
from billing.services.events import record_event
from billing.services.subscriptions import price_at, schedule_for

# Statuses that keep renewing: a past-due subscription still gets its next invoice.
RENEWING = (
    SubscriptionStatus.TRIALING.value,
    SubscriptionStatus.ACTIVE.value,
    SubscriptionStatus.PAST_DUE.value,
)


@dataclass
class RenewalReport:
    invoice_ids: list[int] = field(default_factory=list)
    canceled: list[int] = field(default_factory=list)
    claimed: int = 0


def due_query(now: datetime, limit: int) -> Select[Subscription]:
    """The one due query: due subscriptions, oldest first, bounded."""
    return (
        select(Subscription)
        .where(Subscription.next_billing_at.is_not(None), Subscription.next_billing_at <= now)
        .order_by(Subscription.next_billing_at)
        .limit(limit)
    )


def claim_due(session: Session, now: datetime, limit: int) -> list[Subscription]:
    query = due_query(now, limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.execute(query).scalars())


def renew_one(session: Session, sub: Subscription, now: datetime) -> int | None:
    """Invoice the subscription's next period and advance it; the new invoice id, if any."""
    if sub.status not in RENEWING:
        sub.next_billing_at = None  # nothing to bill until resumed
        return None
    plan = session.get(Plan, sub.plan_id)
    customer = session.get(Customer, sub.customer_id)
    assert plan is not None and customer is not None
    schedule = schedule_for(plan, sub.anchor_at, customer.timezone)
    if sub.current_period_start is None or sub.current_period_end is None:
        assert sub.next_billing_at is not None
        period = first_period(schedule, sub.next_billing_at)
    else:
        period = next_period(schedule, Period(sub.current_period_start, sub.current_period_end))
    if sub.cancel_at_period_end:
        state = apply(
            SubscriptionState(SubscriptionStatus(sub.status), True),
            SubscriptionEvent.PERIOD_ENDED_WITH_CANCEL,
        )
        sub.status = state.status.value
        sub.cancel_at_period_end = False
        sub.canceled_at = period.start
        sub.next_billing_at = None
        sub.updated_at = now
        record_event(
            session,
            "subscription.canceled",
            subscription=sub,
            now=now,
            payload={"at_period_end": True},
        )
        return None
    price = price_at(session, plan.id, period.start)
    invoice_id = _insert_invoice(session, sub, period, price.amount_minor, price.currency, now)
    sub.current_period_start = period.start
    sub.current_period_end = period.end
    sub.next_billing_at = period.end
    # A trialing subscription stays so until its first charge settles (paid -> active,
    # declined -> past_due): the lifecycle table decides, on the charge's outcome.
    sub.updated_at = now
    return invoice_id


def _insert_invoice(
    session: Session,
    sub: Subscription,
    period: Period,
    amount_minor: int,
    currency: str,
    now: datetime,
) -> int | None:
    values = {
        "subscription_id": sub.id,
        "period_start": period.start,
        "period_end": period.end,
        "amount_minor": amount_minor,
        "currency": currency,
        "status": InvoiceStatus.OPEN.value,
        "next_attempt_at": now,
        "attempt_count": 0,
        "failure_count": 0,
        "transient_count": 0,
        "created_at": now,
        "updated_at": now,
    }
    stmt = (
        insert_for(session, Invoice)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["subscription_id", "period_start"])
        .returning(Invoice.id)
    )
    invoice_id = session.execute(stmt).scalar_one_or_none()
    if invoice_id is not None:
        record_event(
            session,
            "invoice.created",
            subscription=sub,
            now=now,
            payload={"invoice_id": invoice_id},
        )
    return invoice_id


def run_renewal_pass(
    rt: Runtime, *, now: datetime | None = None, max_batches: int = 1000
) -> RenewalReport:
    """Claim and renew due subscriptions until none is due; commit batch by batch.

    The caller enqueues the charges for ``report.invoice_ids`` after this returns, that is after
    the commits that made those invoices exist.
    """
    report = RenewalReport()
    for _ in range(max_batches):
        with rt.sessions() as session, session.begin():
            at = now or rt.clock.now()
            due = claim_due(session, at, rt.renewal_batch_size)
            if not due:
                break
            report.claimed += len(due)
            for sub in due:
                invoice_id = renew_one(session, sub, at)
                if invoice_id is not None:
                    report.invoice_ids.append(invoice_id)
                elif sub.status == SubscriptionStatus.CANCELED.value:
                    report.canceled.append(sub.id)
    return report
