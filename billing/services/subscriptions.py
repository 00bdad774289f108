"""Subscriptions: create, cancel, pause, resume; and the schedule a subscription bills on."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session

from billing.lifecycle import (
    IllegalTransition,
    InvoiceStatus,
    SubscriptionEvent,
    SubscriptionState,
    SubscriptionStatus,
    apply,
    initial_status,
)
from billing.models import (
    CardStatus,
    CardToken,
    Customer,
    Invoice,
    PausedBy,
    Plan,
    PlanPrice,
    Subscription,
)
from billing.periods import CronSchedule, Interval, IntervalSchedule, Schedule, first_period
from billing.plans import PriceChange, PricePoint, price_for_new, subscriber_price
from billing.services.dunning_flow import restart_billing, void_open_invoices
from billing.services.errors import BillingError, NotFound
from billing.services.events import record_event


def schedule_for(plan: Plan, anchor: datetime, tz: str) -> Schedule:
    """The billing schedule of a subscription: one place decides it."""
    if plan.interval is not None:
        return IntervalSchedule(Interval(plan.interval), plan.interval_count, anchor, tz)
    assert plan.cron is not None
    return CronSchedule(plan.cron, tz)


def price_at(session: Session, plan_id: int, at: datetime) -> PlanPrice:
    """The plan's price for a subscription created at ``at``: the latest row in force then (its
    first row before the plan existed). What an existing subscription pays is
    ``subscription_price``."""
    price = session.execute(
        select(PlanPrice)
        .where(PlanPrice.plan_id == plan_id, PlanPrice.effective_from <= at)
        .order_by(PlanPrice.effective_from.desc(), PlanPrice.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if price is None:  # a period that started before the plan existed: its first price
        price = session.execute(
            select(PlanPrice)
            .where(PlanPrice.plan_id == plan_id)
            .order_by(PlanPrice.effective_from, PlanPrice.id)
            .limit(1)
        ).scalar_one()
    return price


def price_history(session: Session, plan_id: int) -> list[PricePoint]:
    """The plan's price rows, in the order they apply."""
    rows = session.execute(
        select(PlanPrice)
        .where(PlanPrice.plan_id == plan_id)
        .order_by(PlanPrice.effective_from, PlanPrice.id)
    ).scalars()
    return [
        PricePoint(r.id, r.amount_minor, r.currency, r.effective_from, PriceChange(r.price_change))
        for r in rows
    ]


def subscription_price(session: Session, sub: Subscription, at: datetime) -> PricePoint:
    """What ``sub`` pays for a period starting at ``at``: the price it signed up at, unless a
    'next_period' price change has moved it since (``billing.plans.subscriber_price``)."""
    history = price_history(session, sub.plan_id)
    signed = next((p for p in history if p.id == sub.price_id), None)
    if signed is None:  # signed up before prices were kept per subscription, or its row is gone
        signed = price_for_new(history, sub.created_at)
    if signed is None:
        raise NoResultFound(f"plan {sub.plan_id} has no price")
    return subscriber_price(history, signed, at)


def plan_by_code(session: Session, code: str) -> Plan:
    plan = session.execute(select(Plan).where(Plan.code == code)).scalar_one_or_none()
    if plan is None:
        raise NotFound(f"no plan {code!r} (run `billing plans sync FILE` first)")
    return plan


def create_subscription(
    session: Session,
    *,
    customer: Customer,
    plan: Plan,
    now: datetime,
    card: CardToken | None = None,
    start: datetime | None = None,
    trial_days: int | None = None,
) -> Subscription:
    if plan.retired_at is not None:
        raise BillingError(f"plan {plan.code!r} is retired: it takes no new subscriptions")
    if card is not None and card.customer_id != customer.id:
        raise BillingError(f"card {card.id} belongs to another customer")
    if card is not None and (card.status != CardStatus.ACTIVE.value or card.expires_at <= now):
        state = card.status if card.status != CardStatus.ACTIVE.value else "expired"
        raise BillingError(f"card {card.id} is {state}: it cannot be charged")
    trial = plan.trial_days if trial_days is None else trial_days
    if trial < 0:
        raise BillingError("--trial-days must not be negative")
    begins = start or now
    trial_end = begins + timedelta(days=trial) if trial else None
    anchor = trial_end or begins
    first = first_period(schedule_for(plan, anchor, customer.timezone), anchor)
    # It signs up at the price new subscriptions pay now and keeps it (subscription_price).
    signed = price_for_new(price_history(session, plan.id), now)
    sub = Subscription(
        customer_id=customer.id,
        plan_id=plan.id,
        price_id=signed.id if signed is not None else None,
        card_token_id=card.id if card is not None else None,
        status=initial_status(bool(trial)).value,
        anchor_at=anchor,
        trial_end=trial_end,
        next_billing_at=first.start,
        cancel_at_period_end=False,
        created_at=now,
        updated_at=now,
    )
    session.add(sub)
    session.flush()
    record_event(
        session,
        "subscription.created",
        subscription=sub,
        now=now,
        payload={"plan": plan.code, "first_billing_at": first.start.isoformat()},
    )
    return sub


