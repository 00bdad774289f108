"""Subscription and invoice state machines, driven from their tables."""

from __future__ import annotations

import itertools
import re

import pytest

import billing.lifecycle
from billing.dunning import FinalAction, final_action_event
from billing.lifecycle import (
    INVOICE_TRANSITIONS,
    SUBSCRIPTION_TRANSITIONS,
    IllegalTransition,
    InvoiceEvent,
    InvoiceStatus,
    SubscriptionEvent,
    SubscriptionState,
    SubscriptionStatus,
    apply,
    initial_status,
    invoice_transition,
    transition,
)

S = SubscriptionStatus
E = SubscriptionEvent

# The expected edges, written out independently of the module's table: a change to the table
# must be mirrored here on purpose.
EXPECTED_SUBSCRIPTION_EDGES = {
    (S.TRIALING, E.PAYMENT_SUCCEEDED): S.ACTIVE,
    (S.ACTIVE, E.PAYMENT_SUCCEEDED): S.ACTIVE,
    (S.PAST_DUE, E.PAYMENT_SUCCEEDED): S.ACTIVE,
    (S.UNPAID, E.PAYMENT_SUCCEEDED): S.ACTIVE,
    (S.PAUSED, E.PAYMENT_SUCCEEDED): S.PAUSED,
    (S.TRIALING, E.PAYMENT_FAILED): S.PAST_DUE,
    (S.ACTIVE, E.PAYMENT_FAILED): S.PAST_DUE,
    (S.PAST_DUE, E.PAYMENT_FAILED): S.PAST_DUE,
    (S.UNPAID, E.PAYMENT_FAILED): S.UNPAID,
    (S.PAUSED, E.PAYMENT_FAILED): S.PAUSED,
    (S.PAST_DUE, E.DUNNING_EXHAUSTED_CANCEL): S.CANCELED,
    (S.UNPAID, E.DUNNING_EXHAUSTED_CANCEL): S.CANCELED,
    (S.PAUSED, E.DUNNING_EXHAUSTED_CANCEL): S.CANCELED,
    (S.PAST_DUE, E.DUNNING_EXHAUSTED_UNPAID): S.UNPAID,
    (S.UNPAID, E.DUNNING_EXHAUSTED_UNPAID): S.UNPAID,
    (S.PAUSED, E.DUNNING_EXHAUSTED_UNPAID): S.PAUSED,
    (S.PAST_DUE, E.DUNNING_EXHAUSTED_PAUSE): S.PAUSED,
    (S.UNPAID, E.DUNNING_EXHAUSTED_PAUSE): S.UNPAID,
    (S.PAUSED, E.DUNNING_EXHAUSTED_PAUSE): S.PAUSED,
    (S.ACTIVE, E.PAUSE): S.PAUSED,
    (S.PAST_DUE, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.RESUME): S.ACTIVE,
    (S.TRIALING, E.CANCEL): S.CANCELED,
    (S.ACTIVE, E.CANCEL): S.CANCELED,
    (S.PAST_DUE, E.CANCEL): S.CANCELED,
    (S.UNPAID, E.CANCEL): S.CANCELED,
    (S.PAUSED, E.CANCEL): S.CANCELED,
    (S.TRIALING, E.CANCEL_AT_PERIOD_END): S.TRIALING,
    (S.ACTIVE, E.CANCEL_AT_PERIOD_END): S.ACTIVE,
    (S.PAST_DUE, E.CANCEL_AT_PERIOD_END): S.PAST_DUE,
    (S.TRIALING, E.CANCEL_AT_PERIOD_END_REVOKED): S.TRIALING,
    (S.ACTIVE, E.CANCEL_AT_PERIOD_END_REVOKED): S.ACTIVE,
    (S.PAST_DUE, E.CANCEL_AT_PERIOD_END_REVOKED): S.PAST_DUE,
    (S.TRIALING, E.PERIOD_ENDED_WITH_CANCEL): S.CANCELED,
    (S.ACTIVE, E.PERIOD_ENDED_WITH_CANCEL): S.CANCELED,
    (S.PAST_DUE, E.PERIOD_ENDED_WITH_CANCEL): S.CANCELED,
}

ALL_SUBSCRIPTION_PAIRS = list(itertools.product(SubscriptionStatus, SubscriptionEvent))
ILLEGAL_SUBSCRIPTION_PAIRS = [
    p for p in ALL_SUBSCRIPTION_PAIRS if p not in EXPECTED_SUBSCRIPTION_EDGES
]


def test_subscription_table_is_exactly_the_expected_edges() -> None:
    """The table is the single source of truth and holds no unreviewed edge."""
    assert dict(SUBSCRIPTION_TRANSITIONS) == EXPECTED_SUBSCRIPTION_EDGES


@pytest.mark.parametrize(("pair", "target"), list(EXPECTED_SUBSCRIPTION_EDGES.items()))
def test_every_legal_subscription_edge(
    pair: tuple[SubscriptionStatus, SubscriptionEvent], target: SubscriptionStatus
) -> None:
    """Each legal (status, event) pair moves to its documented status."""
    assert transition(*pair) is target


