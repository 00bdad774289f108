"""The dunning ladder: when to retry a declined invoice, and what to do when retries run out.

A policy lists retry offsets in days, each counted from the invoice's *first* failed charge (not
from the previous retry), so a slow or late retry never pushes the rest of the ladder back. With
``STANDARD`` (1, 3, 5, 7) an invoice first declined on day 0 is retried on days 1, 3, 5 and 7;
if the retry on day 7 fails too, the final action applies.

Offsets are whole 24-hour days of elapsed time: a retry has no reason to follow the customer's
wall clock, and elapsed time needs no time zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import pairwise

from billing.lifecycle import SubscriptionEvent

__all__ = [
    "STANDARD",
    "DunningPolicy",
    "DunningStep",
    "FinalAction",
    "dunning_step",
    "final_action_event",
    "next_retry_at",
]

POLICY_CODE_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


class FinalAction(StrEnum):
    """What happens to the subscription when the ladder is exhausted."""

    CANCEL = "cancel"
    UNPAID = "unpaid"
    PAUSE = "pause"


_FINAL_EVENTS = {
    FinalAction.CANCEL: SubscriptionEvent.DUNNING_EXHAUSTED_CANCEL,
    FinalAction.UNPAID: SubscriptionEvent.DUNNING_EXHAUSTED_UNPAID,
    FinalAction.PAUSE: SubscriptionEvent.DUNNING_EXHAUSTED_PAUSE,
}


def final_action_event(action: FinalAction) -> SubscriptionEvent:
    """The subscription event that carries out ``action``."""
    return _FINAL_EVENTS[FinalAction(action)]


@dataclass(frozen=True)
class DunningPolicy:
    """A named retry ladder: offsets in days from the first failure, then a final action."""

    code: str
    retry_after_days: tuple[int, ...]
    final_action: FinalAction

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not POLICY_CODE_RE.fullmatch(self.code):
            raise ValueError(
                f"dunning policy code {self.code!r} must match {POLICY_CODE_RE.pattern}"
            )
        problem = retry_days_problem(self.retry_after_days)
        if problem:
            raise ValueError(f"dunning policy {self.code!r}: {problem}")
        FinalAction(self.final_action)


def retry_days_problem(days: object) -> str | None:
    """Why ``days`` is not a valid retry ladder, or ``None`` if it is."""
    if not isinstance(days, tuple | list):
        return f"retry_after_days must be a list of whole days, not {type(days).__name__}"
    if not days:
        return "retry_after_days must list at least one retry"
    if any(isinstance(d, bool) or not isinstance(d, int) for d in days):
        return f"retry_after_days must be whole numbers of days, got {list(days)}"
    if any(d < 1 for d in days):
        return f"retry_after_days must be positive, got {list(days)}"
    if any(b <= a for a, b in pairwise(days)):
        return f"retry_after_days must be strictly increasing, got {list(days)}"
    return None


STANDARD = DunningPolicy("standard", (1, 3, 5, 7), FinalAction.CANCEL)


@dataclass(frozen=True)
class DunningStep:
    """Where an invoice stands on the ladder after ``failures`` failed charges.

    Exactly one of ``retry_at`` and ``final_action`` is set. ``step`` is ``failures`` (1 after the
    first decline) and ``steps`` the ladder's length plus one, for "reminder 2 of 5" notices.
    """

    step: int
    steps: int
    retry_at: datetime | None
    final_action: FinalAction | None
    is_last_retry: bool


def _check(first_failure_at: datetime, failures_so_far: int) -> None:
    if first_failure_at.tzinfo is None or first_failure_at.utcoffset() is None:
        raise ValueError("first_failure_at must be an aware datetime")
    if isinstance(failures_so_far, bool) or not isinstance(failures_so_far, int):
        raise TypeError("failures_so_far must be an int")
    if failures_so_far < 1:
        raise ValueError(
            f"failures_so_far must be >= 1 (dunning starts at a failure), got {failures_so_far}"
        )


def next_retry_at(
    policy: DunningPolicy, first_failure_at: datetime, failures_so_far: int
) -> datetime | None:
    """When to retry after ``failures_so_far`` declines, or ``None`` once the ladder is exhausted.

    ``failures_so_far`` counts every failed charge of the invoice, the first one included: after
    one failure the first retry is due, after ``len(retry_after_days) + 1`` none is.
    """
    _check(first_failure_at, failures_so_far)
    index = failures_so_far - 1
    if index >= len(policy.retry_after_days):
        return None
    return first_failure_at + timedelta(days=policy.retry_after_days[index])


def dunning_step(
    policy: DunningPolicy, first_failure_at: datetime, failures_so_far: int
) -> DunningStep:
    """The full position on the ladder, for scheduling and for the customer notification."""
    retry_at = next_retry_at(policy, first_failure_at, failures_so_far)
    retries = len(policy.retry_after_days)
    return DunningStep(
        step=min(failures_so_far, retries + 1),
        steps=retries + 1,
        retry_at=retry_at,
        final_action=policy.final_action if retry_at is None else None,
        is_last_retry=failures_so_far == retries,
    )
