"""Card tokens over their life, on the real PostgreSQL with the sandbox: the renew-ahead link
before a token dies, the first payment on the hosted page, the operator's card commands and the
deactivation of tokens nobody needs.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import CardStatus, CardToken, Event, Invoice, Subscription
from billing.runtime import Runtime
from billing.services import cards as card_service
from billing.services import paylink
from billing.services.charging import collect_invoices
from billing.services.customers import add_card, add_customer
from billing.services.errors import BillingError
from billing.services.subscriptions import cancel, plan_by_code, start_with_checkout
from schedules.sweeps import due_retries
from tests.factories import (
    invoice_of,
    renew,
    renew_link,
    return_path,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)


def _pay_at(web: TestClient, sandbox: Sandbox, path: str) -> str:
    opened = web.get(path, follow_redirects=False)
    assert opened.status_code == 303, opened.text
    payment_id = parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]
    return sandbox.pay(payment_id, "4111111111111111")


def _token_of(rt: Runtime, card_id: int | None) -> str:
    with rt.sessions() as session:
        card = session.get(CardToken, card_id)
        assert card is not None
        return rt.vault.decrypt(card.ciphertext)


def _kinds(rt: Runtime, kind: str) -> list[Event]:
    with rt.sessions() as session:
        return list(session.execute(select(Event).where(Event.kind == kind)).scalars())


def _age_card(rt: Runtime, card_id: int | None, expires_in: timedelta) -> None:
    with rt.sessions() as session, session.begin():
        card = session.get(CardToken, card_id)
        assert card is not None
        card.expires_at = rt.clock.now() + expires_in


# -- before a token dies -------------------------------------------------------------------


def test_the_expiry_notice_comes_the_configured_days_ahead_and_once(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Protects: a customer whose token dies before the next renewal hears about it a notice
    period ahead (not months early, not twice)."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    assert collect_invoices(rt, [first]).results[first] == "paid"
    sub = subscription_of(rt, sub_id)
    assert sub.next_billing_at is not None
    # The token dies two days before the next renewal.
    with rt.sessions() as session, session.begin():
        card = session.get(CardToken, sub.card_token_id)
        assert card is not None
        card.expires_at = sub.next_billing_at - timedelta(days=2)
    assert card_service.sweep_expiring_tokens(rt, timedelta(days=7)) == 0  # a month away
    clock.advance(sub.next_billing_at - clock.now() - timedelta(days=6))
    assert card_service.sweep_expiring_tokens(rt, timedelta(days=7)) == 1
    assert card_service.sweep_expiring_tokens(rt, timedelta(days=7)) == 0
    assert len(_kinds(rt, "card.expiring")) == 1


def test_the_renew_ahead_link_pays_the_next_period_with_a_new_card(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Protects: the link sent before a token dies invoices the coming period, the hosted page
    pays it once and its new token becomes the subscription's card; at the renewal nothing is
    charged again and the dead token is never used."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    collect_invoices(rt, [first])
    sub = subscription_of(rt, sub_id)
    old_card = sub.card_token_id
    assert sub.next_billing_at is not None
    renewal = sub.next_billing_at
    clock.advance(renewal - clock.now() - timedelta(days=5))
    _age_card(rt, old_card, timedelta(days=3))  # dies before the renewal

    link = renew_link(rt, sub_id)
    back = _pay_at(web, sandbox, urlsplit(link).path)
    page = web.get(return_path(back))
    assert page.status_code == 200 and "Thank you" in page.text

    with rt.sessions() as session:
        invoices = list(
            session.execute(
                select(Invoice).where(Invoice.subscription_id == sub_id).order_by(Invoice.id)
            ).scalars()
        )
    assert [i.status for i in invoices] == [InvoiceStatus.PAID.value] * 2
    ahead = invoices[1]
    assert ahead.period_start == renewal
    assert len(successful_charges(rt, sandbox, ahead.id)) == 1
    sub = subscription_of(rt, sub_id)
    assert sub.card_token_id != old_card
    assert _token_of(rt, sub.card_token_id) == parse_qs(urlsplit(back).query)["card_token"][0]

    # The renewal date comes: that period is paid, the next one is not due yet.
    clock.advance(renewal - clock.now() + timedelta(hours=1))
    assert renew(rt) == []
    assert due_retries(rt) == []
    assert len(successful_charges(rt, sandbox, ahead.id)) == 1

    # The same link again: nothing more to pay now.
    again = web.get(urlsplit(link).path, follow_redirects=False)
    assert again.status_code == 200 and "Nothing to pay yet" in again.text


def test_a_renew_link_refuses_what_it_should(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Protects: a forged renew link, one for a renewal months away, or one for a subscription
    set to cancel at its period's end invoices nothing."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    collect_invoices(rt, [first])
    forged = web.get(f"/renew/{sub_id}-AAAAAAAAAAAAAAAAAAAAAAAA", follow_redirects=False)
    assert forged.status_code == 400
    link = urlsplit(renew_link(rt, sub_id)).path
    early = web.get(link, follow_redirects=False)
    assert early.status_code == 200 and "Nothing to pay yet" in early.text
    sub = subscription_of(rt, sub_id)
    assert sub.next_billing_at is not None
    clock.advance(sub.next_billing_at - clock.now() - timedelta(days=2))
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        cancel(session, row, clock.now(), at_period_end=True)
    ending = web.get(link, follow_redirects=False)
    assert ending.status_code == 200 and "Nothing to pay yet" in ending.text
    with rt.sessions() as session:
        assert len(session.execute(select(Invoice.id)).all()) == 1


def test_a_dead_token_is_never_charged_at_the_renewal(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Protects: a token past its six months is not sent to Fatora; the customer is asked for
    a new card (the invoice goes to dunning with the link)."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    collect_invoices(rt, [first])
    sub = subscription_of(rt, sub_id)
    assert sub.next_billing_at is not None
    _age_card(rt, sub.card_token_id, sub.next_billing_at - clock.now() - timedelta(hours=1))
    clock.advance(sub.next_billing_at - clock.now())
    (second,) = renew(rt)
    charges_before = len(sandbox.charges())
    assert collect_invoices(rt, [second]).results[second] != "paid"
    assert len(sandbox.charges()) == charges_before
    failed = [e for e in _kinds(rt, "invoice.payment_failed") if e.invoice_id == second]
    assert failed and failed[0].payload.get("reason") == "no_usable_card"


# -- the first payment on the hosted page --------------------------------------------------


def test_a_subscription_started_by_link_is_active_once_paid_and_keeps_the_card(
    rt: Runtime, sandbox: Sandbox, web: TestClient
) -> None:
    """Protects: a subscription whose first period is paid on the hosted page is not billed
    by any worker before that, becomes active when verify confirms the payment, and is charged
    with the card that payment saved from its next period on."""
    seed_plans(rt)
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        who = add_customer(session, external_id="new", name="New", email="n@example.com", now=now)
        sub, invoice_id = start_with_checkout(
            session, customer=who, plan=plan_by_code(session, "monthly"), now=now
        )
        sub_id = sub.id
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.UNPAID.value and sub.next_billing_at is None
    assert invoice_of(rt, invoice_id).next_attempt_at is None
    assert due_retries(rt) == [] and renew(rt) == []

    back = _pay_at(web, sandbox, f"/pay/{paylink.reference(rt.vault, invoice_id)}")
    assert "Thank you" in web.get(return_path(back)).text
    sub = subscription_of(rt, sub_id)
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.PAID.value
    assert sub.status == SubscriptionStatus.ACTIVE.value
    assert sub.card_token_id is not None
    assert sub.next_billing_at == invoice.period_end
    token = parse_qs(urlsplit(back).query)["card_token"][0]
    assert _token_of(rt, sub.card_token_id) == token
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


# -- the operator's card commands ----------------------------------------------------------


def _cards(rt: Runtime) -> dict[int, CardToken]:
    with rt.sessions() as session:
        return {c.id: c for c in session.execute(select(CardToken)).scalars()}


def test_removing_a_card_deactivates_it_at_fatora_and_moves_its_subscription(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """Protects: a removed card is dead at Fatora and never charged again; its subscription
    moves to the customer's other live card; removing it twice is refused."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success", "success"])
    first_card = subscription_of(rt, sub_id).card_token_id
    assert first_card is not None
    token = _token_of(rt, first_card)
    removal = card_service.remove_card(rt, first_card)
    assert removal.at_gateway
    other = next(i for i in _cards(rt) if i != first_card)
    assert removal.moved == {sub_id: other}
    assert _cards(rt)[first_card].status == CardStatus.DEACTIVATED.value
    assert sandbox.token_deactivated(token)
    with pytest.raises(BillingError, match="deactivated already"):
        card_service.remove_card(rt, first_card)
    (invoice,) = renew(rt)
    assert collect_invoices(rt, [invoice]).results[invoice] == "paid"
    (charge,) = successful_charges(rt, sandbox, invoice)
    assert charge.get("card_token") != token


