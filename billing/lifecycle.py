"""Subscription and invoice state machines.

Each machine is one explicit table, ``(status, event) -> new status``, and nothing else decides a
status: a pair missing from the table raises :class:`IllegalTransition`. Tests enumerate the
tables, so adding an edge is a one-line, reviewed change.

Subscription statuses::

    trialing --payment_succeeded--> active      (the first charge after the trial)
    trialing --payment_failed-----> past_due
    active   --payment_failed-----> past_due    (dunning starts)
    past_due --payment_succeeded--> active
    past_due --dunning_exhausted_{cancel,unpaid,pause}--> canceled | unpaid | paused
    unpaid, paused --payment_succeeded--> active (the customer paid the open invoice)
    active, past_due --pause--> paused --resume--> active
    any but canceled --cancel--> canceled       (immediately; canceled is terminal)

Cancelling at the end of the period is a flag, not a status: ``cancel_at_period_end`` sets it
(status unchanged), ``cancel_at_period_end_revoked`` clears it, and the renewal that finds it set
sends ``period_ended_with_cancel`` instead of billing the next period. :func:`apply` handles the
flag and the status together; :func:`transition` is the status table alone.

A subscription is created ``trialing`` or ``active`` (:func:`initial_status`); creation is not an
event, so there is no "new" status to keep out of every other table row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "INVOICE_TRANSITIONS",
    "SUBSCRIPTION_TRANSITIONS",
    "IllegalTransition",
    "InvoiceEvent",
    "InvoiceStatus",
    "SubscriptionEvent",
    "SubscriptionState",
    "SubscriptionStatus",
    "apply",
    "initial_status",
    "invoice_transition",
    "transition",
]


class SubscriptionStatus(StrEnum):
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"  # a charge was declined; the dunning ladder is running
    UNPAID = "unpaid"  # dunning gave up; the invoice stays open, no more automatic charges
    PAUSED = "paused"  # no renewals until resumed (by the merchant or by paying)
    CANCELED = "canceled"  # terminal


class SubscriptionEvent(StrEnum):
    PAYMENT_SUCCEEDED = "payment_succeeded"
    PAYMENT_FAILED = "payment_failed"
    DUNNING_EXHAUSTED_CANCEL = "dunning_exhausted_cancel"
    DUNNING_EXHAUSTED_UNPAID = "dunning_exhausted_unpaid"
    DUNNING_EXHAUSTED_PAUSE = "dunning_exhausted_pause"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    CANCEL_AT_PERIOD_END = "cancel_at_period_end"
    CANCEL_AT_PERIOD_END_REVOKED = "cancel_at_period_end_revoked"
    PERIOD_ENDED_WITH_CANCEL = "period_ended_with_cancel"


class IllegalTransition(ValueError):
    """An event that the state machine does not allow in the current status."""

    def __init__(self, machine: str, status: StrEnum, event: StrEnum) -> None:
        super().__init__(f"{machine} in status {status.value!r} cannot take event {event.value!r}")
        self.machine = machine
        self.status = status
        self.event = event


_S = SubscriptionStatus
_E = SubscriptionEvent

# The single source of truth for subscription statuses.
SUBSCRIPTION_TRANSITIONS: Mapping[tuple[SubscriptionStatus, SubscriptionEvent], SubscriptionStatus]
SUBSCRIPTION_TRANSITIONS = MappingProxyType(
    {
        # A charge outcome. A failure where dunning has already ended (unpaid, paused) is the
        # customer's own attempt on the pay link: it changes nothing. A payment makes an unpaid
        # subscription active again (its schedule goes on); a paused one stays paused, since
        # only a resume restarts its billing: 'active' must never mean 'not billed'.
        (_S.TRIALING, _E.PAYMENT_SUCCEEDED): _S.ACTIVE,
        (_S.ACTIVE, _E.PAYMENT_SUCCEEDED): _S.ACTIVE,
        (_S.PAST_DUE, _E.PAYMENT_SUCCEEDED): _S.ACTIVE,
        (_S.UNPAID, _E.PAYMENT_SUCCEEDED): _S.ACTIVE,
        (_S.PAUSED, _E.PAYMENT_SUCCEEDED): _S.PAUSED,
        (_S.TRIALING, _E.PAYMENT_FAILED): _S.PAST_DUE,
        (_S.ACTIVE, _E.PAYMENT_FAILED): _S.PAST_DUE,
        (_S.PAST_DUE, _E.PAYMENT_FAILED): _S.PAST_DUE,
        (_S.UNPAID, _E.PAYMENT_FAILED): _S.UNPAID,
        (_S.PAUSED, _E.PAYMENT_FAILED): _S.PAUSED,
        # The end of the dunning ladder: the policy's final action.
        (_S.PAST_DUE, _E.DUNNING_EXHAUSTED_CANCEL): _S.CANCELED,
        (_S.PAST_DUE, _E.DUNNING_EXHAUSTED_UNPAID): _S.UNPAID,
        (_S.PAST_DUE, _E.DUNNING_EXHAUSTED_PAUSE): _S.PAUSED,
        # Merchant or customer actions.
        (_S.ACTIVE, _E.PAUSE): _S.PAUSED,
        (_S.PAST_DUE, _E.PAUSE): _S.PAUSED,
        (_S.PAUSED, _E.RESUME): _S.ACTIVE,
        (_S.TRIALING, _E.CANCEL): _S.CANCELED,
        (_S.ACTIVE, _E.CANCEL): _S.CANCELED,
        (_S.PAST_DUE, _E.CANCEL): _S.CANCELED,
        (_S.UNPAID, _E.CANCEL): _S.CANCELED,
        (_S.PAUSED, _E.CANCEL): _S.CANCELED,
        # Cancel at period end: only where a period is running; the status waits for the renewal.
        (_S.TRIALING, _E.CANCEL_AT_PERIOD_END): _S.TRIALING,
        (_S.ACTIVE, _E.CANCEL_AT_PERIOD_END): _S.ACTIVE,
        (_S.PAST_DUE, _E.CANCEL_AT_PERIOD_END): _S.PAST_DUE,
        (_S.TRIALING, _E.CANCEL_AT_PERIOD_END_REVOKED): _S.TRIALING,
        (_S.ACTIVE, _E.CANCEL_AT_PERIOD_END_REVOKED): _S.ACTIVE,
        (_S.PAST_DUE, _E.CANCEL_AT_PERIOD_END_REVOKED): _S.PAST_DUE,
        (_S.TRIALING, _E.PERIOD_ENDED_WITH_CANCEL): _S.CANCELED,
        (_S.ACTIVE, _E.PERIOD_ENDED_WITH_CANCEL): _S.CANCELED,
        (_S.PAST_DUE, _E.PERIOD_ENDED_WITH_CANCEL): _S.CANCELED,
    }
)


def initial_status(has_trial: bool) -> SubscriptionStatus:
    """Status of a new subscription: ``trialing`` with a trial, else ``active``."""
    return _S.TRIALING if has_trial else _S.ACTIVE


def transition(status: SubscriptionStatus, event: SubscriptionEvent) -> SubscriptionStatus:
    """The status after ``event``, or :class:`IllegalTransition`."""
    status, event = SubscriptionStatus(status), SubscriptionEvent(event)
    try:
        return SUBSCRIPTION_TRANSITIONS[status, event]
    except KeyError:
        raise IllegalTransition("subscription", status, event) from None


@dataclass(frozen=True)
class SubscriptionState:
    """A subscription's status together with its cancel-at-period-end flag."""

    status: SubscriptionStatus
    cancel_at_period_end: bool = False


