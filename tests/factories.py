"""Building blocks for tests: plans, customers, cards and due invoices, through the services."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import select

from billing.attempts import order_prefix
from billing.dunning import STANDARD, DunningPolicy
from billing.fatora.sandbox import Sandbox
from billing.models import ChargeAttempt, Invoice, Subscription
from billing.periods import Interval
from billing.plans import PlansConfig, PlanSpec
from billing.runtime import Runtime
from billing.services.customers import add_card, add_customer
from billing.services.plans_sync import sync_plans
from billing.services.subscriptions import create_subscription, plan_by_code
from schedules.renewal import run_renewal_pass


def plans_config(amount: str = "50.00", currency: str = "QAR") -> PlansConfig:
    monthly = PlanSpec(
        code="monthly",
        name="Monthly",
        amount=Decimal(amount),
        currency=currency,
        interval=Interval.MONTH,
        interval_count=1,
        cron=None,
        trial_days=0,
        dunning="standard",
    )
    return PlansConfig(plans={"monthly": monthly}, dunning={"standard": STANDARD})


def seed_plans(
    rt: Runtime, config: PlansConfig | None = None, *, extra: DunningPolicy | None = None
) -> None:
    with rt.sessions() as session, session.begin():
        sync_plans(session, config or plans_config(), rt.clock.now())


def subscriber(
    rt: Runtime,
    sandbox: Sandbox,
    behaviours: list[str],
    *,
    name: str = "c1",
    plan: str = "monthly",
    start: datetime | None = None,
    timezone: str = "Asia/Qatar",
) -> int:
    """A customer with one sandbox card per behaviour (the first is the subscription's)."""
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        customer = add_customer(
            session,
            external_id=name,
            name=name,
            email=f"{name}@example.com",
            now=now,
            timezone=timezone,
        )
        cards = [
            add_card(
                session,
                rt.vault,
                customer=customer,
                token=sandbox.issue_token(b),
                now=now,
                issued_at=now,
            )
            for b in behaviours
        ]
        sub = create_subscription(
            session,
            customer=customer,
            plan=plan_by_code(session, plan),
            now=now,
            card=cards[0] if cards else None,
            start=start,
        )
        return sub.id


def renew(rt: Runtime) -> list[int]:
    return run_renewal_pass(rt).invoice_ids


def invoice_of(rt: Runtime, invoice_id: int) -> Invoice:
    with rt.sessions() as session:
        invoice = session.get(Invoice, invoice_id)
        assert invoice is not None
        return invoice


def subscription_of(rt: Runtime, sub_id: int) -> Subscription:
    with rt.sessions() as session:
        sub = session.get(Subscription, sub_id)
        assert sub is not None
        return sub


def attempts_of(rt: Runtime, invoice_id: int) -> list[ChargeAttempt]:
    with rt.sessions() as session:
        return list(
            session.execute(
                select(ChargeAttempt)
                .where(ChargeAttempt.invoice_id == invoice_id)
                .order_by(ChargeAttempt.id)
            ).scalars()
        )


def invoice_prefix(rt: Runtime, invoice_id: int) -> str:
    """What every order id of this invoice starts with."""
    invoice = invoice_of(rt, invoice_id)
    return order_prefix(invoice.subscription_id, invoice.period_start)


def successful_charges(rt: Runtime, sandbox: Sandbox, invoice_id: int) -> list[dict[str, object]]:
    """The sandbox's own record of money taken for an invoice: the ground truth."""
    prefix = invoice_prefix(rt, invoice_id)
    return [
        c
        for c in sandbox.charges()
        if str(c["order_id"]).startswith(prefix) and c["status"] == "SUCCESS"
    ]


def age_attempts(rt: Runtime, by: timedelta) -> None:
    """Move every attempt's real-time marks (written, sent) ``by`` into the past: how a test
    lets real time pass for the grace rule without sleeping."""
    with rt.sessions() as session, session.begin():
        for attempt in session.execute(select(ChargeAttempt)).scalars():
            attempt.created_wall_at -= by
            if attempt.sent_wall_at is not None:
                attempt.sent_wall_at -= by


class Monotonic:
    """The sandbox's real-time clock (charges that land later, verify lag), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the pay links and the hosted page ---------------------------------------------------------


def return_path(url: str) -> str:
    """The path and query of a URL (where Fatora sends the payer back to)."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def open_page(web: Any, path: str) -> str:
    """Open a pay or renew link on the web app; the sandbox's paymentID it redirects to."""
    opened = web.get(path, follow_redirects=False)
    assert opened.status_code == 303, opened.text
    return str(parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0])


def renew_link(rt: Runtime, sub_id: int) -> str:
    """The link the expiry notice sends for the subscription's coming renewal."""
    from billing.services import paylink

    due = subscription_of(rt, sub_id).next_billing_at
    assert due is not None
    return paylink.renew_link_for(rt.vault, sub_id, due)


def invoices_of(rt: Runtime, sub_id: int) -> list[Invoice]:
    with rt.sessions() as session:
        return list(
            session.execute(
                select(Invoice).where(Invoice.subscription_id == sub_id).order_by(Invoice.id)
            ).scalars()
        )


class RefundTap(httpx.BaseTransport):
    """The sandbox behind a transport that counts refund requests and plays the bad days of a
    refund: a connection refused, a 400, an answer lost after the refund was made, a process
    killed before or after sending, a request held (for races), and a verify that does not
    show the refund yet (``hide_refund`` answers)."""

    def __init__(self, sandbox: Sandbox) -> None:
        from billing.fatora.sandbox import SandboxTransport

        self.inner = SandboxTransport(sandbox)
        self.refund_calls = 0
        self.refuse_to_connect = 0
        self.die_before = 0
        self.refuse = 0
        self.lose_answers = 0
        self.die_after = 0
        self.hide_refund = 0
        self.hold: threading.Event | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/payments/refund"):
            if self.refuse_to_connect:
                self.refuse_to_connect -= 1
                raise httpx.ConnectError("connection refused", request=request)
            if self.die_before:
                self.die_before -= 1
                raise SystemExit("killed before sending")
            self.refund_calls += 1
            if self.hold is not None:
                self.hold.wait(5)
            if self.refuse:
                self.refuse -= 1
                body = {"status": "FAILURE", "error": {"description": "bad"}}
                return httpx.Response(400, json=body, request=request)
            response = self.inner.handle_request(request)
            if self.die_after:
                self.die_after -= 1
                raise SystemExit("killed after Fatora refunded")
            if self.lose_answers:
                self.lose_answers -= 1
                raise httpx.ReadTimeout("the answer was lost", request=request)
            return response
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/payments/verify") and self.hide_refund:
            self.hide_refund -= 1
            response.read()
            body = json.loads(response.content)
            if isinstance(body.get("result"), dict):
                body["result"]["refund_details"] = None
            return httpx.Response(response.status_code, json=body, request=request)
        return response
