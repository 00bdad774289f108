"""After a restore from a backup: find every charge the gateway took after the backup, and record
it, before anything is charged again.

A backup knows the attempts written before it; the gateway may hold payments made after it. Run
on the restored database, with no worker or beat running, ``reconcile_after_restore``:

1. invoices every period that is due, exactly as the renewal would (the renewal after the backup
   did the same, so each lost invoice comes back as the same subscription period), charging
   nothing;
2. for every invoice not yet paid, asks verify about the order ids that may have been used after
   the backup (``attempts.order_id_for``): the attempt numbers up to the invoice's count that
   have no row here, then the numbers beyond it until ``PROBE_MISSES`` in a row are unknown to
   the gateway;
3. records what it finds (a payment pays its invoice; pending and declined payments are kept as
   history) and moves each invoice's attempt count past every number it asked about, so that
   no new attempt reuses an order id the gateway may know.

Verify answering anything but a payment or Fatora's own "not found" stops the run: a restore is
not finished until the gateway has been asked everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.attempts import (
    UNRESOLVED,
    AttemptStatus,
    CallEnding,
    Expected,
    attempt_number,
    next_verify_delay,
    order_id_for,
    payment_mismatch,
)
from billing.fatora.answers import Call, Then, verdict
from billing.fatora.errors import FatoraError
from billing.fatora.types import Payment, PaymentStatus
from billing.lifecycle import InvoiceStatus
from billing.models import CardToken, ChargeAttempt, Invoice, Subscription
from billing.money import from_minor
from billing.runtime import Runtime
from billing.services import dunning_flow
from billing.services.errors import BillingError
from billing.services.events import record_event

log = logging.getLogger("billing.restore")

# Attempt numbers unknown to the gateway, in a row, after which an invoice's probe stops. Gaps
# come from attempts that never reached the gateway (a connect error, a worker killed before
# sending); more than this many in a row would take days of failures.
PROBE_MISSES = 10


class RestoreIncomplete(BillingError):
    """Verify could not answer clearly: the restore is not reconciled yet; run it again."""


@dataclass
class RestoreReport:
    invoices_created: int = 0
    order_ids_asked: int = 0
    found: dict[str, str] = field(default_factory=dict)  # order id -> what was recorded

    def as_dict(self) -> dict[str, object]:
        return {
            "invoices_created": self.invoices_created,
            "order_ids_asked": self.order_ids_asked,
            "found": dict(sorted(self.found.items())),
        }


@dataclass(frozen=True)
class _Open:
    invoice_id: int
    subscription_id: int
    period_start: datetime
    attempt_count: int
    known: frozenset[int]  # attempt numbers with a row here


def reconcile_after_restore(rt: Runtime) -> RestoreReport:
    from schedules.renewal import run_renewal_pass

    report = RestoreReport()
    report.invoices_created = len(run_renewal_pass(rt).invoice_ids)
    for target in _open_invoices(rt):
        found, last_asked = _probe(rt, target, report)
        _record(rt, target, found, last_asked=last_asked, report=report)
    return report


def _probe(
    rt: Runtime, target: _Open, report: RestoreReport
) -> tuple[list[tuple[int, Payment]], int]:
    """The payments the gateway has for this invoice's order ids that have no row here, and the
    last attempt number asked about."""
    found: list[tuple[int, Payment]] = []

    def ask(number: int) -> bool:
        report.order_ids_asked += 1
        payment = _ask(rt, order_id_for(target.subscription_id, target.period_start, number))
        if payment is not None:
            found.append((number, payment))
        return payment is not None

    # Numbers used here without a row (lost with the restore, or not found by an earlier run):
    # asked again every run, so that a request that landed late is found.
    for number in range(1, target.attempt_count + 1):
        if number not in target.known:
            ask(number)
    number, misses = target.attempt_count + 1, 0
    while misses < PROBE_MISSES:
        misses = 0 if ask(number) else misses + 1
        number += 1
    return found, number - 1


def _open_invoices(rt: Runtime) -> list[_Open]:
    with rt.sessions() as session:
        invoices = session.execute(
            select(Invoice)
            .where(
                Invoice.status.in_([InvoiceStatus.OPEN.value, InvoiceStatus.UNCOLLECTIBLE.value])
            )
            .order_by(Invoice.id)
        ).scalars()
        targets = []
        for invoice in invoices:
            orders = session.execute(
                select(ChargeAttempt.order_id).where(ChargeAttempt.invoice_id == invoice.id)
            ).scalars()
            known = frozenset(n for n in (attempt_number(o) for o in orders) if n is not None)
            targets.append(
                _Open(
                    invoice_id=invoice.id,
                    subscription_id=invoice.subscription_id,
                    period_start=invoice.period_start,
                    attempt_count=invoice.attempt_count,
                    known=known,
                )
            )
        return targets


def _ask(rt: Runtime, order_id: str) -> Payment | None:
    """The payment the gateway has for ``order_id``, None when Fatora says it has none."""
    try:
        return rt.gateway.verify(order_id)
    except FatoraError as exc:
        if verdict(Call.VERIFY, exc.answer).then is Then.NOT_FOUND_RULE:
            return None
        raise RestoreIncomplete(
            f"verify gave no clear answer for {order_id} ({type(exc).__name__}); "
            "nothing was charged: run `billing reconcile --after-restore` again"
        ) from None


def _record(
    rt: Runtime,
    target: _Open,
    found: list[tuple[int, Payment]],
    *,
    last_asked: int,
    report: RestoreReport,
) -> None:
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        sub = session.get(Subscription, target.subscription_id, with_for_update=True)
        invoice = session.get(Invoice, target.invoice_id, with_for_update=True)
        assert sub is not None and invoice is not None
        for number, payment in found:
            order_id = order_id_for(target.subscription_id, target.period_start, number)
            report.found[order_id] = _record_payment(
                rt, session, sub, invoice, order_id, payment, now
            )
        # New attempts start past every number asked about: none reuses an order id the gateway
        # may know (a request of the old system still on its way included).
        invoice.attempt_count = max(invoice.attempt_count, last_asked)


def _record_payment(
    rt: Runtime,
    session: Session,
    sub: Subscription,
    invoice: Invoice,
    order_id: str,
    payment: Payment,
    now: datetime,
) -> str:
    known = session.execute(
        select(ChargeAttempt).where(ChargeAttempt.order_id == order_id)
    ).scalar_one_or_none()
    if known is not None:
        return "already_recorded"
    card_id = (
        sub.card_token_id
        or session.execute(
            select(CardToken.id)
            .where(CardToken.customer_id == sub.customer_id)
            .order_by(CardToken.id.desc())
            .limit(1)
        ).scalar_one_or_none()
    )
    if card_id is None:
        log.error("payment %s found, but its customer has no card on record", order_id)
        record_event(
            session,
            "alert.payment_unrecorded",
            invoice=invoice,
            now=now,
            payload={"order_id": order_id, "reason": "no card on record"},
        )
        return "alerted"
    status, word = _status_of(rt, invoice, order_id, payment)
    if status is AttemptStatus.PENDING and _has_unresolved(session, invoice.id):
        record_event(
            session,
            "alert.payment_unrecorded",
            invoice=invoice,
            now=now,
            payload={"order_id": order_id, "reason": "pending beside another open attempt"},
        )
        return "alerted"
    attempt = ChargeAttempt(
        invoice_id=invoice.id,
        card_token_id=card_id,
        order_id=order_id,
        amount_minor=invoice.amount_minor,
        currency=invoice.currency,
        status=status.value,
        call_ending=(
            CallEnding.ANSWERED.value
            if status is AttemptStatus.DECLINED
            else CallEnding.ACCEPTED.value
        ),
        transaction_id=payment.transaction_id,
        auth_code=payment.auth_code,
        description=(payment.description or "")[:500] or None,
        classification=f"after_restore_{word}",
        gateway_mode=(payment.mode or "")[:8] or None,
        verify_count=1,
        next_verify_at=now + next_verify_delay(1) if status in UNRESOLVED else None,
        created_at=now,
        created_wall_at=datetime.now(UTC),
        settled_at=None if status in UNRESOLVED else now,
        updated_at=now,
    )
    session.add(attempt)
    session.flush()
    if status is AttemptStatus.SUCCEEDED:
        if invoice.status in (InvoiceStatus.OPEN.value, InvoiceStatus.UNCOLLECTIBLE.value):
            dunning_flow.paid(session, invoice, attempt, now)
        else:
            record_event(
                session,
                "alert.duplicate_payment",
                invoice=invoice,
                now=now,
                payload={"attempt_id": attempt.id, "order_id": order_id},
            )
            return "duplicate_payment"
    elif status is AttemptStatus.ANOMALY:
        record_event(
            session,
            "alert.payment_mismatch",
            invoice=invoice,
            now=now,
            payload={"attempt_id": attempt.id, "order_id": order_id},
        )
    return word


def _status_of(
    rt: Runtime, invoice: Invoice, order_id: str, payment: Payment
) -> tuple[AttemptStatus, str]:
    if payment.status is PaymentStatus.SUCCESS:
        expected = Expected(
            order_id,
            from_minor(invoice.amount_minor, invoice.currency),
            invoice.currency,
            rt.live_gateway,
        )
        reason = payment_mismatch(expected, payment)
        if reason is not None:
            return AttemptStatus.ANOMALY, "mismatch"
        return AttemptStatus.SUCCEEDED, "paid"
    if payment.status is PaymentStatus.PENDING:
        return AttemptStatus.PENDING, "pending"
    return AttemptStatus.DECLINED, "declined"


def _has_unresolved(session: Session, invoice_id: int) -> bool:
    return (
        session.execute(
            select(ChargeAttempt.id).where(
                ChargeAttempt.invoice_id == invoice_id,
                ChargeAttempt.status.in_([s.value for s in UNRESOLVED]),
            )
        ).first()
        is not None
    )
