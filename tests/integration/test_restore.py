"""A restore from an earlier backup charges nothing twice (real PostgreSQL, real pg_dump).

The database is dumped after the first month; the second month is billed and collected; the
dump is restored into a new database, as an operator would after losing the first one. The
gateway still has the second month's payments. ``reconcile_after_restore`` must find and record
them before anything is charged, so that the next collection charges no one again.
"""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url

from billing.clock import FixedClock
from billing.crypto import TokenVault
from billing.db import make_engine
from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus
from billing.migrate import upgrade
from billing.models import ChargeAttempt, Invoice
from billing.runtime import Runtime
from billing.services.charging import collect_invoices
from billing.services.restore import reconcile_after_restore
from tests.factories import renew, seed_plans, subscriber
from tests.integration.conftest import PG_URL, START, _admin_engine, make_runtime


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture()
def databases() -> Iterator[tuple[str, str]]:
    """Two empty databases of their own: the one lost, and the one restored into."""
    admin = _admin_engine()
    names = [f"billing_rs_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    urls = [make_url(PG_URL).set(database=n).render_as_string(hide_password=False) for n in names]
    yield urls[0], urls[1]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _charges_by_period(rt: Runtime, sandbox: Sandbox) -> Counter[str]:
    """Successful gateway charges per invoice (subscription and period, from the order id)."""
    del rt
    return Counter(
        str(c["order_id"]).rsplit("-", 1)[0] for c in sandbox.charges() if c["status"] == "SUCCESS"
    )


def _collect_everything(rt: Runtime) -> None:
    with rt.sessions() as session:
        open_ids = list(
            session.execute(
                select(Invoice.id).where(Invoice.status == InvoiceStatus.OPEN.value)
            ).scalars()
        )
    collect_invoices(rt, open_ids)


def test_a_restore_from_an_earlier_dump_charges_nothing_twice(
    databases: tuple[str, str], vault: TokenVault, tmp_path: Path
) -> None:
    """Exactly once across a restore: every payment the gateway took after the backup is found
    and recorded as a paid invoice before any charge, and the next renewal and collection charge
    no one again for a period already paid."""
    lost_url, restored_url = databases
    clock = FixedClock(START)
    sandbox = Sandbox(now=clock.now)
    upgrade(lost_url)
    lost_engine: Engine = make_engine(lost_url)
    rt = make_runtime(lost_engine, sandbox, clock, vault)
    seed_plans(rt)
    for i in range(5):
        subscriber(rt, sandbox, ["success"], name=f"r{i}")
    subscriber(rt, sandbox, ["insufficient_funds"], name="poor")
    collect_invoices(rt, renew(rt))
    dump = tmp_path / "billing.dump"
    subprocess.run(["pg_dump", "-Fc", "-f", str(dump), _libpq(lost_url)], check=True)

    # After the backup: the second month is billed and collected, then the database is lost.
    clock.advance(timedelta(days=28))
    second_month = renew(rt)
    assert len(second_month) == 6
    collect_invoices(rt, second_month)
    taken_after_backup = _charges_by_period(rt, sandbox)
    assert sum(taken_after_backup.values()) == 10
    lost_engine.dispose()

    subprocess.run(["pg_restore", "--no-owner", "-d", _libpq(restored_url), str(dump)], check=True)
    restored = make_engine(restored_url)
    try:
        rt2 = make_runtime(restored, sandbox, clock, vault)
        report = reconcile_after_restore(rt2)
        assert report.invoices_created == 6  # the second month's invoices, again
        assert sorted(report.found.values()).count("paid") == 5
        with rt2.sessions() as session:
            paid = session.execute(
                select(Invoice.id).where(Invoice.status == InvoiceStatus.PAID.value)
            ).all()
        assert len(paid) == 10  # both months of the five good cards

        # Business as usual: renew and collect; nobody is charged twice.
        assert renew(rt2) == []
        _collect_everything(rt2)
        clock.advance(timedelta(days=2))
        _collect_everything(rt2)
        after = _charges_by_period(rt2, sandbox)
        assert max(after.values()) == 1, "a period was charged twice"
        assert after == taken_after_backup
        with rt2.sessions() as session:
            on_record = set(
                session.execute(
                    select(ChargeAttempt.order_id).where(ChargeAttempt.status == "succeeded")
                ).scalars()
            )
        taken = {str(c["order_id"]) for c in sandbox.charges() if c["status"] == "SUCCESS"}
        assert taken == on_record, "a charge is not on record"
    finally:
        restored.dispose()