@pytest.mark.parametrize("pair", ILLEGAL_SUBSCRIPTION_PAIRS)
def test_every_illegal_subscription_pair_raises(
    pair: tuple[SubscriptionStatus, SubscriptionEvent],
) -> None:
    """Anything not in the table is refused, and the error names the status and the event."""
    status, event = pair
    with pytest.raises(IllegalTransition) as raised:
        transition(status, event)
    assert f"'{status.value}'" in str(raised.value)
    assert f"'{event.value}'" in str(raised.value)
    assert raised.value.status is status and raised.value.event is event


def test_canceled_is_terminal() -> None:
    """No event leaves canceled."""
    for event in SubscriptionEvent:
        with pytest.raises(IllegalTransition):
            transition(S.CANCELED, event)


def test_every_status_is_reachable_and_every_event_used() -> None:
    """The enums hold no dead members: each status is a target and each event has an edge."""
    assert {target for target in SUBSCRIPTION_TRANSITIONS.values()} | {S.TRIALING} == set(S)
    assert {event for _, event in SUBSCRIPTION_TRANSITIONS} == set(E)


# Not renewed any more, yet their open invoices are still charged on their dunning ladders.
STOPPED = (S.UNPAID, S.PAUSED)


@pytest.mark.parametrize("action", list(FinalAction))
@pytest.mark.parametrize("status", [s for s in SubscriptionStatus if s is not S.CANCELED])
def test_the_end_of_a_ladder_is_never_dropped(
    status: SubscriptionStatus, action: FinalAction
) -> None:
    """Whatever status a subscription has while one of its invoices is dunned, the end of the
    ladder (the failure, then the policy's final action, as dunning_flow applies them) is a
    table edge, never an IllegalTransition that a caller could swallow: the final action on a
    paused or unpaid subscription is not silently lost while its invoices keep being charged."""
    after_failure = transition(status, E.PAYMENT_FAILED)
    assert after_failure in (S.PAST_DUE, *STOPPED)
    transition(after_failure, final_action_event(action))  # does not raise


@pytest.mark.parametrize("status", [S.PAST_DUE, *STOPPED])
def test_a_final_cancel_cancels_whatever_stopped_the_renewals(status: SubscriptionStatus) -> None:
    """A pause (or an earlier 'unpaid') does not shield a subscription from a policy that ends in
    cancel: the subscription is canceled, and canceled is what stops every further charge."""
    assert transition(status, E.DUNNING_EXHAUSTED_CANCEL) is S.CANCELED


@pytest.mark.parametrize("action", [FinalAction.UNPAID, FinalAction.PAUSE])
@pytest.mark.parametrize("status", STOPPED)
def test_unpaid_or_pause_keeps_a_stopped_subscription_as_it_is(
    status: SubscriptionStatus, action: FinalAction
) -> None:
    """'Unpaid' or 'pause' at the end of a ladder keeps an already unpaid or paused subscription
    in its status: it is already not renewed, and one invoice's end never changes how it
    restarts (a merchant's pause is lifted only by a resume, an unpaid one restarts when paid)."""
    assert transition(status, final_action_event(action)) is status


@pytest.mark.parametrize("status", STOPPED)
def test_a_failed_charge_leaves_a_stopped_subscription_as_it_is(status: SubscriptionStatus) -> None:
    """A declined charge of an invoice issued before the subscription stopped renewing neither
    restarts its billing (past_due would be renewed again) nor lifts a pause."""
    assert transition(status, E.PAYMENT_FAILED) is status


@pytest.mark.parametrize("event", [E.DUNNING_EXHAUSTED_CANCEL, E.DUNNING_EXHAUSTED_UNPAID])
@pytest.mark.parametrize("status", [S.TRIALING, S.ACTIVE, S.CANCELED])
def test_a_final_action_without_the_failure_first_is_refused(
    status: SubscriptionStatus, event: SubscriptionEvent
) -> None:
    """The failure that ends a ladder always comes first, so a final action on trialing or active
    means a caller skipped it; a canceled subscription takes nothing at all."""
    with pytest.raises(IllegalTransition):
        transition(status, event)


_DIAGRAM_LINE = re.compile(
    r"^ {4}(?P<sources>[a-z_]+(?:, [a-z_]+)*) +--(?P<event>[a-z_]+)--> +"
    r"(?P<target>[a-z_]+)$"
)


def test_the_module_docstring_lists_exactly_the_table() -> None:
    """The documented state machine is the one that runs: each diagram line of the module
    docstring is read back, and together they are exactly SUBSCRIPTION_TRANSITIONS."""
    doc = billing.lifecycle.__doc__
    assert doc is not None
    documented: dict[tuple[SubscriptionStatus, SubscriptionEvent], SubscriptionStatus] = {}
    for line in doc.splitlines():
        match = _DIAGRAM_LINE.match(line)
        if match is None:
            continue
        event = SubscriptionEvent(match["event"])
        for source in match["sources"].split(", "):
            status = SubscriptionStatus(source)
            assert (status, event) not in documented, f"documented twice: {source} {event}"
            target = match["target"]
            documented[status, event] = status if target == "unchanged" else S(target)
    assert documented == dict(SUBSCRIPTION_TRANSITIONS)


