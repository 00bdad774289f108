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
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextvars import copy_context
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from billing import metrics
from billing.attempts import (
    SEND_WINDOW,
    UNRESOLVED,
    UNRESOLVED_VALUES,
    AttemptKind,
    AttemptStatus,
    CallEnding,
    Expected,
    next_verify_delay,
    not_found_is_final,
    order_id_for,
    payment_mismatch,
    sent_bound,
)
from billing.db import id_in, insert_rows
from billing.fatora.answers import Call, Money, Then, reads_as_auth, verdict
from billing.fatora.errors import Declined, FatoraError, OutcomeUnknown
from billing.fatora.retry import retry_decision
from billing.fatora.types import DeclineKind, Payment, PaymentStatus
from billing.gateway_cap import GatewayBusy
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.locks import Held
from billing.logs import bind_ids, conceal, log_context
from billing.models import Base, CardStatus, CardToken, ChargeAttempt, Event, Invoice, Subscription
from billing.money import from_minor
from billing.runtime import Runtime
from billing.services import control, dunning_flow
from billing.services.events import record_event

log = logging.getLogger("billing.charging")

# While a call is under way the invoice is not offered to the retry sweep.
IN_FLIGHT_LEASE = timedelta(minutes=15)
# An outcome waits at most this long (in seconds) for others to be recorded with it.
RECORD_WITHIN_S = 0.5
# Outcomes are recorded in chunks of this many (fewer with fewer call threads, or what is
# left): a batch's first answers are written while its later calls are under way, so that
# little is left to write once the last answer is in.
RECORD_CHUNK = 25
# How often (in seconds) a run checks that it still holds its invoice locks.
LOCK_CHECK_S = 1.0
# When the fast retries of a transient fault are used up, try again this often (and alert once).
SLOW_RETRY = timedelta(hours=6)
# Transient failures of one invoice after which, if others are being collected, its card is
# taken to be at fault (5 fast retries, then about two days of slow ones).
TRANSIENT_LIMIT = 12
# A lasting problem's alert is raised again after this long.
ALERT_REPEAT = timedelta(days=1)
# A failure of our own before any request was sent (a token that cannot be decrypted) is
# retried this often, with an alert: it needs a human, not a loop.
INTERNAL_RETRY = timedelta(days=1)
# The breaker: a run whose hard declines are at least BREAKER_MIN_HARD and at least this share
# of its answers is stopped, and its hard declines touch no card (a route or a key is broken).
BREAKER_MIN_HARD = 5
BREAKER_SHARE = 0.5
# Hard declines are held back until this many answers have come in (or the run ends), so that
# the breaker judges a sample before a single card is marked dead.
BREAKER_SAMPLE = 10
# The same breaker over every worker's attempts settled in the last FLEET_WINDOW.
FLEET_WINDOW = timedelta(hours=1)
FLEET_MIN_HARD = BREAKER_MIN_HARD
FLEET_SAMPLE = BREAKER_SAMPLE

# Outcome classifications that mean "the system is broken, not the customer's card".
_PAUSING = {"auth_error": "authentication failed", "systemic": "the gateway route is broken"}


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
    # System time when the collect request left (None: not sent by this exchange).
    sent_wall_at: datetime | None = None
    # For a 'not found' that is not final yet: how long until it can be.
    final_in: timedelta | None = None
    # Pause collection for this reason ("auth_error", "systemic") while keeping the
    # classification (a held decline keeps its word through a broken verify).
    pause: str | None = None
    # The card token a paid checkout saved (verify reports it): a credential, never shown.
    card_token: str | None = field(default=None, repr=False)
    # The exception behind a transient outcome, for the retry decision (never persisted).
    error: BaseException | None = field(default=None, compare=False)

    @property
    def money_taken(self) -> bool:
        return self.status is AttemptStatus.SUCCEEDED

    @property
    def hard_decline(self) -> bool:
        return self.status is AttemptStatus.DECLINED and self.decline_kind is DeclineKind.HARD


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
    sent_wall_at: datetime | None = None
    # A decline the collect answered but verify could not confirm yet (see _confirm_decline).
    held_decline: DeclineKind | None = None
    # Paid by the customer on the hosted page (the pay-and-update link), not by a collect.
    checkout: bool = False
    ciphertext: bytes | None = field(default=None, repr=False)

    def outcome(self, status: AttemptStatus, **fields: object) -> Outcome:
        """An outcome that keeps what is known of this call unless ``fields`` say otherwise."""
        known: dict[str, object] = {
            "ending": self.ending,
            "transaction_id": self.transaction_id,
            "sent_wall_at": self.sent_wall_at,
        }
        return Outcome(status, **{**known, **fields})  # type: ignore[arg-type]


@dataclass
class _Run:
    """What the threads of one collection run share: a switch that stops further requests (lost
    lock, breaker, failed recording) and the breaker's counts."""

    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    seen: int = 0
    hard: int = 0
    tripped: bool = False
    _canary: Canary | None = None
    _canary_lock: threading.Lock = field(default_factory=threading.Lock)

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    def implausible(self) -> bool:
        return self.hard >= BREAKER_MIN_HARD and self.hard >= BREAKER_SHARE * self.seen

    def verify_trusted(self, rt: Runtime) -> Canary:
        """May verify's 'not found' be believed? Once per run, verify is asked about the latest
        payment on record: a route that does not find a payment known to exist (a misrouted
        verify answering a JSON 404) must not write charges off as never made."""
        with self._canary_lock:
            if self._canary is None:
                self._canary = canary(rt)
            return self._canary


class Canary(StrEnum):
    TRUSTED = "trusted"  # verify found the latest payment on record (or none is on record yet)
    MISROUTED = "misrouted"  # verify says a payment on record does not exist: a broken route
    UNSURE = "unsure"  # verify gave no clear answer: decide nothing now, pause nothing


