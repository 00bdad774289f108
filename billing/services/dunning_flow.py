"""What happens to an invoice and its subscription after a charge: paid, or a dunning step.

The ladder itself (when to retry, what to do at the end) is pure and lives in ``billing.dunning``;
this module applies it to the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.attempts import UNRESOLVED_VALUES
from billing.db import id_in
from billing.dunning import DunningPolicy, FinalAction, dunning_step, final_action_event
from billing.fatora.types import DeclineKind
from billing.lifecycle import (
    IllegalTransition,
    InvoiceStatus,
    SubscriptionEvent,
    SubscriptionState,
    SubscriptionStatus,
    apply,
)
from billing.models import (
    CardStatus,
    CardToken,
    ChargeAttempt,
    Customer,
    DunningPolicyRow,
    Invoice,
    PausedBy,
    Plan,
    Subscription,
)
from billing.services.events import record_event

log = logging.getLogger("billing.dunning")


def pick_card(sub: Subscription, cards: Iterable[CardToken], now: datetime) -> CardToken | None:
    """The card to charge: the subscription's own if alive, else the customer's newest live one.

    ``cards`` are the customer's cards (any status); the choice is made here and only here.
    """
    live = [card for card in cards if _alive(card, now)]
    for card in live:
        if card.id == sub.card_token_id:
            return card
    if not live:
        return None
    return max(live, key=lambda card: (card.issued_at, card.id))


def customer_cards(session: Session, customer_ids: Iterable[int]) -> dict[int, list[CardToken]]:
    """Every card of the given customers, by customer id, in one query."""
    ids = sorted(set(customer_ids))
    found: dict[int, list[CardToken]] = {customer_id: [] for customer_id in ids}
    if ids:
        rows = session.execute(
            select(CardToken).where(id_in(session, CardToken.customer_id, ids))
        ).scalars()
        for card in rows:
            found[card.customer_id].append(card)
    return found


def usable_card(
    session: Session,
    invoice: Invoice,
    now: datetime,
    cards: Iterable[CardToken] | None = None,
) -> CardToken | None:
    """The card to charge for ``invoice`` (see ``pick_card``); a fallback card becomes the
    subscription's card. ``cards``, when given, are the customer's cards already loaded."""
    sub = session.get(Subscription, invoice.subscription_id)
    assert sub is not None
    if cards is None:
        cards = customer_cards(session, [sub.customer_id])[sub.customer_id]
    card = pick_card(sub, cards, now)
    if card is not None and card.id != sub.card_token_id:
        sub.card_token_id = card.id
    return card


def subscription_ended(session: Session, invoice: Invoice, now: datetime) -> bool:
    """Void an open invoice whose subscription was canceled; True when it did."""
    sub = session.get(Subscription, invoice.subscription_id)
    assert sub is not None
    if sub.status != SubscriptionStatus.CANCELED.value:
        return False
    invoice.status = InvoiceStatus.VOID.value
    invoice.next_attempt_at = None
    invoice.updated_at = now
    return True


def _alive(card: CardToken, now: datetime) -> bool:
    return card.status == CardStatus.ACTIVE.value and card.expires_at > now


def _policy(session: Session, sub: Subscription) -> DunningPolicy:
    plan = session.get(Plan, sub.plan_id)
    assert plan is not None
    row = session.get(DunningPolicyRow, plan.dunning_code)
    assert row is not None
    return DunningPolicy(row.code, tuple(row.retry_after_days), FinalAction(row.final_action))


def _move(session: Session, sub: Subscription, event: SubscriptionEvent, now: datetime) -> bool:
    """Apply a charge's consequence to the (locked) subscription, through the lifecycle table.

    Canceled takes no event: its invoice moves, the subscription stays. Any other refusal means
    the table and this flow disagree: it is reported as an alert, never silently dropped (and
    never raised, which would make the same verify fail on every later run).
    """
    state = SubscriptionState(SubscriptionStatus(sub.status), sub.cancel_at_period_end)
    try:
        after = apply(state, event)
    except IllegalTransition:
        if sub.status != SubscriptionStatus.CANCELED.value:
            log.error("subscription %s: %s refused in status %s", sub.id, event.value, sub.status)
            record_event(
                session,
                "alert.transition_refused",
                subscription=sub,
                now=now,
                payload={"status": sub.status, "event": event.value},
            )
        return False
    status = after.status.value
    if status == sub.status and after.cancel_at_period_end == sub.cancel_at_period_end:
        return True  # e.g. a payment on an active subscription: nothing to write
    sub.status = status
    sub.cancel_at_period_end = after.cancel_at_period_end
    sub.updated_at = now
    if sub.status == SubscriptionStatus.ACTIVE.value and sub.next_billing_at is None:
        restart_billing(session, sub, now)  # back from unpaid, or from a dunning pause
    if sub.status == SubscriptionStatus.CANCELED.value:
        sub.canceled_at = now
        sub.next_billing_at = None
    elif sub.status in (SubscriptionStatus.PAUSED.value, SubscriptionStatus.UNPAID.value):
        sub.next_billing_at = None
        if sub.status == SubscriptionStatus.PAUSED.value:
            sub.paused_at = now
            sub.paused_by = PausedBy.DUNNING.value
    return True


def _first_period_from_payment(
    session: Session, sub: Subscription, invoice: Invoice, now: datetime
) -> None:
    """The first payment of a subscription started on the hosted page, made after the period
    its invoice was written for had ended (a page opened in time, paid late): that payment buys
    a period from now, so that no second charge follows at once for a period nobody used."""
    if invoice.period_end > now:
        return
    from billing.periods import first_period
    from billing.services.subscriptions import schedule_for

    plan = session.get(Plan, sub.plan_id)
    customer = session.get(Customer, sub.customer_id)
    assert plan is not None and customer is not None
    period = first_period(schedule_for(plan, now, customer.timezone), now)
    sub.anchor_at = now
    sub.current_period_start = period.start
    sub.current_period_end = period.end
    sub.next_billing_at = None  # restart_billing continues from the period just set


def restart_billing(session: Session, sub: Subscription, now: datetime) -> None:
    """Billing starts again after a stop (a resume, or a payment that ends an unpaid status or
    a dunning pause). Inside a period already invoiced, that period and the anchor are kept:
    the next period is billed when it ends. After it has ended, nothing covers the time since,
    and none of it is billed: a new period starts now, anchored on the restart."""
    from billing.periods import first_period
    from billing.services.subscriptions import schedule_for

    sub.paused_at = None
    sub.paused_by = None
    if sub.current_period_end is not None and sub.current_period_end > now:
        sub.next_billing_at = sub.current_period_end
        return
    plan = session.get(Plan, sub.plan_id)
    customer = session.get(Customer, sub.customer_id)
    assert plan is not None and customer is not None
    sub.anchor_at = now
    sub.current_period_start = None
    sub.current_period_end = None
    sub.next_billing_at = first_period(schedule_for(plan, now, customer.timezone), now).start
    void_invoices_ahead(session, sub, now, "restarted")  # the renewal they were for is gone


def unresolved_attempt(session: Session, invoice_id: int) -> ChargeAttempt | None:
    """The invoice's attempt whose outcome is not known yet (the fence allows one at most)."""
    return session.execute(
        select(ChargeAttempt).where(
            ChargeAttempt.invoice_id == invoice_id,
            ChargeAttempt.status.in_(UNRESOLVED_VALUES),
        )
    ).scalar_one_or_none()


