"""Quarantine on real PostgreSQL: one row that raises stops neither renewal nor collection.

A subscription or an invoice whose processing raises is set aside (quarantined) with one alert;
every other row of its batch is processed in the same pass; it is retried hourly without new
alerts, and released by the first retry that does not raise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus
from billing.models import ChargeAttempt, Customer, Event, Invoice, Plan, PlanPrice, Subscription
from billing.plans import PlansConfig
from billing.runtime import Runtime
from billing.services import dunning_flow, quarantine
from billing.services.charging import collect_invoices
from billing.services.events import record_event, savepoint
from schedules import renewal
from schedules.renewal import due_query, retry_query, run_renewal_pass
from schedules.sweeps import due_retries
from tests.factories import (
    attempts_of,
    invoice_of,
    plans_config,
    renew,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)
from tests.integration.conftest import START

HOUR = timedelta(hours=1)


def _two_plans() -> PlansConfig:
    config = plans_config()
    monthly = config.plans["monthly"]
    legacy = replace(monthly, code="legacy", name="Legacy")
    return replace(config, plans={"monthly": monthly, "legacy": legacy})


def _events(rt: Runtime, kind: str) -> list[Event]:
    with rt.sessions() as session:
        return list(
            session.execute(select(Event).where(Event.kind == kind).order_by(Event.id)).scalars()
        )


def _invoices_of(rt: Runtime, sub_id: int) -> list[Invoice]:
    with rt.sessions() as session:
        return list(
            session.execute(
                select(Invoice).where(Invoice.subscription_id == sub_id).order_by(Invoice.id)
            ).scalars()
        )


def _set_timezone(rt: Runtime, sub_id: int, tz: str) -> None:
    """Straight into the database: the service refuses an unknown zone, but data outlives the
    tz database (``US/Pacific-New`` was removed from it in 2020)."""
    with rt.sessions() as session, session.begin():
        sub = session.get(Subscription, sub_id)
        assert sub is not None
        session.execute(update(Customer).where(Customer.id == sub.customer_id).values(timezone=tz))


def _plan_id(rt: Runtime, code: str) -> int:
    with rt.sessions() as session:
        return session.execute(select(Plan.id).where(Plan.code == code)).scalar_one()


@contextmanager
def _savepoints(engine: Engine) -> Iterator[list[str]]:
    """Every SAVEPOINT statement sent on ``engine`` while the block runs."""
    seen: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SAVEPOINT"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", spy)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", spy)


# -- renewal -----------------------------------------------------------------------------------


def test_one_bad_subscription_does_not_stop_the_renewal_of_the_others(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """A customer's vanished time zone and a plan with no price in force: every healthy
    subscription of the batch is invoiced in the same pass; each bad one is quarantined with
    exactly one alert, retried hourly without another, and invoiced and released by the first
    retry after its data is fixed."""
    seed_plans(rt, _two_plans())
    healthy = [subscriber(rt, sandbox, ["success"], name=f"ok{i}") for i in range(3)]
    bad_zone = subscriber(rt, sandbox, ["success"], name="zone")
    healthy += [subscriber(rt, sandbox, ["success"], name=f"ok{i}") for i in range(3, 6)]
    no_price = subscriber(rt, sandbox, ["success"], name="price", plan="legacy")
    healthy.append(subscriber(rt, sandbox, ["success"], name="ok6"))
    _set_timezone(rt, bad_zone, "US/Pacific-New")
    legacy = _plan_id(rt, "legacy")
    with rt.sessions() as session, session.begin():
        session.execute(delete(PlanPrice).where(PlanPrice.plan_id == legacy))

    with _savepoints(rt.engine) as savepoints:
        report = run_renewal_pass(rt)
    assert savepoints, "the failed batch was redone row by row, in savepoints"
    assert sorted(report.quarantined) == sorted([bad_zone, no_price])
    for sub_id in healthy:
        assert len(_invoices_of(rt, sub_id)) == 1, "a healthy row was held back"
    assert len(report.invoice_ids) == len(healthy)
    for sub_id in (bad_zone, no_price):
        assert _invoices_of(rt, sub_id) == []
        sub = subscription_of(rt, sub_id)
        assert sub.quarantined_at == START
        assert sub.quarantine_retry_at == START + HOUR
        assert sub.next_billing_at == START  # its schedule is untouched
    assert "US/Pacific-New" in (subscription_of(rt, bad_zone).quarantine_reason or "")
    assert (subscription_of(rt, no_price).quarantine_reason or "").startswith("NoResultFound")
    alerts = _events(rt, "alert.row_quarantined")
    assert sorted((a.subscription_id, a.payload["table"], a.payload["id"]) for a in alerts) == [
        (bad_zone, "subscriptions", bad_zone),
        (no_price, "subscriptions", no_price),
    ]
    assert all(a.payload["reason"] for a in alerts)

    # Before the retry time: not picked at all.
    clock.advance(timedelta(minutes=30))
    assert run_renewal_pass(rt).claimed == 0
    # At the retry time, still broken: tried again, no second alert, the next retry an hour on.
    clock.advance(timedelta(minutes=31))
    again = run_renewal_pass(rt)
    assert sorted(again.quarantined) == sorted([bad_zone, no_price])
    assert again.invoice_ids == []
    assert len(_events(rt, "alert.row_quarantined")) == 2
    assert subscription_of(rt, bad_zone).quarantined_at == START
    assert subscription_of(rt, bad_zone).quarantine_retry_at == clock.now() + HOUR

    # The data is fixed; the next retry invoices them and releases them.
    _set_timezone(rt, bad_zone, "America/Los_Angeles")
    with rt.sessions() as session, session.begin():
        session.add(
            PlanPrice(plan_id=legacy, amount_minor=5000, currency="QAR", effective_from=START)
        )
    clock.advance(HOUR)
    fixed = run_renewal_pass(rt)
    assert sorted(fixed.released) == sorted([bad_zone, no_price])
    for sub_id in (bad_zone, no_price):
        (invoice,) = _invoices_of(rt, sub_id)
        assert invoice.period_start == START
        sub = subscription_of(rt, sub_id)
        assert (sub.quarantined_at, sub.quarantine_reason, sub.quarantine_retry_at) == (
            None,
            None,
            None,
        )
    released = _events(rt, "row.released")
    assert sorted(e.subscription_id for e in released) == sorted([bad_zone, no_price])
    assert len(_events(rt, "alert.row_quarantined")) == 2
    for sub_id in healthy:
        assert len(_invoices_of(rt, sub_id)) == 1, "nobody is billed twice for a period"


def test_a_healthy_renewal_batch_takes_no_savepoint(rt: Runtime, sandbox: Sandbox) -> None:
    """The common case stays as fast as before: savepoints are paid only when a batch raised."""
    seed_plans(rt)
    for i in range(5):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    with _savepoints(rt.engine) as savepoints:
        report = run_renewal_pass(rt)
    assert len(report.invoice_ids) == 5
    assert savepoints == []


def test_a_fault_of_the_database_quarantines_nobody(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost connection or a deadlock is not a row's fault: the pass fails as a whole (beat
    runs it again a minute later) instead of quarantining every row it happened to touch."""
    seed_plans(rt)
    ids = [subscriber(rt, sandbox, ["success"], name=f"c{i}") for i in range(3)]
    real = renewal.renew_one

    def flaky(session: Session, sub: Subscription, now: Any) -> int | None:
        if sub.id == ids[1]:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return real(session, sub, now)

    monkeypatch.setattr(renewal, "renew_one", flaky)
    with pytest.raises(OperationalError):
        run_renewal_pass(rt)
    assert all(subscription_of(rt, i).quarantined_at is None for i in ids)
    assert _events(rt, "alert.row_quarantined") == []
    monkeypatch.setattr(renewal, "renew_one", real)
    assert len(run_renewal_pass(rt).invoice_ids) == 3


