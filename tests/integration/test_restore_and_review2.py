"""Regressions for the second review: the restore after a lost database, and the charge path.

Each test turns one reproduction of the review into the invariant it broke:

* no period is charged twice (per subscription period, at most one successful gateway charge);
* every charge is on record (each payment the gateway took is an attempt row, or is named by
  an invoice set aside for an operator);
* nothing is stuck silently (an open invoice has a schedule, an unresolved attempt the janitor
  settles, or is quarantined with an alert);
* no customer is harmed by our failure (a blip, a wrong key, an outage of ours kills no card,
  duns no one, marks no one paid with someone else's money).

The restore tests use two databases of their own and the real ``pg_dump`` / ``pg_restore``: the
database that is lost after its backup, and the one the backup is restored into. The sandbox
gateway outlives both, as Fatora would.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url

from billing.attempts import SEND_WINDOW, UNRESOLVED, AttemptStatus
from billing.clock import FixedClock
from billing.crypto import TokenVault
from billing.db import make_engine
from billing.fatora.answers import Answer
from billing.fatora.errors import GatewayServerError, RequestRejected
from billing.fatora.sandbox import Sandbox
from billing.fatora.types import Payment
from billing.lifecycle import InvoiceStatus
from billing.migrate import upgrade
from billing.models import CardToken, ChargeAttempt, Customer, Event, Invoice
from billing.plans import PlansConfig
from billing.runtime import Runtime
from billing.services import charging, control, restore
from billing.services.charging import BREAKER_MIN_HARD, collect_invoices
from billing.services.quarantine import ALERT as ROW_QUARANTINED
from billing.services.restore import RestoreIncomplete, reconcile_after_restore
from schedules.sweeps import due_retries, run_janitor
from tests.factories import (
    age_attempts,
    attempts_of,
    invoice_of,
    plans_config,
    renew,
    seed_plans,
    subscriber,
)
from tests.integration.conftest import PG_URL, START, _admin_engine, make_runtime

RESTORING = "restore in progress"

# -- a lost database and its restored backup ------------------------------------------------


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Timeline:
    """The database lost after its backup, the one the backup is restored into, and the clock
    and gateway both of them talk to."""

    lost_url: str
    restored_url: str
    vault: TokenVault
    backup: Path
    clock: FixedClock = field(default_factory=lambda: FixedClock(START))
    sandbox: Sandbox = field(init=False)
    engines: list[Engine] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sandbox = Sandbox(now=self.clock.now)

    def lost(self) -> Runtime:
        """The database in use before the loss, migrated to head."""
        upgrade(self.lost_url)
        return self._runtime(self.lost_url, self.sandbox)

    def back_up(self) -> None:
        subprocess.run(
            ["pg_dump", "-Fc", "-f", str(self.backup), _libpq(self.lost_url)], check=True
        )

    def restore(self) -> None:
        """The lost database is gone: the backup is restored into the other one."""
        subprocess.run(
            ["pg_restore", "--no-owner", "-d", _libpq(self.restored_url), str(self.backup)],
            check=True,
        )

    def restored(self, sandbox: Sandbox | None = None) -> Runtime:
        """A runtime on the restored database (talking to ``sandbox``, by default Fatora)."""
        return self._runtime(self.restored_url, sandbox or self.sandbox)

    def _runtime(self, url: str, sandbox: Sandbox) -> Runtime:
        engine = make_engine(url)
        self.engines.append(engine)
        return make_runtime(engine, sandbox, self.clock, self.vault)


@pytest.fixture()
def timeline(vault: TokenVault, tmp_path: Path) -> Iterator[Timeline]:
    admin = _admin_engine()
    names = [f"billing_rv_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    urls = [make_url(PG_URL).set(database=n).render_as_string(hide_password=False) for n in names]
    line = Timeline(urls[0], urls[1], vault, tmp_path / "billing.dump")
    try:
        yield line
    finally:
        for engine in line.engines:
            engine.dispose()
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- what the gateway took, what is on record ----------------------------------------------


def _successes(sandbox: Sandbox) -> Counter[str]:
    """Successful gateway charges per order id: the ground truth."""
    return Counter(str(c["order_id"]) for c in sandbox.charges() if c["status"] == "SUCCESS")


def _charged_twice(sandbox: Sandbox) -> dict[str, int]:
    """Subscription periods (the order id without its attempt number) charged more than once."""
    per_period = Counter(order.rsplit("-", 1)[0] for order in _successes(sandbox).elements())
    return {period: n for period, n in per_period.items() if n > 1}


def _off_record(rt: Runtime, sandbox: Sandbox) -> set[str]:
    """Order ids the gateway took money for that are neither an attempt row that says so nor
    named by an invoice set aside for an operator."""
    with rt.sessions() as session:
        recorded = set(
            session.execute(
                select(ChargeAttempt.order_id).where(
                    ChargeAttempt.status.in_(
                        [AttemptStatus.SUCCEEDED.value, AttemptStatus.ANOMALY.value]
                    )
                )
            ).scalars()
        )
        reasons = list(
            session.execute(
                select(Invoice.quarantine_reason).where(Invoice.quarantined_at.is_not(None))
            ).scalars()
        )
    return {
        order
        for order in _successes(sandbox)
        if order not in recorded and not any(order in (reason or "") for reason in reasons)
    }


def _stuck_silently(rt: Runtime) -> list[int]:
    """Open invoices nothing will ever move: no schedule, no unresolved attempt for the
    janitor, not quarantined (with its alert)."""
    unresolved = select(ChargeAttempt.invoice_id).where(
        ChargeAttempt.status.in_([s.value for s in UNRESOLVED])
    )
    with rt.sessions() as session:
        return list(
            session.execute(
                select(Invoice.id).where(
                    Invoice.status == InvoiceStatus.OPEN.value,
                    Invoice.next_attempt_at.is_(None),
                    Invoice.quarantined_at.is_(None),
                    Invoice.id.not_in(unresolved),
                )
            ).scalars()
        )


def _assert_invariant(rt: Runtime, sandbox: Sandbox) -> None:
    assert not _charged_twice(sandbox), f"charged twice: {_charged_twice(sandbox)}"
    assert not _off_record(rt, sandbox), f"money taken, not on record: {_off_record(rt, sandbox)}"
    assert not _stuck_silently(rt), f"open invoices stuck silently: {_stuck_silently(rt)}"


# -- small helpers ---------------------------------------------------------------------------


def _open_ids(rt: Runtime) -> list[int]:
    with rt.sessions() as session:
        return list(
            session.execute(
                select(Invoice.id)
                .where(Invoice.status == InvoiceStatus.OPEN.value)
                .order_by(Invoice.id)
            ).scalars()
        )


def _collect_open(rt: Runtime) -> dict[int, str]:
    """What a worker left running does: collect every open invoice."""
    ids = _open_ids(rt)
    return collect_invoices(rt, ids).results if ids else {}


def _run_beat_and_workers(rt: Runtime) -> None:
    """The due-retry sweep hands its invoices to the charge task; a stale task charges the rest."""
    due = due_retries(rt)
    if due:
        collect_invoices(rt, due)
    _collect_open(rt)


def _paused(rt: Runtime) -> str | None:
    with rt.sessions() as session:
        return control.collection_paused(session)


def _kinds(rt: Runtime, invoice_id: int | None = None) -> list[str]:
    query = select(Event.kind).order_by(Event.id)
    if invoice_id is not None:
        query = query.where(Event.invoice_id == invoice_id)
    with rt.sessions() as session:
        return list(session.execute(query).scalars())


def _statuses(rt: Runtime) -> list[str]:
    with rt.sessions() as session:
        return list(session.execute(select(Invoice.status).order_by(Invoice.id)).scalars())


def _verify_blip(
    monkeypatch: pytest.MonkeyPatch, rt: Runtime, blips: Callable[[str], bool], times: int = 1
) -> list[str]:
    """Verify answers a 503 for the first ``times`` order ids ``blips`` picks; returns them."""
    real = rt.gateway.verify
    hit: list[str] = []

    def verify(order_id: str, transaction_id: str | None = None) -> Payment:
        if blips(order_id) and len(hit) < times:
            hit.append(order_id)
            raise GatewayServerError("503 Service Unavailable", http_status=503)
        return real(order_id, transaction_id)

    monkeypatch.setattr(rt.gateway, "verify", verify)
    return hit


def _verify_rewrites(
    monkeypatch: pytest.MonkeyPatch, rt: Runtime, prefix: str, **changes: str
) -> None:
    """Verify's answer for order ids starting with ``prefix`` carries ``changes``."""
    real = rt.gateway.verify

    def verify(order_id: str, transaction_id: str | None = None) -> Payment:
        payment = real(order_id, transaction_id)
        return replace(payment, **changes) if order_id.startswith(prefix) else payment

    monkeypatch.setattr(rt.gateway, "verify", verify)


