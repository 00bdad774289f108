"""Renewal batches on real PostgreSQL, with rows whose renewal does more than insert an invoice:
two periods due, a cancel at the period's end (with an invoice made ahead to void), an invoice
made ahead still open (taken over) or paid (left alone), a price change between periods, and a
row that raises. A batch renewed in one transaction ends exactly as the same rows renewed one by
one; each period is invoiced once, every created invoice is reported and has its event, and a
batch's invoices are handed over only once committed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import Base, Customer, Event, Invoice, Subscription
from billing.runtime import Runtime
from billing.services.subscriptions import cancel
from schedules import renewal
from schedules.renewal import RenewalReport, invoice_ahead, run_renewal_pass
from schedules.sweeps import due_retries
from tests.factories import plans_config, seed_plans, subscriber
from tests.integration.conftest import START

FEB_28 = datetime(2026, 2, 28, 9, 0, tzinfo=START.tzinfo)
MAR_31 = datetime(2026, 3, 31, 9, 0, tzinfo=START.tzinfo)


@dataclass(frozen=True)
class World:
    plain: int
    canceling: int
    canceling_ahead: int
    ahead_open: int
    ahead_paid: int
    broken: int | None


def _world(rt: Runtime, sandbox: Sandbox, clock: FixedClock, *, broken: bool) -> World:
    """Six subscriptions renewed once at START; twenty days on, invoices made ahead for the
    link (one paid), two set to cancel at the period's end, the price raised; then clock moved
    so that two periods (28 Feb, 31 Mar) are due for every one still renewing."""
    seed_plans(rt)
    names = ["plain", "canceling", "canceling_ahead", "ahead_open", "ahead_paid", "broken"]
    ids = {n: subscriber(rt, sandbox, ["success"], name=n) for n in names}
    run_renewal_pass(rt)
    clock.advance(timedelta(days=20))
    with rt.sessions() as session, session.begin():
        now = clock.now()
        for name in ("ahead_open", "ahead_paid", "canceling_ahead"):
            sub = session.get(Subscription, ids[name], with_for_update=True)
            assert sub is not None
            made = invoice_ahead(session, sub, now)
            if name == "ahead_paid":
                session.execute(
                    update(Invoice)
                    .where(Invoice.id == made)
                    .values(status=InvoiceStatus.PAID.value, paid_at=now)
                )
        for name in ("canceling", "canceling_ahead"):
            sub = session.get(Subscription, ids[name])
            assert sub is not None
            cancel(session, sub, now, at_period_end=True)
        if broken:
            # Data that outlived the tz database: this row raises when renewed.
            sub = session.get(Subscription, ids["broken"])
            assert sub is not None
            session.execute(
                update(Customer)
                .where(Customer.id == sub.customer_id)
                .values(timezone="US/Pacific-New")
            )
    seed_plans(rt, plans_config("60.00"))
    clock.advance(timedelta(days=50))
    return World(
        plain=ids["plain"],
        canceling=ids["canceling"],
        canceling_ahead=ids["canceling_ahead"],
        ahead_open=ids["ahead_open"],
        ahead_paid=ids["ahead_paid"],
        broken=ids["broken"] if broken else None,
    )


Snapshot = tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]


def _snapshot(rt: Runtime) -> Snapshot:
    """Invoices, subscriptions and events, with invoices named by (subscription, period) rather
    than by id (ids differ between runs)."""
    with rt.sessions() as session:
        invoices = list(session.execute(select(Invoice)).scalars())
        period = {i.id: (i.subscription_id, i.period_start.isoformat()) for i in invoices}
        rows = sorted(
            (
                i.subscription_id,
                i.period_start.isoformat(),
                i.status,
                i.amount_minor,
                i.link_only,
                i.next_attempt_at is not None,
            )
            for i in invoices
        )
        subs = sorted(
            (
                s.id,
                s.status,
                str(s.current_period_start),
                str(s.next_billing_at),
                s.cancel_at_period_end,
                str(s.canceled_at),
                s.quarantined_at is not None,
            )
            for s in session.execute(select(Subscription)).scalars()
        )
        events = sorted(
            (
                e.kind,
                str(e.subscription_id),
                str(period.get(e.invoice_id)),
                str(period.get((e.payload or {}).get("invoice_id"))),
            )
            for e in session.execute(select(Event)).scalars()
        )
    return rows, subs, events


def _empty(rt: Runtime) -> None:
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with rt.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


def _row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch renewed row by row, each row flushed in its own savepoint."""
    claim_and_renew = renewal._claim_and_renew

    def isolated(rt: Runtime, query: object, now: object, *, isolated: bool) -> object:
        return claim_and_renew(rt, query, now, isolated=True)  # type: ignore[arg-type]

    monkeypatch.setattr(renewal, "_claim_and_renew", isolated)