def test_the_due_query_stays_on_its_partial_index(rt: Runtime, sandbox: Sandbox) -> None:
    """The due query reads ``ix_subscriptions_due`` (whose predicate leaves quarantined rows
    out) and the retries read ``ix_subscriptions_quarantined``: neither can scan the table."""
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    for query, index in (
        (due_query, "ix_subscriptions_due"),
        (retry_query, "ix_subscriptions_quarantined"),
    ):
        compiled = query(START, 500).with_for_update(skip_locked=True).compile(rt.engine)
        with rt.engine.connect() as conn:
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(
                conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params).scalars()
            )
            conn.rollback()
        assert index in plan, plan
        assert "Seq Scan" not in plan, plan


# -- collection (the write-ahead) --------------------------------------------------------------


def test_one_bad_invoice_does_not_stop_the_write_ahead_of_the_others(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invoice whose write-ahead raises is quarantined with one alert; the other invoices of
    its batch are charged in the same run. It is not offered again before its retry time, is
    retried hourly without another alert, and is charged exactly once after the fault is gone."""
    seed_plans(rt)
    for i in range(5):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    invoice_ids = sorted(renew(rt))
    bad = invoice_ids[2]
    secret = sandbox.issue_token("success")
    real_card = dunning_flow.usable_card

    def broken(session: Session, invoice: Invoice, now: Any, cards: Any = None) -> Any:
        if invoice.id == bad:
            raise RuntimeError(f"card lookup failed near {secret}")
        return real_card(session, invoice, now, cards)

    monkeypatch.setattr(dunning_flow, "usable_card", broken)
    report = collect_invoices(rt, invoice_ids)
    assert report.results == {i: ("quarantined" if i == bad else "paid") for i in invoice_ids}
    for invoice_id in invoice_ids:
        if invoice_id != bad:
            assert len(successful_charges(rt, sandbox, invoice_id)) == 1
    assert attempts_of(rt, bad) == []
    invoice = invoice_of(rt, bad)
    assert invoice.status == InvoiceStatus.OPEN.value
    assert invoice.quarantined_at == START
    assert invoice.quarantine_retry_at == START + HOUR
    assert invoice.next_attempt_at == START + HOUR
    reason = invoice.quarantine_reason or ""
    assert reason.startswith("RuntimeError: card lookup failed")
    assert secret not in reason and secret[:12] not in reason
    (alert,) = _events(rt, "alert.row_quarantined")
    assert (alert.invoice_id, alert.payload["table"], alert.payload["id"]) == (
        bad,
        "invoices",
        bad,
    )
    assert secret[:12] not in str(alert.payload)

    # Before its retry time: not in the due retries, and a task that still names it skips it.
    assert bad not in due_retries(rt)
    assert collect_invoices(rt, [bad]).results == {bad: "quarantined"}
    # At its retry time, still failing: retried, no second alert, the next retry an hour on.
    clock.advance(HOUR)
    assert due_retries(rt) == [bad]
    assert collect_invoices(rt, [bad]).results == {bad: "quarantined"}
    assert len(_events(rt, "alert.row_quarantined")) == 1
    assert invoice_of(rt, bad).quarantined_at == START
    assert invoice_of(rt, bad).quarantine_retry_at == clock.now() + HOUR

    # The fault is gone: the next retry charges it, once, and releases it.
    monkeypatch.setattr(dunning_flow, "usable_card", real_card)
    clock.advance(HOUR)
    assert due_retries(rt) == [bad]
    assert collect_invoices(rt, [bad]).results == {bad: "paid"}
    assert len(successful_charges(rt, sandbox, bad)) == 1
    invoice = invoice_of(rt, bad)
    assert invoice.status == InvoiceStatus.PAID.value
    assert (invoice.quarantined_at, invoice.quarantine_reason, invoice.quarantine_retry_at) == (
        None,
        None,
        None,
    )
    (released,) = _events(rt, "row.released")
    assert released.invoice_id == bad and released.payload["by"] == "retry"
    assert len(_events(rt, "alert.row_quarantined")) == 1


def test_a_healthy_write_ahead_takes_no_savepoint(rt: Runtime, sandbox: Sandbox) -> None:
    """Collection's common case is unchanged: one transaction, no savepoint."""
    seed_plans(rt)
    for i in range(3):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    invoice_ids = renew(rt)
    with _savepoints(rt.engine) as savepoints:
        report = collect_invoices(rt, invoice_ids)
    assert set(report.results.values()) == {"paid"}
    assert savepoints == []
    with rt.sessions() as session:
        assert session.execute(select(ChargeAttempt.id)).all() != []


# -- events in a savepoint ---------------------------------------------------------------------


def test_events_of_a_savepoint_live_and_die_with_it(clean_db: Engine) -> None:
    """What a row's savepoint recorded (``invoice.created``...) is written if the savepoint is
    released and never if it rolls back: a quarantined row leaves no event of work undone."""
    with Session(clean_db) as session, session.begin():
        record_event(session, "outer", now=START)
        with savepoint(session):
            record_event(session, "kept", now=START)
        with pytest.raises(ValueError), savepoint(session):
            record_event(session, "dropped", now=START)
            raise ValueError("this row is bad")
        record_event(session, "after", now=START)
    with Session(clean_db) as session:
        kinds = list(session.execute(select(Event.kind).order_by(Event.id)).scalars())
    assert kinds == ["outer", "kept", "after"]


def test_quarantine_reason_keeps_no_statement_parameters(clean_db: Engine) -> None:
    """A database error's reason is the driver's first line, never the statement's parameters
    (which may carry a ciphertext or a token)."""
    with Session(clean_db) as session, session.begin():
        try:
            with savepoint(session):
                session.execute(
                    text("SELECT CAST(:secret AS integer)"), {"secret": "Zk9+abc/DEF|123\\xyz=="}
                )
        except Exception as exc:
            reason = quarantine.reason_for(exc)
        else:
            raise AssertionError("the cast should have failed")
    assert reason.startswith("DataError: ")
    assert "Zk9+abc" not in reason and "[parameters" not in reason