def canary(rt: Runtime) -> Canary:
    with rt.sessions() as session:
        known = session.execute(
            select(ChargeAttempt)
            .where(ChargeAttempt.status == AttemptStatus.SUCCEEDED.value)
            .order_by(ChargeAttempt.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        if known is None:
            return Canary.TRUSTED  # nothing known yet to check verify against
        order_id, transaction_id = known.order_id, known.transaction_id
    try:
        payment = rt.gateway.verify(order_id, transaction_id)
    except FatoraError as exc:
        then = verdict(Call.VERIFY, exc.answer).then
        if then in (Then.NOT_FOUND_RULE, Then.PAUSE_SYSTEMIC):
            log.error("verify does not find %s, a payment on record (%s)", order_id, exc.answer)
            return Canary.MISROUTED
        return Canary.UNSURE  # a timeout, a 5xx: nothing learnt about the route
    except Exception:
        log.exception("verify of %s, a payment on record, failed", order_id)
        return Canary.UNSURE
    if payment.status is PaymentStatus.SUCCESS:
        return Canary.TRUSTED
    return Canary.MISROUTED


@dataclass
class CollectionReport:
    """What a collection run did, by invoice id (ids and words only: safe to show anywhere)."""

    results: dict[int, str] = field(default_factory=dict)
    retry_in: dict[int, float] = field(default_factory=dict)
    stopped: str | None = None

    def note(self, invoice_id: int, result: str) -> None:
        self.results[invoice_id] = result

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "results": {str(k): v for k, v in sorted(self.results.items())},
            "retry_in": {str(k): v for k, v in sorted(self.retry_in.items())},
        }
        if self.stopped:
            out["stopped"] = self.stopped
        return out


def new_order_id(invoice: Invoice) -> str:
    """The next attempt's order id: fresh (the attempt number only grows, so verify cannot match
    two payments) and derivable again from a backup (``attempts.order_id_for``)."""
    return order_id_for(invoice.subscription_id, invoice.period_start, invoice.attempt_count + 1)


def collect_invoices(
    rt: Runtime, invoice_ids: Sequence[int], *, settle_only: bool = False
) -> CollectionReport:
    """Collect (or, with ``settle_only``, only settle) the given invoices."""
    report = CollectionReport()
    run = _Run()
    with rt.locker.hold(invoice_ids) as held:
        for skipped in sorted(set(invoice_ids) - set(held.ids)):
            report.note(skipped, "busy")  # another worker holds it: that worker finishes it
        if not held.ids:
            return report
        pool = rt.gateway_calls
        unresolved = _unresolved_calls(rt, held.ids)
        if unresolved:
            now_wall = datetime.now(UTC)
            verify = lambda c: _verify(rt, c, now_wall, run)  # noqa: E731
            _exchange(rt, pool, iter([unresolved]), verify, report, held, run)
        if not settle_only and not run.stop.is_set():
            waves = _written_ahead(rt, held, report, run)
            _exchange(rt, pool, waves, lambda c: _charge(rt, c, run), report, held, run)
        if not settle_only and run.stop.is_set():
            for invoice_id in held.ids:  # stopped before its wave: no attempt, still due
                report.results.setdefault(invoice_id, "not_sent")
    if run.stop.is_set():
        report.stopped = run.stop_reason
    return report


def _exchange(
    rt: Runtime,
    pool: ThreadPoolExecutor,
    waves: Iterator[list[_Call]],
    exchange: Callable[[_Call], Outcome],
    report: CollectionReport,
    held: Held,
    run: _Run,
) -> None:
    """Run ``exchange`` for every call on the pool and record the outcomes as they arrive.

    The calls come in waves: each is submitted as soon as it is drawn, and the next is drawn
    (for charges: written ahead) while the calls already submitted are under way, unless the run
    has been stopped (the charge waves check the locks before the second). A wave that cannot be
    drawn stops the drawing; its error is raised once the calls already submitted have ended and
    been recorded.

    Outcomes are recorded in chunks of ``RECORD_CHUNK`` (or of a round of calls, when
    ``charge_concurrency`` is smaller), or sooner when the first of them has waited
    ``RECORD_WITHIN_S``, or when nothing else is under way: the first answers are written while
    later calls are still under way, in few transactions, and little is left for the end.
    Meanwhile the run checks its invoice locks every ``LOCK_CHECK_S``: once they are lost, no
    further request is sent. Hard declines wait for the breaker (``_Run.implausible``) to have a
    sample. The invoice locks are held by the caller until every call has ended, even if
    recording fails.
    """
    run_one = _never_raising(exchange)
    pending: dict[Future[Outcome], _Call] = {}
    # Each call's future, as it ends (a wait on the whole pending set would cost a lock per
    # pending call every time round).
    finished: queue.SimpleQueue[Future[Outcome]] = queue.SimpleQueue()
    chunk = max(1, min(rt.charge_concurrency, RECORD_CHUNK))
    ready: list[tuple[_Call, Outcome]] = []
    hard: list[tuple[_Call, Outcome]] = []
    first_ready_at = 0.0
    next_check = time.monotonic() + LOCK_CHECK_S
    more = True
    # A wave that could not be drawn (its write-ahead failed): raised once the calls of the
    # waves already drawn, whose attempts are committed, have been made and recorded.
    draw_error: Exception | None = None
    try:
        while more or pending:
            if more and not run.stop.is_set():
                try:
                    wave = next(waves, None)
                except Exception as exc:
                    log.error("write-ahead of a wave failed (%s)", type(exc).__name__)
                    draw_error, wave = exc, None
                more = wave is not None
                for call in wave or ():
                    future = pool.submit(copy_context().run, run_one, call)  # with the log ids
                    future.add_done_callback(finished.put)
                    pending[future] = call
            else:
                more = False  # stopped: nothing more is written ahead or sent
            done: list[Future[Outcome]] = []
            if pending:
                # While another wave is to be drawn, only what has already come in is taken.
                done = _finished(finished, 0 if more else RECORD_WITHIN_S)
            if done and not ready:
                first_ready_at = time.monotonic()
            for future in done:
                call, outcome = pending.pop(future), future.result()
                run.seen += 1
                if outcome.hard_decline:
                    run.hard += 1
                    hard.append((call, outcome))
                else:
                    ready.append((call, outcome))
            if hard and (run.seen >= BREAKER_SAMPLE or not (pending or more)):
                ready.extend(_through_breaker(run, hard))
                hard = []
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LOCK_CHECK_S
                if not run.stop.is_set() and not held.check():
                    run.halt("invoice lock lost")
            overdue = ready and time.monotonic() - first_ready_at >= RECORD_WITHIN_S
            if ready and (len(ready) >= chunk or not pending or overdue):
                _record(rt, ready, report)
                ready = []
    except BaseException:
        # Recording failed (or the process is being stopped). Calls not begun are dropped:
        # their attempts stay in flight and are settled by verify later. Calls under way are
        # waited for, so that no invoice lock is let go in the middle of a call, and what is
        # known about the answers that could not be recorded is kept as far as possible.
        run.halt("recording failed")
        for future in pending:
            future.cancel()
        wait(pending)
        ready.extend(hard)
        ready.extend((call, f.result()) for f, call in pending.items() if not f.cancelled())
        _keep_what_was_accepted(rt, ready)
        raise
    if draw_error is not None:
        raise draw_error


def _finished(
    finished: queue.SimpleQueue[Future[Outcome]], timeout: float
) -> list[Future[Outcome]]:
    """The calls that have ended: waiting up to ``timeout`` for the first, then all the others
    already there."""
    try:
        done = [finished.get(timeout=timeout) if timeout > 0 else finished.get_nowait()]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done


def _through_breaker(run: _Run, hard: list[tuple[_Call, Outcome]]) -> list[tuple[_Call, Outcome]]:
    """Hard declines, unless the run has seen an implausible share of them: then they are only
    suspects, no card is touched, and no further request is sent."""
    if not run.tripped and run.implausible():
        run.tripped = True
        run.halt("implausible share of hard declines")
        log.error(
            "breaker: %d hard declines in %d answers; no card is marked dead", run.hard, run.seen
        )
    if not run.tripped:
        return hard
    return [(c, replace(o, classification="suspect_hard_decline")) for c, o in hard]


def _never_raising(exchange: Callable[[_Call], Outcome]) -> Callable[[_Call], Outcome]:
    """``exchange``, turning any exception (a bug) into an unknown outcome: a call that raised
    must not take the answers of the other calls down with it."""

    def run(call: _Call) -> Outcome:
        bind_ids(invoice_id=call.invoice_id, attempt_id=call.attempt_id, order_id=call.order_id)
        try:
            return exchange(call)
        except Exception as exc:
            log.exception("gateway exchange failed for attempt %s", call.attempt_id)
            return call.outcome(AttemptStatus.UNKNOWN, description=type(exc).__name__)

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
                attempt = session.get(ChargeAttempt, call.attempt_id, with_for_update=True)
                if attempt is not None and attempt.status in UNRESOLVED_VALUES:
                    attempt.call_ending = CallEnding.ACCEPTED.value
                    found = outcome.transaction_id or attempt.transaction_id
                    attempt.transaction_id = gateway_text(found, 120)
                    attempt.sent_wall_at = outcome.sent_wall_at or attempt.sent_wall_at
    except Exception:
        log.exception("could not mark %d accepted attempt(s)", len(accepted))


# -- 1. settle what is unknown ---------------------------------------------------------------


def _unresolved_calls(rt: Runtime, invoice_ids: list[int]) -> list[_Call]:
    """The attempts of these invoices whose outcome is not known yet, to verify first (with the
    hosted pages that closed lately: a customer may still pay an old tab)."""
    with rt.sessions() as session:
        attempts = session.execute(
            select(ChargeAttempt).where(
                id_in(session, ChargeAttempt.invoice_id, invoice_ids),
                or_(
                    ChargeAttempt.status.in_(UNRESOLVED_VALUES),
                    CLOSED_CHECKOUT_WATCHED,
                ),
            )
        ).scalars()
        return [_call_of(a) for a in attempts]


# A hosted page closed unpaid is still verified daily for CHECKOUT_WATCH: paid late, its money is
# recorded (the invoice paid, or a duplicate payment raised), never lost.
CHECKOUT_WATCH = timedelta(days=7)
CLOSED_CHECKOUT_WATCHED = and_(
    ChargeAttempt.kind == AttemptKind.CHECKOUT.value,
    ChargeAttempt.status == AttemptStatus.FAILED.value,
    ChargeAttempt.next_verify_at.is_not(None),
)


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
        sent_wall_at=attempt.sent_wall_at,
        held_decline=_held_decline(attempt),
        checkout=attempt.kind == AttemptKind.CHECKOUT.value,
        ciphertext=ciphertext,
    )


