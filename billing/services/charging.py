"""Collection: an open invoice becomes a verified payment, at most once.

This is where a charge happens. For each invoice of a batch, under the invoice lock:

1. settle every attempt whose outcome is not known yet, with verify, before anything else;
2. if the invoice is still open and due, write a new attempt with a fresh order id and commit it
   (write-ahead: from here on the charge cannot be lost, only be unknown);
3. call collect-payment, then verify, and check order id, amount, currency and mode;
4. record the result and move the invoice and the subscription (paid/active, or a dunning step).

Gateway calls of a batch run concurrently on the runtime's call threads; the database work stays
on the calling thread, in short transactions that load a batch's rows with one query per table.
Results are recorded as they come in, so the database work of the first answers overlaps the
calls still under way. If the process dies anywhere, the attempt rows that were committed are
settled by the next run (a redelivered task, a retry sweep or the janitor), which verifies before
it may charge again.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.attempts import (
    UNRESOLVED,
    AttemptStatus,
    CallEnding,
    Expected,
    mismatch_reason,
    next_verify_delay,
    not_found_is_final,
)
from billing.db import id_in
from billing.fatora.errors import (
    AuthenticationFailed,
    Declined,
    FatoraError,
    OutcomeUnknown,
    PaymentNotFound,
    RequestRejected,
    Unprocessable,
)
from billing.fatora.retry import retry_decision
from billing.fatora.types import DeclineKind, Payment, PaymentStatus
from billing.lifecycle import InvoiceStatus
from billing.models import Base, CardStatus, CardToken, ChargeAttempt, Invoice, Subscription
from billing.money import from_minor
from billing.runtime import Runtime
from billing.services import control, dunning_flow
from billing.services.events import record_event

log = logging.getLogger("billing.charging")

# While a call is under way the invoice is not offered to the retry sweep.
IN_FLIGHT_LEASE = timedelta(minutes=15)
# An outcome waits at most this long (in seconds) for others to be recorded with it.
RECORD_WITHIN_S = 0.5
# When fast retries of transient faults are used up, try again after this long.
SLOW_RETRY = timedelta(hours=1)


@dataclass(frozen=True)
class Outcome:
    """What one gateway exchange established about one attempt."""

    status: AttemptStatus
    ending: CallEnding | None = None
    transaction_id: str | None = None
    auth_code: str | None = None
    description: str | None = None
    mode: str | None = None
    decline_kind: DeclineKind | None = None
    classification: str | None = None
    # The exception behind a transient outcome, for the retry decision (never persisted).
    error: BaseException | None = field(default=None, compare=False)

    @property
    def money_taken(self) -> bool:
        return self.status is AttemptStatus.SUCCEEDED


@dataclass(frozen=True)
class _Call:
    """What a gateway thread needs: plain values, no ORM objects."""

    attempt_id: int
    invoice_id: int
    order_id: str
    amount: Decimal
    currency: str
    transaction_id: str | None
    ending: CallEnding | None
    created_wall_at: datetime
    ciphertext: bytes | None = field(default=None, repr=False)


@dataclass
class CollectionReport:
    """What a collection run did, by invoice id (ids and words only: safe to show anywhere)."""

    results: dict[int, str] = field(default_factory=dict)
    retry_in: dict[int, float] = field(default_factory=dict)

    def note(self, invoice_id: int, result: str) -> None:
        self.results[invoice_id] = result

    def as_dict(self) -> dict[str, object]:
        return {
            "results": {str(k): v for k, v in sorted(self.results.items())},
            "retry_in": {str(k): v for k, v in sorted(self.retry_in.items())},
        }


def new_order_id(invoice_id: int) -> str:
    """A fresh order id for every attempt: never reused, so verify cannot match two payments."""
    return f"INV{invoice_id}-{secrets.token_hex(6).upper()}"


def collect_invoices(
    rt: Runtime, invoice_ids: Sequence[int], *, settle_only: bool = False
) -> CollectionReport:
    """Collect (or, with ``settle_only``, only settle) the given invoices."""
    report = CollectionReport()
    with rt.locker.hold(invoice_ids) as locked:
        for skipped in sorted(set(invoice_ids) - set(locked)):
            report.note(skipped, "busy")  # another worker holds it: that worker finishes it
        if not locked:
            return report
        pool = rt.gateway_calls
        unresolved = _unresolved_calls(rt, locked)
        if unresolved:
            now_wall = datetime.now(UTC)
            _exchange(rt, pool, unresolved, lambda c: _verify(rt, c, now_wall), report)
        if not settle_only:
            calls = _start_attempts(rt, locked, report)
            if calls:
                _exchange(rt, pool, calls, lambda c: _charge(rt, c), report)
    return report


def _exchange(
    rt: Runtime,
    pool: ThreadPoolExecutor,
    calls: list[_Call],
    exchange: Callable[[_Call], Outcome],
    report: CollectionReport,
) -> None:
    """Run ``exchange`` for every call on the pool and record the outcomes as they arrive.

    Outcomes are recorded in chunks of about a round of calls (``charge_concurrency``), or
    sooner when the first of them has waited ``RECORD_WITHIN_S``: the first answers are written
    while later calls are still under way, in few transactions. The invoice locks are held by
    the caller until every call has ended, even if recording fails.
    """
    run = _never_raising(exchange)
    pending: dict[Future[Outcome], _Call] = {}
    chunk = max(1, rt.charge_concurrency)
    ready: list[tuple[_Call, Outcome]] = []
    first_ready_at = 0.0
    try:
        for call in calls:
            pending[pool.submit(run, call)] = call
        while pending:
            done, _ = wait(pending, timeout=RECORD_WITHIN_S, return_when=FIRST_COMPLETED)
            if done and not ready:
                first_ready_at = time.monotonic()
            ready.extend((pending.pop(future), future.result()) for future in done)
            overdue = ready and time.monotonic() - first_ready_at >= RECORD_WITHIN_S
            if ready and (len(ready) >= chunk or not pending or overdue):
                _record(rt, ready, report)
                ready = []
    except BaseException:
        # Recording failed (or the process is being stopped). Calls not begun are dropped:
        # their attempts stay in flight and are settled by verify later. Calls under way are
        # waited for, so that no invoice lock is let go in the middle of a call, and what is
        # known about the answers that could not be recorded is kept as far as possible.
        for future in pending:
            future.cancel()
        wait(pending)
        ready.extend((call, f.result()) for f, call in pending.items() if not f.cancelled())
        _keep_what_was_accepted(rt, ready)
        raise


def _never_raising(exchange: Callable[[_Call], Outcome]) -> Callable[[_Call], Outcome]:
    """``exchange``, turning any exception (a bug) into an unknown outcome: a call that raised
    must not take the answers of the other calls down with it."""

    def run(call: _Call) -> Outcome:
        try:
            return exchange(call)
        except Exception as exc:
            log.exception("gateway exchange failed for attempt %s", call.attempt_id)
            return Outcome(
                AttemptStatus.UNKNOWN,
                call.ending,
                transaction_id=call.transaction_id,
                description=type(exc).__name__,
            )

    return run


def _keep_what_was_accepted(rt: Runtime, results: list[tuple[_Call, Outcome]]) -> None:
    """After a failed record: mark the attempts the gateway accepted, so that a later verify
    'not found' is never read as 'never charged'. Best effort; every attempt not recorded stays
    unresolved and is settled by verify."""
    accepted = [
        (call, outcome) for call, outcome in results if outcome.ending is CallEnding.ACCEPTED
    ]
    log.error(
        "results of %d call(s) not recorded (they are settled by verify later); accepted: %s",
        len(results),
        ", ".join(f"{c.order_id}/{o.transaction_id or '-'}" for c, o in accepted) or "none",
    )
    if not accepted:
        return
    try:
        with rt.sessions() as session, session.begin():
            for call, outcome in accepted:
                attempt = session.get(ChargeAttempt, call.attempt_id)
                if attempt is not None and attempt.status in {s.value for s in UNRESOLVED}:
                    attempt.call_ending = CallEnding.ACCEPTED.value
                    attempt.transaction_id = outcome.transaction_id or attempt.transaction_id
    except Exception:
        log.exception("could not mark %d accepted attempt(s)", len(accepted))


# -- 1. settle what is unknown ---------------------------------------------------------------


def _unresolved_calls(rt: Runtime, invoice_ids: list[int]) -> list[_Call]:
    """The attempts of these invoices whose outcome is not known yet, to verify first."""
    with rt.sessions() as session:
        attempts = session.execute(
            select(ChargeAttempt).where(
                id_in(session, ChargeAttempt.invoice_id, invoice_ids),
                ChargeAttempt.status.in_([s.value for s in UNRESOLVED]),
            )
        ).scalars()
        return [_call_of(a) for a in attempts]


def _call_of(attempt: ChargeAttempt, ciphertext: bytes | None = None) -> _Call:
    return _Call(
        attempt_id=attempt.id,
        invoice_id=attempt.invoice_id,
        order_id=attempt.order_id,
        amount=from_minor(attempt.amount_minor, attempt.currency),
        currency=attempt.currency,
        transaction_id=attempt.transaction_id,
        ending=CallEnding(attempt.call_ending) if attempt.call_ending else None,
        created_wall_at=attempt.created_wall_at,
        ciphertext=ciphertext,
    )


def _verify(rt: Runtime, call: _Call, now_wall: datetime) -> Outcome:
    """Ask the gateway what became of an attempt whose outcome we do not know."""
    try:
        payment = rt.gateway.verify(call.order_id, call.transaction_id)
    except PaymentNotFound:
        if not_found_is_final(call.ending, call.created_wall_at, now_wall, rt.unknown_grace):
            return Outcome(AttemptStatus.FAILED, call.ending, description="not found at gateway")
        return Outcome(AttemptStatus.UNKNOWN, call.ending, description="not found yet")
    except FatoraError as exc:
        return Outcome(AttemptStatus.UNKNOWN, call.ending, description=_why(exc), error=exc)
    except Exception as exc:  # a bug must not lose the attempt: it stays unknown
        log.exception("verify failed for attempt %s", call.attempt_id)
        return Outcome(AttemptStatus.UNKNOWN, call.ending, description=type(exc).__name__)
    return _judge(rt, call, payment, call.ending)


def _judge(rt: Runtime, call: _Call, payment: Payment, ending: CallEnding | None) -> Outcome:
    """Turn a verify answer into an outcome, checking it really is this charge."""
    common = {
        "ending": ending,
        "transaction_id": payment.transaction_id or call.transaction_id,
        "auth_code": payment.auth_code,
        "description": payment.description,
        "mode": payment.mode,
    }
    if payment.status is PaymentStatus.SUCCESS:
        expected = Expected(call.order_id, call.amount, call.currency, rt.live_gateway)
        reason = mismatch_reason(
            expected,
            order_id=payment.order_id,
            amount=payment.amount,
            currency=payment.currency,
            mode=payment.mode,
        )
        if reason is not None:
            return Outcome(AttemptStatus.ANOMALY, classification="mismatch", **common)  # type: ignore[arg-type]
        return Outcome(AttemptStatus.SUCCEEDED, classification="paid", **common)  # type: ignore[arg-type]
    if payment.status is PaymentStatus.PENDING:
        return Outcome(AttemptStatus.PENDING, classification="pending", **common)  # type: ignore[arg-type]
    kind = payment.decline_kind or DeclineKind.SOFT
    return Outcome(
        AttemptStatus.DECLINED,
        decline_kind=kind,
        classification=f"{kind.value}_decline",
        **common,  # type: ignore[arg-type]
    )


# -- 2. write-ahead --------------------------------------------------------------------------


def _start_attempts(rt: Runtime, invoice_ids: list[int], report: CollectionReport) -> list[_Call]:
    """Write one new attempt per collectable invoice and commit, before any gateway call."""
    started: list[tuple[ChargeAttempt, CardToken]] = []
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        paused = control.collection_paused(session)
        # An attempt still unresolved after settling forbids a new charge on its invoice.
        blocked = set(
            session.execute(
                select(ChargeAttempt.invoice_id).where(
                    id_in(session, ChargeAttempt.invoice_id, invoice_ids),
                    ChargeAttempt.status.in_([s.value for s in UNRESOLVED]),
                )
            ).scalars()
        )
        invoices = _load(session, Invoice, invoice_ids)
        subs = _load(session, Subscription, (i.subscription_id for i in invoices.values()))
        cards = dunning_flow.customer_cards(session, (s.customer_id for s in subs.values()))
        with session.no_autoflush:
            for invoice in sorted(invoices.values(), key=lambda i: i.id):
                if invoice.id in blocked:
                    continue  # its result (unknown, pending) was noted while settling
                verdict = _collectable(invoice, now)
                if verdict is None and dunning_flow.subscription_ended(session, invoice, now):
                    verdict = InvoiceStatus.VOID.value  # canceled meanwhile: never charge it now
                if verdict is not None:
                    report.note(invoice.id, verdict)
                    continue
                if paused:
                    report.note(invoice.id, "collection_paused")
                    continue
                customer_id = subs[invoice.subscription_id].customer_id
                card = dunning_flow.usable_card(session, invoice, now, cards[customer_id])
                if card is None:
                    dunning_flow.no_usable_card(session, invoice, now)
                    report.note(invoice.id, "no_card")
                    continue
                attempt = ChargeAttempt(
                    invoice_id=invoice.id,
                    card_token_id=card.id,
                    order_id=new_order_id(invoice.id),
                    amount_minor=invoice.amount_minor,
                    currency=invoice.currency,
                    status=AttemptStatus.IN_FLIGHT.value,
                    next_verify_at=now + next_verify_delay(0),
                    created_at=now,
                    created_wall_at=datetime.now(UTC),
                    updated_at=now,
                )
                session.add(attempt)
                invoice.attempt_count += 1
                invoice.next_attempt_at = now + IN_FLIGHT_LEASE
                invoice.updated_at = now
                started.append((attempt, card))
        session.flush()  # one multi-row INSERT for the attempts: their ids, before the commit
        calls = [_call_of(attempt, ciphertext=card.ciphertext) for attempt, card in started]
    return calls


_Row = TypeVar("_Row", bound=Base)


def _load(session: Session, model: type[_Row], ids: Iterable[int]) -> dict[int, _Row]:
    """Rows of ``model`` by id, in one query; they stay in the session for ``session.get``."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = session.execute(select(model).where(id_in(session, model.id, wanted))).scalars()  # type: ignore[attr-defined]
    return {row.id: row for row in rows}  # type: ignore[attr-defined]


