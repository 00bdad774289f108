"""Records as plain dicts for ``--json`` output: ISO 8601 UTC times, amounts as decimal strings.

A card is shown by id, status and dates: never its token, not even masked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from billing.models import (
    CardToken,
    ChargeAttempt,
    Customer,
    Invoice,
    Plan,
    Refund,
    Subscription,
)
from billing.money import from_minor
from billing.plans import PlanSpec
from billing.services.quarantine import QuarantinedRow


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def amount(minor: int, currency: str) -> str:
    return str(from_minor(minor, currency))


def customer(c: Customer) -> dict[str, Any]:
    return {
        "id": c.id,
        "external_id": c.external_id,
        "name": c.name,
        "email": c.email,
        "phone": c.phone,
        "language": c.language,
        "timezone": c.timezone,
        # A device token identifies a phone: only whether there is one is shown.
        "push": c.fcm_token is not None,
        "created_at": iso(c.created_at),
    }


def card(c: CardToken) -> dict[str, Any]:
    return {
        "id": c.id,
        "customer_id": c.customer_id,
        "status": c.status,
        "status_reason": c.status_reason,
        "issued_at": iso(c.issued_at),
        "expires_at": iso(c.expires_at),
        "created_at": iso(c.created_at),
        "deactivated_at": iso(c.deactivated_at),
    }


def _schedule(interval: str | None, count: int, cron: str | None) -> str:
    if cron is not None:
        return f"cron {cron}"
    return f"every {count} {interval}" + ("s" if count != 1 else "")


def plan_spec(p: PlanSpec) -> dict[str, Any]:
    return {
        "code": p.code,
        "name": p.name,
        "amount": str(p.amount),
        "currency": p.currency,
        "interval": p.interval.value if p.interval is not None else None,
        "interval_count": p.interval_count,
        "cron": p.cron,
        "trial_days": p.trial_days,
        "dunning": p.dunning,
        "schedule": _schedule(p.interval.value if p.interval else None, p.interval_count, p.cron),
    }


def plan(session: Session, p: Plan, now: datetime) -> dict[str, Any]:
    from billing.services.subscriptions import price_at

    price = price_at(session, p.id, now)
    return {
        "code": p.code,
        "name": p.name,
        "amount": amount(price.amount_minor, price.currency),
        "currency": price.currency,
        "interval": p.interval,
        "interval_count": p.interval_count,
        "cron": p.cron,
        "trial_days": p.trial_days,
        "dunning": p.dunning_code,
        "schedule": _schedule(p.interval, p.interval_count, p.cron),
        "retired_at": iso(p.retired_at),
    }


def subscription(session: Session, s: Subscription) -> dict[str, Any]:
    from sqlalchemy.exc import NoResultFound

    from billing.services.subscriptions import subscription_price

    owner = session.get(Customer, s.customer_id)
    plan_row = session.get(Plan, s.plan_id)
    try:  # what its next period is billed at, with the prices written so far
        price = subscription_price(session, s, datetime.max.replace(tzinfo=UTC))
    except NoResultFound:  # a plan with no price: its renewal is quarantined
        price = None
    return {
        "id": s.id,
        "customer": owner.external_id if owner is not None else None,
        "customer_id": s.customer_id,
        "plan": plan_row.code if plan_row is not None else None,
        "amount": amount(*price.money) if price is not None else None,
        "currency": price.currency if price is not None else None,
        "card_id": s.card_token_id,
        "status": s.status,
        "trial_end": iso(s.trial_end),
        "current_period_start": iso(s.current_period_start),
        "current_period_end": iso(s.current_period_end),
        "next_billing_at": iso(s.next_billing_at),
        "cancel_at_period_end": s.cancel_at_period_end,
        "canceled_at": iso(s.canceled_at),
        "created_at": iso(s.created_at),
        **_quarantine(s),
    }


def invoice(i: Invoice) -> dict[str, Any]:
    return {
        "id": i.id,
        "subscription_id": i.subscription_id,
        "period_start": iso(i.period_start),
        "period_end": iso(i.period_end),
        "amount": amount(i.amount_minor, i.currency),
        "currency": i.currency,
        "status": i.status,
        "attempt_count": i.attempt_count,
        "failure_count": i.failure_count,
        "next_attempt_at": iso(i.next_attempt_at),
        "paid_at": iso(i.paid_at),
        "created_at": iso(i.created_at),
        **_quarantine(i),
    }


def _quarantine(row: Subscription | Invoice) -> dict[str, Any]:
    return {
        "quarantined_at": iso(row.quarantined_at),
        "quarantine_reason": row.quarantine_reason,
        "quarantine_retry_at": iso(row.quarantine_retry_at),
    }


def attempt(a: ChargeAttempt) -> dict[str, Any]:
    return {
        "id": a.id,
        "invoice_id": a.invoice_id,
        "order_id": a.order_id,
        "kind": a.kind,
        "card_id": a.card_token_id,
        "amount": amount(a.amount_minor, a.currency),
        "currency": a.currency,
        "status": a.status,
        "classification": a.classification,
        "transaction_id": a.transaction_id,
        "auth_code": a.auth_code,
        "description": a.description,
        "call_ending": a.call_ending,
        "verify_count": a.verify_count,
        "next_verify_at": iso(a.next_verify_at),
        "created_at": iso(a.created_at),
        "settled_at": iso(a.settled_at),
    }


def quarantined(row: QuarantinedRow) -> dict[str, Any]:
    """A quarantined row; its reason holds the exception's class and message, never a secret."""
    return {
        "table": row.table,
        "id": row.id,
        "since": iso(row.since),
        "reason": row.reason,
        "next_retry": iso(row.retry_at),
    }


def refund(r: Refund) -> dict[str, Any]:
    return {
        "id": r.id,
        "invoice_id": r.invoice_id,
        "order_id": r.order_id,
        "transaction_id": r.transaction_id,
        "amount": amount(r.amount_minor, r.currency),
        "currency": r.currency,
        "status": r.status,
        "refund_transaction_id": r.refund_transaction_id,
        "description": r.description,
        "tries": r.tries,
        "requested_at": iso(r.requested_at),
        "settled_at": iso(r.settled_at),
    }