def _held_decline(attempt: ChargeAttempt) -> DeclineKind | None:
    if attempt.call_ending != CallEnding.ANSWERED.value:
        return None
    for kind in DeclineKind:
        if attempt.classification == f"{kind.value}_decline":
            return kind
    return None


def _verify(rt: Runtime, call: _Call, now_wall: datetime, run: _Run) -> Outcome:
    """Ask the gateway what became of an attempt; only a clear answer settles it."""
    try:
        payment = rt.gateway.verify(call.order_id, call.transaction_id)
    except FatoraError as exc:
        then = verdict(Call.VERIFY, exc.answer).then
        if then is Then.NOT_FOUND_RULE:
            sent_by = sent_bound(call.created_wall_at, call.sent_wall_at)
            final = not_found_is_final(call.ending, sent_by, now_wall, rt.unknown_grace)
            trust = run.verify_trusted(rt) if final else Canary.TRUSTED
            if trust is Canary.MISROUTED:
                return call.outcome(
                    AttemptStatus.UNKNOWN,
                    description="verify does not find a payment on record",
                    classification="systemic",
                )
            if trust is Canary.UNSURE:
                return call.outcome(AttemptStatus.UNKNOWN, description="not found, unconfirmed")
            if final and call.held_decline is not None:
                kind = call.held_decline
                return call.outcome(
                    AttemptStatus.DECLINED,
                    decline_kind=kind,
                    classification=f"{kind.value}_decline",
                )
            if final:
                return call.outcome(
                    AttemptStatus.FAILED,
                    description="not found at gateway",
                    classification="never_charged",
                )
            wait_for = sent_by + rt.unknown_grace - now_wall
            final_in = None if call.ending is CallEnding.ACCEPTED else wait_for
            return call.outcome(
                AttemptStatus.UNKNOWN, description="not found yet", final_in=final_in
            )
        return call.outcome(
            AttemptStatus.UNKNOWN,
            description=_why(exc),
            classification=_pausing_class(then),
            error=exc,
        )
    except Exception as exc:  # a bug must not lose the attempt: it stays unknown
        log.exception("verify failed for attempt %s", call.attempt_id)
        return call.outcome(AttemptStatus.UNKNOWN, description=type(exc).__name__)
    return _judge(rt, call, payment)


def _pausing_class(then: Then) -> str | None:
    if then is Then.PAUSE_AUTH:
        return "auth_error"
    if then is Then.PAUSE_SYSTEMIC:
        return "systemic"
    return None