def _set_aside(rt: Runtime, invoice_id: int) -> Invoice:
    """The invoice, checked to be set aside for an operator with exactly one alert."""
    invoice = invoice_of(rt, invoice_id)
    assert invoice.quarantined_at is not None, "not set aside"
    assert invoice.next_attempt_at is None, "set aside, yet scheduled"
    assert _kinds(rt, invoice_id).count(ROW_QUARANTINED) == 1
    return invoice


# -- the restore -------------------------------------------------------------------------------


def test_an_interrupted_restore_charges_nothing_until_a_run_completes(
    timeline: Timeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INVARIANT no period charged twice (review R2). The restore re-creates the lost invoices
    (due now, attempt count 0) before it probes. One unclear verify in the probe stops it
    (RestoreIncomplete): collection stays paused, so the due-retry sweep and a worker left
    running charge nothing (not attempt 1 again, the order id the lost system was paid under);
    the run that completes resumes collection and nobody is charged twice."""
    sandbox = timeline.sandbox
    rt = timeline.lost()
    seed_plans(rt)
    for i in range(3):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    collect_invoices(rt, renew(rt))
    month1 = set(_successes(sandbox))
    timeline.back_up()
    timeline.clock.advance(timedelta(days=28))
    collect_invoices(rt, renew(rt))  # month 2 paid after the backup
    month2 = sorted(set(_successes(sandbox)) - month1)
    assert len(month2) == 3

    timeline.restore()
    rt2 = timeline.restored()
    blipped = _verify_blip(monkeypatch, rt2, lambda order: order == month2[1])
    with pytest.raises(RestoreIncomplete):
        reconcile_after_restore(rt2)
    assert blipped == [month2[1]]  # the probe stopped halfway, the lost invoices re-created
    assert len(_open_ids(rt2)) >= 2
    assert (_paused(rt2) or "").startswith(RESTORING)

    taken = len(sandbox.charges())
    _run_beat_and_workers(rt2)
    assert len(sandbox.charges()) == taken, "charged during an interrupted restore"
    assert (_paused(rt2) or "").startswith(RESTORING)

    report = reconcile_after_restore(rt2)  # run again, as documented: it completes
    assert set(report.found) >= set(month2[1:])
    assert _paused(rt2) is None
    _run_beat_and_workers(rt2)
    assert _statuses(rt2) == [InvoiceStatus.PAID.value] * 6
    _assert_invariant(rt2, sandbox)


def test_a_payment_that_does_not_match_is_set_aside_not_charged_again(
    timeline: Timeline,
) -> None:
    """INVARIANT no period charged twice (review R7). A price change synced after the backup is
    lost with it: the restore re-invoices the period at the old price and finds the payment at
    the new one (ANOMALY). The invoice is set aside for an operator (quarantined, no schedule,
    one alert) instead of being charged again."""
    sandbox, clock = timeline.sandbox, timeline.clock
    rt = timeline.lost()
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="c")
    collect_invoices(rt, renew(rt))
    month1 = set(_successes(sandbox))
    timeline.back_up()
    clock.advance(timedelta(days=10))
    seed_plans(rt, plans_config(amount="60.00"))  # synced after the backup
    clock.advance(timedelta(days=18))
    collect_invoices(rt, renew(rt))  # month 2 paid at 60.00
    (month2,) = set(_successes(sandbox)) - month1

    timeline.restore()
    rt2 = timeline.restored()
    report = reconcile_after_restore(rt2)
    assert report.found == {month2: "mismatch"}
    (inv,) = _open_ids(rt2)
    invoice = _set_aside(rt2, inv)
    assert month2 in (invoice.quarantine_reason or "")
    assert "alert.payment_mismatch" in _kinds(rt2, inv)
    assert [a.status for a in attempts_of(rt2, inv)] == [AttemptStatus.ANOMALY.value]

    for _ in range(3):  # business as usual
        _run_beat_and_workers(rt2)
        clock.advance(timedelta(days=1))
    assert _successes(sandbox)[month2] == 1
    assert invoice_of(rt2, inv).quarantined_at is not None
    _assert_invariant(rt2, sandbox)


def test_a_payment_after_a_long_run_of_unsent_attempts_is_found(
    timeline: Timeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INVARIANT every charge on record, no period charged twice (review R1). Attempts that
    never reached the gateway (connect refused: NOT_SENT) leave no trace at Fatora; after
    24 of them the 25th attempt takes the money. The probe (PROBE_MISSES unknown numbers in a
    row) still finds it, records the invoice paid, and no new attempt reuses its order id."""
    sandbox, clock = timeline.sandbox, timeline.clock
    gap = 24
    rt = timeline.lost()
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="victim")
    (inv,) = renew(rt)
    timeline.back_up()  # the invoice open, no attempt yet

    real_collect = rt.gateway.collect_payment

    def refused(*args: object, **kwargs: object) -> None:
        raise RequestRejected("request not sent (connect)", answer=Answer.NOT_SENT)

    monkeypatch.setattr(rt.gateway, "collect_payment", refused)
    for _ in range(gap):
        clock.at = max(clock.now(), invoice_of(rt, inv).next_attempt_at)
        collect_invoices(rt, [inv])
    assert invoice_of(rt, inv).attempt_count == gap
    monkeypatch.setattr(rt.gateway, "collect_payment", real_collect)
    clock.at = max(clock.now(), invoice_of(rt, inv).next_attempt_at)
    assert collect_invoices(rt, [inv]).results == {inv: "paid"}
    paid_order = attempts_of(rt, inv)[-1].order_id
    assert paid_order.endswith(f"-{gap + 1}")

    timeline.restore()
    rt2 = timeline.restored()
    report = reconcile_after_restore(rt2)
    assert report.found == {paid_order: "paid"}
    assert invoice_of(rt2, inv).status == InvoiceStatus.PAID.value
    _run_beat_and_workers(rt2)
    assert _successes(sandbox) == {paid_order: 1}
    _assert_invariant(rt2, sandbox)