def _check_invariants(rt: Runtime, world: World, report: RenewalReport) -> None:
    with rt.sessions() as session:
        invoices = list(session.execute(select(Invoice)).scalars())
        created = [
            e.payload["invoice_id"]
            for e in session.execute(select(Event).where(Event.kind == "invoice.created")).scalars()
        ]
        subs = {s.id: s for s in session.execute(select(Subscription)).scalars()}
    by_period: dict[tuple[int, datetime], list[Invoice]] = {}
    for invoice in invoices:
        by_period.setdefault((invoice.subscription_id, invoice.period_start), []).append(invoice)
    # Every invoice has its creation event, once; no period has two invoices.
    assert sorted(created) == sorted(i.id for i in invoices)
    assert all(len(found) == 1 for found in by_period.values())
    # What the pass reports is exactly what is left to charge.
    collectable = sorted(
        i.id
        for i in invoices
        if i.status == InvoiceStatus.OPEN.value and not i.link_only and i.period_start > START
    )
    assert sorted(report.invoice_ids) == collectable
    # Renewing rows: both due periods invoiced, the subscription in the second.
    for sub_id in (world.plain, world.ahead_open, world.ahead_paid):
        assert (sub_id, FEB_28) in by_period and (sub_id, MAR_31) in by_period
        assert subs[sub_id].current_period_start == MAR_31
    (taken_over,) = by_period[(world.ahead_open, FEB_28)]
    assert taken_over.status == InvoiceStatus.OPEN.value and not taken_over.link_only
    assert taken_over.next_attempt_at is not None
    (paid,) = by_period[(world.ahead_paid, FEB_28)]
    assert paid.status == InvoiceStatus.PAID.value and paid.next_attempt_at is None
    assert paid.id not in report.invoice_ids
    # Canceled at the period's end: no new period, the invoice made ahead voided.
    for sub_id in (world.canceling, world.canceling_ahead):
        assert subs[sub_id].status == SubscriptionStatus.CANCELED.value
        assert subs[sub_id].next_billing_at is None
        assert sub_id in report.canceled
        assert (sub_id, MAR_31) not in by_period
    assert (world.canceling, FEB_28) not in by_period
    (voided,) = by_period[(world.canceling_ahead, FEB_28)]
    assert voided.status == InvoiceStatus.VOID.value
    if world.broken is not None:
        assert world.broken in report.quarantined
        assert subs[world.broken].quarantined_at is not None
        assert (world.broken, FEB_28) not in by_period


@pytest.mark.parametrize("broken", [False, True], ids=["healthy", "one_row_raises"])
def test_a_batch_ends_as_its_rows_renewed_one_by_one(
    sandbox: Sandbox,
    clock: FixedClock,
    rt: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    broken: bool,
) -> None:
    """The same world renewed in one-transaction batches and row by row ends with the same
    invoices, subscriptions and events; each period is invoiced once, every created invoice is
    reported and has its event, cancels void what was made ahead and paid periods are left
    alone (also when a row raises and the batch is redone row by row)."""
    world = _world(rt, sandbox, clock, broken=broken)
    report = run_renewal_pass(rt)
    _check_invariants(rt, world, report)
    batched = _snapshot(rt)

    # The same world again, from an empty database, renewed row by row.
    _empty(rt)
    clock.at = START
    world = _world(rt, sandbox, clock, broken=broken)
    _row_by_row(monkeypatch)
    report = run_renewal_pass(rt)
    _check_invariants(rt, world, report)
    assert _snapshot(rt) == batched


def test_a_pass_stopped_by_its_hand_over_leaves_committed_invoices_to_the_retry_sweep(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queueing of a batch's charges fails (the broker is down) after earlier batches were
    handed over: the failed batch's invoices are committed and found by the retry sweep, the
    rest of the due rows are renewed by the next pass, and nothing is handed over twice or
    before its commit."""
    seed_plans(rt)
    for n in range(5):
        subscriber(rt, sandbox, ["success"], name=f"c{n}")
    monkeypatch.setattr(rt, "renewal_batch_size", 2)
    handed: list[int] = []
    calls = 0

    def broker_down_on_second(batch: RenewalReport) -> None:
        nonlocal calls
        calls += 1
        with rt.engine.connect() as other:
            seen = other.execute(
                select(Invoice.id).where(Invoice.id.in_(batch.invoice_ids))
            ).scalars()
            assert sorted(seen) == sorted(batch.invoice_ids)
        if calls == 2:
            raise ConnectionError("broker unreachable")
        handed.extend(batch.invoice_ids)

    with pytest.raises(ConnectionError):
        run_renewal_pass(rt, on_batch=broker_down_on_second)
    assert len(handed) == 2
    with rt.sessions() as session:
        committed = list(session.execute(select(Invoice.id)).scalars())
    assert len(committed) == 4
    assert sorted(set(due_retries(rt)) - set(handed)) == sorted(set(committed) - set(handed))
    rest = run_renewal_pass(rt, on_batch=lambda b: handed.extend(b.invoice_ids))
    assert rest.claimed == 1
    assert len(handed) == len(set(handed)) == 3
