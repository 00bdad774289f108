"""The due finder: subscriptions whose ``next_billing_at`` has passed become invoices.

Each pass claims due subscriptions in bounded batches, ordered by ``next_billing_at`` over the
partial index on it, so its cost grows with the number due and not with the table. On
PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED``: two schedulers take disjoint batches. The
invoice's unique constraint on (subscription, period start) is the last word: a race that got
past the claim inserts nothing (``ON CONFLICT DO NOTHING``).

One subscription that raises (a customer's time zone that no longer exists, a plan with no
price) must not stop the others. A batch is renewed in one transaction, as fast as before; only
if it raises is it rolled back and renewed again row by row, each row in a savepoint, and a row
that raises again is quarantined (``billing/services/quarantine.py``): it leaves the due index
and is tried again hourly by ``retry_query``, each retry in a savepoint of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Executable, Select, or_, select
from sqlalchemy.orm import Session

from billing.db import id_in, insert_for
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
from billing.services import quarantine
from billing.services.dunning_flow import void_invoices_ahead
from billing.services.events import record_event, savepoint
from billing.services.subscriptions import schedule_for, subscription_price

log = logging.getLogger("billing.renewal")

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
    # Subscriptions that raised and were quarantined (entering or staying), and those released.
    quarantined: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    def add(self, other: RenewalReport) -> None:
        self.invoice_ids.extend(other.invoice_ids)
        self.canceled.extend(other.canceled)
        self.claimed += other.claimed
        self.quarantined.extend(other.quarantined)
        self.released.extend(other.released)


def due_query(now: datetime, limit: int) -> Select[Subscription]:
    """The one due query: due subscriptions, oldest first, bounded.

    It repeats the predicate of the partial index ``ix_subscriptions_due`` (something to bill,
    not quarantined), so it reads that index in order and only rows it can bill: quarantined
    subscriptions are not in it, they come back through ``retry_query``.
    """
    return (
        select(Subscription)
        .where(
            Subscription.next_billing_at.is_not(None),
            Subscription.quarantined_at.is_(None),
            Subscription.next_billing_at <= now,
        )
        .order_by(Subscription.next_billing_at)
        .limit(limit)
    )


def retry_query(now: datetime, limit: int) -> Select[Subscription]:
    """Quarantined subscriptions whose retry time has come, over ``ix_subscriptions_quarantined``
    (which holds only quarantined rows). One that has nothing to bill any more (canceled or
    paused meanwhile) comes back too, to be released."""
    return (
        select(Subscription)
        .where(
            Subscription.quarantined_at.is_not(None),
            Subscription.quarantine_retry_at <= now,
            or_(Subscription.next_billing_at.is_(None), Subscription.next_billing_at <= now),
        )
        .order_by(Subscription.quarantine_retry_at)
        .limit(limit)
    )


def claim_due(session: Session, now: datetime, limit: int) -> list[Subscription]:
    return claim(session, due_query(now, limit))


def claim(session: Session, query: Select[Subscription]) -> list[Subscription]:
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.execute(query).scalars())


def renew_one(session: Session, sub: Subscription, now: datetime) -> int | None:
    """Invoice the subscription's next period and advance it; the new invoice id, if any."""
    if sub.status not in RENEWING:
        sub.next_billing_at = None  # nothing to bill until resumed
        return None
    plan = session.get(Plan, sub.plan_id)
    assert plan is not None
    period = _coming_period(session, sub)
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
        void_invoices_ahead(session, sub, now, "canceled")
        record_event(
            session,
            "subscription.canceled",
            subscription=sub,
            now=now,
            payload={"at_period_end": True},
        )
        return None
    price = subscription_price(session, sub, period.start)
    invoice_id = _insert_invoice(session, sub, period, price.amount_minor, price.currency, now)
    if invoice_id is None:
        invoice_id = _take_over_ahead(session, sub, period, now)
    sub.current_period_start = period.start
    sub.current_period_end = period.end
    sub.next_billing_at = period.end
    # A trialing subscription stays so until its first charge settles (paid -> active,
    # declined -> past_due): the lifecycle table decides, on the charge's outcome.
    sub.updated_at = now
    return invoice_id