def test_a_pending_payment_beside_an_unresolved_attempt_sets_the_invoice_aside(
    timeline: Timeline,
) -> None:
    """INVARIANT no period charged twice, nothing stuck silently (review R6). The backup holds
    attempt 1 written but not settled; after it, attempt 2 was answered PENDING. The restore
    finds that pending payment beside the still-unresolved attempt 1: the invoice is set aside
    (one alert naming the payment) and not charged again when attempt 1 is written off, so the
    pending payment completing at the gateway is the only charge."""
    from billing.services.charging import CollectionReport, _start_attempts

    sandbox, clock = timeline.sandbox, timeline.clock
    rt = timeline.lost()
    seed_plans(rt)
    subscriber(rt, sandbox, ["pending_then_success"], name="p")
    (inv,) = renew(rt)
    _start_attempts(rt, [inv], CollectionReport())  # attempt 1 written; the worker dies
    timeline.back_up()

    # the lost timeline: attempt 1 written off (never sent), attempt 2 answered PENDING
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    clock.at = invoice_of(rt, inv).next_attempt_at
    assert collect_invoices(rt, [inv]).results == {inv: "pending"}
    (pending,) = [a.order_id for a in attempts_of(rt, inv) if a.status == "pending"]

    timeline.restore()
    rt2 = timeline.restored()
    report = reconcile_after_restore(rt2)
    assert report.found == {pending: "set_aside"}
    invoice = _set_aside(rt2, inv)
    assert pending in (invoice.quarantine_reason or "")

    age_attempts(rt2, SEND_WINDOW + rt2.unknown_grace)  # real time since the backup
    run_janitor(rt2, everything=True)  # attempt 1: never charged
    for _ in range(4):  # collection and janitor go on as usual
        _run_beat_and_workers(rt2)
        clock.advance(timedelta(minutes=10))
        run_janitor(rt2, everything=True)
    rt2.gateway.verify(pending)  # the gateway completes its pending payment
    assert list(_successes(sandbox)) == [pending]
    # Still set aside, alerted once (attempt 1 written off gave it a next attempt time, which a
    # set-aside invoice never reaches before `billing quarantine release`).
    invoice = invoice_of(rt2, inv)
    assert invoice.quarantined_at is not None
    assert pending in (invoice.quarantine_reason or "")
    assert _kinds(rt2, inv).count(ROW_QUARANTINED) == 1
    assert inv not in due_retries(rt2, now=clock.now() + timedelta(days=365))
    _assert_invariant(rt2, sandbox)


