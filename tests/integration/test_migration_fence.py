"""Migration 0002 (the attempt fence) on data the previous release wrote, on PostgreSQL.

Each test builds a database as the previous release left it: the schema at head is filled
through the services, stepped back to 0001, and given the rows the old rules wrote (attempts
written off as 'not found at gateway' after a five-minute grace, duplicate unresolved attempts
from a lost lock). Then it upgrades and checks what the fence promises.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from billing.clock import FixedClock
from billing.crypto import TokenVault, new_key
from billing.db import make_engine
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus
from billing.migrate import current_heads, downgrade, upgrade
from billing.runtime import Runtime
from billing.services import charging
from schedules.sweeps import run_janitor
from tests.factories import (
    Monotonic,
    attempts_of,
    invoice_of,
    renew,
    seed_plans,
    subscriber,
    successful_charges,
)
from tests.integration.conftest import PG_URL, START, _admin_engine, make_runtime


@pytest.fixture()
def scratch_url() -> Iterator[str]:
    """An empty database of the test's own, dropped at the end."""
    admin = _admin_engine()
    name = f"billing_fence_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def mono() -> Monotonic:
    return Monotonic()


@pytest.fixture()
def sandbox(mono: Monotonic) -> Sandbox:
    return Sandbox(now=lambda: START, land_delay_s=60, monotonic=mono)


@pytest.fixture()
def vault() -> TokenVault:
    return TokenVault(new_key())


@pytest.fixture()
def engines() -> Iterator[list[Engine]]:
    """Engines a test opens, disposed at the end."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def _runtime(
    url: str, sandbox: Sandbox, vault: TokenVault, engines: list[Engine], clock: FixedClock
) -> Runtime:
    engine = make_engine(url)
    engines.append(engine)
    return make_runtime(engine, sandbox, clock, vault)


def _revision(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def _old_release(url: str, sql: str, **params: object) -> None:
    """Rows written by the previous release (the schema at 0001)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def _statuses(url: str) -> dict[str, tuple[str, str | None]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT order_id, status, call_ending FROM charge_attempts ORDER BY id")
            )
            return {order_id: (status, ending) for order_id, status, ending in rows}
    finally:
        engine.dispose()


# An attempt as the previous release wrote it, for invoice :invoice with its customer's card.
_INSERT_ATTEMPT = (
    "INSERT INTO charge_attempts (invoice_id, card_token_id, order_id, amount_minor, currency,"
    " status, call_ending, description, classification, verify_count, created_at,"
    " created_wall_at, settled_at, updated_at)"
    " SELECT i.id, c.id, :order_id, i.amount_minor, i.currency, :status, :ending,"
    " :description, :classification, 1, now() - :age, now() - :age,"
    " CASE WHEN :settled THEN now() END, now()"
    " FROM invoices i JOIN subscriptions s ON s.id = i.subscription_id"
    " JOIN card_tokens c ON c.customer_id = s.customer_id WHERE i.id = :invoice"
)


def _attempt(
    url: str,
    invoice: int,
    order_id: str,
    status: str,
    *,
    description: str | None = None,
    classification: str | None = None,
    ending: str | None = "answered",
    age: timedelta = timedelta(hours=1),
) -> None:
    _old_release(
        url,
        _INSERT_ATTEMPT,
        invoice=invoice,
        order_id=order_id,
        status=status,
        settled=status not in ("in_flight", "unknown", "pending"),
        ending=ending,
        description=description,
        classification=classification,
        age=age,
    )


def _write_off(url: str, invoice: int, order_id: str, age: timedelta = timedelta(hours=1)) -> None:
    """The previous release's 'never charged': 'not found' final after a five-minute grace."""
    _attempt(
        url,
        invoice,
        order_id,
        "failed",
        description="not found at gateway",
        classification="never_charged",
        age=age,
    )