def _judge(rt: Runtime, call: _Call, payment: Payment) -> Outcome:
    """Turn a verify answer into an outcome, checking it really is this charge."""
    common: dict[str, object] = {
        "transaction_id": payment.transaction_id or call.transaction_id,
        "auth_code": payment.auth_code,
        "description": payment.description,
        "mode": payment.mode,
    }
    if payment.status is PaymentStatus.SUCCESS:
        if not payment.order_named:
            # A success that does not say for which order proves nothing: asked again later.
            return call.outcome(AttemptStatus.UNKNOWN, description="verify named no order")
        expected = Expected(call.order_id, call.amount, call.currency, rt.live_gateway)
        reason = payment_mismatch(expected, payment)
        if reason is not None:
            return call.outcome(AttemptStatus.ANOMALY, classification="mismatch", **common)
        token = payment.card_token if call.checkout else None
        return call.outcome(
            AttemptStatus.SUCCEEDED, classification="paid", card_token=token, **common
        )
    if payment.status is PaymentStatus.PENDING:
        if call.checkout and datetime.now(UTC) - call.created_wall_at >= rt.unknown_grace:
            # A hosted page left unpaid: the link makes a new one when the customer comes back.
            return call.outcome(AttemptStatus.FAILED, classification="checkout_expired", **common)
        return call.outcome(AttemptStatus.PENDING, classification="pending", **common)
    if reads_as_auth(payment.description or ""):
        # Failed for the merchant's key or account, not the card: no money, nobody dunned.
        return call.outcome(AttemptStatus.FAILED, classification="auth_error", **common)
    if call.checkout:
        # The customer's own card failed on the hosted page: their business, not a dead token
        # of ours, and not a sign of a broken gateway.
        return call.outcome(AttemptStatus.DECLINED, classification="checkout_declined", **common)
    kind = payment.decline_kind or DeclineKind.SOFT
    return call.outcome(
        AttemptStatus.DECLINED,
        decline_kind=kind,
        classification=f"{kind.value}_decline",
        **common,
    )


# -- 2. write-ahead --------------------------------------------------------------------------

# The first invoices of a batch are written ahead (and their calls sent) on their own, so that
# the rest is written ahead while those calls are under way, not before any call leaves.
FIRST_WAVE = 25


def _written_ahead(
    rt: Runtime, held: Held, report: CollectionReport, run: _Run
) -> Iterator[list[_Call]]:
    """The batch's new attempts in two waves, each committed before it is handed out: the first
    ``FIRST_WAVE`` invoices, then the rest (drawn only if the run goes on, and written only if
    the invoice locks are still held)."""
    ids = sorted(held.ids)
    first, rest = ids[:FIRST_WAVE], ids[FIRST_WAVE:]
    if first:
        yield _start_attempts(rt, first, report)
    if rest:
        if not held.check():
            run.halt("invoice lock lost")
            return
        yield _start_attempts(rt, rest, report)


def _start_attempts(rt: Runtime, invoice_ids: list[int], report: CollectionReport) -> list[_Call]:
    """Write one new attempt per collectable invoice and commit, before any gateway call.

    The subscriptions and invoices are locked (``FOR UPDATE``) first, so a cancel, a pause or
    another worker cannot change them between the check and the write; the partial unique index
    ``uq_charge_attempts_one_unresolved`` is the last fence if anything still slips through.

    One invoice that raises must not hold back the others. The batch is written in one
    transaction; only if that raises (and the fault is not the database's) is it rolled back and
    written again invoice by invoice, each in a savepoint: an invoice that raises again is
    quarantined (``billing/services/quarantine.py``), the others get their attempts. A
    quarantined invoice is skipped until its retry time; a batch holding one whose retry time
    has come goes invoice by invoice at once, and the retry that does not raise releases it.
    """
    from billing.services import quarantine

    notes: dict[int, str] = {}
    try:
        calls = _write_ahead(rt, invoice_ids, notes, isolated=False)
    except Exception as exc:
        if quarantine.systemic(exc):
            raise
        log.warning(
            "write-ahead batch failed (%s): writing it invoice by invoice",
            quarantine.reason_for(exc),
        )
        notes = {}
        calls = _write_ahead(rt, invoice_ids, notes, isolated=True)
    for invoice_id, word in notes.items():  # only once the transaction that decided it committed
        report.note(invoice_id, word)
    return calls


def _write_ahead(
    rt: Runtime, invoice_ids: list[int], notes: dict[int, str], *, isolated: bool
) -> list[_Call]:
    """The write-ahead transaction of ``_start_attempts``; with ``isolated``, each invoice's work
    is done in a savepoint of its own, and an invoice whose work raises is quarantined."""
    from billing.services import quarantine
    from billing.services.events import savepoint

    started: list[_Started] = []  # written in one statement at the end (not isolated)
    calls: list[_Call] = []
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        subs, invoices = _lock_rows(session, invoice_ids)
        paused = control.collection_paused(session)
        # An attempt still unresolved after settling forbids a new charge on its invoice.
        blocked = set(
            session.execute(
                select(ChargeAttempt.invoice_id).where(
                    id_in(session, ChargeAttempt.invoice_id, invoice_ids),
                    ChargeAttempt.status.in_(UNRESOLVED_VALUES),
                )
            ).scalars()
        )
        cards = dunning_flow.customer_cards(session, (s.customer_id for s in subs.values()))
        batch = sorted(invoices.values(), key=lambda i: i.id)
        # A quarantined invoice due for its retry is expected to raise again.
        isolated = isolated or any(_quarantine_retry_due(i, now) for i in batch)
        with session.no_autoflush, log_context():
            for invoice in batch:
                bind_ids(invoice_id=invoice.id, subscription_id=invoice.subscription_id)
                if invoice.id in blocked:
                    continue  # its result (unknown, pending) was noted while settling
                if invoice.quarantined_at is not None and not _quarantine_retry_due(invoice, now):
                    notes[invoice.id] = "quarantined"
                    continue
                if not isolated:
                    one = _start_one(session, invoice, now, subs, cards, paused)
                else:
                    try:
                        with savepoint(session):
                            one = _start_one(session, invoice, now, subs, cards, paused)
                            session.flush()  # this invoice's database errors surface here
                            if not isinstance(one, str):
                                calls.extend(_insert_attempts(session, [one], now))
                    except Exception as exc:
                        if quarantine.systemic(exc):
                            raise
                        quarantine.hold(session, invoice, exc, now)
                        session.flush()  # not left for the next savepoint to be blamed for
                        notes[invoice.id] = "quarantined"
                        continue
                    if quarantine.release(session, invoice, now):
                        session.flush()
                if isinstance(one, str):
                    notes[invoice.id] = one
                elif not isolated:
                    started.append(one)
        session.flush()
        calls.extend(_insert_attempts(session, started, now))
    return calls


@dataclass(frozen=True)
class _Started:
    """A new attempt, not written yet: its row's values and its card's ciphertext."""

    invoice_id: int
    card_token_id: int
    order_id: str
    amount_minor: int
    currency: str
    created_wall_at: datetime
    ciphertext: bytes = field(repr=False)

    def row(self, now: datetime) -> dict[str, object]:
        """Its ``charge_attempts`` row, written at ``now``: in flight, verified if it is still
        unresolved later."""
        return {
            "invoice_id": self.invoice_id,
            "card_token_id": self.card_token_id,
            "order_id": self.order_id,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "status": AttemptStatus.IN_FLIGHT.value,
            "next_verify_at": now + next_verify_delay(0),
            "created_at": now,
            "created_wall_at": self.created_wall_at,
            "updated_at": now,
        }

    def call(self, attempt_id: int) -> _Call:
        return _Call(
            attempt_id=attempt_id,
            invoice_id=self.invoice_id,
            order_id=self.order_id,
            amount=from_minor(self.amount_minor, self.currency),
            currency=self.currency,
            transaction_id=None,
            ending=None,
            created_wall_at=self.created_wall_at,
            ciphertext=self.ciphertext,
        )


