"""Charge attempts: their states and the pure rules that settle them.

An attempt is written (``in_flight``) and committed before the gateway is called. Until verify
has said what happened, the invoice may not be charged again: that is the rule that keeps an
invoice from being paid twice when a call times out after the gateway took the money.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from billing.fatora.types import Payment


class AttemptStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # written, gateway call under way (or the worker died during it)
    UNKNOWN = "unknown"  # the call ended without a trustworthy answer: verify decides
    PENDING = "pending"  # the gateway says PENDING: neither paid nor failed
    SUCCEEDED = "succeeded"  # verify confirmed SUCCESS with the expected amount, currency, mode
    DECLINED = "declined"  # the gateway declined: no money taken
    FAILED = "failed"  # no money taken, for another reason (rejected request, never arrived)
    ANOMALY = "anomaly"  # verify reports money taken that does not match: a human must look


class AttemptKind(StrEnum):
    COLLECT = "collect"  # collect-payment on a stored card, by a worker
    CHECKOUT = "checkout"  # the customer pays on Fatora's hosted page (the pay-and-update link)


UNRESOLVED = frozenset({AttemptStatus.IN_FLIGHT, AttemptStatus.UNKNOWN, AttemptStatus.PENDING})
# The same as stored: for SQL (``status.in_``) and for rows read back.
UNRESOLVED_VALUES: tuple[str, ...] = tuple(sorted(status.value for status in UNRESOLVED))


class CallEnding(StrEnum):
    """How the collect call ended, which decides how far a later 'not found' can be trusted."""

    NOT_SENT = "not_sent"  # the request never left: no money can have moved
    ANSWERED = "answered"  # a clear, final answer in Fatora's envelope (decline, rejection...)
    NO_ANSWER = "no_answer"  # anything unclear: timeout, 5xx, HTML, garbled, a dead worker
    ACCEPTED = "accepted"  # the gateway accepted the charge (SUCCESS or PENDING to collect)


# A worker sends a collect only within this long of writing its attempt (a call that waited
# longer in the pool is dropped unsent), so an attempt whose worker died without saying when it
# sent bounds its send moment by ``created_wall_at + SEND_WINDOW``.
SEND_WINDOW = timedelta(minutes=10)


@dataclass(frozen=True)
class Expected:
    """What a verify must report for a charge to count as ours and paid."""

    order_id: str
    amount: Decimal
    currency: str
    live: bool


def order_id_for(subscription_id: int, period_start: datetime, attempt_no: int) -> str:
    """The order id of an invoice's ``attempt_no``-th attempt, from what survives a restore.

    An invoice is its subscription's period (that pair is unique, and a renewal re-creates the
    same pair after a restore, whatever id it gets), so order ids can be derived again from a
    backup: ``billing reconcile --after-restore`` asks verify about every one that may have been
    used after it. Never reused: the attempt number only grows.
    """
    return f"{order_prefix(subscription_id, period_start)}{attempt_no}"


def order_prefix(subscription_id: int, period_start: datetime) -> str:
    """What every order id of one invoice (a subscription's period) starts with."""
    return f"S{subscription_id}-{period_start.astimezone(UTC):%Y%m%d%H%M%S}-"


_ORDER_ID_RE = re.compile(r"S(\d+)-(\d{14})-(\d+)")


def attempt_number(order_id: str) -> int | None:
    """The attempt number in an order id of ``order_id_for``'s form (None for older forms)."""
    match = _ORDER_ID_RE.fullmatch(order_id)
    return int(match.group(3)) if match else None


def mismatch_reason(
    expected: Expected,
    *,
    order_id: str | None,
    amount: Decimal | None,
    currency: str | None,
    mode: str | None,
) -> str | None:
    """Why a SUCCESS verify result does not prove this charge, or None when it does."""
    if order_id is not None and order_id != expected.order_id:
        return f"order id {order_id!r} differs from {expected.order_id!r}"
    if amount is None or amount != expected.amount:
        return f"amount {amount} differs from {expected.amount}"
    if currency is None or currency.upper() != expected.currency.upper():
        return f"currency {currency} differs from {expected.currency}"
    if expected.live and (mode or "").lower() != "live":
        return f"mode {mode!r} is not live"
    return None


def sent_bound(created_wall_at: datetime, sent_wall_at: datetime | None) -> datetime:
    """The latest moment the collect request can have left: when it was sent if the worker said
    so, else the end of the send window (the worker may have died without recording it)."""
    return sent_wall_at if sent_wall_at is not None else created_wall_at + SEND_WINDOW


def payment_mismatch(expected: Expected, payment: Payment) -> str | None:
    """``mismatch_reason`` for a verify answer."""
    return mismatch_reason(
        expected,
        order_id=payment.order_id,
        amount=payment.amount,
        currency=payment.currency,
        mode=payment.mode,
    )


def not_found_is_final(
    ending: CallEnding | None, sent_by: datetime, now: datetime, grace: timedelta
) -> bool:
    """May a 'payment not found' from verify be read as 'never charged'?

    Never after the gateway accepted the charge (only a human may say otherwise). Always when
    the request never left. Otherwise the request may still be on its way (a proxy holding it,
    a slow network, an edge that answered 504 while the gateway goes on): 'not found' counts
    only once ``grace`` of real time has passed since ``sent_by``, the latest moment the
    request can have left (``sent_bound``).
    """
    if ending is CallEnding.ACCEPTED:
        return False
    if ending is CallEnding.NOT_SENT:
        return True
    return now - sent_by >= grace


# Verify again after these delays when an attempt stays unresolved (then daily).
JANITOR_BACKOFF = (
    timedelta(minutes=5),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(days=1),
)


def next_verify_delay(verify_count: int, first: timedelta | None = None) -> timedelta:
    """The delay before the next verify of an unresolved attempt (5m, 1h, 6h, then daily)."""
    if verify_count <= 0 and first is not None:
        return first
    index = min(max(verify_count, 0), len(JANITOR_BACKOFF) - 1)
    return JANITOR_BACKOFF[index]
