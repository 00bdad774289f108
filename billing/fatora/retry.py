"""Whether and when to try a Fatora call again: one small pure function.

Only an unknown outcome (timeout, broken connection, 5xx, 429, unreadable body) is worth a fast
retry, and for a charge the caller must verify first: Fatora has no idempotency key, so resending
a charge that did go through would bill the customer twice. Declines belong to the dunning
schedule, not to this loop; every other error needs a human or a code change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from billing.fatora.errors import (
    AuthenticationFailed,
    Declined,
    FatoraError,
    ModeMismatch,
    OutcomeUnknown,
    PaymentNotFound,
    RequestRejected,
    Unprocessable,
)

__all__ = ["RetryDecision", "backoff_cap", "full_jitter", "retry_decision"]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer of ``retry_decision``."""

    retry: bool
    delay_s: float | None  # seconds to wait before the next attempt; None when not retrying
    verify_first: bool  # call verify before resending (the last attempt may have gone through)
    reason: str


def full_jitter(cap: float) -> float:
    """A uniformly random delay in [0, cap] ("full jitter"), so retrying workers spread out."""
    return random.uniform(0.0, cap)


def backoff_cap(attempt: int, *, base_delay_s: float, max_delay_s: float) -> float:
    """The exponential ceiling for the delay after ``attempt``: base * 2**(attempt-1), capped."""
    # Bound the exponent so a large attempt number cannot overflow a float.
    return min(max_delay_s, base_delay_s * 2.0 ** min(attempt - 1, 64))


def _no(reason: str) -> RetryDecision:
    return RetryDecision(retry=False, delay_s=None, verify_first=False, reason=reason)


def retry_decision(
    error: BaseException | None,
    attempt: int,
    *,
    max_attempts: int = 5,
    base_delay_s: float = 2.0,
    max_delay_s: float = 300.0,
    jitter: Callable[[float], float] = full_jitter,
) -> RetryDecision:
    """Decide about the next try after ``attempt`` (1-based) ended with ``error``.

    ``error`` None means the call succeeded. A Retry-After hint from the gateway is a floor for
    the delay; a hint longer than ``max_delay_s`` ends the fast retries instead.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if error is None:
        return _no("succeeded")
    if isinstance(error, Declined):
        return _no(f"{error.kind} decline: left to the dunning schedule")
    if isinstance(error, AuthenticationFailed):
        return _no("authentication failed: stop and alert")
    if isinstance(error, ModeMismatch):
        return _no("test-mode result in live mode: stop and alert")
    if isinstance(error, PaymentNotFound):
        return _no("payment not found")
    if isinstance(error, RequestRejected | Unprocessable):
        return _no("request rejected: will not succeed unchanged")
    if not isinstance(error, OutcomeUnknown):
        kind = (
            "unclassified gateway error"
            if isinstance(error, FatoraError)
            else "not a gateway error"
        )
        return _no(kind)
    # From here on the outcome is unknown: whatever happens next, verify before resending.
    name = type(error).__name__
    if attempt >= max_attempts:
        return RetryDecision(
            retry=False,
            delay_s=None,
            verify_first=True,
            reason=f"{name}: gave up after {attempt} attempts",
        )
    delay = jitter(backoff_cap(attempt, base_delay_s=base_delay_s, max_delay_s=max_delay_s))
    hint = error.retry_after_s
    if hint is not None:
        if hint > max_delay_s:
            return RetryDecision(
                retry=False,
                delay_s=None,
                verify_first=True,
                reason=f"{name}: gateway asks to wait {hint:.0f}s, longer than {max_delay_s:.0f}s",
            )
        delay = max(delay, hint)
    return RetryDecision(
        retry=True, delay_s=delay, verify_first=True, reason=f"{name}: outcome unknown"
    )
