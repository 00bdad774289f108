"""Building blocks for tests: plans, customers, cards and due invoices, through the services."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

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
