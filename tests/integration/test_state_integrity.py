"""State integrity on the real PostgreSQL: no lost update between a worker and an operator, and
pause/resume bill what customers expect.

The races are driven with real concurrent transactions: one side holds its transaction open
(its row locks taken), the other runs in a thread and must wait for it, then act on what was
committed, never on a stale copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import Invoice
from billing.runtime import Runtime
from billing.services import charging
from billing.services.charging import collect_invoices
from billing.services.subscriptions import cancel, get_subscription, pause, resume
from schedules.renewal import claim_due, renew_one
from tests.factories import (
    attempts_of,
    invoice_of,
    renew,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)
from tests.integration.conftest import START


def _due(
    rt: Runtime, sandbox: Sandbox, behaviour: str = "success", plan: str = "monthly"
) -> tuple[int, int]:
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, [behaviour], plan=plan)
    (invoice_id,) = renew(rt)
    return sub_id, invoice_id


def _while_held(
    rt: Runtime, hold: Callable[[Session], None], other: Callable[[], object]
) -> object:
    """Run ``hold`` in an open transaction, start ``other`` in a thread, check that it waits
    for the transaction, commit, and return what ``other`` returned."""
    result: list[object] = []
    session = rt.sessions()
    session.begin()
    try:
        hold(session)
        session.flush()
        thread = threading.Thread(target=lambda: result.append(other()))
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive(), "the other side did not wait for the row lock"
        session.commit()
    finally:
        session.close()
    thread.join(30)
    assert result, "the other side failed"
    return result[0]


def test_a_cancel_in_progress_holds_back_the_write_ahead(rt: Runtime, sandbox: Sandbox) -> None:
    """Never charge a canceled subscription: a worker that reaches the invoice while a cancel
    is being committed waits for it, sees the invoice voided, and writes no attempt."""
    sub_id, invoice_id = _due(rt, sandbox)
    report = charging.CollectionReport()
    calls = _while_held(
        rt,
        lambda s: cancel(s, get_subscription(s, sub_id), rt.clock.now(), at_period_end=False),
        lambda: charging._start_attempts(rt, [invoice_id], report),
    )
    assert calls == []
    assert report.results[invoice_id] == InvoiceStatus.VOID.value
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.VOID.value
    assert sandbox.charges() == []


def test_a_payment_recorded_during_a_cancel_does_not_revive_the_subscription(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """No lost update: a charge already under way when the customer cancels is recorded as
    paid, and the subscription stays canceled, with no next billing date."""
    sub_id, invoice_id = _due(rt, sandbox)
    (call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    outcome = charging._charge(rt, call, charging._Run())
    report = charging.CollectionReport()
    _while_held(
        rt,
        lambda s: cancel(s, get_subscription(s, sub_id), rt.clock.now(), at_period_end=False),
        lambda: charging._record(rt, [(call, outcome)], report),
    )
    assert report.results[invoice_id] == "paid"
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.CANCELED.value
    assert sub.next_billing_at is None and sub.canceled_at is not None
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_a_pause_during_a_payment_is_kept(rt: Runtime, sandbox: Sandbox) -> None:
    """No lost update: a pause committed while a payment is recorded stays a pause (a payment
    never lifts a merchant's pause)."""
    sub_id, invoice_id = _due(rt, sandbox)
    (call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    outcome = charging._charge(rt, call, charging._Run())
    _while_held(
        rt,
        lambda s: pause(s, get_subscription(s, sub_id), rt.clock.now()),
        lambda: charging._record(rt, [(call, outcome)], charging.CollectionReport()),
    )
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.PAUSED.value
    assert sub.next_billing_at is None
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value


def test_a_decline_recorded_while_renewal_cancels_at_period_end_keeps_the_cancel(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """No lost update: the renewal that ends a cancel-at-period-end subscription and a dunning
    retry's decline in the same minute; the subscription stays canceled (the decline waits for
    the renewal's row lock, then finds it canceled)."""
    sub_id, invoice_id = _due(rt, sandbox, behaviour="insufficient_funds")
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "soft_declined"
    with rt.sessions() as session, session.begin():
        cancel(session, get_subscription(session, sub_id), clock.now(), at_period_end=True)
    period_end = invoice_of(rt, invoice_id).period_end
    clock.advance(period_end - clock.now())  # the period ends while a dunning retry is due
    (call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    outcome = charging._charge(rt, call, charging._Run())

    def renewal(session: Session) -> None:
        for sub in claim_due(session, clock.now(), 10):
            renew_one(session, sub, clock.now())

    _while_held(
        rt,
        renewal,
        lambda: charging._record(rt, [(call, outcome)], charging.CollectionReport()),
    )
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.CANCELED.value
    assert sub.next_billing_at is None


def _paid_first_month(rt: Runtime, sandbox: Sandbox) -> tuple[int, int]:
    sub_id, invoice_id = _due(rt, sandbox)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    return sub_id, invoice_id


def _toggle(rt: Runtime, sub_id: int, action: Callable[[Session, object, datetime], None]) -> None:
    with rt.sessions() as session, session.begin():
        action(session, get_subscription(session, sub_id), rt.clock.now())  # type: ignore[arg-type]


def _periods(rt: Runtime, sub_id: int) -> list[tuple[datetime, datetime]]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Invoice).where(Invoice.subscription_id == sub_id).order_by(Invoice.period_start)
        ).scalars()
        return [(i.period_start, i.period_end) for i in rows]


def test_pause_and_resume_inside_a_paid_month_charge_nothing_more(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Pause and resume bill what customers expect: a month paid on 31 January (a month end)
    stays paid through pauses and resumes, the next renewal falls at its end as planned, and
    the anchor keeps the 31st."""
    sub_id, _ = _paid_first_month(rt, sandbox)
    first_end = _periods(rt, sub_id)[0][1]
    assert first_end == datetime(2026, 2, 28, 9, 0, tzinfo=START.tzinfo)
    clock.advance(timedelta(days=3))
    for _ in range(5):  # every toggle used to charge a fresh period
        _toggle(rt, sub_id, pause)
        clock.advance(timedelta(hours=1))
        _toggle(rt, sub_id, resume)
        assert renew(rt) == []
    assert subscription_of(rt, sub_id).next_billing_at == first_end
    clock.advance(first_end - clock.now())
    (second,) = renew(rt)
    assert _periods(rt, sub_id)[1] == (first_end, datetime(2026, 3, 31, 9, 0, tzinfo=START.tzinfo))
    assert len(sandbox.charges()) == 1
    assert invoice_of(rt, second).status == InvoiceStatus.OPEN.value


def test_resuming_after_the_paid_month_starts_a_new_period(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """After the paid period has ended, nothing covers the time since: resuming starts a new
    period at once (nothing is billed for the weeks of the pause)."""
    sub_id, _ = _paid_first_month(rt, sandbox)
    clock.advance(timedelta(days=3))
    _toggle(rt, sub_id, pause)
    clock.advance(timedelta(days=40))
    assert renew(rt) == []  # paused: nothing billed at the end of February
    _toggle(rt, sub_id, resume)
    (invoice_id,) = renew(rt)
    start, end = _periods(rt, sub_id)[1]
    assert start == clock.now()
    assert end.day == start.day
    assert len(attempts_of(rt, invoice_id)) == 0


@pytest.fixture()
def rt(rt: Runtime) -> Runtime:
    rt.charge_concurrency = 2
    return rt


def test_two_plan_syncs_at_once_write_one_price(rt: Runtime, clock: FixedClock) -> None:
    """No lost update and no crash: a second `plans sync` of a changed price waits for the first
    and finds the price already in force, instead of failing on the unique constraint."""
    from billing.plans import PlansConfig
    from billing.services.plans_sync import sync_plans
    from tests.factories import plans_config

    seed_plans(rt)
    clock.advance(timedelta(hours=1))
    changed: PlansConfig = plans_config(amount="60.00")
    second: list[list[str]] = []
    _while_held(
        rt,
        lambda s: sync_plans(s, changed, rt.clock.now()) and None,
        lambda: second.append(_sync(rt, changed)) or second[-1],
    )
    assert second == [[]]  # nothing left to change: the first sync did it


def _sync(rt: Runtime, config: object) -> list[str]:
    from billing.services.plans_sync import sync_plans

    with rt.sessions() as session, session.begin():
        return sync_plans(session, config, rt.clock.now())  # type: ignore[arg-type]
