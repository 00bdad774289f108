"""Paying a renewal ahead, the first-payment link and refunds, against pauses, cancels, resumes,
closed pages, price changes and runs killed between two commits (real PostgreSQL, the in-process
sandbox). Each test asserts what money safety requires: a paid period is honoured, an unpaid one
is billed once at its price, nothing is payable for a renewal that will not come, and a refund
is never asked twice nor recorded wrongly."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from billing.attempts import SEND_WINDOW
from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import Event, Refund, Subscription
from billing.refunds import RefundStatus
from billing.runtime import Runtime
from billing.services import paylink
from billing.services.charging import collect_invoices
from billing.services.customers import add_customer
from billing.services.refunds import refund_invoice
from billing.services.subscriptions import (
    cancel,
    pause,
    plan_by_code,
    resume,
    start_with_checkout,
)
from schedules.sweeps import due_retries, run_janitor
from tests.factories import (
    RefundTap,
    age_attempts,
    invoice_of,
    invoices_of,
    open_page,
    plans_config,
    renew,
    return_path,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)


def _alerts(rt: Runtime) -> list[str]:
    with rt.sessions() as session:
        return [
            e.kind
            for e in session.execute(select(Event).where(Event.kind.like("alert.%"))).scalars()
        ]


def _collect_everything_due(rt: Runtime) -> None:
    renew(rt)
    for invoice_id in due_retries(rt):
        collect_invoices(rt, [invoice_id])


def _all_success(sandbox: Sandbox) -> list[dict[str, object]]:
    return [c for c in sandbox.charges() if c["status"] == "SUCCESS"]


def _paid_up(rt: Runtime, sandbox: Sandbox) -> int:
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    assert collect_invoices(rt, [first]).results[first] == "paid"
    return sub_id


def _renew_path(rt: Runtime, sub_id: int) -> str:
    due = subscription_of(rt, sub_id).next_billing_at
    assert due is not None
    return urlsplit(paylink.renew_link_for(rt.vault, sub_id, due)).path


def _pay_ahead(rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient) -> int:
    """A paid-up subscription whose customer pays the coming renewal through the expiry
    notice's link, five days before it. Returns the sub id."""
    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(days=5))
    back = sandbox.pay(open_page(web, _renew_path(rt, sub_id)), "4111111111111111")
    assert "Thank you" in web.get(return_path(back)).text
    ahead = invoices_of(rt, sub_id)[-1]
    assert ahead.period_start == renewal and ahead.status == InvoiceStatus.PAID.value
    return sub_id


# -- 1. paid ahead, then cancel at period end: the paid period is canceled at its start --------


