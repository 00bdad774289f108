"""retry_decision: one table covering every error class."""

from __future__ import annotations

import pytest

from billing.fatora import (
    AuthenticationFailed,
    Declined,
    FatoraError,
    ForeignAnswer,
    GatewayConnectionError,
    GatewayServerError,
    GatewayTimeout,
    HardDecline,
    MalformedResponse,
    ModeMismatch,
    OutcomeUnknown,
    PaymentNotFound,
    RateLimited,
    RequestRejected,
    RetryDecision,
    SoftDecline,
    UnclearAnswer,
    Unprocessable,
    full_jitter,
    retry_decision,
)
from billing.fatora.retry import backoff_cap


def no_jitter(cap: float) -> float:
    return cap


# (error, attempt, retry, delay_s, verify_first)
TABLE: list[tuple[BaseException | None, int, bool, float | None, bool]] = [
    (None, 1, False, None, False),
    (GatewayTimeout(), 1, True, 2.0, True),
    (GatewayTimeout(), 2, True, 4.0, True),
    (GatewayTimeout(), 3, True, 8.0, True),
    (GatewayTimeout(), 4, True, 16.0, True),
    (GatewayTimeout(), 5, False, None, True),
    (GatewayConnectionError(), 1, True, 2.0, True),
    (GatewayServerError(http_status=502), 2, True, 4.0, True),
    (GatewayServerError(http_status=503, retry_after_s=30.0), 1, True, 30.0, True),
    (GatewayServerError(http_status=503, retry_after_s=1.0), 3, True, 8.0, True),
    (MalformedResponse(), 1, True, 2.0, True),
    (ForeignAnswer(), 1, True, 2.0, True),
    (UnclearAnswer(), 1, True, 2.0, True),
    (OutcomeUnknown(), 1, True, 2.0, True),
    (RateLimited(http_status=429), 1, True, 2.0, True),
    (RateLimited(http_status=429, retry_after_s=60.0), 1, True, 60.0, True),
    (RateLimited(http_status=429, retry_after_s=3600.0), 1, False, None, True),
    (RateLimited(http_status=429), 5, False, None, True),
    (HardDecline("Expired card"), 1, False, None, False),
    (SoftDecline("Insufficient funds"), 1, False, None, False),
    (Declined("?"), 1, False, None, False),
    (RequestRejected(http_status=400), 1, False, None, False),
    (AuthenticationFailed(http_status=401), 1, False, None, False),
    (AuthenticationFailed(http_status=403), 1, False, None, False),
    (PaymentNotFound(http_status=404), 1, False, None, False),
    (Unprocessable(http_status=422), 1, False, None, False),
    (ModeMismatch(), 1, False, None, False),
    (FatoraError(), 1, False, None, False),
    (ValueError("bug"), 1, False, None, False),
]


@pytest.mark.parametrize(
    ("error", "attempt", "retry", "delay_s", "verify_first"),
    TABLE,
    ids=[f"{type(row[0]).__name__}-{row[1]}" for row in TABLE],
)
def test_retry_table(
    error: BaseException | None,
    attempt: int,
    retry: bool,
    delay_s: float | None,
    verify_first: bool,
) -> None:
    decision = retry_decision(error, attempt, jitter=no_jitter)
    assert isinstance(decision, RetryDecision)
    assert (decision.retry, decision.delay_s, decision.verify_first) == (
        retry,
        delay_s,
        verify_first,
    )
    assert decision.reason


def test_every_public_error_class_is_in_the_table() -> None:
    import billing.fatora as fatora

    classes = {
        obj
        for obj in vars(fatora).values()
        if isinstance(obj, type) and issubclass(obj, FatoraError)
    }
    covered = {type(row[0]) for row in TABLE}
    assert classes <= covered


def test_delay_is_capped() -> None:
    decision = retry_decision(
        GatewayTimeout(), 30, max_attempts=100, max_delay_s=300.0, jitter=no_jitter
    )
    assert decision.delay_s == 300.0
    huge = retry_decision(GatewayTimeout(), 10_000, max_attempts=20_000, jitter=no_jitter)
    assert huge.delay_s == 300.0


def test_custom_limits() -> None:
    d = retry_decision(GatewayTimeout(), 2, max_attempts=2)
    assert not d.retry
    d = retry_decision(GatewayTimeout(), 2, base_delay_s=0.5, jitter=no_jitter)
    assert d.delay_s == 1.0


def test_jitter_receives_the_cap_and_stays_within_it() -> None:
    seen: list[float] = []

    def spy(cap: float) -> float:
        seen.append(cap)
        return 0.0

    assert retry_decision(GatewayServerError(), 3, jitter=spy).delay_s == 0.0
    assert seen == [8.0]
    for _ in range(200):
        assert 0.0 <= full_jitter(5.0) <= 5.0
    assert backoff_cap(1, base_delay_s=2.0, max_delay_s=300.0) == 2.0


def test_attempt_counts_from_one() -> None:
    with pytest.raises(ValueError):
        retry_decision(GatewayTimeout(), 0)