def test_a_removal_fatora_does_not_confirm_changes_nothing(rt: Runtime, sandbox: Sandbox) -> None:
    """Protects: when Fatora does not confirm the deactivation, the card stays as it was."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    card_id = subscription_of(rt, sub_id).card_token_id
    assert card_id is not None
    sandbox.broken_routes.add("deactivate-token")
    with pytest.raises(BillingError, match="nothing was changed"):
        card_service.remove_card(rt, card_id)
    assert _cards(rt)[card_id].status == CardStatus.ACTIVE.value
    assert subscription_of(rt, sub_id).card_token_id == card_id


def test_set_default_switches_the_subscriptions_to_a_live_card(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """Protects: an operator's switch takes effect at the next charge, and a dead card is
    refused."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success", "success"])
    first = subscription_of(rt, sub_id).card_token_id
    second = next(i for i in _cards(rt) if i != first)
    with rt.sessions() as session, session.begin():
        assert card_service.set_default(session, second, rt.clock.now()) == [sub_id]
    assert subscription_of(rt, sub_id).card_token_id == second
    _age_card(rt, first, timedelta(days=-1))
    with rt.sessions() as session, session.begin(), pytest.raises(BillingError, match="expired"):
        card_service.set_default(session, first or 0, rt.clock.now())


