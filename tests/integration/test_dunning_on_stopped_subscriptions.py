"""The end of a dunning ladder on a subscription that no longer renews (paused or unpaid).

Such a subscription still has open invoices on their ladders. When one of them runs out and the
policy says cancel, the subscription is canceled, and its other open invoices are voided instead
of being charged on: the final action is never dropped.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.clock import FixedClock
from billing.dunning import DunningPolicy, FinalAction
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import Subscription
from billing.periods import Interval
from billing.plans import PlansConfig, PlanSpec
from billing.runtime import Runtime
from billing.services.charging import collect_invoices
from billing.services.subscriptions import get_subscription, pause
from tests.factories import attempts_of, invoice_of, renew, seed_plans, subscriber, subscription_of

# Retries on days 1 and 40 after the first failure: long enough for the next month's invoice to be
# open (and on its own ladder) when the first one's ladder ends.
LONG_LADDER = DunningPolicy("long", (1, 40), FinalAction.CANCEL)


def _plans() -> PlansConfig:
    monthly = PlanSpec(
        code="monthly",
        name="Monthly",
        amount=Decimal("50.00"),
        currency="QAR",
        interval=Interval.MONTH,
        interval_count=1,
        cron=None,
        trial_days=0,
        dunning=LONG_LADDER.code,
    )
    return PlansConfig(plans={"monthly": monthly}, dunning={LONG_LADDER.code: LONG_LADDER})


def _stop(rt: Runtime, sub_id: int, how: str) -> None:
    with rt.sessions() as session, session.begin():
        sub = get_subscription(session, sub_id)
        if how == "paused":
            pause(session, sub, rt.clock.now())
        else:  # what an earlier ladder ending in 'unpaid' leaves
            sub.status = SubscriptionStatus.UNPAID.value
            sub.next_billing_at = None
    assert subscription_of(rt, sub_id).status == how


@pytest.mark.parametrize("how", [SubscriptionStatus.PAUSED.value, SubscriptionStatus.UNPAID.value])
def test_a_final_cancel_on_a_stopped_subscription_cancels_it_and_stops_its_charges(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, how: str
) -> None:
    """A policy ending in cancel cancels a paused or unpaid subscription too, and its other open
    invoice is voided, never charged again, instead of the final action being silently dropped
    while that invoice is still charged on its own ladder."""
    seed_plans(rt, _plans())
    sub_id = subscriber(rt, sandbox, ["insufficient_funds"])
    (first,) = renew(rt)
    start = clock.now()
    assert collect_invoices(rt, [first]).results[first] == "soft_declined"
    clock.at = start + timedelta(days=1)
    assert collect_invoices(rt, [first]).results[first] == "soft_declined"
    with rt.sessions() as session:
        sub = session.get(Subscription, sub_id)
        assert sub is not None and sub.next_billing_at is not None
        clock.at = sub.next_billing_at
    (second,) = renew(rt)  # a past_due subscription still renews
    assert collect_invoices(rt, [second]).results[second] == "soft_declined"
    second_failed_at = clock.now()
    _stop(rt, sub_id, how)

    clock.at = start + timedelta(days=40)  # the first invoice's last retry fails: end of ladder
    collect_invoices(rt, [first])
    assert invoice_of(rt, first).status == InvoiceStatus.UNCOLLECTIBLE.value
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.CANCELED.value and sub.canceled_at == clock.now()
    assert sub.next_billing_at is None

    charged_before = len(attempts_of(rt, second))
    clock.at = second_failed_at + timedelta(days=40)  # the second invoice's retry falls due
    assert collect_invoices(rt, [second]).results[second] == InvoiceStatus.VOID.value
    assert invoice_of(rt, second).status == InvoiceStatus.VOID.value
    assert len(attempts_of(rt, second)) == charged_before
