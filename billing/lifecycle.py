"""Subscription and invoice state machines.

Each machine is one explicit table, ``(status, event) -> new status``, and nothing else decides a
status: a pair missing from the table raises :class:`IllegalTransition`. Tests enumerate the
tables, so adding an edge is a one-line, reviewed change.

Subscription statuses: every edge of :data:`SUBSCRIPTION_TRANSITIONS`, and nothing else (a test
reads these lines back and compares them with the table; ``unchanged`` keeps the status)::

    trialing, active, past_due, unpaid          --payment_succeeded-->             active
    paused                                      --payment_succeeded-->             unchanged
    trialing, active, past_due                  --payment_failed-->                past_due
    unpaid, paused                              --payment_failed-->                unchanged
    past_due, unpaid, paused                    --dunning_exhausted_cancel-->      canceled
    past_due                                    --dunning_exhausted_unpaid-->      unpaid
    unpaid, paused                              --dunning_exhausted_unpaid-->      unchanged
    past_due                                    --dunning_exhausted_pause-->       paused
    unpaid, paused                              --dunning_exhausted_pause-->       unchanged
    active, past_due                            --pause-->                         paused
    paused                                      --resume-->                        active
    trialing, active, past_due, unpaid, paused  --cancel-->                        canceled
    trialing, active, past_due                  --cancel_at_period_end-->          unchanged
    trialing, active, past_due                  --cancel_at_period_end_revoked-->  unchanged
    trialing, active, past_due                  --period_ended_with_cancel-->      canceled

Canceled is terminal: it takes no event at all.

Unpaid and paused subscriptions are not renewed, but the invoices they already have stay open
and keep their own dunning ladders: a pause stops new periods, not the collection of periods
already billed, and an unpaid subscription may have a later invoice still on its ladder. So both
charge outcomes and the end of a ladder reach them:

* A payment makes trialing, past_due and unpaid active (an unpaid one's schedule goes on from its
  last invoiced period, or from now when that period is over: the time it was stopped is never
  billed). A paused one stays paused: only a resume restarts its billing, so 'active' never
  means 'not billed'. The charge flow sends that resume itself when the pause was the dunning
  ladder's final action (``subscriptions.paused_by``): a payment lifts a pause made for want of
  payment, never the merchant's own.
* A failure moves trialing and active to past_due (dunning starts). It leaves unpaid and paused
  as they are: a failure neither restarts billing nor lifts a pause.
* The end of a ladder applies the policy's final action to whatever status the subscription has
  by then; it is never dropped. The failure that ends the ladder comes first, so that status is
  past_due, unpaid or paused (trialing and active cannot take a final action; canceled takes
  nothing, and its open invoices are voided instead of charged). ``cancel`` cancels from all
  three: a pause does not shield a subscription from its policy, and canceling stops every
  charge. ``unpaid`` and ``pause`` end past_due; on a subscription already unpaid or paused they
  keep its status: it is already not renewed, and one invoice's end must not change how it
  restarts (a merchant's pause is lifted by a resume and never by a payment; an unpaid
  subscription restarts when paid). The invoice is written off either way.

Cancelling at the end of the period is a flag, not a status: ``cancel_at_period_end`` sets it
(status unchanged), ``cancel_at_period_end_revoked`` clears it, and the renewal that finds it set
sends ``period_ended_with_cancel`` instead of billing the next period. :func:`apply` handles the
flag and the status together; :func:`transition` is the status table alone.

A subscription is created ``trialing`` or ``active`` (:func:`initial_status`), or ``unpaid`` when
its first period is paid on the hosted page; creation is not an event, so there is no "new"
status to keep out of every other table row.
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
    UNPAID = "unpaid"  # dunning gave up: no renewals until an open invoice is paid
    PAUSED = "paused"  # no renewals until the merchant resumes it (a payment leaves it paused)
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
        # A charge outcome (see the module docstring). On unpaid and paused it comes from an
        # invoice issued before they stopped renewing: a failure changes nothing there, and a
        # payment makes an unpaid subscription active again (its schedule goes on) but leaves a
        # paused one paused, since only a resume restarts its billing.
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
        # The end of a dunning ladder: the policy's final action, on every status the failure
        # that ends a ladder can leave (past_due, unpaid, paused). Cancel always cancels; unpaid
        # and pause keep a subscription that is already unpaid or paused as it is.
        (_S.PAST_DUE, _E.DUNNING_EXHAUSTED_CANCEL): _S.CANCELED,
        (_S.UNPAID, _E.DUNNING_EXHAUSTED_CANCEL): _S.CANCELED,
        (_S.PAUSED, _E.DUNNING_EXHAUSTED_CANCEL): _S.CANCELED,
        (_S.PAST_DUE, _E.DUNNING_EXHAUSTED_UNPAID): _S.UNPAID,
        (_S.UNPAID, _E.DUNNING_EXHAUSTED_UNPAID): _S.UNPAID,
        (_S.PAUSED, _E.DUNNING_EXHAUSTED_UNPAID): _S.PAUSED,
        (_S.PAST_DUE, _E.DUNNING_EXHAUSTED_PAUSE): _S.PAUSED,
        (_S.UNPAID, _E.DUNNING_EXHAUSTED_PAUSE): _S.UNPAID,
        (_S.PAUSED, _E.DUNNING_EXHAUSTED_PAUSE): _S.PAUSED,
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


def initial_status(has_trial: bool, *, paid_on_page: bool = False) -> SubscriptionStatus:
    """Status of a new subscription: ``trialing`` with a trial, else ``active``; ``unpaid``
    when its first period is to be paid on the hosted page (no card yet): it is not renewed
    until that invoice is paid, and the payment makes it ``active``, like any unpaid one."""
    if paid_on_page:
        return _S.UNPAID
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
