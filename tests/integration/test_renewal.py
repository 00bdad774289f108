"""Renewal on real PostgreSQL: one invoice per subscription period, whoever runs the scheduler."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.models import Invoice
from billing.runtime import Runtime
from schedules.renewal import RenewalReport, run_renewal_pass
from tests.factories import seed_plans, subscriber


def _periods(rt: Runtime, sub_id: int) -> list[tuple[datetime, datetime]]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Invoice.period_start, Invoice.period_end)
            .where(Invoice.subscription_id == sub_id)
            .order_by(Invoice.period_start)
        ).all()
    return [(r[0], r[1]) for r in rows]


def test_two_schedulers_at_once_create_each_invoice_once(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Two scheduler passes racing over the same due rows: every period is invoiced once."""
    seed_plans(rt)
    for i in range(150):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    clock.at = datetime(2026, 4, 1, tzinfo=UTC)  # three periods due for everyone
    barrier = threading.Barrier(2)
    created: list[list[int]] = []

    def scheduler() -> None:
        barrier.wait()
        created.append(run_renewal_pass(rt).invoice_ids)

    threads = [threading.Thread(target=scheduler) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = created[0] + created[1]
    assert len(all_ids) == len(set(all_ids)) == 150 * 3
    with rt.sessions() as session:
        per_period = session.execute(
            select(Invoice.subscription_id, Invoice.period_start, func.count())
            .group_by(Invoice.subscription_id, Invoice.period_start)
            .having(func.count() > 1)
        ).all()
    assert per_period == []
    assert run_renewal_pass(rt).invoice_ids == []  # nothing left due


def test_month_end_anchors_follow_the_calendar(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Anchors on 29, 30 and 31 January bill on the clamped day each month, never skipping one."""
    seed_plans(rt)
    subs = {}
    for day in (29, 30, 31):
        start = datetime(2026, 1, day, 9, 0, tzinfo=UTC)
        clock.at = start
        subs[day] = subscriber(
            rt, sandbox, ["success"], name=f"d{day}", start=start, timezone="UTC"
        )
    clock.at = datetime(2026, 5, 15, tzinfo=UTC)
    run_renewal_pass(rt)
    starts = {
        day: [p[0].date().isoformat() for p in _periods(rt, sub)] for day, sub in subs.items()
    }
    assert starts[29] == ["2026-01-29", "2026-02-28", "2026-03-29", "2026-04-29"]
    assert starts[30] == ["2026-01-30", "2026-02-28", "2026-03-30", "2026-04-30"]
    assert starts[31] == ["2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30"]
    for sub in subs.values():
        periods = _periods(rt, sub)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(periods))


def test_price_change_applies_to_later_periods_only(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """An invoice keeps the amount it was issued for; the new price starts with later periods."""
    from tests.factories import plans_config

    seed_plans(rt)
    sub = subscriber(rt, sandbox, ["success"], name="p")
    run_renewal_pass(rt)
    clock.at = datetime(2026, 2, 10, tzinfo=UTC)
    seed_plans(rt, plans_config(amount="60.00"))
    clock.at = datetime(2026, 4, 1, tzinfo=UTC)  # periods of 28 Feb and 31 Mar are due
    run_renewal_pass(rt)
    with rt.sessions() as session:
        amounts = (
            session.execute(
                select(Invoice.amount_minor)
                .where(Invoice.subscription_id == sub)
                .order_by(Invoice.id)
            )
            .scalars()
            .all()
        )
    assert amounts == [5000, 6000, 6000]


def test_each_batch_is_handed_over_once_committed(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A month-start spike is charged while the rest is still renewed: each batch's invoices are
    handed over (to be queued for charging) as soon as its transaction has committed, visible to
    any other connection, each invoice once."""
    seed_plans(rt)
    for n in range(5):
        subscriber(rt, sandbox, ["success"], name=f"c{n}")
    monkeypatch.setattr(rt, "renewal_batch_size", 2)
    handed: list[list[int]] = []

    def visible_elsewhere(batch: RenewalReport) -> None:
        with rt.engine.connect() as other:  # another connection sees only what is committed
            seen = other.execute(
                select(func.count()).select_from(Invoice).where(Invoice.id.in_(batch.invoice_ids))
            ).scalar_one()
        assert seen == len(batch.invoice_ids)
        handed.append(list(batch.invoice_ids))

    report = run_renewal_pass(rt, on_batch=visible_elsewhere)
    assert [len(ids) for ids in handed] == [2, 2, 1]
    assert sorted(itertools.chain.from_iterable(handed)) == sorted(report.invoice_ids)