def test_a_restore_against_a_verify_that_knows_nothing_charges_nothing(
    timeline: Timeline,
) -> None:
    """INVARIANT no period charged twice (review R5). Run against the wrong merchant account
    (verify answers Fatora's 404 for everything), the restore does not conclude that nothing
    was paid after the backup: verify does not find the latest payment on record, so it stops
    (RestoreIncomplete) with collection paused. Workers started meanwhile charge nothing; the
    run with the right account finds every payment and nobody is charged twice."""
    sandbox, clock = timeline.sandbox, timeline.clock
    rt = timeline.lost()
    seed_plans(rt)
    for i in range(3):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    collect_invoices(rt, renew(rt))
    timeline.back_up()
    clock.advance(timedelta(days=28))
    collect_invoices(rt, renew(rt))
    taken = len(sandbox.charges())

    timeline.restore()
    wrong = Sandbox(now=clock.now)  # another merchant account: knows no payment of ours
    with pytest.raises(RestoreIncomplete):
        reconcile_after_restore(timeline.restored(wrong))
    assert not wrong.charges()

    rt2 = timeline.restored()  # the config fixed, the workers started too soon
    assert (_paused(rt2) or "").startswith(RESTORING)
    _run_beat_and_workers(rt2)
    assert len(sandbox.charges()) == taken

    report = reconcile_after_restore(rt2)
    assert sorted(report.found.values()) == ["paid"] * 3
    assert _paused(rt2) is None
    _run_beat_and_workers(rt2)
    assert len(sandbox.charges()) == taken
    assert _statuses(rt2) == [InvoiceStatus.PAID.value] * 6
    _assert_invariant(rt2, sandbox)


