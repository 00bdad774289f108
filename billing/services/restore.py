"""After a restore from a backup: find every charge the gateway took after the backup, and record
it, before anything is charged again.

A backup knows the attempts written before it; the gateway may hold payments made after it. Run
on the restored database, with no worker or beat running, ``reconcile_after_restore``:

1. pauses collection until a run completes, moves every id sequence past the backup's ids (rows
   created after the backup are lost, their ids are not), and checks that verify finds the
   latest payment on record (a verify pointed at the wrong account finds nothing, ever);
2. invoices every period that is due, exactly as the renewal would (the renewal after the backup
   did the same, so each lost invoice comes back as the same subscription period), charging
   nothing, and settles what the backup left unresolved;
3. for every invoice not yet paid, asks verify about the order ids that may have been used after
   the backup (``attempts.order_id_for``): the attempt numbers up to the invoice's count that
   have no row here, then the numbers beyond it until ``PROBE_MISSES`` in a row are unknown to
   the gateway;
4. records what it finds (a payment pays its invoice; pending and declined payments are kept as
   history; a payment that does not match is set aside for an operator), moves each invoice's
   attempt count past every number it asked about, so that no new attempt reuses an order id
   the gateway may know, and schedules every open invoice left with nothing to do.

Verify answering anything but a payment or Fatora's own "not found" stops the run: a restore is
not finished until the gateway has been asked everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from billing.attempts import (
    UNRESOLVED,
    UNRESOLVED_VALUES,
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
from billing.services import control, dunning_flow, quarantine
from billing.services.charging import gateway_text
from billing.services.errors import BillingError
from billing.services.events import record_event

log = logging.getLogger("billing.restore")

# Attempt numbers unknown to the gateway, in a row, after which an invoice's probe stops. Gaps
# come from attempts that never reached the gateway (a connect error, a worker killed before
# sending); more than this many in a row would take days of failures.
PROBE_MISSES = 25
# How far past the largest id in the backup new rows start (see _skip_used_ids).
ID_GAP = 1_000_000
_ID_TABLES = ("customers", "card_tokens", "subscriptions", "invoices", "charge_attempts", "events")


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
    """See the module docstring. Collection stays paused until a run completes: an interrupted
    run (a worker left running, a stale task) charges nothing meanwhile."""
    from billing.services.charging import Canary, canary, collect_invoices
    from schedules.renewal import run_renewal_pass

    report = RestoreReport()
    _skip_used_ids(rt)  # first: even the pause's own alert must get a fresh id
    ours = _pause(rt)
    if canary(rt) is not Canary.TRUSTED:
        raise RestoreIncomplete(
            "verify does not find the latest payment on record (a wrong key, account or URL?): "
            "nothing was charged; fix it and run `billing reconcile --after-restore` again"
        )
    report.invoices_created = len(run_renewal_pass(rt).invoice_ids)
    targets = _open_invoices(rt)
    # What the backup left unresolved is settled first, so that what the probe finds can be
    # recorded beside it.
    ids = [t.invoice_id for t in targets]
    for start in range(0, len(ids), rt.charge_batch_size):
        collect_invoices(rt, ids[start : start + rt.charge_batch_size], settle_only=True)
    for target in targets:
        found, last_asked = _probe(rt, target, report)
        _record(rt, target, found, last_asked=last_asked, report=report)
    _schedule_the_rest(rt)
    if ours:
        _resume(rt)
    return report


_RESTORING = "restore in progress: run `billing reconcile --after-restore` until it completes"


def _pause(rt: Runtime) -> bool:
    """Pause collection for the restore; True when this run paused it (and will resume it)."""
    with rt.sessions() as session, session.begin():
        reason = control.collection_paused(session)
        if reason is None:
            control.pause_collection(session, _RESTORING, rt.clock.now())
            return True
        return reason == _RESTORING


def _resume(rt: Runtime) -> None:
    with rt.sessions() as session, session.begin():
        if control.collection_paused(session) == _RESTORING:
            control.resume_collection(session, rt.clock.now())


def _skip_used_ids(rt: Runtime) -> None:
    """Rows created after the backup are lost, but their ids may live on at the gateway (in
    order ids) and at the merchant (in webhook ids): new rows start well past them."""
    with rt.sessions() as session, session.begin():
        if session.get_bind().dialect.name != "postgresql":
            return
        for table in _ID_TABLES:
            session.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                    f"(SELECT coalesce(max(id), 0) FROM {table}) + :gap)"
                ),
                {"gap": ID_GAP},
            )


def _schedule_the_rest(rt: Runtime) -> None:
    """No open invoice is left with nothing to try and nothing unresolved (the backup's own
    schedule may have been superseded by what the probe found)."""
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        unresolved = select(ChargeAttempt.invoice_id).where(
            ChargeAttempt.status.in_(UNRESOLVED_VALUES)
        )
        stranded = session.execute(
            select(Invoice)
            .where(
                Invoice.status == InvoiceStatus.OPEN.value,
                Invoice.next_attempt_at.is_(None),
                Invoice.quarantined_at.is_(None),
                Invoice.link_only.is_(False),  # paid only through the link: never scheduled
                Invoice.id.not_in(unresolved),
            )
            .with_for_update()
        ).scalars()
        for invoice in stranded:
            invoice.next_attempt_at = now
            invoice.updated_at = now


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
        quarantine.set_aside(session, invoice, f"payment {order_id} found, no card on record", now)
        return "set_aside"
    status, word = _status_of(rt, invoice, order_id, payment)
    if status in UNRESOLVED and dunning_flow.unresolved_attempt(session, invoice.id) is not None:
        reason = f"payment {order_id} pending beside another unresolved attempt"
        quarantine.set_aside(session, invoice, reason, now)
        return "set_aside"
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
        transaction_id=gateway_text(payment.transaction_id, 120),
        auth_code=gateway_text(payment.auth_code, 64),
        description=gateway_text(payment.description, 500),
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
        # Money taken that does not match the invoice (a price changed after the backup?):
        # nothing more is charged until a human has looked.
        record_event(
            session,
            "alert.payment_mismatch",
            invoice=invoice,
            now=now,
            payload={"attempt_id": attempt.id, "order_id": order_id},
        )
        quarantine.set_aside(session, invoice, f"payment {order_id} does not match", now)
    return word


def _status_of(
    rt: Runtime, invoice: Invoice, order_id: str, payment: Payment
) -> tuple[AttemptStatus, str]:
    if payment.status is PaymentStatus.SUCCESS:
        if not payment.order_named:
            return AttemptStatus.PENDING, "unconfirmed"  # verified again before anything else
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
