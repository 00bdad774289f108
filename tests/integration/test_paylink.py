"""The pay-and-update link on the real PostgreSQL: the customer pays an open invoice on the
sandbox's hosted page and gives a new card; nothing is trusted that verify has not confirmed.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from billing.attempts import SEND_WINDOW
from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import CardToken, Event
from billing.runtime import Runtime
from billing.services import paylink
from billing.services.charging import collect_invoices
from schedules.sweeps import run_janitor
from tests.factories import (
    age_attempts,
    attempts_of,
    invoice_of,
    renew,
    return_path,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)


@pytest.fixture()
def declined(rt: Runtime, sandbox: Sandbox) -> int:
    """An invoice in dunning: its card was declined for insufficient funds."""
    seed_plans(rt)
    subscriber(rt, sandbox, ["insufficient_funds"])
    (invoice_id,) = renew(rt)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "soft_declined"
    return invoice_id


def _pay(web: TestClient, sandbox: Sandbox, rt: Runtime, invoice_id: int) -> str:
    """Open the link, pay on the hosted page; the URL Fatora sends the customer back to."""
    ref = paylink.reference(rt.vault, invoice_id)
    opened = web.get(f"/pay/{ref}", follow_redirects=False)
    assert opened.status_code == 303
    payment_id = parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]
    return sandbox.pay(payment_id, "4111111111111111")


def _events(rt: Runtime, kind: str) -> int:
    with rt.sessions() as session:
        return len(session.execute(select(Event.id).where(Event.kind == kind)).all())


def test_the_link_recovers_the_invoice_and_replaces_the_card(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int
) -> None:
    """A declined customer pays through the link: the invoice is paid once, the subscription is
    active again and charged from now on with the new card, stored byte for byte."""
    back = _pay(web, sandbox, rt, declined)
    page = web.get(return_path(back))
    assert page.status_code == 200 and "Thank you" in page.text
    invoice = invoice_of(rt, declined)
    assert invoice.status == InvoiceStatus.PAID.value
    sub = subscription_of(rt, invoice.subscription_id)
    assert sub.status == SubscriptionStatus.ACTIVE.value
    token = parse_qs(urlsplit(back).query)["card_token"][0]
    assert "+" in token  # the trap: a "+" read as a space would store another token
    with rt.sessions() as session:
        card = session.get(CardToken, sub.card_token_id)
        assert card is not None
        assert rt.vault.decrypt(card.ciphertext) == token
    assert len(successful_charges(rt, sandbox, declined)) == 1


def test_the_success_page_called_again_changes_nothing(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int
) -> None:
    """Fatora may call the success page several times, and a redirect can be replayed: the
    second time settles nothing more, stores no second card and sends no second receipt."""
    back = _pay(web, sandbox, rt, declined)
    web.get(return_path(back))
    before = (_events(rt, "invoice.paid"), _events(rt, "card.replaced"))
    again = web.get(return_path(back))
    assert again.status_code == 200 and "Thank you" in again.text
    assert (_events(rt, "invoice.paid"), _events(rt, "card.replaced")) == before
    with rt.sessions() as session:
        assert len(session.execute(select(CardToken.id)).all()) == 2  # the old and the new


def test_a_forged_redirect_changes_nothing_and_says_so(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int
) -> None:
    """A redirect is never proof: a made-up success for an unpaid invoice, or one with a wrong
    signature, pays nothing and stores no card."""
    ref = paylink.reference(rt.vault, declined)
    forged = web.get(f"/return/{ref}?order_id=X&transaction_id=1&card_token=Fake%2BToken")
    assert forged.status_code == 200 and "did not go through" in forged.text
    bad = web.get(f"/return/{declined}-AAAAAAAAAAAAAAAAAAAAAAAA?order_id=X")
    assert bad.status_code == 400 and "not valid" in bad.text
    assert web.get(f"/pay/{declined}-AAAAAAAAAAAAAAAAAAAAAAAA").status_code == 400
    assert invoice_of(rt, declined).status == InvoiceStatus.OPEN.value
    with rt.sessions() as session:
        assert len(session.execute(select(CardToken.id)).all()) == 1


def test_while_the_hosted_page_is_open_no_worker_charges_the_invoice(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int, clock: FixedClock
) -> None:
    """Exactly once: a customer on the hosted page and a dunning retry cannot both pay. The
    retry waits while the page is open; an abandoned page closes after the grace, and the
    dunning schedule goes on."""
    ref = paylink.reference(rt.vault, declined)
    assert web.get(f"/pay/{ref}", follow_redirects=False).status_code == 303
    step = invoice_of(rt, declined).next_attempt_at
    assert step is not None
    clock.advance(step - clock.now())  # the dunning retry is due
    collect_invoices(rt, [declined])
    assert len(attempts_of(rt, declined)) == 2  # the decline and the open checkout: no charge
    # Opening the link again sends the customer to the same page.
    again = web.get(f"/pay/{ref}", follow_redirects=False)
    assert again.status_code == 303
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)  # the customer never paid
    run_janitor(rt, everything=True)
    assert attempts_of(rt, declined)[-1].status == "failed"
    assert invoice_of(rt, declined).next_attempt_at == step  # the ladder is untouched
    assert successful_charges(rt, sandbox, declined) == []  # an unpaid page took nothing


def test_an_arabic_customer_reads_the_page_right_to_left(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int
) -> None:
    """The customer sees what happened in their own language."""
    from billing.models import Customer

    with rt.sessions() as session, session.begin():
        for customer in session.execute(select(Customer)).scalars():
            customer.language = "ar"
    back = _pay(web, sandbox, rt, declined)
    page = web.get(return_path(back))
    assert 'dir="rtl"' in page.text and "شكرًا" in page.text


def test_the_dunning_email_carries_the_link_that_recovers_the_invoice(
    rt: Runtime,
    sandbox: Sandbox,
    web: TestClient,
    declined: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dunning reaches the customer: the payment-failed email holds the pay-and-update link,
    and that very link, followed and paid, recovers the invoice."""
    from billing.config import reset_settings_cache
    from billing.crypto import TokenVault
    from billing.services.notifications import Channels, SmtpMailer, deliver_due
    from tests.receivers import smtp_server

    monkeypatch.setattr("billing.crypto.vault_from_settings", lambda: rt.vault)
    monkeypatch.setenv("BILLING_PUBLIC_URL", "https://billing.test")
    reset_settings_cache()
    assert isinstance(rt.vault, TokenVault)
    with smtp_server() as (inbox, port):
        channels = Channels(
            mailer=SmtpMailer(f"smtp://127.0.0.1:{port}", timeout_s=5),
            email_from="Shop <billing@shop.example>",
        )
        deliver_due(rt, channels)
    failed = [m for m in inbox.messages if paylink.reference(rt.vault, declined) in str(m)]
    assert failed, [m["Subject"] for m in inbox.messages]
    link = f"https://billing.test/pay/{paylink.reference(rt.vault, declined)}"
    assert link in failed[0].get_body(("plain",)).get_content()  # type: ignore[union-attr]
    opened = web.get(urlsplit(link).path, follow_redirects=False)
    payment_id = parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]
    web.get(return_path(sandbox.pay(payment_id, "4111111111111111")))
    assert invoice_of(rt, declined).status == InvoiceStatus.PAID.value
    reset_settings_cache()