def _cron_plans() -> PlansConfig:
    config = plans_config()
    cron = replace(
        config.plans["monthly"], code="firstofmonth", name="1st", interval=None, cron="0 0 1 * *"
    )
    return replace(config, plans={"firstofmonth": cron})


def test_ids_used_after_the_backup_are_never_issued_again(timeline: Timeline) -> None:
    """INVARIANT no customer harmed by our failure (review R4). Order ids are derived from the
    subscription id and the period start; on a cron plan every subscription shares its period
    starts. A restore must not reissue the id of a subscription created after the backup, or the
    new customer's charge is matched to the lost customer's payment: marked paid with someone
    else's money, never charged. Every id sequence moves past max(id) + ID_GAP."""
    sandbox, clock = timeline.sandbox, timeline.clock
    rt = timeline.lost()
    seed_plans(rt, _cron_plans())
    timeline.back_up()  # plans only

    a = subscriber(rt, sandbox, ["success"], name="A", plan="firstofmonth")
    clock.advance(timedelta(hours=13))  # past the first fire (Feb 1 00:00 Asia/Qatar)
    (inv_a,) = renew(rt)
    assert collect_invoices(rt, [inv_a]).results == {inv_a: "paid"}
    (a_order,) = _successes(sandbox)

    timeline.restore()
    clock.at = START + timedelta(hours=1)  # B signs up the same day, before the fire
    rt2 = timeline.restored()
    reconcile_after_restore(rt2)
    b = subscriber(rt2, sandbox, ["server_error_always"], name="B", plan="firstofmonth")
    clock.advance(timedelta(hours=12))
    (inv_b,) = renew(rt2)
    collect_invoices(rt2, [inv_b])
    (attempt,) = attempts_of(rt2, inv_b)
    assert b != a
    assert attempt.order_id != a_order
    with rt2.sessions() as session:
        new_ids = {
            "customer": session.execute(select(Customer.id)).scalar_one(),
            "card": session.execute(select(CardToken.id)).scalar_one(),
            "subscription": b,
            "invoice": inv_b,
            "attempt": attempt.id,
            "event": min(
                session.execute(
                    select(Event.id).where(
                        (Event.subscription_id == b) | (Event.invoice_id == inv_b)
                    )
                ).scalars()
            ),
        }
    assert all(i > restore.ID_GAP for i in new_ids.values()), new_ids

    age_attempts(rt2, SEND_WINDOW + rt2.unknown_grace)
    clock.advance(timedelta(minutes=10))
    run_janitor(rt2, everything=True)
    assert invoice_of(rt2, inv_b).status != InvoiceStatus.PAID.value, (
        "B is marked paid, but B's card was never charged"
    )
    assert attempts_of(rt2, inv_b)[0].status != AttemptStatus.SUCCEEDED.value
    assert not _charged_twice(sandbox)
    assert not _stuck_silently(rt2)