def _collectable(invoice: Invoice, now: datetime) -> str | None:
    """None when the invoice may be charged now, else the reason it may not."""
    if invoice.status != InvoiceStatus.OPEN.value:
        return invoice.status
    if invoice.next_attempt_at is None:
        return "not_scheduled"
    # A quick retry of a transient fault runs when its task comes, even under a frozen test clock.
    if invoice.next_attempt_at > now and invoice.transient_count == 0:
        return "not_due"
    return None


# -- 3. the gateway exchange -----------------------------------------------------------------


def _charge(rt: Runtime, call: _Call) -> Outcome:
    """collect-payment then verify. Runs on a pool thread: no database access here."""
    try:
        assert call.ciphertext is not None
        token = rt.vault.decrypt(call.ciphertext)
        collected = rt.gateway.collect_payment(token, call.order_id, call.amount, call.currency)
    except OutcomeUnknown as exc:
        ending = CallEnding.ANSWERED if exc.http_status is not None else CallEnding.NO_ANSWER
        return _after_unknown(rt, call, ending, exc)
    except Declined as exc:
        return _confirm_decline(rt, call, exc)
    except PaymentNotFound as exc:  # the gateway does not know the token: a dead card
        return _confirm_decline(rt, call, exc, kind=DeclineKind.HARD)
    except AuthenticationFailed as exc:
        return Outcome(
            AttemptStatus.FAILED,
            CallEnding.ANSWERED,
            description=_why(exc),
            classification="auth_error",
        )
    except (RequestRejected, Unprocessable) as exc:
        return Outcome(
            AttemptStatus.FAILED,
            CallEnding.ANSWERED,
            description=_why(exc),
            classification="rejected",
        )
    except FatoraError as exc:
        return _after_unknown(rt, call, CallEnding.ANSWERED, exc)
    except Exception as exc:  # a bug after the row was written: keep it unknown, never lost
        log.exception("collect failed for attempt %s", call.attempt_id)
        return Outcome(AttemptStatus.UNKNOWN, CallEnding.NO_ANSWER, description=type(exc).__name__)
    # The gateway accepted the charge: from now on a 'not found' is never read as 'not charged'.
    accepted = replace(call, transaction_id=collected.transaction_id)
    try:
        payment = rt.gateway.verify(call.order_id, collected.transaction_id)
        return _judge(rt, accepted, payment, CallEnding.ACCEPTED)
    except Exception as exc:  # a failed verify or a bug: taken-or-unknown, never 'not charged'
        if not isinstance(exc, FatoraError):
            log.exception("verify after an accepted collect failed for attempt %s", call.attempt_id)
        return Outcome(
            AttemptStatus.UNKNOWN,
            CallEnding.ACCEPTED,
            transaction_id=collected.transaction_id,
            description=_why(exc) if isinstance(exc, FatoraError) else type(exc).__name__,
            error=exc,
        )