def test_cancel_at_period_end_never_changes_status() -> None:
    """Scheduling or revoking a cancellation is a flag: the status stays as it was."""
    for (status, event), target in SUBSCRIPTION_TRANSITIONS.items():
        if event in (E.CANCEL_AT_PERIOD_END, E.CANCEL_AT_PERIOD_END_REVOKED):
            assert target is status


def test_illegal_transition_is_a_value_error() -> None:
    """Callers may treat an illegal transition as bad input."""
    assert issubclass(IllegalTransition, ValueError)


def test_transition_accepts_plain_strings() -> None:
    """Values read back from the database (plain strings) work the same as enum members."""
    assert transition("past_due", "payment_succeeded") is S.ACTIVE  # type: ignore[arg-type]


def test_initial_status() -> None:
    """A new subscription starts trialing only if it has a trial."""
    assert initial_status(True) is S.TRIALING
    assert initial_status(False) is S.ACTIVE


def test_apply_sets_and_clears_the_cancel_flag() -> None:
    """cancel_at_period_end sets the flag, revoking clears it, the status does not move."""
    state = SubscriptionState(S.ACTIVE)
    scheduled = apply(state, E.CANCEL_AT_PERIOD_END)
    assert scheduled == SubscriptionState(S.ACTIVE, cancel_at_period_end=True)
    assert apply(scheduled, E.CANCEL_AT_PERIOD_END_REVOKED) == state


def test_apply_period_end_with_flag_cancels() -> None:
    """The renewal that finds the flag ends the subscription instead of billing again."""
    state = SubscriptionState(S.ACTIVE, cancel_at_period_end=True)
    assert apply(state, E.PERIOD_ENDED_WITH_CANCEL) == SubscriptionState(S.CANCELED, False)


def test_apply_flag_survives_payment_events() -> None:
    """A payment outcome during the last period keeps the scheduled cancellation."""
    state = SubscriptionState(S.ACTIVE, cancel_at_period_end=True)
    assert apply(state, E.PAYMENT_FAILED) == SubscriptionState(S.PAST_DUE, True)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (SubscriptionState(S.ACTIVE, False), E.PERIOD_ENDED_WITH_CANCEL),
        (SubscriptionState(S.ACTIVE, False), E.CANCEL_AT_PERIOD_END_REVOKED),
        (SubscriptionState(S.ACTIVE, True), E.CANCEL_AT_PERIOD_END),
        (SubscriptionState(S.PAUSED, False), E.CANCEL_AT_PERIOD_END),
        (SubscriptionState(S.CANCELED, False), E.RESUME),
    ],
)
def test_apply_refuses_stale_flag_events(
    state: SubscriptionState, event: SubscriptionEvent
) -> None:
    """Flag events that contradict the flag mean a stale view, and are refused."""
    with pytest.raises(IllegalTransition):
        apply(state, event)


INV = InvoiceStatus
IE = InvoiceEvent

EXPECTED_INVOICE_EDGES = {
    (INV.OPEN, IE.PAYMENT_SUCCEEDED): INV.PAID,
    (INV.OPEN, IE.MARK_UNCOLLECTIBLE): INV.UNCOLLECTIBLE,
    (INV.OPEN, IE.VOID): INV.VOID,
    (INV.UNCOLLECTIBLE, IE.PAYMENT_SUCCEEDED): INV.PAID,
    (INV.UNCOLLECTIBLE, IE.VOID): INV.VOID,
}
ILLEGAL_INVOICE_PAIRS = [
    p for p in itertools.product(InvoiceStatus, InvoiceEvent) if p not in EXPECTED_INVOICE_EDGES
]


def test_invoice_table_is_exactly_the_expected_edges() -> None:
    """The invoice table holds exactly the reviewed edges."""
    assert dict(INVOICE_TRANSITIONS) == EXPECTED_INVOICE_EDGES


@pytest.mark.parametrize(("pair", "target"), list(EXPECTED_INVOICE_EDGES.items()))
def test_every_legal_invoice_edge(
    pair: tuple[InvoiceStatus, InvoiceEvent], target: InvoiceStatus
) -> None:
    """Each legal invoice edge moves to its documented status."""
    assert invoice_transition(*pair) is target


@pytest.mark.parametrize("pair", ILLEGAL_INVOICE_PAIRS)
def test_every_illegal_invoice_pair_raises(pair: tuple[InvoiceStatus, InvoiceEvent]) -> None:
    """Paid and void are terminal; an invoice is never paid twice (DESIGN invariant 2)."""
    status, event = pair
    with pytest.raises(IllegalTransition, match=f"invoice in status '{status.value}'"):
        invoice_transition(status, event)
