"""``make demo``: the whole product on the embedded default, with no server to start.

SQLite in ``var/demo.sqlite3``, the Fatora sandbox in-process, and the production tasks run by a
real Celery worker (a thread of this process, consuming the memory transport), while the test
clock moves through three months. It shows a gateway round trip first (checkout with save_token,
a payer paying, verify, collect, verify, refund), then billing runs with customers whose cards
succeed, decline, time out after charging, answer PENDING or fail with a server error; one
customer pays her declined invoice on the pay-and-update link, another gives a new card that the
next dunning retry charges. A progress bar follows the days; log lines go to ``var/demo.log``,
never to the screen. At the end it checks that no invoice was charged twice, then prints the
report (figures read from the database, see ``billing.report``) and writes it to
``var/report.html`` (inline SVG charts, nothing fetched from the network) and
``var/report.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from billing.attempts import order_prefix
from billing.fatora.sandbox import Sandbox
from billing.report import Report, build_report, load_facts, render_html, summary_rows

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

# (customer, what the sandbox does with their card, plan)
CUSTOMERS = [
    ("amal", "success", "basic-monthly"),
    ("badr", "timeout_after_charge", "basic-monthly"),
    ("dana", "pending_then_success", "basic-monthly"),
    ("fahad", "server_error_before_charge", "basic-monthly"),
    ("huda", "insufficient_funds", "basic-monthly"),
    ("jassim", "expired_token", "basic-monthly"),
    ("layla", "success", "office-weekly"),
    ("nour", "do_not_honor", "basic-monthly"),
    ("rania", "card_cannot_recur", "basic-monthly"),
]
START = datetime(2027, 1, 31, 7, 0, tzinfo=UTC)
DAYS = 92
# Between two dunning retries: nour pays on her link, rania gives a new card.
RESCUE_DAY = START + timedelta(days=2)
TEST_CARD = "4111111111111111"
TICK_TIMEOUT_S = 60.0
# How often the worker looks at the memory transport for a task (kombu's default is 1 s).
POLLING_INTERVAL_S = 0.05


class DemoFailed(SystemExit):
    """The demo found something wrong: one line, non-zero exit."""


@dataclass(frozen=True)
class DemoFiles:
    folder: Path

    @property
    def database(self) -> Path:
        return self.folder / "demo.sqlite3"

    @property
    def log(self) -> Path:
        return self.folder / "demo.log"

    @property
    def html(self) -> Path:
        return self.folder / "report.html"

    @property
    def json(self) -> Path:
        return self.folder / "report.json"


def run_demo(console: Console, *, out_dir: Path | None = None) -> Report:
    """Run the demo, writing its files to ``out_dir`` (``var`` under the current directory)."""
    started = time.monotonic()
    files = DemoFiles(out_dir if out_dir is not None else Path("var"))
    files.folder.mkdir(parents=True, exist_ok=True)
    for stale in (files.database, files.log, *files.folder.glob("demo.sqlite3-*")):
        stale.unlink(missing_ok=True)
    with _embedded_environment(files.database), _logs_to(files.log):
        from billing.migrate import upgrade
        from billing.runtime import get_runtime

        upgrade()
        try:
            _gateway_round_trip(console)
            with _worker(files.log):
                _billing_months(console)
            # The worker has stopped: what follows reads a database nothing writes to any more.
            return _finish(console, files, started)
        finally:
            rt = get_runtime()
            rt.close()
            rt.engine.dispose()


@contextmanager
def _embedded_environment(database: Path) -> Iterator[None]:
    """The embedded default's settings for the time of the demo; the environment as it was
    afterwards."""
    from billing.config import reset_settings_cache
    from billing.crypto import new_key
    from billing.runtime import EMBEDDED_SANDBOX_URL, reset_runtime

    saved = dict(os.environ)
    os.environ.update(
        {
            "BILLING_MODE": "test",
            "BILLING_DATABASE_URL": f"sqlite:///{database.resolve()}",
            "BILLING_BROKER_URL": "memory://",
            "BILLING_TOKEN_KEY": new_key(),
            # Waiting out the grace before trusting 'not found' is real time; the demo is short.
            "BILLING_UNKNOWN_GRACE_S": "0",
            # The worker serves no metrics port: the demo runs beside anything.
            "BILLING_METRICS_PORT": "0",
            "BILLING_LOG_FORMAT": "text",
            "FATORA_BASE_URL": EMBEDDED_SANDBOX_URL,
            "FATORA_MODE": "test",
        }
    )
    for name in ("BILLING_RESULT_BACKEND", "PROMETHEUS_MULTIPROC_DIR"):
        os.environ.pop(name, None)
    reset_settings_cache()
    reset_runtime()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        reset_settings_cache()
        reset_runtime()


@contextmanager
def _logs_to(log_file: Path) -> Iterator[None]:
    """Every log record of the demo (the worker's included) goes to ``log_file``, through the
    project's formatter and redaction, and none to the screen; the root logger is given back
    as it was."""
    from billing.logs import configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    showwarning = warnings.showwarning
    captured = getattr(logging, "_warnings_showwarning", None) is not None
    for handler in handlers:
        root.removeHandler(handler)
    configure_logging(level=logging.INFO, logfile=str(log_file), log_format="text")
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        if not captured:
            logging.captureWarnings(False)
        warnings.showwarning = showwarning


@contextmanager
def _worker(log_file: Path) -> Iterator[None]:
    """A Celery worker (solo pool) in a thread of this process, consuming the memory transport:
    the charge tasks the scheduler pass queues travel as messages and run as they do in
    production. The app's settings for the embedded default are given back afterwards."""
    from celery.contrib.testing.worker import start_worker

    from workers.app import app

    broker = str(app.conf.broker_url or "")
    if not broker.startswith("memory://"):
        raise DemoFailed(
            "error: the Celery app was set up for another broker before the demo started: "
            "run the demo in a process of its own (`billing demo`)"
        )
    saved = {
        "task_always_eager": app.conf.task_always_eager,
        "task_eager_propagates": app.conf.task_eager_propagates,
        "broker_transport_options": dict(app.conf.broker_transport_options or {}),
    }
    app.conf.task_always_eager = False
    app.conf.task_eager_propagates = False
    app.conf.broker_transport_options = {
        **saved["broker_transport_options"],
        "polling_interval": POLLING_INTERVAL_S,
    }
    try:
        with start_worker(
            app,
            pool="solo",
            concurrency=1,
            perform_ping_check=False,
            loglevel="INFO",
            logfile=str(log_file),
            shutdown_timeout=TICK_TIMEOUT_S,
        ):
            yield
    finally:
        app.conf.update(saved)


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
    console.print(f"checkout with save_token   -> {session.checkout_url}", markup=False)
    payment_id = parse_qs(urlsplit(session.checkout_url).query)["paymentID"][0]
    redirect = sandbox.pay(payment_id, TEST_CARD, "123")
    params = parse_redirect_params(urlsplit(redirect).query)
    console.print(
        f"payer pays with the test card 4111 1111 1111 1111 -> redirected to success_url "
        f"(order {params.order_id}, transaction {params.transaction_id}, token received)",
        markup=False,
    )
    first = gateway.verify("DEMO-CHECKOUT-1", params.transaction_id)
    console.print(
        f"verify                     -> {first.status.value} {first.amount} {first.currency}",
        markup=False,
    )
    assert params.card_token is not None
    collected = gateway.collect_payment(
        params.card_token, "DEMO-COLLECT-1", Decimal("50.00"), "QAR"
    )
    console.print(f"collect on the saved token -> {collected.status}", markup=False)
    second = gateway.verify("DEMO-COLLECT-1", collected.transaction_id)
    console.print(
        f"verify                     -> {second.status.value} {second.amount} {second.currency}",
        markup=False,
    )
    assert second.transaction_id is not None
    refund = gateway.refund("DEMO-COLLECT-1", second.transaction_id)
    console.print(f"refund                     -> {refund.refund_status}", markup=False)
    sandbox.reset()


def _billing_months(console: Console) -> None:
    from billing import runner
    from billing.clock import DatabaseClock
    from billing.plans import parse_plans
    from billing.runtime import get_runtime
    from billing.services.customers import add_card, add_customer
    from billing.services.plans_sync import sync_plans
    from billing.services.subscriptions import create_subscription, plan_by_code

    console.rule("[bold]2. Three months of billing on the test clock, through a Celery worker")
    rt = get_runtime()
    sandbox = _sandbox()
    clock = DatabaseClock(rt.engine)
    clock.set(START)
    with rt.sessions() as session, session.begin():
        for line in sync_plans(session, parse_plans(DEMO_PLANS, "demo plans"), START):
            console.print(f"plans sync: {line}", markup=False)
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
            console.print(
                f"customer {name:<7} card behaves '{behaviour}', plan {plan}", markup=False
            )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("days"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        days = progress.add_task(f"billing {START:%Y-%m-%d}", total=DAYS + 1)
        for offset in range(DAYS + 1):
            day = START + timedelta(days=offset)
            clock.set(day)
            progress.update(days, description=f"billing {day:%Y-%m-%d}")
            if day == RESCUE_DAY:
                progress.console.print(f"{day:%Y-%m-%d}  {_pays_on_the_link('nour')}", markup=False)
                progress.console.print(
                    f"{day:%Y-%m-%d}  {_gives_a_new_card('rania')}", markup=False
                )
            result = runner.tick(wait=True, timeout=TICK_TIMEOUT_S)
            problem = runner.tick_problem(result, TICK_TIMEOUT_S)
            if problem is not None:
                raise DemoFailed(f"error: {problem}")
            runner.reconcile()
            if result["invoices_created"] or result["retries_queued"]:
                outcomes = ", ".join(f"{k} {v}" for k, v in result.get("outcomes", {}).items())
                progress.console.print(
                    f"{day:%Y-%m-%d}  new invoices {result['invoices_created']}, "
                    f"retries {result['retries_queued']}: {outcomes or 'nothing charged'}",
                    markup=False,
                )
            progress.advance(days)
        runner.reconcile()


def _open_invoice_of(customer: str) -> int:
    from sqlalchemy import select

    from billing.lifecycle import InvoiceStatus
    from billing.models import Customer, Invoice, Subscription
    from billing.runtime import get_runtime

    with get_runtime().sessions() as session:
        invoice_id = session.execute(
            select(Invoice.id)
            .join(Subscription, Subscription.id == Invoice.subscription_id)
            .join(Customer, Customer.id == Subscription.customer_id)
            .where(Customer.external_id == customer, Invoice.status == InvoiceStatus.OPEN.value)
            .order_by(Invoice.period_start)
            .limit(1)
        ).scalar_one_or_none()
    if invoice_id is None:
        raise DemoFailed(f"error: {customer} has no open invoice to pay")
    return invoice_id


def _pays_on_the_link(customer: str) -> str:
    """The customer opens the pay-and-update link of her payment-failed email, pays on Fatora's
    hosted page with a new card and is sent back: what the return web app does on each of the
    two requests (``billing/web.py``), with the customer played by the sandbox."""
    from billing.runtime import get_runtime
    from billing.services.paylink import open_checkout, reference, settle_return

    rt = get_runtime()
    ref = reference(rt.vault, _open_invoice_of(customer))
    hosted = open_checkout(rt, ref)
    if hosted.word != "redirect" or hosted.url is None:
        raise DemoFailed(f"error: the pay link showed '{hosted.word}' instead of the hosted page")
    payment_id = parse_qs(urlsplit(hosted.url).query)["paymentID"][0]
    back = urlsplit(_sandbox().pay(payment_id, TEST_CARD, "123"))
    page = settle_return(rt, ref, back.query)
    return (
        f"{customer} opens the link in her payment-failed email and pays on the hosted page "
        f"with a new card: the return page says '{page.word}'"
    )


def _gives_a_new_card(customer: str) -> str:
    """The customer gives the merchant a new card (``billing cards add``): the next dunning
    retry charges it."""
    from billing.runtime import get_runtime
    from billing.services.customers import add_card, customer_by_external_id

    rt = get_runtime()
    now = rt.clock.now()
    with rt.sessions() as session, session.begin():
        add_card(
            session,
            rt.vault,
            customer=customer_by_external_id(session, customer),
            now=now,
            token=_sandbox().issue_token("success", issued_at=now),
        )
    return f"{customer} gives a new card after her card was refused: the next retry charges it"


def _finish(console: Console, files: DemoFiles, started: float) -> Report:
    from billing.runtime import get_runtime

    console.rule("[bold]3. Report")
    rt = get_runtime()
    console.print(_end_state())
    broken = _check_charges(console)
    with rt.sessions() as session:
        facts = load_facts(session)
    report = build_report(facts, elapsed_s=time.monotonic() - started)
    table = Table(title="Billing report (from the database)", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value")
    for label, value in summary_rows(report):
        table.add_row(label, value)
    console.print(table)
    note = (
        f"The demo's three months on the test clock, {START:%Y-%m-%d} to "
        f"{START + timedelta(days=DAYS):%Y-%m-%d}: {len(CUSTOMERS)} customers on the Fatora "
        "sandbox, charged by a Celery worker."
    )
    files.html.write_text(render_html(report, title="Billing demo report", note=note), "utf-8")
    files.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n", "utf-8")
    console.print(
        f"wrote {files.html} (open it in a browser) and {files.json}; "
        f"log lines in {files.log}; the database stays in {files.database}",
        markup=False,
        soft_wrap=True,
    )
    if broken:
        raise DemoFailed("error: an invariant is broken: see above")
    return report


def _end_state() -> Table:
    """Each customer: their subscription now, and their invoices and attempts."""
    from sqlalchemy import func, select

    from billing.models import ChargeAttempt, Customer, Invoice, Subscription
    from billing.runtime import get_runtime

    behaviour = {name: card for name, card, _ in CUSTOMERS}
    table = Table(title="End state")
    for column in ("customer", "card", "subscription", "invoices", "attempts"):
        table.add_column(column, overflow="fold")
    with get_runtime().sessions() as session:
        subscriptions = session.execute(
            select(Customer.external_id, Subscription.id, Subscription.status)
            .join(Subscription, Subscription.customer_id == Customer.id)
            .order_by(Customer.external_id)
        ).all()
        statuses = session.execute(
            select(Invoice.subscription_id, Invoice.status, func.count()).group_by(
                Invoice.subscription_id, Invoice.status
            )
        ).all()
        attempts = {
            sub_id: count
            for sub_id, count in session.execute(
                select(Invoice.subscription_id, func.count(ChargeAttempt.id))
                .join(ChargeAttempt, ChargeAttempt.invoice_id == Invoice.id)
                .group_by(Invoice.subscription_id)
            )
        }
    by_subscription: dict[int, Counter[str]] = {}
    for sub_id, status, count in statuses:
        by_subscription.setdefault(sub_id, Counter())[status] = count
    for name, sub_id, status in subscriptions:
        counts = by_subscription.get(sub_id, Counter())
        table.add_row(
            name,
            behaviour.get(name, "?"),
            status,
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none",
            str(attempts.get(sub_id, 0)),
        )
    return table


def _check_charges(console: Console) -> bool:
    """The sandbox's own list of charges against the paid invoices: True if one was charged
    twice or a charge was taken and never recorded."""
    from sqlalchemy import select

    from billing.models import Invoice
    from billing.runtime import get_runtime

    with get_runtime().sessions() as session:
        paid_invoices = session.execute(
            select(Invoice.subscription_id, Invoice.period_start).where(Invoice.status == "paid")
        ).all()
    taken = Counter(
        str(c["order_id"]).rsplit("-", 1)[0]
        for c in _sandbox().charges()
        if c["status"] == "SUCCESS"
    )
    paid = {order_prefix(sub_id, start)[:-1] for sub_id, start in paid_invoices}
    twice = [k for k, v in taken.items() if v > 1]
    unrecorded = [k for k in taken if k not in paid]
    console.print(
        f"the sandbox took {sum(taken.values())} payment(s) for {len(paid)} paid invoice(s); "
        f"charged twice: {len(twice)}; taken but not recorded: {len(unrecorded)}",
        markup=False,
    )
    return bool(twice or unrecorded)