def _after_unknown(rt: Runtime, call: _Call, ending: CallEnding, exc: FatoraError) -> Outcome:
    """The collect call has no trustworthy answer: verify at once, it often settles it."""
    settled = _verify(rt, replace(call, ending=ending), datetime.now(UTC))
    if settled.status in (AttemptStatus.UNKNOWN, AttemptStatus.FAILED):
        return Outcome(
            settled.status,
            ending,
            description=_why(exc),
            classification="transient",
            error=exc,
        )
    return settled


def _confirm_decline(
    rt: Runtime, call: _Call, exc: FatoraError, kind: DeclineKind | None = None
) -> Outcome:
    """Check a decline with verify: a 'declined' answer is not trusted over a verified payment."""
    decline_kind = kind or (exc.kind if isinstance(exc, Declined) else DeclineKind.SOFT)
    declined = Outcome(
        AttemptStatus.DECLINED,
        CallEnding.ANSWERED,
        description=exc.description,
        decline_kind=decline_kind,
        classification=f"{decline_kind.value}_decline",
    )
    try:
        payment = rt.gateway.verify(call.order_id, None)
    except FatoraError:
        return declined
    if payment.status is PaymentStatus.FAILURE:
        return Outcome(
            AttemptStatus.DECLINED,
            CallEnding.ANSWERED,
            transaction_id=payment.transaction_id,
            description=payment.description or exc.description,
            mode=payment.mode,
            decline_kind=decline_kind,
            classification=f"{decline_kind.value}_decline",
        )
    return _judge(rt, call, payment, CallEnding.ACCEPTED)