def _coming_period(session: Session, sub: Subscription) -> Period:
    plan = session.get(Plan, sub.plan_id)
    customer = session.get(Customer, sub.customer_id)
    assert plan is not None and customer is not None
    schedule = schedule_for(plan, sub.anchor_at, customer.timezone)
    if sub.current_period_start is None or sub.current_period_end is None:
        assert sub.next_billing_at is not None
        return first_period(schedule, sub.next_billing_at)
    return next_period(schedule, Period(sub.current_period_start, sub.current_period_end))


def invoice_ahead(session: Session, sub: Subscription, now: datetime) -> int:
    """The invoice of the subscription's coming period, made now to be paid through the link
    (``link_only``), without renewing the subscription: its renewal happens on its date as
    always, and then charges this invoice unless it was paid (``_take_over_ahead``)."""
    period = _coming_period(session, sub)
    existing = session.execute(
        select(Invoice.id).where(
            Invoice.subscription_id == sub.id, Invoice.period_start == period.start
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    price = subscription_price(session, sub, period.start)
    invoice_id = _insert_invoice(session, sub, period, price.amount_minor, price.currency, now)
    assert invoice_id is not None  # the subscription is locked and the period was free
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    invoice.link_only = True
    invoice.next_attempt_at = None
    return invoice_id


def _take_over_ahead(
    session: Session, sub: Subscription, period: Period, now: datetime
) -> int | None:
    """The renewal meets the period's invoice made ahead for the link: paid, it is left alone;
    still open, it becomes an ordinary invoice charged from now on."""
    invoice = session.execute(
        select(Invoice)
        .where(Invoice.subscription_id == sub.id, Invoice.period_start == period.start)
        .with_for_update()
    ).scalar_one_or_none()
    if invoice is None or not invoice.link_only:
        return None
    invoice.link_only = False
    invoice.updated_at = now
    if invoice.status != InvoiceStatus.OPEN.value:
        return None
    # Billed at the period's price as of now (it may have changed since the page was opened).
    price = subscription_price(session, sub, period.start)
    invoice.amount_minor, invoice.currency = price.amount_minor, price.currency
    invoice.next_attempt_at = now
    return invoice.id


# The invoice INSERT of each dialect, built once: a renewal only binds its values, instead of
# building (and computing the cache key of) a statement of its own. It runs on the session's
# connection, as the plain INSERT it is, without the ORM's bulk-insert machinery.
_INVOICE_INSERTS: dict[str, Executable] = {}


def _invoice_insert(session: Session) -> Executable:
    dialect = session.get_bind().dialect.name
    stmt = _INVOICE_INSERTS.get(dialect)
    if stmt is None:
        stmt = (
            insert_for(session, Invoice)
            .on_conflict_do_nothing(index_elements=["subscription_id", "period_start"])
            .returning(Invoice.id)
        )
        _INVOICE_INSERTS[dialect] = stmt
    return stmt


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
    invoice_id: int | None = (
        session.connection().execute(_invoice_insert(session), values).scalar_one_or_none()
    )
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
    rt: Runtime,
    *,
    now: datetime | None = None,
    max_batches: int = 1000,
    on_batch: Callable[[RenewalReport], None] | None = None,
) -> RenewalReport:
    """Claim and renew due subscriptions until none is due; commit batch by batch.

    Quarantined subscriptions whose retry time has come are tried first (a retry that succeeds
    releases the row, and its later periods, if due, are renewed by the rest of the pass), then
    the due ones. ``on_batch`` is given each batch's report once its transaction has committed
    (the worker queues that batch's charges: a month-start spike is being charged while the
    rest is still renewed); otherwise the caller enqueues the charges for
    ``report.invoice_ids`` after this returns, that is after the commits that made them exist.
    """
    report = RenewalReport()
    # Retries are expected to raise again: they go row by row (savepoints) from the start.
    for query, isolated in ((retry_query, True), (due_query, False)):
        for _ in range(max_batches):
            batch = _renew_batch(rt, query, now, isolated=isolated)
            if batch is None:
                break
            report.add(batch)
            if on_batch is not None:
                on_batch(batch)
    return report


def _renew_batch(
    rt: Runtime,
    query: Callable[[datetime, int], Select[Subscription]],
    now: datetime | None,
    *,
    isolated: bool,
) -> RenewalReport | None:
    """Claim one batch with ``query`` and renew it in one transaction; None when nothing was
    due. If the batch raises (and the fault is not the database's), it is rolled back and
    claimed again, to be renewed row by row."""
    try:
        return _claim_and_renew(rt, query, now, isolated=isolated)
    except Exception as exc:
        if isolated or quarantine.systemic(exc):
            raise
        log.warning("renewal batch failed (%s): renewing it row by row", quarantine.reason_for(exc))
    return _claim_and_renew(rt, query, now, isolated=True)


def _claim_and_renew(
    rt: Runtime,
    query: Callable[[datetime, int], Select[Subscription]],
    now: datetime | None,
    *,
    isolated: bool,
) -> RenewalReport | None:
    batch = RenewalReport()
    with rt.sessions() as session, session.begin():
        at = now or rt.clock.now()
        due = claim(session, query(at, rt.renewal_batch_size))
        if not due:
            return None
        batch.claimed = len(due)
        related = _load_related(session, due)
        if isolated:
            for sub in due:
                _renew_isolated(session, sub, at, batch)
        else:
            # The rows' changes are flushed together at the commit, not one by one before the
            # next row's first query: each row's queries read only its own invoices (and their
            # attempts) and its plan's prices, never another claimed row's changes.
            with session.no_autoflush:
                for sub in due:
                    _note(batch, sub, renew_one(session, sub, at))
        del related  # held until here: the session keeps only the objects someone refers to
    return batch  # committed: only now does the report speak of it


def _load_related(session: Session, subs: list[Subscription]) -> list[Plan | Customer]:
    """The plans and customers of ``subs``, one query each, so that renewing each subscription
    finds them in the session instead of loading them one by one."""
    plans = select(Plan).where(id_in(session, Plan.id, (sub.plan_id for sub in subs)))
    customers = select(Customer).where(
        id_in(session, Customer.id, (sub.customer_id for sub in subs))
    )
    return [*session.execute(plans).scalars(), *session.execute(customers).scalars()]


def _renew_isolated(
    session: Session, sub: Subscription, at: datetime, batch: RenewalReport
) -> None:
    """Renew one subscription in a savepoint: if it raises, only its own work is rolled back and
    it is quarantined; if it succeeds and was quarantined, it is released."""
    try:
        with savepoint(session):
            invoice_id = renew_one(session, sub, at) if sub.next_billing_at is not None else None
            session.flush()  # a database error of this row surfaces here, inside its savepoint
    except Exception as exc:
        if quarantine.systemic(exc):
            raise
        quarantine.hold(session, sub, exc, at)
        session.flush()  # not left for the next row's savepoint to be blamed for
        batch.quarantined.append(sub.id)
        return
    if quarantine.release(session, sub, at):
        session.flush()
        batch.released.append(sub.id)
    _note(batch, sub, invoice_id)


def _note(batch: RenewalReport, sub: Subscription, invoice_id: int | None) -> None:
    if invoice_id is not None:
        batch.invoice_ids.append(invoice_id)
    elif sub.status == SubscriptionStatus.CANCELED.value:
        batch.canceled.append(sub.id)