def _ids(rt: Runtime) -> dict[str, set[int]]:
    with rt.sessions() as session:
        return {
            table: set(session.execute(text(f"SELECT id FROM {table}")).scalars())
            for table in restore._ID_TABLES
        }


def test_no_id_used_after_the_backup_is_issued_by_the_restore(timeline: Timeline) -> None:
    """INVARIANT every charge on record, no customer harmed (review R4, every table). Rows
    written after the backup are lost, their ids are not (order ids at Fatora, webhook-id and
    Message-ID at the merchant and the operator): no row the restore or anything after it
    writes may take one of them, in any table whose sequence the restore moves."""
    sandbox, clock = timeline.sandbox, timeline.clock
    rt = timeline.lost()
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="c")
    collect_invoices(rt, renew(rt))
    timeline.back_up()
    backup = _ids(rt)
    clock.advance(timedelta(days=28))
    subscriber(rt, sandbox, ["success"], name="d")
    collect_invoices(rt, renew(rt))
    used_after = {t: ids - backup[t] for t, ids in _ids(rt).items()}
    assert all(used_after.values())  # every table has rows written after the backup

    timeline.restore()
    rt2 = timeline.restored()
    reconcile_after_restore(rt2)
    subscriber(rt2, sandbox, ["success"], name="d")
    _collect_open(rt2)
    issued = {t: ids - backup[t] for t, ids in _ids(rt2).items()}
    reissued = {t: sorted(issued[t] & used_after[t]) for t in issued if issued[t] & used_after[t]}
    assert not reissued, f"ids used after the backup issued again: {reissued}"