def apply(state: SubscriptionState, event: SubscriptionEvent) -> SubscriptionState:
    """The state after ``event``: the status table, plus the rules for the flag.

    Setting the flag twice, revoking an unset flag, or ending a period "with cancel" when the flag
    is not set are illegal: each means the caller's view of the subscription is stale.
    """
    event = SubscriptionEvent(event)
    flag = state.cancel_at_period_end
    legal_flag = {
        _E.CANCEL_AT_PERIOD_END: not flag,
        _E.CANCEL_AT_PERIOD_END_REVOKED: flag,
        _E.PERIOD_ENDED_WITH_CANCEL: flag,
    }.get(event, True)
    if not legal_flag:
        raise IllegalTransition(
            "subscription" + (" with cancel_at_period_end" if flag else ""), state.status, event
        )
    status = transition(state.status, event)
    if event is _E.CANCEL_AT_PERIOD_END:
        flag = True
    elif event is _E.CANCEL_AT_PERIOD_END_REVOKED or status is _S.CANCELED:
        flag = False
    return SubscriptionState(status, flag)


class InvoiceStatus(StrEnum):
    OPEN = "open"  # awaiting payment (including while dunning retries it)
    PAID = "paid"  # terminal
    UNCOLLECTIBLE = "uncollectible"  # written off; a late payment is still accepted
    VOID = "void"  # terminal: never to be paid (e.g. subscription canceled before collection)


class InvoiceEvent(StrEnum):
    PAYMENT_SUCCEEDED = "payment_succeeded"
    MARK_UNCOLLECTIBLE = "mark_uncollectible"
    VOID = "void"


_I = InvoiceStatus
_IE = InvoiceEvent

# The single source of truth for invoice statuses.
INVOICE_TRANSITIONS: Mapping[tuple[InvoiceStatus, InvoiceEvent], InvoiceStatus]
INVOICE_TRANSITIONS = MappingProxyType(
    {
        (_I.OPEN, _IE.PAYMENT_SUCCEEDED): _I.PAID,
        (_I.OPEN, _IE.MARK_UNCOLLECTIBLE): _I.UNCOLLECTIBLE,
        (_I.OPEN, _IE.VOID): _I.VOID,
        (_I.UNCOLLECTIBLE, _IE.PAYMENT_SUCCEEDED): _I.PAID,
        (_I.UNCOLLECTIBLE, _IE.VOID): _I.VOID,
    }
)


def invoice_transition(status: InvoiceStatus, event: InvoiceEvent) -> InvoiceStatus:
    """The invoice status after ``event``, or :class:`IllegalTransition`."""
    status, event = InvoiceStatus(status), InvoiceEvent(event)
    try:
        return INVOICE_TRANSITIONS[status, event]
    except KeyError:
        raise IllegalTransition("invoice", status, event) from None
