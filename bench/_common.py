"""Pieces shared by the benchmarks that run real workers (``throughput.py``, ``spike.py``).

``bench_runtime`` is the bench process's own runtime: the benchmark's database on the frozen
test clock, and a client of the sandbox it serves.

``check_exactly_once`` compares the database with the sandbox's own list of charges. The
invoices are selected with one array parameter (``billing.db.id_in``), so that any number of
them fits in one statement (a parameter per id stops at 65 535).
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from sqlalchemy import Engine, func, select

from billing.attempts import order_prefix
from billing.clock import DatabaseClock
from billing.crypto import TokenVault
from billing.db import id_in, session_factory
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus
from billing.locks import PostgresAdvisoryLocker
from billing.models import ChargeAttempt, Invoice
from billing.runtime import Runtime


def bench_runtime(engine: Engine, base_url: str, sandbox: Sandbox, vault: TokenVault) -> Runtime:
    """The bench process's runtime (it seeds, renews and checks; the workers build their own)."""
    return Runtime(
        engine=engine,
        sessions=session_factory(engine),
        clock=DatabaseClock(engine),
        gateway=FatoraClient(base_url, sandbox.api_key, mode="test", timeout_s=30),
        locker=PostgresAdvisoryLocker(engine),
        live_gateway=False,
        unknown_grace=timedelta(minutes=5),
    ).with_vault(vault)


def check_exactly_once(rt: Runtime, sandbox: Sandbox, invoice_ids: list[int]) -> None:
    """One SUCCESS sandbox charge per invoice, every invoice paid, every charge on record."""
    taken = [c for c in sandbox.charges() if c["status"] == "SUCCESS"]
    # An order id is its invoice's prefix (subscription and period) and the attempt number.
    per_invoice = Counter(str(c["order_id"]).rsplit("-", 1)[0] + "-" for c in taken)
    with rt.sessions() as session:
        periods = session.execute(
            select(Invoice.subscription_id, Invoice.period_start).where(
                id_in(session, Invoice.id, invoice_ids)
            )
        ).all()
    expected = {order_prefix(sub_id, start) for sub_id, start in periods}
    problems: list[str] = []
    if set(per_invoice) != expected:
        missing = len(expected - set(per_invoice))
        extra = len(set(per_invoice) - expected)
        problems.append(f"{missing} invoice(s) without a charge, {extra} unknown charged")
    doubles = [k for k, v in per_invoice.items() if v > 1]
    if doubles:
        problems.append(f"{len(doubles)} invoice(s) charged more than once, e.g. {doubles[:5]}")
    with rt.sessions() as session:
        not_paid = session.execute(
            select(func.count())
            .select_from(Invoice)
            .where(Invoice.status != InvoiceStatus.PAID.value)
        ).scalar_one()
        succeeded = set(
            session.execute(
                select(ChargeAttempt.order_id).where(ChargeAttempt.status == "succeeded")
            ).scalars()
        )
    if not_paid:
        problems.append(f"{not_paid} invoice(s) not paid")
    if {str(c["order_id"]) for c in taken} != succeeded:
        problems.append("the sandbox's charges and the succeeded attempts differ")
    if problems:
        raise SystemExit("EXACTLY-ONCE VIOLATED: " + "; ".join(problems))
