"""Charge attempts: their states and the pure rules that settle them.

An attempt is written (``in_flight``) and committed before the gateway is called. Until verify
has said what happened, the invoice may not be charged again: that is the rule that keeps an
invoice from being paid twice when a call times out after the gateway took the money.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum


class AttemptStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # written, gateway call under way (or the worker died during it)
    UNKNOWN = "unknown"  # the call ended without a trustworthy answer: verify decides
    PENDING = "pending"  # the gateway says PENDING: neither paid nor failed
    SUCCEEDED = "succeeded"  # verify confirmed SUCCESS with the expected amount, currency, mode
    DECLINED = "declined"  # the gateway declined: no money taken
    FAILED = "failed"  # no money taken, for another reason (rejected request, never arrived)
    ANOMALY = "anomaly"  # verify reports money taken that does not match: a human must look


UNRESOLVED = frozenset({AttemptStatus.IN_FLIGHT, AttemptStatus.UNKNOWN, AttemptStatus.PENDING})


class CallEnding(StrEnum):
    """How the collect call ended, which decides how far a later 'not found' can be trusted."""

    ANSWERED = "answered"  # the gateway sent a response (even a 5xx or a garbled one)
    NO_ANSWER = "no_answer"  # timeout, dropped connection, or the worker died mid-call
    ACCEPTED = "accepted"  # the gateway accepted the charge (SUCCESS or PENDING to collect)


@dataclass(frozen=True)
class Expected:
    """What a verify must report for a charge to count as ours and paid."""

    order_id: str
    amount: Decimal
    currency: str
    live: bool


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


def not_found_is_final(
    ending: CallEnding | None, written_at: datetime, now: datetime, grace: timedelta
) -> bool:
    """May a 'payment not found' from verify be read as 'never charged'?

    When the gateway answered the collect call, it had finished with the request, so a later
    'not found' is final, unless it had accepted the charge. When no answer came (a timeout, a
    dropped connection, a worker that died during the call), the request may still be inside the
    gateway: only once ``grace`` has passed since the attempt was written is 'not found' final.
    """
    if ending is CallEnding.ACCEPTED:
        return False  # the gateway said it took the charge: only a human may say otherwise
    if ending is CallEnding.ANSWERED:
        return True
    return now - written_at >= grace


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