def test_an_old_attempt_written_off_after_a_restore_reschedules_its_invoice(
    timeline: Timeline,
) -> None:
    """INVARIANT nothing stuck silently (review D2). The restore records a declined attempt 2
    (a higher row id) beside the backup's unresolved attempt 1; attempt 1 is then written off as
    never charged. An older attempt settled late leaves the schedule alone only when the invoice
    has one: here it has none, so it is scheduled, and dunning runs its course."""
    sandbox, clock = timeline.sandbox, timeline.clock
    rt = timeline.lost()
    seed_plans(rt)
    subscriber(rt, sandbox, ["server_error_always"], name="x")
    (inv,) = renew(rt)
    assert collect_invoices(rt, [inv]).results == {inv: "unknown"}  # 503
    timeline.back_up()

    (token,) = sandbox._tokens.values()
    token.behaviour = "insufficient_funds"  # the issuer answers now: a soft decline
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    clock.at = invoice_of(rt, inv).next_attempt_at
    collect_invoices(rt, [inv])
    assert [a.status for a in attempts_of(rt, inv)] == ["failed", "declined"]

    timeline.restore()
    clock.advance(timedelta(hours=1))
    rt2 = timeline.restored()
    report = reconcile_after_restore(rt2)
    assert list(report.found.values()) == ["declined"]
    assert not _stuck_silently(rt2)
    age_attempts(rt2, SEND_WINDOW + rt2.unknown_grace)
    run_janitor(rt2, everything=True)  # attempt 1: never charged, settled after attempt 2
    assert attempts_of(rt2, inv)[0].status == AttemptStatus.FAILED.value
    assert invoice_of(rt2, inv).next_attempt_at is not None, "open with no schedule"
    assert not _stuck_silently(rt2)

    for _ in range(10):
        clock.advance(timedelta(days=1))
        run_janitor(rt2)
        for i in due_retries(rt2):
            collect_invoices(rt2, [i])
        assert not _stuck_silently(rt2)
    assert invoice_of(rt2, inv).status == InvoiceStatus.UNCOLLECTIBLE.value
    assert "invoice.dunning_exhausted" in _kinds(rt2, inv)
    _assert_invariant(rt2, sandbox)


# -- the charge path ---------------------------------------------------------------------------