def void_invoices_ahead(session: Session, sub: Subscription, now: datetime, why: str) -> None:
    """Take back the invoices made ahead for the link (open, ``link_only``) of a subscription
    whose renewal they were made for will not come as planned: it ended at its period's end,
    or restarted on a new period. One whose hosted page is open is left: a payment on it is
    recorded (and raised). While a subscription is paused, or set to cancel, such an invoice
    simply cannot be paid (``ahead_payable``); a resume before its date makes it payable again."""
    if sub.status == SubscriptionStatus.UNPAID.value:
        return  # its link-only invoice is its first payment, not one made ahead
    invoices = session.execute(
        select(Invoice)
        .where(
            Invoice.subscription_id == sub.id,
            Invoice.status == InvoiceStatus.OPEN.value,
            Invoice.link_only.is_(True),
        )
        .order_by(Invoice.id)
        .with_for_update()
    ).scalars()
    for invoice in invoices:
        if unresolved_attempt(session, invoice.id) is not None:
            continue
        invoice.status = InvoiceStatus.VOID.value
        invoice.updated_at = now
        record_event(session, "invoice.voided", invoice=invoice, now=now, payload={"by": why})


def ahead_payable(sub: Subscription, invoice: Invoice) -> bool:
    """May a renewal's invoice made ahead be paid now? Only while it is still the next renewal
    of a subscription that renews and is not set to cancel."""
    return (
        sub.status
        in (
            SubscriptionStatus.ACTIVE.value,
            SubscriptionStatus.TRIALING.value,
            SubscriptionStatus.PAST_DUE.value,
        )
        and not sub.cancel_at_period_end
        and is_coming_period(sub, invoice)
    )