def _why(exc: BaseException) -> str:
    text = str(exc)
    return text[:500]


# -- 4. record -------------------------------------------------------------------------------


def _record(
    rt: Runtime,
    results: list[tuple[_Call, Outcome]],
    report: CollectionReport,
) -> None:
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        attempts = _load(session, ChargeAttempt, (call.attempt_id for call, _ in results))
        invoices = _load(session, Invoice, (call.invoice_id for call, _ in results))
        # Held here so that the session's (weak) identity map keeps them for session.get.
        subs = _load(session, Subscription, (i.subscription_id for i in invoices.values()))
        for call, outcome in results:
            attempt = attempts[call.attempt_id]
            invoice = invoices[call.invoice_id]
            _write_attempt(attempt, outcome, now)
            word = _move_invoice(session, invoice, attempt, outcome, now, report)
            report.note(invoice.id, word)
        del subs


def _write_attempt(attempt: ChargeAttempt, outcome: Outcome, now: datetime) -> None:
    attempt.status = outcome.status.value
    # ACCEPTED is never downgraded: once the gateway took the charge, it stays taken-or-known.
    if outcome.ending is not None and attempt.call_ending != CallEnding.ACCEPTED.value:
        attempt.call_ending = outcome.ending.value
    attempt.transaction_id = outcome.transaction_id or attempt.transaction_id
    attempt.auth_code = outcome.auth_code or attempt.auth_code
    attempt.description = (outcome.description or attempt.description or "")[:500] or None
    attempt.classification = outcome.classification or attempt.classification
    attempt.gateway_mode = (outcome.mode or attempt.gateway_mode or "")[:8] or None
    attempt.updated_at = now
    if outcome.status in UNRESOLVED:
        if outcome.status is not AttemptStatus.IN_FLIGHT:
            attempt.verify_count += 1
        attempt.next_verify_at = now + next_verify_delay(attempt.verify_count)
    else:
        attempt.next_verify_at = None
        attempt.settled_at = now