def _open(web: TestClient, rt: Runtime, invoice_id: int) -> str:
    opened = web.get(f"/pay/{paylink.reference(rt.vault, invoice_id)}", follow_redirects=False)
    assert opened.status_code == 303
    return parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]


def test_a_page_paid_after_it_closed_is_recorded(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int
) -> None:
    """No charge unrecorded: a hosted page closes unpaid after the grace, but the customer pays
    the old tab later; the janitor, which keeps watching it, records the payment."""
    payment_id = _open(web, rt, declined)
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    assert attempts_of(rt, declined)[-1].status == "failed"  # closed: the ladder goes on
    sandbox.pay(payment_id, "4111111111111111")  # the old tab, paid late
    run_janitor(rt, everything=True)
    assert invoice_of(rt, declined).status == InvoiceStatus.PAID.value
    assert len(successful_charges(rt, sandbox, declined)) == 1


def test_a_page_paid_late_after_the_card_was_charged_raises_a_duplicate(
    rt: Runtime, sandbox: Sandbox, web: TestClient, clock: FixedClock
) -> None:
    """Two payments are never silent: the worker charged the card after the page closed, then
    the customer paid the old tab; the second payment is recorded and raised as a duplicate."""
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    with rt.sessions() as session, session.begin():
        from billing.models import Invoice

        invoice = session.get(Invoice, invoice_id)
        assert invoice is not None
        invoice.next_attempt_at = clock.now() + rt.unknown_grace  # not charged before
    payment_id = _open(web, rt, invoice_id)
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    clock.advance(rt.unknown_grace)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"  # the stored card
    sandbox.pay(payment_id, "4111111111111111")
    run_janitor(rt, everything=True)
    assert _events(rt, "alert.duplicate_payment") == 1
    with rt.sessions() as session:
        from billing.models import ChargeAttempt

        succeeded = session.execute(
            select(ChargeAttempt.order_id).where(ChargeAttempt.status == "succeeded")
        ).all()
    assert len(succeeded) == 2 == len(successful_charges(rt, sandbox, invoice_id))