def is_coming_period(sub: Subscription, invoice: Invoice) -> bool:
    """Is ``invoice`` for the period the subscription's next renewal will bill?"""
    if sub.next_billing_at is None:
        return False
    if sub.current_period_end is not None:
        return invoice.period_start == sub.current_period_end
    return invoice.period_start == sub.next_billing_at


def void_open_invoices(session: Session, sub: Subscription, now: datetime) -> None:
    """A canceled subscription is not charged any more: its open invoices are voided (locked,
    in id order, after the subscription, like every path that writes them).

    An invoice with a charge still unresolved is left open: voiding it could hide a payment;
    the janitor settles it first.
    """
    invoices = session.execute(
        select(Invoice)
        .where(Invoice.subscription_id == sub.id, Invoice.status == InvoiceStatus.OPEN.value)
        .order_by(Invoice.id)
        .with_for_update()
    ).scalars()
    for invoice in invoices:
        if unresolved_attempt(session, invoice.id) is not None:
            continue
        invoice.status = InvoiceStatus.VOID.value
        invoice.next_attempt_at = None
        invoice.updated_at = now


def paid(session: Session, invoice: Invoice, attempt: ChargeAttempt, now: datetime) -> None:
    invoice.status = InvoiceStatus.PAID.value
    invoice.paid_at = now
    invoice.paid_attempt_id = attempt.id
    invoice.next_attempt_at = None
    invoice.transient_count = 0
    invoice.updated_at = now
    sub = session.get(Subscription, invoice.subscription_id)
    assert sub is not None
    if invoice.link_only and sub.status == SubscriptionStatus.UNPAID.value:
        _first_period_from_payment(session, sub, invoice, now)
    elif invoice.link_only and is_coming_period(sub, invoice):
        # The renewal paid ahead through the link: the subscription enters that period now, as
        # its renewal would have. A cancel at the period's end then ends it when the paid period
        # does, and a pause and resume keep it.
        sub.current_period_start = invoice.period_start
        sub.current_period_end = invoice.period_end
        sub.next_billing_at = invoice.period_end
        sub.updated_at = now
    _move(session, sub, SubscriptionEvent.PAYMENT_SUCCEEDED, now)
    if sub.status == SubscriptionStatus.PAUSED.value and sub.paused_by == PausedBy.DUNNING.value:
        # The ladder paused it for want of payment: a payment lifts that pause (a merchant's
        # own pause is lifted only by a resume).
        _move(session, sub, SubscriptionEvent.RESUME, now)
        record_event(
            session, "subscription.resumed", subscription=sub, now=now, payload={"by": "payment"}
        )
    elif sub.status == SubscriptionStatus.PAUSED.value and invoice.period_start >= (
        sub.paused_at or invoice.period_start
    ):
        # Paid for a period that begins while the merchant has it paused (a page opened
        # before the pause): recorded, and put before a human.
        record_event(
            session,
            "alert.paid_while_paused",
            invoice=invoice,
            now=now,
            payload={"attempt_id": attempt.id, "order_id": attempt.order_id},
        )
    record_event(
        session,
        "invoice.paid",
        invoice=invoice,
        subscription=sub,
        now=now,
        payload={"attempt_id": attempt.id, "order_id": attempt.order_id},
    )


