"""``billing refund INVOICE``: the full refund of a paid invoice through Fatora, recorded, and
safe to run again (``billing/refunds.py`` says what each answer means and when to ask again).

1. The invoice is locked and checked (paid, by a charge with a transaction id), and the refund
   row is written (``requested``) or read back, and committed.
2. The row is locked with ``NOWAIT`` (a second run meanwhile is told a refund is under way).
   A refund already asked for, or accepted, is first looked up through verify's refund details;
   then ``refunds.may_ask_again`` decides. To ask, the moment the request leaves is written and
   committed first (``sent_wall_at``): a run killed after that leaves a trace that keeps the
   next run from asking again before the grace.
3. The row is locked again, the request sent, and its answer recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Select, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.fatora.errors import FatoraError
from billing.lifecycle import InvoiceStatus
from billing.models import ChargeAttempt, Invoice, Refund, Subscription
from billing.refunds import RefundStatus, after_error, from_word, is_settled, may_ask_again
from billing.runtime import Runtime
from billing.services.errors import BillingError, Conflict, NotFound
from billing.services.events import record_event

log = logging.getLogger("billing.refunds")


@dataclass(frozen=True)
class RefundReport:
    invoice_id: int
    status: RefundStatus
    asked: bool  # whether Fatora was asked for the refund in this run
    already: bool  # the refund was settled before this run
    amount_minor: int
    currency: str
    description: str | None = None


def refund_invoice(rt: Runtime, invoice_id: int) -> RefundReport:
    refund_id = _write_ahead(rt, invoice_id)
    with rt.sessions() as session, session.begin():
        refund = _lock(session, refund_id)
        status = RefundStatus(refund.status)
        if status is RefundStatus.COMPLETED:
            return _report(refund, asked=False, already=True)
        if refund.sent_wall_at is not None or status is RefundStatus.PENDING:
            seen, readable = _verify(rt, refund)
            if seen is not None:
                _settle(session, refund, from_word(seen), rt)
                return _report(refund, asked=False, already=False)
            if not readable:
                return _report(refund, asked=False, already=False)
        wall = datetime.now(UTC)
        if not may_ask_again(status, refund.sent_wall_at, wall, rt.unknown_grace):
            return _report(refund, asked=False, already=False)  # Fatora may still be on it
        if refund.sent_wall_at is not None:
            refund.tries += 1
        refund.status = RefundStatus.REQUESTED.value
        refund.sent_wall_at = wall
        refund.updated_at = rt.clock.now()
    with rt.sessions() as session, session.begin():
        refund = _lock(session, refund_id)
        if refund.sent_wall_at != wall or refund.status != RefundStatus.REQUESTED.value:
            return _report(refund, asked=False, already=False)  # another run took over
        try:
            answer = rt.gateway.refund(refund.order_id, refund.transaction_id)
        except FatoraError as exc:
            log.warning("refund of invoice %s: %s", invoice_id, exc.answer)
            seen, readable = _verify(rt, refund)
            outcome = after_error(exc.answer, exc.http_status, seen, readable)
            refund.description = _clip(f"{type(exc).__name__}: {exc}")
            _settle(session, refund, outcome, rt)
            return _report(refund, asked=True, already=False)
        refund.refund_transaction_id = answer.refund_transaction_id
        refund.description = None
        _settle(session, refund, from_word(answer.refund_status), rt)
        return _report(refund, asked=True, already=False)


def _write_ahead(rt: Runtime, invoice_id: int) -> int:
    """The refund's row, written (or found) and committed."""
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        invoice = session.get(Invoice, invoice_id)
        if invoice is None:
            raise NotFound(f"no invoice {invoice_id}")
        session.get(Subscription, invoice.subscription_id, with_for_update=True)
        session.refresh(invoice, with_for_update=True)
        if invoice.status != InvoiceStatus.PAID.value:
            raise BillingError(
                f"invoice {invoice_id} is {invoice.status}: only a paid invoice can be refunded"
            )
        # NOWAIT: a run in Fatora holds this row and then needs the invoice (its events refer
        # to it); waiting here, with the invoice locked, would deadlock with it.
        refund = _locked_refund(session, select(Refund).where(Refund.invoice_id == invoice_id))
        if refund is None:
            paid = (
                session.get(ChargeAttempt, invoice.paid_attempt_id)
                if invoice.paid_attempt_id is not None
                else None
            )
            if paid is None or not paid.transaction_id:
                raise BillingError(
                    f"invoice {invoice_id} has no recorded payment with a Fatora transaction "
                    "id: it cannot be refunded through Fatora"
                )
            refund = Refund(
                invoice_id=invoice_id,
                attempt_id=paid.id,
                order_id=paid.order_id,
                transaction_id=paid.transaction_id,
                amount_minor=paid.amount_minor,
                currency=paid.currency,
                status=RefundStatus.REQUESTED.value,
                tries=1,
                requested_at=now,
                updated_at=now,
            )
            session.add(refund)
            session.flush()
            record_event(
                session,
                "invoice.refund_requested",
                invoice=invoice,
                now=now,
                payload={"refund_id": refund.id, "order_id": refund.order_id},
            )
        return refund.id


def _lock(session: Session, refund_id: int) -> Refund:
    refund = _locked_refund(session, select(Refund).where(Refund.id == refund_id))
    assert refund is not None
    return refund


def _locked_refund(session: Session, query: Select[Refund]) -> Refund | None:
    """The refund row, locked without waiting: a run already holding it is in Fatora."""
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(nowait=True)
    try:
        return session.execute(query).scalar_one_or_none()
    except OperationalError:
        raise Conflict(
            "a refund of this invoice is being asked for right now; run the command again in "
            "a minute to see how it went"
        ) from None


def _verify(rt: Runtime, refund: Refund) -> tuple[str | None, bool]:
    """The refund status verify shows for the payment (None: no refund), and whether verify
    could be read at all."""
    try:
        payment = rt.gateway.verify(refund.order_id, refund.transaction_id)
    except FatoraError as exc:
        log.warning("verify of refunded order %s: %s", refund.order_id, exc.answer)
        return None, False
    if payment.refund_transaction_id and not refund.refund_transaction_id:
        refund.refund_transaction_id = payment.refund_transaction_id
    return payment.refund_status, True


def _settle(session: Session, refund: Refund, status: RefundStatus, rt: Runtime) -> None:
    now = rt.clock.now()
    before = refund.status
    refund.status = status.value
    refund.updated_at = now
    if is_settled(status):
        refund.settled_at = now
    if status.value == before:
        return
    invoice = session.get(Invoice, refund.invoice_id)
    kind = {
        RefundStatus.COMPLETED: "invoice.refunded",
        RefundStatus.PENDING: "invoice.refund_pending",
        RefundStatus.REJECTED: "invoice.refund_rejected",
    }.get(status)
    if kind is not None and invoice is not None:
        record_event(
            session,
            kind,
            invoice=invoice,
            now=now,
            payload={"refund_id": refund.id, "order_id": refund.order_id},
        )


def _clip(text: str) -> str:
    return text[:500]


def _report(refund: Refund, *, asked: bool, already: bool) -> RefundReport:
    return RefundReport(
        invoice_id=refund.invoice_id,
        status=RefundStatus(refund.status),
        asked=asked,
        already=already,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        description=refund.description,
    )
