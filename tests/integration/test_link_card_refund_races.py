"""Races and late answers around the pay links, the card commands and refunds (real
PostgreSQL, the in-process sandbox). Each test asserts what money safety requires: no period
charged that the merchant stopped, no charge for a period nobody used, nothing charged that only
the link may pay, no refund asked twice or recorded wrongly, no dead token sent.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from billing.attempts import SEND_WINDOW
from billing.clock import FixedClock
from billing.crypto import TokenVault
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import (
    CardStatus,
    CardToken,
    ChargeAttempt,
    Event,
    Subscription,
)
from billing.refunds import RefundStatus
from billing.runtime import Runtime
from billing.services import cards as card_service
from billing.services import paylink
from billing.services.charging import collect_invoices
from billing.services.customers import add_card, add_customer
from billing.services.refunds import refund_invoice
from billing.services.subscriptions import (
    cancel,
    pause,
    plan_by_code,
    start_with_checkout,
)
from schedules.sweeps import due_retries, run_janitor
from tests.factories import (
    RefundTap,
    age_attempts,
    invoice_of,
    invoices_of,
    open_page,
    renew,
    renew_link,
    return_path,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)
from tests.integration.conftest import make_runtime


def _events(rt: Runtime, kind: str) -> list[Event]:
    with rt.sessions() as session:
        return list(session.execute(select(Event).where(Event.kind == kind)).scalars())


def _collect_everything_due(rt: Runtime) -> None:
    renew(rt)
    for invoice_id in due_retries(rt):
        collect_invoices(rt, [invoice_id])


def _abandoned_renew_ahead(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> tuple[int, int]:
    """An active, paid-up subscription whose customer opens the renew-ahead link five days
    before the renewal, looks at the hosted page and closes it. Returns (sub, ahead invoice)."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    assert collect_invoices(rt, [first]).results[first] == "paid"
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(days=5))
    open_page(web, urlsplit(renew_link(rt, sub_id)).path)
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)  # the page was never paid
    run_janitor(rt, everything=True)
    ahead = invoices_of(rt, sub_id)[-1]
    assert ahead.period_start == renewal and ahead.status == InvoiceStatus.OPEN.value
    return sub_id, ahead.id


# -- an abandoned renew-ahead invoice is charged for a period the merchant stopped ---------


