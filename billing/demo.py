"""``make demo``: the whole product on the embedded default, with no server to start.

SQLite in a temporary folder, the Fatora sandbox in-process, Celery tasks run in-process on the
memory transport, and the test clock moving through three months. It shows a gateway round
trip first (checkout with save_token, a payer paying, verify, collect, verify, refund), then
billing runs with customers whose cards succeed, decline, time out after charging, answer
PENDING or fail with a server error, and checks at the end that no invoice was charged twice.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from billing.attempts import order_prefix
from billing.fatora.sandbox import Sandbox

DEMO_PLANS = """
[plans.basic-monthly]
name = "Basic"
amount = "50.00"
currency = "QAR"
interval = "month"

[plans.office-weekly]
name = "Office hours"
amount = "1.250"
currency = "KWD"
cron = "0 9 * * MON"

[dunning.standard]
retry_after_days = [1, 3, 5, 7]
final_action = "cancel"
"""

CUSTOMERS = [
    ("amal", "success", "basic-monthly"),
    ("badr", "timeout_after_charge", "basic-monthly"),
    ("dana", "pending_then_success", "basic-monthly"),
    ("fahad", "server_error_before_charge", "basic-monthly"),
    ("huda", "insufficient_funds", "basic-monthly"),
    ("jassim", "expired_token", "basic-monthly"),
    ("layla", "success", "office-weekly"),
]
START = datetime(2027, 1, 31, 7, 0, tzinfo=UTC)


def _embedded_environment(folder: Path) -> None:
    from billing.config import reset_settings_cache
    from billing.crypto import new_key
    from billing.runtime import EMBEDDED_SANDBOX_URL, reset_runtime

    os.environ.update(
        {
            "BILLING_MODE": "test",
            "BILLING_DATABASE_URL": f"sqlite:///{folder / 'demo.sqlite3'}",
            "BILLING_BROKER_URL": "memory://",
            "BILLING_TOKEN_KEY": new_key(),
            # Waiting out the grace before trusting 'not found' is real time; the demo is short.
            "BILLING_UNKNOWN_GRACE_S": "0",
            "FATORA_BASE_URL": EMBEDDED_SANDBOX_URL,
            "FATORA_MODE": "test",
        }
    )
    reset_settings_cache()
    reset_runtime()


def run_demo(console: Console) -> None:
    with tempfile.TemporaryDirectory(prefix="fatora-billing-demo-") as tmp:
        _embedded_environment(Path(tmp))
        from billing.migrate import upgrade

        upgrade()
        _gateway_round_trip(console)
        _billing_months(console)


def _sandbox() -> Sandbox:
    from billing.runtime import embedded_sandbox, get_runtime

    return embedded_sandbox(get_runtime().engine)


def _gateway_round_trip(console: Console) -> None:
    from billing.fatora.parsing import parse_redirect_params
    from billing.runtime import get_runtime

    console.rule("[bold]1. Fatora round trip on the sandbox")
    gateway = get_runtime().gateway
    sandbox = _sandbox()
    session = gateway.checkout(
        amount=Decimal("50.00"),
        currency="QAR",
        order_id="DEMO-CHECKOUT-1",
        client_name="Amal",
        client_email="amal@example.com",
        success_url="https://merchant.example/fatora/success",
        failure_url="https://merchant.example/fatora/failure",
        save_token=True,
    )
    console.print(f"checkout with save_token   -> {session.checkout_url}")
    payment_id = dict(
        p.split("=", 1) for p in (urlsplit(session.checkout_url).query or "").split("&") if p
    )["paymentID"]
    redirect = sandbox.pay(payment_id, "4111111111111111", "123")
    params = parse_redirect_params(urlsplit(redirect).query)
    console.print(
        f"payer pays with the test card 4111 1111 1111 1111 -> redirected to success_url "
        f"(order {params.order_id}, transaction {params.transaction_id}, token received)"
    )
    first = gateway.verify("DEMO-CHECKOUT-1", params.transaction_id)
    console.print(
        f"verify                     -> {first.status.value} {first.amount} {first.currency}"
    )
    assert params.card_token is not None
    collected = gateway.collect_payment(
        params.card_token, "DEMO-COLLECT-1", Decimal("50.00"), "QAR"
    )
    console.print(f"collect on the saved token -> {collected.status}")
    second = gateway.verify("DEMO-COLLECT-1", collected.transaction_id)
    console.print(
        f"verify                     -> {second.status.value} {second.amount} {second.currency}"
    )
    assert second.transaction_id is not None
    refund = gateway.refund("DEMO-COLLECT-1", second.transaction_id)
    console.print(f"refund                     -> {refund.refund_status}")
    sandbox.reset()


def _billing_months(console: Console) -> None:
    from sqlalchemy import select

    from billing import runner
    from billing.clock import DatabaseClock
    from billing.models import Invoice
    from billing.plans import parse_plans
    from billing.runtime import get_runtime
    from billing.services.customers import add_card, add_customer
    from billing.services.plans_sync import sync_plans
    from billing.services.subscriptions import create_subscription, plan_by_code

    console.rule("[bold]2. Three months of billing, on the test clock")
    rt = get_runtime()
    sandbox = _sandbox()
    clock = DatabaseClock(rt.engine)
    clock.set(START)
    with rt.sessions() as session, session.begin():
        for line in sync_plans(session, parse_plans(DEMO_PLANS, "demo plans"), START):
            console.print(f"plans sync: {line}")
        for name, behaviour, plan in CUSTOMERS:
            customer = add_customer(
                session, external_id=name, name=name.title(), email=f"{name}@example.com", now=START
            )
            card = add_card(
                session,
                rt.vault,
                customer=customer,
                now=START,
                token=sandbox.issue_token(behaviour, issued_at=START),
            )
            create_subscription(
                session, customer=customer, plan=plan_by_code(session, plan), card=card, now=START
            )
            console.print(f"customer {name:<7} card behaves '{behaviour}', plan {plan}")
    day = START
    end = START + timedelta(days=92)
    while day <= end:
        clock.set(day)
        result = runner.tick(wait=True, timeout=60)
        runner.reconcile()
        if result["invoices_created"] or result["retries_queued"]:
            outcomes = ", ".join(f"{k} {v}" for k, v in result.get("outcomes", {}).items())
            console.print(
                f"{day:%Y-%m-%d}  new invoices {result['invoices_created']}, "
                f"retries {result['retries_queued']}: {outcomes}"
            )
        day += timedelta(days=1)
    runner.reconcile()

    table = Table(title="Invoices")
    for column in ("customer", "period start", "amount", "status", "attempts"):
        table.add_column(column)
    by_customer = {i + 1: c[0] for i, c in enumerate(CUSTOMERS)}
    with rt.sessions() as session:
        invoices = list(
            session.execute(
                select(Invoice).order_by(Invoice.subscription_id, Invoice.period_start)
            ).scalars()
        )
    from billing.money import from_minor

    for inv in invoices:
        table.add_row(
            by_customer.get(inv.subscription_id, "?"),
            f"{inv.period_start:%Y-%m-%d}",
            f"{from_minor(inv.amount_minor, inv.currency)} {inv.currency}",
            inv.status,
            str(inv.attempt_count),
        )
    console.print(table)
    taken = Counter(
        str(c["order_id"]).rsplit("-", 1)[0] for c in sandbox.charges() if c["status"] == "SUCCESS"
    )
    paid = {
        order_prefix(i.subscription_id, i.period_start)[:-1] for i in invoices if i.status == "paid"
    }
    twice = [k for k, v in taken.items() if v > 1]
    unrecorded = [k for k in taken if k not in paid]
    console.print(
        f"sandbox took {sum(taken.values())} payment(s) for {len(paid)} paid invoice(s); "
        f"charged twice: {len(twice)}; taken but not recorded: {len(unrecorded)}"
    )
    if twice or unrecorded:
        raise SystemExit("invariant broken: see above")