def test_tokens_of_customers_with_no_subscription_left_are_deactivated(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Protects: tokens no subscription needs are deactivated at Fatora a week after the last
    subscription ended (one already deactivated there, answered 422, counts as done); a
    customer still subscribed keeps all, and so does one who has no subscription yet."""
    seed_plans(rt)
    gone = subscriber(rt, sandbox, ["success", "success"], name="gone")
    kept = subscriber(rt, sandbox, ["success", "success"], name="kept")
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, gone)
        assert row is not None
        cancel(session, row, rt.clock.now(), at_period_end=False)
    with rt.sessions() as session, session.begin():
        newcomer = add_customer(
            session, external_id="new", name="New", email="n@example.com", now=clock.now()
        )
        add_card(
            session,
            rt.vault,
            customer=newcomer,
            token=sandbox.issue_token("success"),
            now=clock.now(),
        )
    gone_customer = subscription_of(rt, gone).customer_id
    gone_cards = [c for c in _cards(rt).values() if c.customer_id == gone_customer]
    sandbox.deactivate(_token_of(rt, gone_cards[0].id))
    clock.advance(timedelta(days=6))
    assert card_service.deactivate_unneeded_tokens(rt).deactivated == 0  # not a week yet
    clock.advance(timedelta(days=2))
    report = card_service.deactivate_unneeded_tokens(rt)
    assert (report.deactivated, report.failed) == (2, 0)
    after = _cards(rt)
    for card in after.values():
        expected = (
            CardStatus.DEACTIVATED.value
            if card.customer_id == gone_customer
            else CardStatus.ACTIVE.value
        )
        assert card.status == expected
        if card.customer_id == gone_customer:
            assert sandbox.token_deactivated(_token_of(rt, card.id))
    assert subscription_of(rt, kept).card_token_id is not None
    assert card_service.deactivate_unneeded_tokens(rt).deactivated == 0