def test_a_pause_keeps_an_abandoned_renew_ahead_invoice_from_being_charged(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Without the link, a pause before the renewal date means no invoice for the next period.
    With an abandoned renew-ahead page, the pre-made invoice is charged at its start while the
    subscription is paused."""
    sub_id, ahead = _abandoned_renew_ahead(rt, sandbox, clock, web)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        pause(session, row, clock.now())
    start = invoice_of(rt, ahead).period_start
    clock.advance(start - clock.now() + timedelta(hours=1))
    _collect_everything_due(rt)
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.PAUSED.value
    assert successful_charges(rt, sandbox, ahead) == [], "charged for a period while paused"


def test_a_cancel_at_period_end_keeps_an_abandoned_renew_ahead_invoice_from_being_charged(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """The customer asks to cancel at the end of the current period (before the renewal date):
    the pre-made invoice of the next period is charged anyway, and the cancel only takes effect
    a period later."""
    sub_id, ahead = _abandoned_renew_ahead(rt, sandbox, clock, web)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        cancel(session, row, clock.now(), at_period_end=True)
    start = invoice_of(rt, ahead).period_start
    clock.advance(start - clock.now() + timedelta(hours=1))
    _collect_everything_due(rt)
    assert successful_charges(rt, sandbox, ahead) == [], (
        "charged for the period after the one the customer canceled at"
    )


def test_a_renew_ahead_page_paid_after_a_pause_is_raised(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Same root cause, with the page still open: the merchant pauses, the customer then pays
    the page. The payment is recorded as an ordinary invoice.paid for a period that begins while
    the subscription is paused; nothing alerts anyone (a payment after a cancel raises
    alert.paid_after_cancel, a payment into a pause raises nothing). Resumed after that period,
    the subscription starts a new period and bills it: the prepaid period is simply lost."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    assert collect_invoices(rt, [first]).results[first] == "paid"
    renewal = subscription_of(rt, sub_id).next_billing_at
    assert renewal is not None
    clock.advance(renewal - clock.now() - timedelta(days=5))
    payment_id = open_page(web, urlsplit(renew_link(rt, sub_id)).path)
    with rt.sessions() as session, session.begin():
        row = session.get(Subscription, sub_id)
        assert row is not None
        pause(session, row, clock.now())
    back = sandbox.pay(payment_id, "4111111111111111")
    web.get(return_path(back))
    ahead = invoices_of(rt, sub_id)[-1]
    assert ahead.period_start == renewal
    alerts = [e.kind for e in _events(rt, "alert.paid_after_cancel")] + [
        e.kind for e in _events(rt, "alert.duplicate_payment")
    ]
    with rt.sessions() as session:
        all_alerts = [
            e.kind
            for e in session.execute(select(Event).where(Event.kind.like("alert.%"))).scalars()
        ]
    assert ahead.status != InvoiceStatus.PAID.value or all_alerts, (
        f"a period that starts during a merchant pause was paid with no alert ({alerts})"
    )


# -- a checkout-link subscription paid late is billed twice for one period of service ------


def _started_by_link(rt: Runtime, external_id: str = "new") -> tuple[int, int]:
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        who = add_customer(
            session, external_id=external_id, name="New", email="n@example.com", now=now
        )
        sub, invoice_id = start_with_checkout(
            session, customer=who, plan=plan_by_code(session, "monthly"), now=now
        )
        return sub.id, invoice_id


def test_a_first_payment_link_expires_and_a_late_payment_buys_a_period_from_now(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Protects: no charge for a period nobody used. A first-payment link opened weeks later
    has expired (the subscription is canceled, nothing is charged); a page opened in time but
    paid after the first period ended buys a period from the payment, with no second charge at
    once."""
    seed_plans(rt)
    sub_id, invoice_id = _started_by_link(rt)
    clock.advance(timedelta(days=40))
    late = web.get(f"/pay/{paylink.reference(rt.vault, invoice_id)}", follow_redirects=False)
    assert late.status_code == 200 and "expired" in late.text
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.CANCELED.value
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.VOID.value
    assert sandbox.charges() == []

    with rt.sessions() as session, session.begin():
        who = add_customer(
            session, external_id="late", name="Late", email="l@example.com", now=clock.now()
        )
        sub, second = start_with_checkout(
            session, customer=who, plan=plan_by_code(session, "monthly"), now=clock.now()
        )
        late_sub = sub.id
    payment_id = open_page(web, f"/pay/{paylink.reference(rt.vault, second)}")
    clock.advance(timedelta(days=35))  # the tab stays open; paid after the period ended
    back = sandbox.pay(payment_id, "4111111111111111")
    assert "Thank you" in web.get(return_path(back)).text
    _collect_everything_due(rt)
    assert len([c for c in sandbox.charges() if c["status"] == "SUCCESS"]) == 1
    paid_sub = subscription_of(rt, late_sub)
    assert paid_sub.status == SubscriptionStatus.ACTIVE.value
    assert paid_sub.next_billing_at is not None and paid_sub.next_billing_at > clock.now()


# -- the restore schedules the link subscription's invoice, and a worker charges it ---------


def test_a_restore_never_schedules_an_invoice_only_the_link_pays(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Protects: an invoice only the link pays (a first period started on the hosted page) is
    never charged by a worker, not even after a restore schedules every open invoice, and not
    with the customer's card of another subscription, which they never agreed to use for it."""
    from billing.services.restore import reconcile_after_restore

    seed_plans(rt)
    other = subscriber(rt, sandbox, ["success"], name="shared")
    (paid,) = renew(rt)
    assert collect_invoices(rt, [paid]).results[paid] == "paid"
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        who = session.get(Subscription, other)
        assert who is not None
        from billing.models import Customer

        customer = session.get(Customer, who.customer_id)
        assert customer is not None
        _sub, link_invoice = start_with_checkout(
            session, customer=customer, plan=plan_by_code(session, "monthly"), now=now
        )
    reconcile_after_restore(rt)
    for invoice_id in due_retries(rt):
        collect_invoices(rt, [invoice_id])
    assert successful_charges(rt, sandbox, link_invoice) == [], (
        "a link-only invoice was charged by a worker on another subscription's card"
    )


# -- refunds: a lagging verify sends a second refund, and 'already refunded' is recorded as
#        'rejected' --------------------------------------------------------------------------


def test_a_lost_refund_answer_and_a_lagging_verify_neither_ask_twice_nor_record_rejected(
    rtx: Runtime, sandbox: Sandbox, tap: RefundTap
) -> None:
    """Run 1: Fatora refunds, the answer is lost, verify does not show it yet -> 'requested'.
    Run 2 (the operator, a minute later): verify still lags -> asked AGAIN (no grace, unlike a
    charge's 'not found'); Fatora answers 422 'Payment already refunded', classed REJECTED
    ('refused, nothing moved'); verify lags -> the refund is recorded 'rejected' and the merchant
    is told invoice.refund_rejected, although the money went back."""
    seed_plans(rtx)
    subscriber(rtx, sandbox, ["success"])
    (invoice_id,) = renew(rtx)
    assert collect_invoices(rtx, [invoice_id]).results[invoice_id] == "paid"
    tap.lose_answers, tap.hide_refund = 1, 3
    first = refund_invoice(rtx, invoice_id)
    assert first.status is RefundStatus.REQUESTED
    second = refund_invoice(rtx, invoice_id)
    refunded = sum(1 for c in sandbox.charges() if c.get("refunded"))
    problems = []
    if tap.refund_calls != 1:
        problems.append(f"refund asked {tap.refund_calls} times")
    if refunded == 1 and second.status is RefundStatus.REJECTED:
        problems.append("money refunded but recorded 'rejected'")
    if _events(rtx, "invoice.refund_rejected"):
        problems.append("invoice.refund_rejected raised for a refund that was made")
    assert not problems, problems


# -- cards ------------------------------------------------------------------------------


class GateTap(httpx.BaseTransport):
    """The sandbox; holds deactivate-token requests until ``release`` is set, and records, for
    each collect-payment, whether the token sent was already deactivated at the gateway."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.inner = SandboxTransport(sandbox)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.deactivate_calls = 0
        self.dead_tokens_sent = 0
        self.hold = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/deactivate-token"):
            self.deactivate_calls += 1
            if self.hold:
                self.hold = False
                self.entered.set()
                self.release.wait(10)
        if path.endswith("/collect-payment"):
            token = json.loads(request.content)["card_token"]
            if self.sandbox.token_deactivated(token):
                self.dead_tokens_sent += 1
        return self.inner.handle_request(request)


@pytest.fixture()
def gate(sandbox: Sandbox) -> GateTap:
    return GateTap(sandbox)


@pytest.fixture()
def rtg(
    clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault, gate: GateTap
) -> Runtime:
    rt = make_runtime(clean_db, sandbox, clock, vault)
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1", sandbox.api_key, mode="test", timeout_s=15, transport=gate
    )
    return rt


def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_two_concurrent_removals_deactivate_once(
    rtg: Runtime, sandbox: Sandbox, gate: GateTap
) -> None:
    """Protects: two operators removing the same card at once: Fatora is asked once and the
    card retired once; the second, who waited on the lock, reads it afresh and is told it is
    deactivated already."""
    seed_plans(rtg)
    sub_id = subscriber(rtg, sandbox, ["success", "success"])
    card_id = subscription_of(rtg, sub_id).card_token_id
    first, box1 = _in_thread(card_service.remove_card, rtg, card_id)
    assert gate.entered.wait(10)
    second, box2 = _in_thread(card_service.remove_card, rtg, card_id)
    time.sleep(1.0)  # the second is waiting on the customer lock
    gate.release.set()
    first.join(15)
    second.join(15)
    assert "error" not in box1, box1
    assert gate.deactivate_calls == 1 and "error" in box2, (
        f"{gate.deactivate_calls} deactivate calls, second removal: {box2}, "
        f"card.deactivated events: {len(_events(rtg, 'card.deactivated'))}"
    )


def test_a_charge_racing_remove_card_never_sends_the_deactivated_token(
    rtg: Runtime, sandbox: Sandbox, clock: FixedClock, gate: GateTap
) -> None:
    """The subscription's own card has expired; its fallback (the customer's other live card) is
    being removed by an operator (customer + card locked, Fatora asked). A collection run reads
    the cards from its snapshot (fallback 'active'), picks it, and its INSERT of the attempt waits
    on the card's lock (the key-share the docstring relies on); once the removal commits, the
    insert goes through and the token Fatora just deactivated is charged. The docstring's promise
    ('none can start using the card while it is being deactivated') does not hold: the choice is
    made before the key-share lock and is not re-read."""
    seed_plans(rtg)
    sub_id = subscriber(rtg, sandbox, ["success", "success"])
    own = subscription_of(rtg, sub_id).card_token_id
    with rtg.sessions() as session, session.begin():
        card = session.get(CardToken, own)
        assert card is not None
        card.expires_at = clock.now() - timedelta(hours=1)  # the own token died
        fallback = session.execute(select(CardToken.id).where(CardToken.id != own)).scalar_one()
    (invoice_id,) = renew(rtg)
    remover, rbox = _in_thread(card_service.remove_card, rtg, fallback)
    assert gate.entered.wait(10)
    collector, cbox = _in_thread(collect_invoices, rtg, [invoice_id])
    time.sleep(1.5)  # the write-ahead has picked the fallback and waits on its row lock
    gate.release.set()
    remover.join(15)
    collector.join(15)
    assert "error" not in rbox, rbox
    with rtg.sessions() as session:
        attempts = list(
            session.execute(
                select(ChargeAttempt).where(ChargeAttempt.invoice_id == invoice_id)
            ).scalars()
        )
        statuses = {c.id: c.status for c in session.execute(select(CardToken)).scalars()}
    assert gate.dead_tokens_sent == 0, (
        f"a deactivated token was sent to collect-payment; attempts on cards "
        f"{[(a.card_token_id, a.status) for a in attempts]}, card statuses {statuses}, "
        f"collection: {cbox}"
    )


def test_the_nightly_deactivation_spares_a_card_added_before_its_subscription(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """Onboarding is three commands (customers add, cards add, subscriptions create). If the
    03:17 sweep runs between the last two, the new customer's token is deactivated at Fatora
    for good ('no subscription left' also matches 'no subscription yet'); create_subscription
    then accepts the deactivated card, and the first renewal dunns a brand-new customer."""
    seed_plans(rt)
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        who = add_customer(session, external_id="fresh", name="F", email="f@example.com", now=now)
        card = add_card(
            session, rt.vault, customer=who, token=sandbox.issue_token("success"), now=now
        )
        card_id = card.id
    report = card_service.deactivate_unneeded_tokens(rt)
    with rt.sessions() as session:
        status = session.get(CardToken, card_id).status  # type: ignore[union-attr]
    assert report.deactivated == 0 and status == CardStatus.ACTIVE.value, (
        f"a card added minutes ago, before its subscription, was deactivated: {report}, {status}"
    )


# -- the renew link, used again after paying ahead, invoices one more period ---------------


def test_a_renew_link_pays_one_renewal_only(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, web: TestClient
) -> None:
    """Weekly plan, default 14-day notice. The customer pays the coming renewal through the
    email's link; clicking the same link again (a second device, the email re-read) does not
    say 'Nothing to pay yet' (as it does for a monthly plan) but invoices the period after and
    opens a page to pay it too: nothing bounds the link to the renewal the email was about."""
    from decimal import Decimal

    from billing.dunning import STANDARD
    from billing.periods import Interval
    from billing.plans import PlansConfig, PlanSpec

    weekly = PlanSpec(
        code="monthly",  # the factory subscribes to 'monthly'
        name="Weekly",
        amount=Decimal("10.00"),
        currency="QAR",
        interval=Interval.WEEK,
        interval_count=1,
        cron=None,
        trial_days=0,
        dunning="standard",
    )
    seed_plans(rt, PlansConfig(plans={"monthly": weekly}, dunning={"standard": STANDARD}))
    sub_id = subscriber(rt, sandbox, ["success"])
    (first,) = renew(rt)
    assert collect_invoices(rt, [first]).results[first] == "paid"
    clock.advance(timedelta(days=3))
    path = urlsplit(renew_link(rt, sub_id)).path
    back = sandbox.pay(open_page(web, path), "4111111111111111")
    assert "Thank you" in web.get(return_path(back)).text
    again = web.get(path, follow_redirects=False)
    invoices = invoices_of(rt, sub_id)
    assert again.status_code == 200 and "Nothing to pay yet" in again.text, (
        f"second click: HTTP {again.status_code}; invoices now "
        f"{[(i.period_start.date(), i.status) for i in invoices]}"
    )