def _insert_attempts(session: Session, started: list[_Started], now: datetime) -> list[_Call]:
    """Write the new attempts in one statement, and move their invoices in another (one more
    attempt, under the in-flight lease); their calls, with the ids the database gave them
    (matched back by invoice id: an invoice has one new attempt at most). The invoices' rows
    are locked by this transaction; their objects in the session are not updated (the
    transaction ends with them)."""
    if not started:
        return []
    rows = [one.row(now) for one in started]
    returning = [ChargeAttempt.invoice_id, ChargeAttempt.id]
    ids: dict[int, int] = {
        row[0]: row[1] for row in insert_rows(session, ChargeAttempt, rows, returning)
    }
    session.execute(
        update(Invoice)
        .where(id_in(session, Invoice.id, (one.invoice_id for one in started)))
        .values(
            attempt_count=Invoice.attempt_count + 1,
            next_attempt_at=now + IN_FLIGHT_LEASE,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return [one.call(ids[one.invoice_id]) for one in started]


def _quarantine_retry_due(invoice: Invoice, now: datetime) -> bool:
    retry_at = invoice.quarantine_retry_at
    return invoice.quarantined_at is not None and (retry_at is None or retry_at <= now)


def _start_one(
    session: Session,
    invoice: Invoice,
    now: datetime,
    subs: dict[int, Subscription],
    cards: dict[int, list[CardToken]],
    paused: str | None,
) -> _Started | str:
    """The write-ahead of one invoice: its new attempt (to be written) and card, or the word
    for the report when it is not charged now."""
    verdict_ = _collectable(invoice, now)
    if verdict_ is None and dunning_flow.subscription_ended(session, invoice, now):
        verdict_ = InvoiceStatus.VOID.value  # canceled meanwhile: never charge it now
    if verdict_ is not None:
        return verdict_
    if paused:
        return "collection_paused"
    customer_id = subs[invoice.subscription_id].customer_id
    card = dunning_flow.usable_card(session, invoice, now, cards[customer_id])
    if card is None:
        dunning_flow.no_usable_card(session, invoice, now)
        return "no_card"
    started = _Started(
        invoice_id=invoice.id,
        card_token_id=card.id,
        order_id=new_order_id(invoice),
        amount_minor=invoice.amount_minor,
        currency=invoice.currency,
        created_wall_at=datetime.now(UTC),
        ciphertext=card.ciphertext,
    )
    return started  # its invoice takes the attempt (count, in-flight lease) in _insert_attempts


_Row = TypeVar("_Row", bound=Base)


def _load(
    session: Session, model: type[_Row], ids: Iterable[int], *, lock: bool = False
) -> dict[int, _Row]:
    """Rows of ``model`` by id, in one query (``FOR UPDATE`` in id order with ``lock``); they
    stay in the session for ``session.get``."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    query = select(model).where(id_in(session, model.id, wanted))  # type: ignore[attr-defined]
    if lock:
        query = query.order_by(model.id).with_for_update()  # type: ignore[attr-defined]
    rows = session.execute(query).scalars()
    return {row.id: row for row in rows}  # type: ignore[attr-defined]


def _lock_rows(
    session: Session, invoice_ids: Iterable[int]
) -> tuple[dict[int, Subscription], dict[int, Invoice]]:
    """Lock the invoices' subscriptions, then the invoices: always in that order (and in id
    order), as every path that writes them does, so that two of them cannot deadlock."""
    wanted = sorted(set(invoice_ids))
    sub_ids = session.execute(
        select(Invoice.subscription_id).where(id_in(session, Invoice.id, wanted))
    ).scalars()
    subs = _load(session, Subscription, sub_ids, lock=True)
    invoices = _load(session, Invoice, wanted, lock=True)
    return subs, invoices


def _collectable(invoice: Invoice, now: datetime) -> str | None:
    """None when the invoice may be charged now, else the reason it may not."""
    if invoice.status != InvoiceStatus.OPEN.value:
        return invoice.status
    if invoice.link_only:
        return "link_only"  # paid only on the hosted page, whatever schedule it was given
    if invoice.next_attempt_at is None:
        return "not_scheduled"
    # Whoever queued it (renewal, a quick retry, the retry sweep, a redelivery), an invoice is
    # charged only once its backoff, Retry-After or dunning step has passed.
    if invoice.next_attempt_at > now:
        return "not_due"
    return None


# -- 3. the gateway exchange -----------------------------------------------------------------


def _charge(rt: Runtime, call: _Call, run: _Run) -> Outcome:
    """collect-payment then verify. Runs on a pool thread: no database access here."""
    if run.stop.is_set():
        return _not_sent(call, run.stop_reason)
    if datetime.now(UTC) - call.created_wall_at > SEND_WINDOW:
        # Sending now would break the bound a later 'not found' relies on (attempts.SEND_WINDOW).
        return _not_sent(call, "waited too long to be sent")
    try:
        assert call.ciphertext is not None
        token = rt.vault.decrypt(call.ciphertext)
        conceal(token)  # never in a log line, whatever raises with it
    except Exception as exc:
        log.error("attempt %s: the card token cannot be read (%s)", call.attempt_id, type(exc))
        return call.outcome(
            AttemptStatus.FAILED,
            ending=CallEnding.NOT_SENT,
            description=f"card token cannot be read ({type(exc).__name__})",
            classification="internal",
        )
    before = datetime.now(UTC)
    try:
        collected = rt.gateway.collect_payment(
            token,
            call.order_id,
            call.amount,
            call.currency,
            # A wait for a slot under the gateway cap must not push the send past the window
            # a later 'not found' relies on.
            send_by=call.created_wall_at + SEND_WINDOW,
        )
    except FatoraError as exc:
        return _after_collect_error(rt, _sent(rt, call, before), exc, run)
    except Exception as exc:  # a bug after the request may have left: unknown, never lost
        log.exception("collect failed for attempt %s", call.attempt_id)
        unclear = replace(_sent(rt, call, before), ending=CallEnding.NO_ANSWER)
        return unclear.outcome(AttemptStatus.UNKNOWN, description=type(exc).__name__)
    sent = _sent(rt, call, before)
    # The gateway took the charge: from now on a 'not found' is never read as 'not charged'.
    accepted = replace(
        sent,
        ending=CallEnding.ACCEPTED,
        transaction_id=collected.transaction_id or call.transaction_id,
    )
    return _verify(rt, accepted, datetime.now(UTC), run)


def _sent(rt: Runtime, call: _Call, before: datetime) -> _Call:
    """The call with the moment its request left: after any wait for a slot under the gateway
    cap (the client notes it), never earlier than just before the call."""
    left = rt.gateway.last_sent_at()
    return replace(call, sent_wall_at=max(before, left) if left is not None else before)


def _not_sent(call: _Call, reason: str) -> Outcome:
    return call.outcome(
        AttemptStatus.FAILED,
        ending=CallEnding.NOT_SENT,
        description=f"not sent: {reason}",
        classification="not_sent",
    )


# What a final collect answer that moved no money means for the attempt.
_NO_MONEY_CLASS = {
    Then.RETRY: "transient",
    Then.PAUSE_AUTH: "auth_error",
    Then.ALERT_REJECTED: "rejected",
    Then.PAUSE_SYSTEMIC: "systemic",
}


def _after_collect_error(rt: Runtime, call: _Call, exc: FatoraError, run: _Run) -> Outcome:
    """A collect answer other than SUCCESS/PENDING, judged by ``answers.VERDICTS``."""
    judged = verdict(Call.COLLECT, exc.answer)
    if judged.then in (Then.DUN_SOFT, Then.DUN_HARD):
        return _confirm_decline(rt, call, exc)
    if judged.money is Money.TAKEN:
        # Accepted, yet something is wrong (a test-mode answer in live mode): taken-or-unknown.
        accepted = replace(call, ending=CallEnding.ACCEPTED)
        return accepted.outcome(
            AttemptStatus.UNKNOWN,
            description=_why(exc),
            classification=_pausing_class(judged.then),
            error=exc,
        )
    if judged.then is Then.ALERT_REJECTED:
        # Refused before processing, by Fatora's own envelope: final. Verify is asked once all
        # the same (cheap, and a rejection is rare): money it shows is recorded, never lost.
        found = _verify(rt, replace(call, ending=CallEnding.ANSWERED), datetime.now(UTC), run)
        if found.status not in (AttemptStatus.UNKNOWN, AttemptStatus.FAILED):
            return found
    if judged.money is Money.NO:
        ending = CallEnding.NOT_SENT if judged.then is Then.RETRY else CallEnding.ANSWERED
        return call.outcome(
            AttemptStatus.FAILED,
            ending=ending,
            description=_why(exc),
            classification=_NO_MONEY_CLASS[judged.then],
            error=exc,
        )
    # Money may have moved: verify at once (it often settles it), else it stays unknown.
    unclear = replace(call, ending=CallEnding.NO_ANSWER)
    settled = _verify(rt, unclear, datetime.now(UTC), run)
    if settled.status not in (AttemptStatus.UNKNOWN, AttemptStatus.FAILED):
        return settled  # verify knows the payment: that is the answer, whatever collect said
    pausing = _pausing_class(judged.then)
    return replace(
        settled,
        description=_why(exc),
        classification=pausing or settled.classification or "transient",
        error=exc,
    )


def _confirm_decline(rt: Runtime, call: _Call, exc: FatoraError) -> Outcome:
    """Check a decline with verify: a 'declined' answer is not trusted over a verified payment,
    and is final only once verify reports the failed payment. If verify does not know it (yet),
    the decline is held: the attempt stays unknown, and becomes a decline only when 'not found'
    is final (a grace period after the send), so a lying or lagging gateway cannot charge twice.
    """
    kind = exc.kind if isinstance(exc, Declined) else DeclineKind.SOFT
    declined = call.outcome(
        AttemptStatus.DECLINED,
        ending=CallEnding.ANSWERED,
        description=exc.description,
        decline_kind=kind,
        classification=f"{kind.value}_decline",
    )
    try:
        payment = rt.gateway.verify(call.order_id, None)
    except FatoraError as err:
        held = replace(declined, status=AttemptStatus.UNKNOWN, decline_kind=None)
        return replace(held, pause=_pausing_class(verdict(Call.VERIFY, err.answer).then))
    if payment.status is PaymentStatus.FAILURE:
        return replace(
            declined,
            transaction_id=payment.transaction_id,
            description=payment.description or exc.description,
            mode=payment.mode,
        )
    return _judge(rt, replace(call, ending=CallEnding.ACCEPTED), payment)


def _why(exc: BaseException) -> str:
    text = str(exc)
    return text[:500]


# -- 4. record -------------------------------------------------------------------------------


def _record(
    rt: Runtime,
    results: list[tuple[_Call, Outcome]],
    report: CollectionReport,
) -> None:
    """Write outcomes, with their subscriptions, invoices and attempts locked. An attempt that
    another worker has settled meanwhile is left alone (unless verify now finds its money)."""
    with rt.sessions() as session, session.begin(), log_context():
        now = rt.clock.now()
        subs, invoices = _lock_rows(session, (call.invoice_id for call, _ in results))
        attempts = _load(session, ChargeAttempt, (c.attempt_id for c, _ in results), lock=True)
        wall = datetime.now(UTC)
        for call, outcome in results:
            bind_ids(invoice_id=call.invoice_id, attempt_id=call.attempt_id, order_id=call.order_id)
            attempt = attempts[call.attempt_id]
            invoice = invoices[call.invoice_id]
            outcome = _still_never_charged(attempt, outcome, wall, rt.unknown_grace)
            if not _may_record(attempt, outcome):
                _watch_closed_checkout(attempt, now)
                report.note(invoice.id, "already_settled")
                continue
            _write_attempt(attempt, outcome, now)
            word = _move_invoice(session, invoice, attempt, outcome, now, report)
            if outcome.card_token is not None and word == "paid":
                adopt_card(rt, session, invoice, attempt, outcome.card_token, now)
            log.info("attempt outcome %s: %s", outcome.status.value, word)
            report.note(invoice.id, word)
            metrics.charge_recorded(session, outcome.status, call.currency, call.amount)
        del subs  # held so that the session's (weak) identity map keeps them for session.get


def _still_never_charged(
    attempt: ChargeAttempt, outcome: Outcome, wall: datetime, grace: timedelta
) -> Outcome:
    """A 'never charged' read from a snapshot, checked again against the locked row: another
    worker may have recorded meanwhile that the gateway accepted the charge, or when it sent."""
    if outcome.classification != "never_charged":
        return outcome
    ending = CallEnding(attempt.call_ending) if attempt.call_ending else None
    sent_by = sent_bound(attempt.created_wall_at, attempt.sent_wall_at)
    if not_found_is_final(ending, sent_by, wall, grace):
        return outcome
    return replace(outcome, status=AttemptStatus.UNKNOWN, classification=None)


def adopt_card(
    rt: Runtime,
    session: Session,
    invoice: Invoice,
    attempt: ChargeAttempt,
    token: str,
    now: datetime,
) -> None:
    """A paid checkout saved a card: store it (encrypted, byte for byte) and charge it from now
    on. The same token seen again (the success page called twice) is the card already stored.
    A token that cannot be stored never stops the payment from being recorded: an alert says
    so and the old card stays."""
    from billing.models import Customer
    from billing.services.customers import add_card
    from billing.services.events import savepoint

    sub = session.get(Subscription, invoice.subscription_id)
    customer = session.get(Customer, sub.customer_id) if sub is not None else None
    if sub is None or customer is None:
        return
    if sub.status == SubscriptionStatus.CANCELED.value:
        record_event(
            session,
            "alert.paid_after_cancel",
            invoice=invoice,
            now=now,
            payload={"attempt_id": attempt.id, "order_id": attempt.order_id},
        )
        return
    try:
        with savepoint(session):
            stored = session.execute(
                select(CardToken).where(CardToken.fingerprint.in_(rt.vault.fingerprints(token)))
            ).scalar_one_or_none()
            card = stored or add_card(session, rt.vault, customer=customer, token=token, now=now)
            if card.customer_id != customer.id or card.status != CardStatus.ACTIVE.value:
                raise ValueError("the card is another customer's, or not active")
            attempt.card_token_id = card.id
            if sub.card_token_id != card.id:
                sub.card_token_id = card.id
                sub.updated_at = now
                record_event(
                    session,
                    "card.replaced",
                    subscription=sub,
                    now=now,
                    payload={"card_id": card.id},
                )
    except Exception as exc:
        log.error("checkout %s: its card was not adopted (%s)", attempt.order_id, type(exc))
        record_event(
            session,
            "alert.card_not_adopted",
            invoice=invoice,
            now=now,
            payload={"attempt_id": attempt.id, "reason": type(exc).__name__},
        )


def _watch_closed_checkout(attempt: ChargeAttempt, now: datetime) -> None:
    """A closed hosted page still unpaid: look again tomorrow, until CHECKOUT_WATCH is over."""
    if attempt.kind == AttemptKind.CHECKOUT.value and attempt.next_verify_at is not None:
        watched_since = attempt.settled_at or now
        done = now - watched_since >= CHECKOUT_WATCH
        attempt.next_verify_at = None if done else now + timedelta(days=1)


def _may_record(attempt: ChargeAttempt, outcome: Outcome) -> bool:
    if attempt.status in UNRESOLVED_VALUES:
        return True
    # Written off as 'never charged' or 'declined', yet verify now shows the money: the money
    # is the truth. Anything else about a settled attempt is news from a slower worker.
    return outcome.status is AttemptStatus.SUCCEEDED and attempt.status in (
        AttemptStatus.FAILED.value,
        AttemptStatus.DECLINED.value,
    )


# Control characters but the tab: a NUL cannot be stored, a line break would forge log lines.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f]")


def gateway_text(text: str | None, limit: int) -> str | None:
    """Text from the gateway as it can be stored: no control characters, at most ``limit``."""
    if not text:
        return None
    return _CONTROL.sub("", text)[:limit] or None


def _write_attempt(attempt: ChargeAttempt, outcome: Outcome, now: datetime) -> None:
    attempt.status = outcome.status.value
    # ACCEPTED is never downgraded: once the gateway took the charge, it stays taken-or-known.
    if outcome.ending is not None and attempt.call_ending != CallEnding.ACCEPTED.value:
        attempt.call_ending = outcome.ending.value
    attempt.sent_wall_at = attempt.sent_wall_at or outcome.sent_wall_at
    # Gateway text fits its column and the database (no NUL): one odd answer must not fail a
    # whole record.
    attempt.transaction_id = gateway_text(outcome.transaction_id or attempt.transaction_id, 120)
    attempt.auth_code = gateway_text(outcome.auth_code or attempt.auth_code, 64)
    attempt.description = gateway_text(outcome.description or attempt.description, 500)
    if not (_held_decline(attempt) and outcome.status in UNRESOLVED):
        # (a held decline keeps its word while unresolved: it becomes the decline in the end)
        attempt.classification = outcome.classification or attempt.classification
    attempt.gateway_mode = (outcome.mode or attempt.gateway_mode or "")[:8] or None
    attempt.updated_at = now
    if outcome.status in UNRESOLVED:
        if outcome.status is not AttemptStatus.IN_FLIGHT:
            attempt.verify_count += 1
        delay = next_verify_delay(attempt.verify_count)
        if outcome.final_in is not None:
            # Verify again as soon as a 'not found' can count, not a backoff step later.
            delay = min(delay, max(outcome.final_in, timedelta(0)) + timedelta(seconds=1))
        attempt.next_verify_at = now + delay
    elif attempt.kind == AttemptKind.CHECKOUT.value and outcome.status is AttemptStatus.FAILED:
        attempt.next_verify_at = now + timedelta(days=1)  # watched: see CHECKOUT_WATCH
        attempt.settled_at = now
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
    kind = outcome.pause or outcome.classification
    # A broken key, route or gateway is never the customer's failure: no card, no dunning.
    if kind in _PAUSING or kind == "suspect_hard_decline":
        why = _PAUSING.get(kind or "", "implausible share of hard declines")
        control.pause_collection(session, f"{why}: {outcome.description or ''}"[:500], now)
        if status not in UNRESOLVED:
            invoice.next_attempt_at = now  # collected as soon as collection resumes
            invoice.updated_at = now
        return {"auth_error": "auth_error", "systemic": "collection_paused"}.get(
            kind or "", "suspect_decline"
        )
    if status is AttemptStatus.SUCCEEDED:
        if invoice.status in (InvoiceStatus.OPEN.value, InvoiceStatus.UNCOLLECTIBLE.value):
            dunning_flow.paid(session, invoice, attempt, now)
            return "paid"
        if invoice.paid_attempt_id == attempt.id:
            return "paid"
        # Paid by another attempt already (or voided): a second charge is a refund case.
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
    if attempt.kind == AttemptKind.CHECKOUT.value:
        # The customer's own try on the hosted page: while it is open nothing else is charged
        # (the fence), and whatever becomes of it, the invoice keeps its own schedule.
        return "checkout_open" if status in UNRESOLVED else f"checkout_{status.value}"
    if status in UNRESOLVED:
        # The janitor verifies it (attempt.next_verify_at); no new charge meanwhile.
        invoice.next_attempt_at = None
        return status.value if status is AttemptStatus.PENDING else "unknown"
    if status is AttemptStatus.DECLINED:
        assert outcome.decline_kind is not None
        if outcome.decline_kind is DeclineKind.HARD and _hard_declines_implausible(session, now):
            control.pause_collection(session, "implausible share of hard declines", now)
            invoice.next_attempt_at = now
            return "suspect_decline"
        if outcome.decline_kind is DeclineKind.HARD and attempt.card_token_id is not None:
            card = session.get(CardToken, attempt.card_token_id)
            if card is not None and card.status == CardStatus.ACTIVE.value:
                card.status = CardStatus.DEAD.value
                card.status_reason = (outcome.description or "hard decline")[:200]
        if invoice.status != InvoiceStatus.OPEN.value:
            return "declined_after_close"  # paid (or voided) meanwhile: no dunning
        invoice.transient_count = 0
        dunning_flow.declined(session, invoice, attempt, outcome.decline_kind, now)
        return f"{outcome.decline_kind.value}_declined"
    # FAILED: no money was taken.
    if invoice.status != InvoiceStatus.OPEN.value:
        return "failed"
    if kind == "rejected":
        invoice.next_attempt_at = None
        record_event(
            session,
            "alert.charge_rejected",
            invoice=invoice,
            payload={"attempt_id": attempt.id, "reason": (outcome.description or "")[:200]},
            now=now,
        )
        return "rejected"
    if kind == "internal":
        invoice.next_attempt_at = now + INTERNAL_RETRY
        _alert_daily(session, "alert.charge_internal_error", invoice, attempt, outcome, now)
        return "internal_error"
    if kind == "not_sent":
        invoice.next_attempt_at = now  # nothing happened: the next sweep picks it up
        return "not_sent"
    if invoice.next_attempt_at is not None and _superseded(session, attempt):
        return "failed"  # an older attempt settled late: the invoice's schedule stays its own
    return _schedule_transient_retry(session, invoice, attempt, outcome, now, report)


def _superseded(session: Session, attempt: ChargeAttempt) -> bool:
    """Has the invoice had a newer attempt (this one was re-verified late)?"""
    newer = session.execute(
        select(ChargeAttempt.id)
        .where(ChargeAttempt.invoice_id == attempt.invoice_id, ChargeAttempt.id > attempt.id)
        .limit(1)
    ).first()
    return newer is not None


def _hard_declines_implausible(session: Session, now: datetime) -> bool:
    """The breaker across runs and workers: among the last FLEET_SAMPLE attempts settled in the
    last FLEET_WINDOW (newest first, by id), at least FLEET_MIN_HARD hard declines making at
    least BREAKER_SHARE of them. Small runs, retries and several workers each see too little to
    judge; a long quiet past must not outvote a sudden wave either."""
    recent = session.execute(
        select(ChargeAttempt.classification)
        .where(ChargeAttempt.settled_at >= now - FLEET_WINDOW)
        .order_by(ChargeAttempt.id.desc())
        .limit(FLEET_SAMPLE)
    ).scalars()
    kinds = list(recent)
    hard = kinds.count("hard_decline")
    return hard >= FLEET_MIN_HARD and hard >= BREAKER_SHARE * len(kinds)


def _alert_daily(
    session: Session,
    kind: str,
    invoice: Invoice,
    attempt: ChargeAttempt,
    outcome: Outcome,
    now: datetime,
) -> None:
    """Raise ``kind`` for this invoice unless it was raised in the last day: a problem that
    lasts is repeated, a loop does not flood."""
    raised = session.execute(
        select(Event.id)
        .where(
            Event.kind == kind,
            Event.invoice_id == invoice.id,
            Event.created_at > now - ALERT_REPEAT,
        )
        .limit(1)
    ).first()
    if raised is None:
        record_event(
            session,
            kind,
            invoice=invoice,
            payload={
                "attempt_id": attempt.id,
                "transient_count": invoice.transient_count,
                "reason": (outcome.description or "")[:200],
            },
            now=now,
        )


def _others_are_collected(session: Session, invoice: Invoice, now: datetime) -> bool:
    """Did other invoices get paid lately? Then the gateway works, and this card is at fault."""
    paid = session.execute(
        select(ChargeAttempt.id)
        .where(
            ChargeAttempt.status == AttemptStatus.SUCCEEDED.value,
            ChargeAttempt.settled_at >= now - SLOW_RETRY,
            ChargeAttempt.invoice_id != invoice.id,
        )
        .limit(1)
    ).first()
    return paid is not None


def _schedule_transient_retry(
    session: Session,
    invoice: Invoice,
    attempt: ChargeAttempt,
    outcome: Outcome,
    now: datetime,
    report: CollectionReport,
) -> str:
    """Nothing was charged for a transient reason: try again soon with backoff and jitter. Once
    the fast retries are used up, every SLOW_RETRY with an alert repeated daily; past
    TRANSIENT_LIMIT failures, while other customers are being charged (so the gateway works),
    the card is at fault and the invoice takes a dunning step: never an endless quiet loop.
    The count is kept until the invoice is paid or takes a dunning step."""
    invoice.updated_at = now
    error = outcome.error if isinstance(outcome.error, FatoraError) else _NeverArrived()
    if isinstance(error, GatewayBusy):
        # Held back by our own cap on calls in flight: neither the card's fault nor the
        # gateway's, so it counts toward nothing (no dunning step can come of it).
        delay = retry_decision(error, 1).delay_s or 5.0
        invoice.next_attempt_at = now + timedelta(seconds=delay)
        report.retry_in[invoice.id] = round(delay, 3)
        return "retry"
    invoice.transient_count += 1
    decision = retry_decision(error, invoice.transient_count)
    if decision.retry and decision.delay_s is not None:
        invoice.next_attempt_at = now + timedelta(seconds=decision.delay_s)
        report.retry_in[invoice.id] = round(decision.delay_s, 3)
        return "retry"
    if invoice.transient_count >= TRANSIENT_LIMIT and _others_are_collected(session, invoice, now):
        dunning_flow.card_keeps_failing(session, invoice, attempt, now)
        return "card_keeps_failing"
    invoice.next_attempt_at = now + SLOW_RETRY
    _alert_daily(session, "alert.collection_stalled", invoice, attempt, outcome, now)
    return "retry_later"


class _NeverArrived(OutcomeUnknown):
    """Stands for a charge that verify showed never reached the gateway."""

    def __init__(self) -> None:
        super().__init__("the charge never reached the gateway")
