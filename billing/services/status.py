"""What ``billing status`` shows: the state of the whole system at a glance, read in one
transaction. Queries only; the command line renders the result (``Status.as_dict`` is its
``--json``).

Times: renewals and failures are read against the billing clock (the test clock in test mode),
as they are written; the age of an unresolved attempt is real time since the attempt was written
(how long a request may still be inside the gateway is a matter of real seconds), as in the
``billing_attempts_unresolved_oldest_seconds`` metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.attempts import UNRESOLVED_VALUES, AttemptStatus
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import ChargeAttempt, ControlFlag, Customer, Invoice, Plan, Subscription
from billing.money import from_minor
from billing.notify import iso
from billing.services.alerts import open_alerts_by_kind
from billing.services.control import COLLECTION_PAUSED

FAILURE_WINDOW = timedelta(days=1)
NEXT_RENEWALS = 5
# Attempt statuses that took no money and are final: what "failures" counts.
FAILED = (AttemptStatus.DECLINED.value, AttemptStatus.FAILED.value, AttemptStatus.ANOMALY.value)


@dataclass(frozen=True)
class CurrencyTotals:
    """Invoices of one currency: open (awaiting payment, dunning included) and paid, ever."""

    currency: str
    open_count: int
    open_amount: Decimal
    paid_count: int
    paid_amount: Decimal


@dataclass(frozen=True)
class Renewal:
    subscription_id: int
    customer: str  # the customer's external id
    plan: str
    status: str
    next_billing_at: datetime


@dataclass(frozen=True)
class Pause:
    reason: str
    since: datetime


@dataclass(frozen=True)
class Unresolved:
    count: int
    oldest_written_at: datetime | None  # system time


@dataclass(frozen=True)
class Status:
    now: datetime  # the billing clock
    subscriptions: dict[str, int]  # every state, zeros included
    invoices: list[CurrencyTotals]
    unresolved: Unresolved
    unresolved_age_s: float | None
    paused: Pause | None
    open_alerts: dict[str, int]  # by kind
    next_renewals: list[Renewal]
    failures: dict[str, int]  # in the last FAILURE_WINDOW, by reason
    quarantined: dict[str, int]  # subscriptions and invoices set aside

    @property
    def open_alert_count(self) -> int:
        return sum(self.open_alerts.values())

    @property
    def failure_count(self) -> int:
        return sum(self.failures.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": iso(self.now),
            "subscriptions": self.subscriptions,
            "invoices": {
                t.currency: {
                    "open": t.open_count,
                    "open_amount": str(t.open_amount),
                    "paid": t.paid_count,
                    "paid_amount": str(t.paid_amount),
                }
                for t in self.invoices
            },
            "unresolved_attempts": {
                "count": self.unresolved.count,
                "oldest_written_at": iso(self.unresolved.oldest_written_at),
                "oldest_age_s": self.unresolved_age_s,
            },
            "collection": {
                "paused": self.paused is not None,
                "reason": self.paused.reason if self.paused else None,
                "since": iso(self.paused.since) if self.paused else None,
            },
            "open_alerts": {"count": self.open_alert_count, "by_kind": self.open_alerts},
            "next_renewals": [
                {
                    "subscription_id": r.subscription_id,
                    "customer": r.customer,
                    "plan": r.plan,
                    "status": r.status,
                    "next_billing_at": iso(r.next_billing_at),
                }
                for r in self.next_renewals
            ],
            "failures_last_day": {"count": self.failure_count, "by_reason": self.failures},
            "quarantined": self.quarantined,
        }


def read_status(
    session: Session, now: datetime, wall_now: datetime, *, renewals: int = NEXT_RENEWALS
) -> Status:
    """Every figure of ``billing status``: ``now`` is the billing clock's, ``wall_now`` the
    system time (for the age of unresolved attempts)."""
    unresolved = unresolved_attempts(session)
    oldest = unresolved.oldest_written_at
    return Status(
        now=now,
        subscriptions=subscriptions_by_status(session),
        invoices=invoice_totals(session),
        unresolved=unresolved,
        unresolved_age_s=max((wall_now - oldest).total_seconds(), 0.0) if oldest else None,
        paused=collection_pause(session),
        open_alerts=open_alerts_by_kind(session),
        next_renewals=next_renewals(session, renewals),
        failures=failures_since(session, now - FAILURE_WINDOW),
        quarantined=quarantined(session),
    )


def subscriptions_by_status(session: Session) -> dict[str, int]:
    counts = {status.value: 0 for status in SubscriptionStatus}
    rows = session.execute(select(Subscription.status, func.count()).group_by(Subscription.status))
    for status, count in rows:
        counts[str(status)] = int(count)
    return counts


def invoice_totals(session: Session) -> list[CurrencyTotals]:
    """Open and paid invoices per currency (a currency with neither is left out)."""
    wanted = (InvoiceStatus.OPEN.value, InvoiceStatus.PAID.value)
    rows = session.execute(
        select(Invoice.currency, Invoice.status, func.count(), func.sum(Invoice.amount_minor))
        .where(Invoice.status.in_(wanted))
        .group_by(Invoice.currency, Invoice.status)
    ).all()
    figures: dict[str, dict[str, tuple[int, int]]] = {}
    for currency, status, count, minor in rows:
        figures.setdefault(str(currency), {})[str(status)] = (int(count), int(minor or 0))
    totals = []
    for currency in sorted(figures):
        open_count, open_minor = figures[currency].get(InvoiceStatus.OPEN.value, (0, 0))
        paid_count, paid_minor = figures[currency].get(InvoiceStatus.PAID.value, (0, 0))
        totals.append(
            CurrencyTotals(
                currency=currency,
                open_count=open_count,
                open_amount=from_minor(open_minor, currency),
                paid_count=paid_count,
                paid_amount=from_minor(paid_minor, currency),
            )
        )
    return totals


def unresolved_attempts(session: Session) -> Unresolved:
    """Attempts whose outcome is not known yet (read through their partial unique index)."""
    count, oldest = session.execute(
        select(func.count(), func.min(ChargeAttempt.created_wall_at)).where(
            ChargeAttempt.status.in_(UNRESOLVED_VALUES)
        )
    ).one()
    return Unresolved(int(count), oldest)


def collection_pause(session: Session) -> Pause | None:
    flag = session.get(ControlFlag, COLLECTION_PAUSED)
    return Pause(flag.value, flag.updated_at) if flag is not None else None


def next_renewals(session: Session, limit: int = NEXT_RENEWALS) -> list[Renewal]:
    """The subscriptions due next (read through the due index), soonest first."""
    rows = session.execute(
        select(
            Subscription.id,
            Customer.external_id,
            Plan.code,
            Subscription.status,
            Subscription.next_billing_at,
        )
        .join(Customer, Customer.id == Subscription.customer_id)
        .join(Plan, Plan.id == Subscription.plan_id)
        .where(Subscription.next_billing_at.is_not(None), Subscription.quarantined_at.is_(None))
        .order_by(Subscription.next_billing_at, Subscription.id)
        .limit(limit)
    )
    return [Renewal(int(i), str(c), str(p), str(s), at) for i, c, p, s, at in rows if at]


def failures_since(session: Session, since: datetime) -> dict[str, int]:
    """Attempts settled since ``since`` that took no money, by reason: the attempt's
    classification (soft_decline, hard_decline, transient, never_charged...), else its
    status."""
    reason = func.coalesce(ChargeAttempt.classification, ChargeAttempt.status)
    rows = session.execute(
        select(reason, func.count())
        .where(ChargeAttempt.status.in_(FAILED), ChargeAttempt.settled_at >= since)
        .group_by(reason)
    )
    return {str(why): int(count) for why, count in sorted(rows, key=lambda r: (-r[1], r[0]))}


def quarantined(session: Session) -> dict[str, int]:
    subs = session.execute(
        select(func.count()).where(Subscription.quarantined_at.is_not(None))
    ).scalar_one()
    invoices = session.execute(
        select(func.count()).where(Invoice.quarantined_at.is_not(None))
    ).scalar_one()
    return {"subscriptions": int(subs), "invoices": int(invoices)}