def get_subscription(session: Session, sub_id: int) -> Subscription:
    sub = session.get(Subscription, sub_id)
    if sub is None:
        raise NotFound(f"no subscription {sub_id}")
    return sub


def _apply(session: Session, sub: Subscription, event: SubscriptionEvent, now: datetime) -> None:
    """Lock the row (reading it afresh), then apply ``event``: a cancel, a pause or a resume
    never writes back a stale copy over a worker's change, nor a worker over theirs."""
    session.refresh(sub, with_for_update=True)
    try:
        state = apply(
            SubscriptionState(SubscriptionStatus(sub.status), sub.cancel_at_period_end), event
        )
    except IllegalTransition as exc:
        raise BillingError(f"subscription {sub.id}: {exc}") from None
    sub.status = state.status.value
    sub.cancel_at_period_end = state.cancel_at_period_end
    sub.updated_at = now


def cancel(session: Session, sub: Subscription, now: datetime, *, at_period_end: bool) -> None:
    if at_period_end:
        _apply(session, sub, SubscriptionEvent.CANCEL_AT_PERIOD_END, now)
        record_event(session, "subscription.cancel_scheduled", subscription=sub, now=now)
        return
    _apply(session, sub, SubscriptionEvent.CANCEL, now)
    sub.canceled_at = now
    sub.next_billing_at = None
    void_open_invoices(session, sub, now)
    prepaid = session.execute(
        select(Invoice.id).where(
            Invoice.subscription_id == sub.id,
            Invoice.status == InvoiceStatus.PAID.value,
            Invoice.period_start > now,
        )
    ).scalars()
    for invoice_id in prepaid:
        # Paid ahead for a period that will not come: a refund candidate, put before a human.
        record_event(
            session,
            "alert.prepaid_period_canceled",
            subscription=sub,
            now=now,
            payload={"invoice_id": invoice_id},
        )
    record_event(session, "subscription.canceled", subscription=sub, now=now)


def pause(session: Session, sub: Subscription, now: datetime) -> None:
    _apply(session, sub, SubscriptionEvent.PAUSE, now)
    sub.paused_at = now
    sub.paused_by = PausedBy.MERCHANT.value
    sub.next_billing_at = None
    record_event(session, "subscription.paused", subscription=sub, now=now)


def resume(session: Session, sub: Subscription, now: datetime) -> None:
    """Resume billing.

    Inside a period already invoiced, that period and the anchor are kept: the customer has paid
    (or is paying) for it, and the next period is billed when it ends, as if no pause had
    happened. Pausing and resuming again and again charges nothing more. After that period has
    ended, nothing covers the time since: a new period starts now, anchored on the resumption.
    """
    _apply(session, sub, SubscriptionEvent.RESUME, now)
    restart_billing(session, sub, now)
    record_event(session, "subscription.resumed", subscription=sub, now=now)


def start_with_checkout(
    session: Session, *, customer: Customer, plan: Plan, now: datetime
) -> tuple[Subscription, int]:
    """A subscription whose first period is paid on Fatora's hosted page, which also gives its
    card: created ``unpaid`` with that period invoiced at once; returns it and the invoice id.

    No worker charges the invoice (there is no card, and none is chosen): only the link pays
    it. The payment makes the subscription active, its schedule going on from the end of the
    paid period; until then nothing else is billed. No trial: the page is the first payment.
    """
    from schedules.renewal import renew_one

    sub = create_subscription(session, customer=customer, plan=plan, now=now, trial_days=0)
    invoice_id = renew_one(session, sub, now)
    assert invoice_id is not None  # a new subscription has no invoice to collide with
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    invoice.next_attempt_at = None
    invoice.link_only = True
    sub.status = initial_status(False, paid_on_page=True).value
    sub.next_billing_at = None  # renewals restart when the first period is paid
    session.flush()
    return sub, invoice_id