def test_upgrade_reverifies_the_latest_recent_write_off_of_each_invoice(
    scratch_url: str,
    sandbox: Sandbox,
    mono: Monotonic,
    vault: TokenVault,
    engines: list[Engine],
) -> None:
    """Every charge ends up recorded: under the previous release a 504 followed by 'not found'
    was written off as never charged after five minutes, although the charge could land later.
    The upgrade makes the latest such write-off of each invoice from the last seven days
    unknown again (unless the invoice already has an unresolved attempt, which the fence would
    refuse); the janitor then verifies it, and the charge found is recorded: it pays the invoice,
    or is reported as a duplicate of the payment that did. Older write-offs, earlier write-offs
    of the same invoice and other settled attempts are left alone."""
    clock = FixedClock(START)
    upgrade(scratch_url)
    rt = _runtime(scratch_url, sandbox, vault, engines, clock)
    seed_plans(rt)
    subscriber(rt, sandbox, ["edge_504_lands_later"], name="landed")
    subscriber(rt, sandbox, ["success"], name="repaid")
    for name in ("old", "twice", "busy", "declined"):
        subscriber(rt, sandbox, ["success"], name=name)
    landed, repaid, old, twice, busy, declined = renew(rt)

    # 'landed': a 504; the charge lands a minute later, after the old release wrote it off.
    (landed_call,) = charging._start_attempts(rt, [landed], charging.CollectionReport())
    charging._charge(rt, landed_call, charging._Run())
    # 'repaid': charged, written off wrongly, charged again and paid by the second attempt.
    (repaid_call,) = charging._start_attempts(rt, [repaid], charging.CollectionReport())
    charging._charge(rt, repaid_call, charging._Run())
    _old_release(
        scratch_url,
        "UPDATE charge_attempts SET status = 'failed', call_ending = 'answered', "
        "description = 'not found at gateway', classification = 'never_charged', "
        "settled_at = now(), next_verify_at = NULL WHERE order_id = :order_id",
        order_id=repaid_call.order_id,
    )
    clock.advance(charging.IN_FLIGHT_LEASE)
    assert charging.collect_invoices(rt, [repaid]).results[repaid] == "paid"
    rt.close()

    downgrade(scratch_url, "0001")
    _old_release(
        scratch_url,
        "UPDATE charge_attempts SET status = 'failed', call_ending = 'answered', "
        "description = 'not found at gateway', classification = 'never_charged', "
        "settled_at = now(), next_verify_at = NULL WHERE order_id = :order_id",
        order_id=landed_call.order_id,
    )
    _write_off(scratch_url, old, "OLD", age=timedelta(days=8))
    _write_off(scratch_url, twice, "TWICE-1", age=timedelta(hours=2))
    _write_off(scratch_url, twice, "TWICE-2")
    _write_off(scratch_url, busy, "BUSY-1", age=timedelta(hours=2))
    _attempt(scratch_url, busy, "BUSY-2", "in_flight", ending=None)
    _attempt(
        scratch_url,
        declined,
        "DECLINED",
        "declined",
        description="Do Not Honor",
        classification="soft_decline",
    )
    mono.now += 120  # the charge behind the 504 has landed at the gateway

    upgrade(scratch_url)
    statuses = _statuses(scratch_url)
    assert statuses[landed_call.order_id] == ("unknown", "no_answer")
    assert statuses[repaid_call.order_id] == ("unknown", "no_answer")
    assert statuses["OLD"][0] == "failed"  # more than seven days ago
    assert (statuses["TWICE-1"][0], statuses["TWICE-2"][0]) == ("failed", "unknown")
    assert (statuses["BUSY-1"][0], statuses["BUSY-2"][0]) == ("failed", "in_flight")
    assert statuses["DECLINED"][0] == "declined"

    rt = _runtime(scratch_url, sandbox, vault, engines, FixedClock(START + timedelta(days=1)))
    run_janitor(rt, everything=True)
    (landed_attempt,) = attempts_of(rt, landed)
    assert landed_attempt.status == "succeeded"
    assert invoice_of(rt, landed).status == InvoiceStatus.PAID.value
    assert invoice_of(rt, landed).paid_attempt_id == landed_attempt.id
    assert len(successful_charges(rt, sandbox, landed)) == 1
    first, second = attempts_of(rt, repaid)
    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert invoice_of(rt, repaid).paid_attempt_id == second.id
    with rt.sessions() as session:
        duplicates = session.execute(
            text("SELECT invoice_id FROM events WHERE kind = 'alert.duplicate_payment'")
        ).scalars()
        assert list(duplicates) == [repaid]  # the refund case is on record


def test_upgrade_names_the_invoices_with_two_unresolved_attempts(
    scratch_url: str, sandbox: Sandbox, vault: TokenVault, engines: list[Engine]
) -> None:
    """The fence is never built over the old bug's traces, and says where they are: when the
    previous release left two unresolved attempts on an invoice (a lost lock, a redelivered
    task), the upgrade stops with a RuntimeError naming exactly those invoices, not a unique
    violation, and leaves the database at 0001. Once a human settles them it goes through."""
    upgrade(scratch_url)
    rt = _runtime(scratch_url, sandbox, vault, engines, FixedClock(START))
    seed_plans(rt)
    for i in range(3):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    first, second, third = renew(rt)
    charging._start_attempts(rt, [first, second, third], charging.CollectionReport())
    rt.close()

    downgrade(scratch_url, "0001")
    for invoice in (first, third):  # the old release writes a second attempt for two of them
        _attempt(scratch_url, invoice, f"DUP-{invoice}", "unknown", ending="no_answer")

    with pytest.raises(RuntimeError) as info:
        upgrade(scratch_url)
    message = str(info.value)
    named = re.search(r"invoice\(s\) ([\d, ]+) have", message)
    assert named is not None, message
    assert set(named.group(1).split(", ")) == {str(first), str(third)}
    assert "uq_charge_attempts_one_unresolved" not in message
    assert _revision(scratch_url) == "0001"

    _old_release(  # settled by hand from the gateway's dashboard: never charged
        scratch_url, "UPDATE charge_attempts SET status = 'failed' WHERE order_id LIKE 'DUP-%'"
    )
    upgrade(scratch_url)
    assert (_revision(scratch_url),) == current_heads(scratch_url)