def declined(
    session: Session,
    invoice: Invoice,
    attempt: ChargeAttempt,
    kind: DeclineKind,
    now: datetime,
) -> None:
    """A declined charge: a hard decline retries at once on another live card, else dunning."""
    if kind is DeclineKind.HARD and usable_card(session, invoice, now) is not None:
        invoice.next_attempt_at = now
        invoice.updated_at = now
        record_event(
            session,
            "invoice.card_switched",
            invoice=invoice,
            now=now,
            payload={"attempt_id": attempt.id},
        )
        return
    _dunning_step(session, invoice, now, reason=f"{kind.value}_decline", attempt=attempt)


def card_keeps_failing(
    session: Session, invoice: Invoice, attempt: ChargeAttempt, now: datetime
) -> None:
    """Transient failures on this card alone, past every retry: a dunning step that asks the
    customer for another card (the gateway works for everyone else)."""
    _dunning_step(session, invoice, now, reason="card_keeps_failing", attempt=attempt)


def no_usable_card(session: Session, invoice: Invoice, now: datetime) -> None:
    """No live card to charge: a dunning step without a gateway call, asking for a new card."""
    _dunning_step(session, invoice, now, reason="no_usable_card", attempt=None)


def _dunning_step(
    session: Session,
    invoice: Invoice,
    now: datetime,
    *,
    reason: str,
    attempt: ChargeAttempt | None,
) -> None:
    sub = session.get(Subscription, invoice.subscription_id)
    assert sub is not None
    invoice.failure_count += 1
    invoice.transient_count = 0
    if invoice.first_failed_at is None:
        invoice.first_failed_at = now
    invoice.updated_at = now
    step = dunning_step(_policy(session, sub), invoice.first_failed_at, invoice.failure_count)
    needs_card = reason != "soft_decline"
    payload: dict[str, object] = {
        "reason": reason,
        "step": step.step,
        "steps": step.steps,
        "needs_new_card": needs_card,
        "attempt_id": attempt.id if attempt is not None else None,
    }
    if step.retry_at is not None:
        invoice.next_attempt_at = step.retry_at
        _move(session, sub, SubscriptionEvent.PAYMENT_FAILED, now)
        payload["retry_at"] = step.retry_at.isoformat()
        record_event(
            session,
            "invoice.payment_failed",
            invoice=invoice,
            subscription=sub,
            now=now,
            payload=payload,
        )
        return
    assert step.final_action is not None
    invoice.next_attempt_at = None
    invoice.status = InvoiceStatus.UNCOLLECTIBLE.value
    # The failure first: the final action's table rows start from past_due, unpaid or paused.
    _move(session, sub, SubscriptionEvent.PAYMENT_FAILED, now)
    _move(session, sub, final_action_event(step.final_action), now)
    payload["final_action"] = step.final_action.value
    payload["subscription_status"] = sub.status
    if sub.status == SubscriptionStatus.CANCELED.value:
        void_open_invoices(session, sub, now)
        record_event(
            session,
            "subscription.canceled",
            subscription=sub,
            now=now,
            payload={"reason": "dunning_exhausted"},
        )
    record_event(
        session,
        "invoice.dunning_exhausted",
        invoice=invoice,
        subscription=sub,
        now=now,
        payload=payload,
    )