def test_an_overlong_auth_code_does_not_block_the_janitor(
    clean_db: Engine, clock: FixedClock, vault: TokenVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INVARIANT every charge on record, nothing stuck silently (review Q1). Verify answers an
    80-character auth code (the column holds 64) for one of three charges that landed after a
    504. It is clipped: that attempt is recorded paid, and the janitor's other chunks are
    settled too, without raising."""
    sandbox = Sandbox(now=lambda: START, land_delay_s=0.2)
    rt = make_runtime(clean_db, sandbox, clock, vault)
    rt.charge_batch_size = 1  # janitor chunks of one invoice: the poison one first
    seed_plans(rt)
    poison_sub = subscriber(rt, sandbox, ["edge_504_lands_later"], name="poison")
    for i in range(2):
        subscriber(rt, sandbox, ["edge_504_lands_later"], name=f"late{i}")
    ids = sorted(renew(rt))
    _verify_rewrites(monkeypatch, rt, f"S{poison_sub}-", auth_code="X" * 80)
    assert set(collect_invoices(rt, ids).results.values()) == {"unknown"}
    time.sleep(0.4)  # the gateway has taken the three charges now

    clock.advance(timedelta(minutes=10))
    report = run_janitor(rt)
    assert report.settled == dict.fromkeys(ids, "paid")
    poison = attempts_of(rt, ids[0])[0]
    assert poison.order_id.startswith(f"S{poison_sub}-")
    assert (poison.status, poison.auth_code) == (AttemptStatus.SUCCEEDED.value, "X" * 64)
    assert len(_successes(sandbox)) == 3
    _assert_invariant(rt, sandbox)


def test_a_janitor_chunk_that_cannot_be_recorded_blocks_neither_the_others_nor_the_alert(
    clean_db: Engine, clock: FixedClock, vault: TokenVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INVARIANT nothing stuck silently (review Q1, the janitor). An answer that cannot be
    written (here a fault injected into the record of one invoice) fails its chunk only: the
    janitor settles the other chunks, raises JanitorIncomplete at the end, and once the attempt
    is stale raises alert.attempt_unresolved for it."""
    from schedules.sweeps import JanitorIncomplete

    sandbox = Sandbox(now=lambda: START, land_delay_s=0.2)
    rt = make_runtime(clean_db, sandbox, clock, vault)
    rt.charge_batch_size = 1
    seed_plans(rt)
    poison_sub = subscriber(rt, sandbox, ["edge_504_lands_later"], name="poison")
    for i in range(2):
        subscriber(rt, sandbox, ["edge_504_lands_later"], name=f"late{i}")
    poison, *others = sorted(renew(rt))
    del poison_sub
    collect_invoices(rt, [poison, *others])
    real_write = charging._write_attempt

    def poisoned(attempt: ChargeAttempt, outcome: charging.Outcome, now: datetime) -> None:
        if attempt.invoice_id == poison:
            raise ValueError("this answer cannot be written")
        real_write(attempt, outcome, now)

    monkeypatch.setattr(charging, "_write_attempt", poisoned)
    time.sleep(0.4)

    clock.advance(timedelta(days=4))
    for _ in range(2):
        with pytest.raises(JanitorIncomplete):
            run_janitor(rt)
    assert all(invoice_of(rt, i).status == InvoiceStatus.PAID.value for i in others)
    assert attempts_of(rt, poison)[0].status in {s.value for s in UNRESOLVED}
    assert _kinds(rt, poison).count("alert.attempt_unresolved") == 1
    assert not _charged_twice(sandbox)


def test_one_blip_on_the_canary_decides_nothing_and_pauses_no_one(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INVARIANT no customer harmed by our failure (review D1). The canary asks verify about
    the latest payment on record before a 'not found' writes an attempt off. A 503 on that one
    verify says nothing about the route: the attempt stays unknown and collection is not
    paused for everyone; once verify answers again, the attempt is settled."""
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="good")
    subscriber(rt, sandbox, ["server_error_always"], name="flaky")
    good, flaky = sorted(renew(rt))
    assert collect_invoices(rt, [good, flaky]).results == {good: "paid", flaky: "unknown"}
    good_order = attempts_of(rt, good)[0].order_id
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    clock.advance(timedelta(minutes=10))

    blipped = _verify_blip(monkeypatch, rt, lambda order: order == good_order)
    assert run_janitor(rt).settled == {flaky: "unknown"}
    assert blipped == [good_order]
    assert _paused(rt) is None, "one 503 on the canary paused collection for everyone"
    assert not [k for k in _kinds(rt) if k.startswith("alert.")]
    assert attempts_of(rt, flaky)[0].status == AttemptStatus.UNKNOWN.value

    clock.at = attempts_of(rt, flaky)[0].next_verify_at  # its next verify, as scheduled
    run_janitor(rt)  # verify answers again: the canary finds the payment, 'not found' is final
    assert attempts_of(rt, flaky)[0].status == AttemptStatus.FAILED.value
    assert invoice_of(rt, flaky).next_attempt_at is not None
    assert _paused(rt) is None
    _assert_invariant(rt, sandbox)


def test_earlier_successes_do_not_mask_a_hard_decline_outage(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """INVARIANT no customer harmed by our failure (review D3). After a burst of successes, the
    acquirer hard-declines every charge, fed to it in runs of two (due retries, trickle
    renewals). The fleet breaker judges the last FLEET_SAMPLE attempts settled, not the whole
    hour: collection pauses before BREAKER_MIN_HARD cards are marked dead, and stays paused."""
    seed_plans(rt)
    for i in range(20):
        subscriber(rt, sandbox, ["success"], name=f"ok{i}")
    assert set(collect_invoices(rt, renew(rt)).results.values()) == {"paid"}
    clock.advance(timedelta(minutes=5))
    for i in range(30):  # the acquirer now answers 'card cannot recur' for everyone
        subscriber(rt, sandbox, ["card_cannot_recur"], name=f"x{i}")
    ids = sorted(renew(rt))
    for k in range(0, len(ids), 2):
        clock.advance(timedelta(minutes=1))
        collect_invoices(rt, ids[k : k + 2])
    with rt.sessions() as session:
        dead = session.execute(select(CardToken.id).where(CardToken.status == "dead")).all()
    assert len(dead) <= BREAKER_MIN_HARD - 1, f"{len(dead)} cards marked dead before the pause"
    assert _paused(rt) is not None
    assert not _charged_twice(sandbox)
