"""The way back from the end of a dunning ladder (real PostgreSQL, the sandbox): a payment
through the link restores an unpaid subscription or one the ladder paused, and bills nothing
for the time it was stopped; a merchant's own pause is lifted only by a resume."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

from starlette.testclient import TestClient

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import DunningPolicyRow, Invoice, Subscription
from billing.runtime import Runtime
from billing.services import paylink
from billing.services.charging import collect_invoices
from billing.services.subscriptions import pause, resume
from tests.factories import invoice_of, renew, seed_plans, subscriber, subscription_of


def _ladder_ends(rt: Runtime, sandbox: Sandbox, clock: FixedClock, final_action: str) -> int:
    """A customer whose card keeps declining until the ladder's final action; the invoice."""
    seed_plans(rt)
    with rt.sessions() as session, session.begin():
        policy = session.get(DunningPolicyRow, "standard")
        assert policy is not None
        policy.retry_after_days, policy.final_action = [1], final_action
    subscriber(rt, sandbox, ["insufficient_funds"])
    (invoice_id,) = renew(rt)
    for _ in range(3):
        collect_invoices(rt, [invoice_id])
        step = invoice_of(rt, invoice_id).next_attempt_at
        if step is None:
            break
        clock.advance(step - clock.now())
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.UNCOLLECTIBLE.value
    return invoice_id


def _pay(web: TestClient, sandbox: Sandbox, rt: Runtime, invoice_id: int) -> None:
    opened = web.get(f"/pay/{paylink.reference(rt.vault, invoice_id)}", follow_redirects=False)
    assert opened.status_code == 303
    payment_id = parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]
    back = urlsplit(sandbox.pay(payment_id, "4111111111111111"))
    assert "Thank you" in web.get(f"{back.path}?{back.query}").text


def test_a_payment_lifts_the_ladders_pause(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Protects: a subscription the ladder paused for want of payment is billed again once the
    customer pays; its period goes on."""
    invoice_id = _ladder_ends(rt, sandbox, clock, "pause")
    sub_id = invoice_of(rt, invoice_id).subscription_id
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.PAUSED.value
    _pay(web, sandbox, rt, invoice_id)
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.ACTIVE.value
    assert (sub.paused_at, sub.paused_by) == (None, None)
    assert sub.next_billing_at == invoice_of(rt, invoice_id).period_end


def test_a_payment_never_lifts_the_merchants_pause(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Protects: a merchant's pause is theirs: a late payment of an old invoice is recorded
    and leaves the subscription paused until the merchant resumes it."""
    invoice_id = _ladder_ends(rt, sandbox, clock, "unpaid")
    sub_id = invoice_of(rt, invoice_id).subscription_id
    with rt.sessions() as session, session.begin():
        # Back from unpaid by an operator, then paused by the merchant.
        row = session.get(Subscription, sub_id)
        assert row is not None
        row.status = SubscriptionStatus.ACTIVE.value
        session.flush()
        pause(session, row, clock.now())
    _pay(web, sandbox, rt, invoice_id)
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.PAUSED.value and sub.paused_by == "merchant"
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        resume(session, row, clock.now())
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value


def test_a_subscription_back_from_unpaid_after_its_period_bills_nothing_for_the_gap(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Protects: no charge for time the subscription was stopped. Paid weeks after its period
    ended, it starts a new period now: the periods it spent unpaid are never invoiced."""
    invoice_id = _ladder_ends(rt, sandbox, clock, "unpaid")
    invoice = invoice_of(rt, invoice_id)
    clock.advance(invoice.period_end - clock.now() + timedelta(days=40))
    _pay(web, sandbox, rt, invoice_id)
    sub = subscription_of(rt, invoice.subscription_id)
    assert sub.status == SubscriptionStatus.ACTIVE.value
    assert sub.next_billing_at is not None
    assert sub.next_billing_at >= clock.now() - timedelta(seconds=1)
    renewed = renew(rt)
    with rt.sessions() as session:
        starts = sorted(
            i.period_start
            for i in session.query(Invoice).where(Invoice.subscription_id == sub.id).all()
        )
    assert len(renewed) == 1 and len(starts) == 2
    assert starts[1] >= clock.now() - timedelta(seconds=1)  # no period inside the gap