def test_declines_on_the_hosted_page_feed_no_breaker(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int
) -> None:
    """One customer's typos on the hosted page are theirs: they pause nobody's collection and
    mark no card dead."""
    from billing.services import control

    for _ in range(6):
        payment_id = _open(web, rt, declined)
        sandbox.pay(payment_id, "4111111111111111", cvv="999")  # declined on the page
        web.get(f"/return/{paylink.reference(rt.vault, declined)}")
    with rt.sessions() as session:
        assert control.collection_paused(session) is None
        dead = session.execute(select(CardToken.id).where(CardToken.status == "dead")).all()
    assert dead == []


def test_a_card_that_cannot_be_stored_does_not_stop_the_payment_being_recorded(
    rt: Runtime, sandbox: Sandbox, web: TestClient, declined: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No charge unrecorded: an odd card token in verify's answer is alerted and left out; the
    invoice is paid all the same and the old card stays."""
    from billing.fatora.client import FatoraClient

    real = FatoraClient.verify

    def odd_token(self: FatoraClient, order_id: str, transaction_id: str | None = None):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        payment = real(self, order_id, transaction_id)
        return replace(payment, card_token="has a space") if payment.card_token else payment

    monkeypatch.setattr(FatoraClient, "verify", odd_token)
    back = _pay(web, sandbox, rt, declined)
    assert web.get(return_path(back)).status_code == 200
    assert invoice_of(rt, declined).status == InvoiceStatus.PAID.value
    assert _events(rt, "alert.card_not_adopted") == 1


def test_a_reference_with_other_digits_is_refused_politely(web: TestClient) -> None:
    """A damaged link gets a page, never a server error."""
    assert web.get("/pay/²-x").status_code == 400
    assert web.get("/return/١٢-x").status_code == 400


def test_an_unpaid_subscription_comes_back_through_the_link(
    rt: Runtime, sandbox: Sandbox, web: TestClient, clock: FixedClock
) -> None:
    """A way back: when the ladder ends with 'unpaid', the written-off invoice can still be paid
    through the link, which makes the subscription active again and bills on from its period."""
    from billing.models import DunningPolicyRow

    seed_plans(rt)
    with rt.sessions() as session, session.begin():
        policy = session.get(DunningPolicyRow, "standard")
        assert policy is not None
        policy.retry_after_days, policy.final_action = [1], "unpaid"
    subscriber(rt, sandbox, ["insufficient_funds"])
    (invoice_id,) = renew(rt)
    for _ in range(3):
        collect_invoices(rt, [invoice_id])
        step = invoice_of(rt, invoice_id).next_attempt_at
        if step is None:
            break
        clock.advance(step - clock.now())
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.UNCOLLECTIBLE.value
    assert subscription_of(rt, invoice.subscription_id).status == SubscriptionStatus.UNPAID.value
    web.get(return_path(_pay(web, sandbox, rt, invoice_id)))
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.PAID.value
    sub = subscription_of(rt, invoice.subscription_id)
    assert sub.status == SubscriptionStatus.ACTIVE.value
    assert sub.next_billing_at == invoice.period_end
