"""The dunning ladder: offsets from the first failure, then the final action."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.dunning import (
    STANDARD,
    DunningPolicy,
    DunningStep,
    FinalAction,
    dunning_step,
    final_action_event,
    next_retry_at,
)
from billing.lifecycle import SubscriptionEvent, SubscriptionStatus, transition

FIRST = datetime(2026, 1, 31, 10, 15, tzinfo=UTC)


def test_standard_policy() -> None:
    """The built-in ladder is 1, 3, 5, 7 days, then cancel."""
    assert DunningPolicy("standard", (1, 3, 5, 7), FinalAction.CANCEL) == STANDARD


@pytest.mark.parametrize(("failures", "days"), [(1, 1), (2, 3), (3, 5), (4, 7)])
def test_retries_are_offsets_from_the_first_failure(failures: int, days: int) -> None:
    """Each retry is counted from the first failed charge, not from the previous retry."""
    assert next_retry_at(STANDARD, FIRST, failures) == FIRST + timedelta(days=days)


@pytest.mark.parametrize("failures", [5, 6, 100])
def test_exhausted_ladder_returns_none(failures: int) -> None:
    """After the last retry fails there is no retry: the final action applies."""
    assert next_retry_at(STANDARD, FIRST, failures) is None


@pytest.mark.parametrize("failures", [0, -1])
def test_failures_start_at_one(failures: int) -> None:
    """Dunning begins with a failure; zero failures is a caller bug."""
    with pytest.raises(ValueError):
        next_retry_at(STANDARD, FIRST, failures)


def test_naive_first_failure_is_refused() -> None:
    """Time is always aware; a naive datetime is ambiguous."""
    with pytest.raises(ValueError):
        next_retry_at(STANDARD, datetime(2026, 1, 1), 1)


def test_offsets_are_elapsed_days_in_any_zone() -> None:
    """An offset is 24 hours per day whatever zone the first failure was recorded in."""
    qatar = timezone(timedelta(hours=3))
    first = datetime(2026, 3, 1, 9, tzinfo=qatar)
    assert next_retry_at(STANDARD, first, 1) == first + timedelta(hours=24)


def test_dunning_step_walks_the_ladder() -> None:
    """Steps count failures; the last retry is flagged; then only the final action is left."""
    pause = DunningPolicy("soft", (2, 4), FinalAction.PAUSE)
    assert dunning_step(pause, FIRST, 1) == DunningStep(
        step=1, steps=3, retry_at=FIRST + timedelta(days=2), final_action=None, is_last_retry=False
    )
    assert dunning_step(pause, FIRST, 2) == DunningStep(
        step=2, steps=3, retry_at=FIRST + timedelta(days=4), final_action=None, is_last_retry=True
    )
    assert dunning_step(pause, FIRST, 3) == DunningStep(
        step=3, steps=3, retry_at=None, final_action=FinalAction.PAUSE, is_last_retry=False
    )


@pytest.mark.parametrize(
    ("days", "message"),
    [
        ((), "at least one"),
        ((1, 1), "strictly increasing"),
        ((3, 2), "strictly increasing"),
        ((0, 2), "positive"),
        ((-1,), "positive"),
        ((True,), "whole numbers"),
    ],
)
def test_invalid_ladders_are_refused(days: tuple[int, ...], message: str) -> None:
    """A ladder must have retries, positive and strictly increasing offsets."""
    with pytest.raises(ValueError, match=message):
        DunningPolicy("x", days, FinalAction.CANCEL)


def test_policy_code_is_checked() -> None:
    """Policy codes follow the same pattern as plan codes."""
    with pytest.raises(ValueError):
        DunningPolicy("Bad Code", (1,), FinalAction.CANCEL)


@pytest.mark.parametrize(
    ("action", "status"),
    [
        (FinalAction.CANCEL, SubscriptionStatus.CANCELED),
        (FinalAction.UNPAID, SubscriptionStatus.UNPAID),
        (FinalAction.PAUSE, SubscriptionStatus.PAUSED),
    ],
)
def test_final_action_maps_to_a_legal_past_due_transition(
    action: FinalAction, status: SubscriptionStatus
) -> None:
    """Every final action is an event the state machine accepts from past_due."""
    event = final_action_event(action)
    assert isinstance(event, SubscriptionEvent)
    assert transition(SubscriptionStatus.PAST_DUE, event) is status


ladders = st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=8, unique=True).map(
    lambda days: tuple(sorted(days))
)


@given(ladders, st.sampled_from(list(FinalAction)))
def test_retry_times_increase_and_end(days: tuple[int, ...], action: FinalAction) -> None:
    """Retries come strictly later each time and stop after exactly len(days) retries."""
    policy = DunningPolicy("p", days, action)
    times = [next_retry_at(policy, FIRST, n) for n in range(1, len(days) + 2)]
    retries = [t for t in times if t is not None]
    assert len(retries) == len(days) and times[-1] is None
    assert all(FIRST < a < b for a, b in pairwise(retries))
    assert [dunning_step(policy, FIRST, n).is_last_retry for n in range(1, len(days) + 2)] == [
        n == len(days) for n in range(1, len(days) + 2)
    ]