def _move_invoice(
    session: Session,
    invoice: Invoice,
    attempt: ChargeAttempt,
    outcome: Outcome,
    now: datetime,
    report: CollectionReport,
) -> str:
    """Apply one attempt's outcome to its invoice and subscription; return a word for it."""
    status = outcome.status
    if status is AttemptStatus.SUCCEEDED:
        if invoice.status == InvoiceStatus.OPEN.value:
            dunning_flow.paid(session, invoice, attempt, now)
            return "paid"
        # Paid by another attempt already: a second successful charge is a refund case.
        record_event(
            session,
            "alert.duplicate_payment",
            invoice=invoice,
            payload={"attempt_id": attempt.id, "order_id": attempt.order_id},
            now=now,
        )
        return "duplicate_payment"
    if status is AttemptStatus.ANOMALY:
        invoice.next_attempt_at = None
        record_event(
            session,
            "alert.payment_mismatch",
            invoice=invoice,
            payload={"attempt_id": attempt.id, "order_id": attempt.order_id},
            now=now,
        )
        return "anomaly"
    if status is AttemptStatus.PENDING:
        invoice.next_attempt_at = None  # the janitor verifies it again; no charge meanwhile
        return "pending"
    if status in (AttemptStatus.UNKNOWN, AttemptStatus.IN_FLIGHT):
        _schedule_transient_retry(invoice, outcome, now, report, verify_only=True)
        return "unknown"
    if status is AttemptStatus.DECLINED:
        assert outcome.decline_kind is not None
        invoice.transient_count = 0
        if outcome.decline_kind is DeclineKind.HARD:
            card = session.get(CardToken, attempt.card_token_id)
            if card is not None and card.status == CardStatus.ACTIVE.value:
                card.status = CardStatus.DEAD.value
                card.status_reason = (outcome.description or "hard decline")[:200]
        dunning_flow.declined(session, invoice, attempt, outcome.decline_kind, now)
        return f"{outcome.decline_kind.value}_declined"
    # FAILED: no money was taken.
    if outcome.classification == "auth_error":
        control.pause_collection(session, outcome.description or "authentication failed", now)
        invoice.next_attempt_at = now  # collected as soon as collection resumes
        return "auth_error"
    if outcome.classification == "rejected":
        invoice.next_attempt_at = None
        record_event(
            session,
            "alert.charge_rejected",
            invoice=invoice,
            payload={"attempt_id": attempt.id, "reason": (outcome.description or "")[:200]},
            now=now,
        )
        return "rejected"
    _schedule_transient_retry(invoice, outcome, now, report, verify_only=False)
    return "retry"


def _schedule_transient_retry(
    invoice: Invoice,
    outcome: Outcome,
    now: datetime,
    report: CollectionReport,
    *,
    verify_only: bool,
) -> None:
    """A transient fault: try again soon, verifying first, with backoff and jitter."""
    if invoice.status != InvoiceStatus.OPEN.value:
        return
    invoice.transient_count += 1
    decision = retry_decision(outcome.error, invoice.transient_count)
    if outcome.error is None and not verify_only:
        # A call that never arrived (settled as not found): retry at the first backoff step.
        decision = retry_decision(_NeverArrived(), invoice.transient_count)
    if decision.retry and decision.delay_s is not None:
        invoice.next_attempt_at = now + timedelta(seconds=decision.delay_s)
        report.retry_in[invoice.id] = round(decision.delay_s, 3)
    else:
        invoice.transient_count = 0
        invoice.next_attempt_at = now + SLOW_RETRY
    invoice.updated_at = now


class _NeverArrived(OutcomeUnknown):
    """Stands for a charge that verify showed never reached the gateway."""

    def __init__(self) -> None:
        super().__init__("the charge never reached the gateway")