def test_paid_ahead_then_cancel_at_period_end_keeps_the_paid_period(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _pay_ahead(rt, sandbox, clock, web)
    ahead = invoices_of(rt, sub_id)[-1]
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        cancel(session, row, clock.now(), at_period_end=True)
    clock.advance(ahead.period_start - clock.now() + timedelta(hours=1))
    _collect_everything_due(rt)
    sub = subscription_of(rt, sub_id)
    covered = sub.status != SubscriptionStatus.CANCELED.value or (
        sub.canceled_at is not None and sub.canceled_at >= ahead.period_end
    )
    assert covered or _alerts(rt), (
        f"customer paid {ahead.period_start:%F}..{ahead.period_end:%F}, subscription "
        f"{sub.status} at {sub.canceled_at}, alerts {_alerts(rt)}: paid period silently lost"
    )


# -- 2. paid ahead, then a merchant pause across the renewal: billed again on resume ----------


def test_paid_ahead_then_pause_and_resume_does_not_bill_the_paid_period_again(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _pay_ahead(rt, sandbox, clock, web)
    ahead = invoices_of(rt, sub_id)[-1]
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        pause(session, row, clock.now())
    clock.advance(ahead.period_start - clock.now() + timedelta(days=10))
    _collect_everything_due(rt)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        resume(session, row, clock.now())
    _collect_everything_due(rt)
    later = [
        i for i in invoices_of(rt, sub_id) if i.id != ahead.id and i.created_at > ahead.created_at
    ]
    overlapping = [
        (i.period_start, i.status)
        for i in later
        if i.period_start < ahead.period_end and i.status == InvoiceStatus.PAID.value
    ]
    assert not overlapping or _alerts(rt), (
        f"paid ahead for {ahead.period_start:%F}..{ahead.period_end:%F} (paused before it began, "
        f"resumed inside it); charged again for {overlapping}, {len(_all_success(sandbox))} "
        f"successful charges in all, alerts {_alerts(rt)}"
    )


# -- 3. paid ahead, then canceled at once: money for a period that never starts, no alert -----


def test_paid_ahead_then_cancel_now_is_raised(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _pay_ahead(rt, sandbox, clock, web)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        cancel(session, row, clock.now(), at_period_end=False)
    ahead = invoices_of(rt, sub_id)[-1]
    assert ahead.status != InvoiceStatus.PAID.value or _alerts(rt), (
        f"invoice {ahead.id} for {ahead.period_start:%F}.. (not begun) stays paid after an "
        "immediate cancel; no alert, no refund expectation"
    )


# -- 4. a pause voids the ahead invoice; resumed before the renewal: the period is free -------


def test_pause_then_resume_before_the_renewal_still_bills_the_period(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(days=5))
    open_page(web, _renew_path(rt, sub_id))  # looked at the page, closed it
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        pause(session, row, clock.now())  # voids the ahead invoice
    clock.advance(timedelta(days=1))
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        resume(session, row, clock.now())  # inside the paid period: renews at `renewal`
    clock.advance(renewal - clock.now() + timedelta(hours=1))
    _collect_everything_due(rt)
    sub = subscription_of(rt, sub_id)
    period = [i for i in invoices_of(rt, sub_id) if i.period_start == renewal]
    assert sub.current_period_start == renewal  # the subscription moved into the period
    assert any(i.status in (InvoiceStatus.OPEN.value, InvoiceStatus.PAID.value) for i in period), (
        f"subscription {sub.status} in period {renewal:%F}..{sub.current_period_end:%F}, its "
        f"only invoice is {[(i.id, i.status) for i in period]}: the period is never billed"
    )


# -- 5. price cut between the renew-ahead click and the renewal: the old price is charged ------


def test_renewal_taking_over_an_ahead_invoice_charges_the_price_of_the_period(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(days=5))
    open_page(web, _renew_path(rt, sub_id))
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    clock.advance(timedelta(days=1))
    seed_plans(rt, plans_config("30.00"))  # the price falls from 50 to 30 before the renewal
    clock.advance(renewal - clock.now() + timedelta(hours=1))
    _collect_everything_due(rt)
    (invoice,) = [i for i in invoices_of(rt, sub_id) if i.period_start == renewal]
    charged = successful_charges(rt, sandbox, invoice.id)
    assert invoice.amount_minor == 3000, (
        f"the worker charged {[c['amount'] for c in charged]} ({invoice.amount_minor} minor) "
        "for a period whose price is 30.00: the price of the abandoned ahead page"
    )


# -- 6. first-payment page closed, then paid late on the open tab after an 'expired' click ----


def test_first_payment_link_not_expired_while_a_closed_page_is_still_watched(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    seed_plans(rt)
    with rt.sessions() as session, session.begin():
        now = clock.now()
        who = add_customer(session, external_id="n", name="N", email="n@example.com", now=now)
        sub, invoice_id = start_with_checkout(
            session, customer=who, plan=plan_by_code(session, "monthly"), now=now
        )
        sub_id = sub.id
    clock.advance(timedelta(hours=23, minutes=59))
    payment_id = open_page(web, f"/pay/{paylink.reference(rt.vault, invoice_id)}")
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    clock.advance(timedelta(minutes=10))
    run_janitor(rt, everything=True)  # the page is closed unpaid (watched for 7 days)
    clock.advance(timedelta(hours=1))
    again = web.get(f"/pay/{paylink.reference(rt.vault, invoice_id)}", follow_redirects=False)
    sandbox.pay(payment_id, "4111111111111111")  # the customer pays the tab still open
    clock.advance(timedelta(days=1))
    run_janitor(rt)
    inv = invoice_of(rt, invoice_id)
    sub = subscription_of(rt, sub_id)
    assert len(_all_success(sandbox)) == 1
    assert inv.status == InvoiceStatus.PAID.value, (
        f"second click: HTTP {again.status_code} {'expired' in again.text and 'expired'}; the "
        f"customer's payment landed, invoice {inv.status}, subscription {sub.status}, "
        f"alerts {_alerts(rt)}"
    )


# -- 7. a page open at the pause keeps its invoice; abandoned, it is an orphan still payable --


def test_an_ahead_invoice_left_by_a_pause_is_not_payable_after_its_page_closed(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(days=5))
    open_page(web, _renew_path(rt, sub_id))  # the page is open...
    ahead = invoices_of(rt, sub_id)[-1]
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        pause(session, row, clock.now())  # ...so the pause leaves the invoice
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)  # ...and the customer closes it unpaid
    clock.advance(renewal - clock.now() + timedelta(days=10))
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        resume(session, row, clock.now())  # a new period from now
    _collect_everything_due(rt)
    # The customer finds the old 'try again' link and pays it.
    opened = web.get(f"/pay/{paylink.reference(rt.vault, ahead.id)}", follow_redirects=False)
    if opened.status_code == 303:
        payment_id = parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]
        web.get(return_path(sandbox.pay(payment_id, "4111111111111111")))
    sub = subscription_of(rt, sub_id)
    assert opened.status_code != 303 or _alerts(rt), (
        f"invoice {ahead.id} ({ahead.period_start:%F}..{ahead.period_end:%F}) left open by the "
        f"pause is {invoice_of(rt, ahead.id).status} after payment; subscription {sub.status} in "
        f"{sub.current_period_start:%F}..{sub.current_period_end:%F} billed separately; "
        f"{len(_all_success(sandbox))} charges, alerts {_alerts(rt)}"
    )


# -- 8. the renewal meets the ahead invoice while its page is open ---------------------------


def test_the_renewal_does_not_charge_the_card_while_the_ahead_page_is_open(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(minutes=1))
    payment_id = open_page(web, _renew_path(rt, sub_id))
    ahead = invoices_of(rt, sub_id)[-1]
    clock.advance(timedelta(minutes=2))
    _collect_everything_due(rt)
    assert successful_charges(rt, sandbox, ahead.id) == []
    web.get(return_path(sandbox.pay(payment_id, "4111111111111111")))
    _collect_everything_due(rt)
    run_janitor(rt, everything=True)
    assert len(successful_charges(rt, sandbox, ahead.id)) == 1
    assert invoice_of(rt, ahead.id).status == InvoiceStatus.PAID.value


# -- 9. the renew link when next_billing_at has microseconds ---------------------------------


def test_the_renew_link_with_microseconds_opens_the_page(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _paid_up(rt, sandbox)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        row.next_billing_at = row.next_billing_at + timedelta(microseconds=999_999)
    renewal = subscription_of(rt, sub_id).next_billing_at
    clock.advance(renewal - clock.now() - timedelta(days=5))
    open_page(web, _renew_path(rt, sub_id))
    assert invoices_of(rt, sub_id)[-1].link_only


# -- 10. refunds: a run killed between its two phases; a refusal asked again ------------------


def _age_refunds(rt: Runtime, by: timedelta) -> None:
    with rt.sessions() as session, session.begin():
        for refund in session.execute(select(Refund)).scalars():
            if refund.sent_wall_at is not None:
                refund.sent_wall_at -= by


def _refunded(sandbox: Sandbox) -> int:
    return sum(1 for c in sandbox.charges() if c.get("refunded"))


def test_refund_killed_before_sending_is_asked_once_after_the_grace(
    rtx: Runtime, sandbox: Sandbox, tap: RefundTap
) -> None:
    seed_plans(rtx)
    subscriber(rtx, sandbox, ["success"])
    (invoice_id,) = renew(rtx)
    assert collect_invoices(rtx, [invoice_id]).results[invoice_id] == "paid"
    tap.die_before = 1
    with pytest.raises(SystemExit):
        refund_invoice(rtx, invoice_id)
    again = refund_invoice(rtx, invoice_id)  # inside the grace: verify shows none, wait
    assert again.status is RefundStatus.REQUESTED and not again.asked and tap.refund_calls == 0
    _age_refunds(rtx, rtx.unknown_grace)
    done = refund_invoice(rtx, invoice_id)
    assert (
        done.status is RefundStatus.COMPLETED and tap.refund_calls == 1 and _refunded(sandbox) == 1
    )


def test_refund_killed_after_fatora_refunded_with_a_lagging_verify(
    rtx: Runtime, sandbox: Sandbox, tap: RefundTap
) -> None:
    seed_plans(rtx)
    subscriber(rtx, sandbox, ["success"])
    (invoice_id,) = renew(rtx)
    assert collect_invoices(rtx, [invoice_id]).results[invoice_id] == "paid"
    tap.die_after, tap.hide_refund = 1, 10
    with pytest.raises(SystemExit):
        refund_invoice(rtx, invoice_id)
    assert refund_invoice(rtx, invoice_id).status is RefundStatus.REQUESTED
    _age_refunds(rtx, rtx.unknown_grace)
    third = refund_invoice(rtx, invoice_id)  # asked again: 422 already refunded
    assert third.status is RefundStatus.REQUESTED, third
    tap.hide_refund = 0
    final = refund_invoice(rtx, invoice_id)
    assert final.status is RefundStatus.COMPLETED and _refunded(sandbox) == 1


def test_a_refused_refund_is_asked_again_and_completes_once(
    rtx: Runtime, sandbox: Sandbox, tap: RefundTap
) -> None:
    seed_plans(rtx)
    subscriber(rtx, sandbox, ["success"])
    (invoice_id,) = renew(rtx)
    assert collect_invoices(rtx, [invoice_id]).results[invoice_id] == "paid"
    tap.refuse = 1
    first = refund_invoice(rtx, invoice_id)
    assert first.status is RefundStatus.REJECTED, first
    second = refund_invoice(rtx, invoice_id)
    assert second.status is RefundStatus.COMPLETED and second.asked
    third = refund_invoice(rtx, invoice_id)
    assert third.already and tap.refund_calls == 2 and _refunded(sandbox) == 1
    with rtx.sessions() as session:
        row = session.execute(select(Refund)).scalar_one()
        assert row.tries == 2


# -- 11. the renew link clicked after its renewal happened (and failed on the dying card) -----


def test_the_renew_link_after_its_renewal_pays_the_renewal_invoice(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    from billing.models import CardToken

    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    path = _renew_path(rt, sub_id)  # the card.expiring notice's link
    with rt.sessions() as session, session.begin():
        for card in session.execute(select(CardToken)).scalars():
            card.expires_at = renewal - timedelta(days=1)  # the token dies before the renewal
    clock.advance(renewal - clock.now() + timedelta(hours=1))
    _collect_everything_due(rt)
    (due,) = [i for i in invoices_of(rt, sub_id) if i.period_start == renewal]
    assert due.status == InvoiceStatus.OPEN.value
    clock.advance(timedelta(days=1))
    clicked = web.get(path, follow_redirects=False)
    assert clicked.status_code == 303, (
        f"the customer clicks the notice's link a day after the renewal failed on the dead "
        f"card: HTTP {clicked.status_code}, "
        f"{'Nothing to pay' in clicked.text and 'Nothing to pay yet'}; invoice {due.id} is open"
    )


# -- 12. void_invoices_ahead misses an ahead invoice whose period began before the renewal ran --


def test_an_ahead_invoice_whose_renewal_has_not_run_is_not_payable_while_paused(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    sub_id = _paid_up(rt, sandbox)
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    path = _renew_path(rt, sub_id)
    clock.advance(renewal - clock.now() + timedelta(minutes=1))  # due; the pass has not run
    open_page(web, path)
    ahead = invoices_of(rt, sub_id)[-1]
    assert ahead.link_only and ahead.period_start == renewal
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)  # closed unpaid
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        pause(session, row, clock.now())
    _collect_everything_due(rt)
    # While paused it can be neither paid through its link nor charged.
    again = web.get(f"/pay/{paylink.reference(rt.vault, ahead.id)}", follow_redirects=False)
    assert again.status_code == 200 and "Nothing to pay yet" in again.text
    assert successful_charges(rt, sandbox, ahead.id) == []
