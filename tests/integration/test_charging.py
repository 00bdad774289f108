"""Collection against real PostgreSQL and the sandbox: at most one charge per invoice, none lost.

Every test checks its invariant against the sandbox's own list of charges (the money actually
taken), not only against our records.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from billing.attempts import SEND_WINDOW, AttemptStatus
from billing.clock import FixedClock
from billing.crypto import TokenVault
from billing.fatora.errors import PaymentNotFound
from billing.fatora.sandbox import Sandbox
from billing.fatora.types import Payment
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import CardToken, ControlFlag, Event, Invoice, Subscription
from billing.runtime import Runtime
from billing.services import charging
from billing.services.charging import collect_invoices
from schedules.sweeps import run_janitor
from tests.factories import (
    age_attempts,
    attempts_of,
    invoice_of,
    invoice_prefix,
    renew,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)
from tests.integration.conftest import make_runtime


def _one_due_invoice(rt: Runtime, sandbox: Sandbox, behaviours: list[str]) -> tuple[int, int]:
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, behaviours)
    (invoice_id,) = renew(rt)
    return sub_id, invoice_id


def test_success_is_verified_and_recorded(rt: Runtime, sandbox: Sandbox) -> None:
    """A plain success: paid once, with the gateway's transaction id on record."""
    sub_id, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    report = collect_invoices(rt, [invoice_id])
    assert report.results == {invoice_id: "paid"}
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.PAID.value
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED.value
    charges = successful_charges(rt, sandbox, invoice_id)
    assert len(charges) == 1
    assert attempt.transaction_id == charges[0]["transaction_id"]
    assert charges[0]["amount"] in ("50.00", "50.0", "50")
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value


def test_timeout_after_charge_is_settled_by_verify_without_a_second_collect(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """Fatora took the money but the answer never came: verify settles it; no second charge."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["timeout_after_charge"])
    collect_invoices(rt, [invoice_id])
    collect_invoices(rt, [invoice_id])  # a retry or a redelivered task changes nothing
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    prefix = invoice_prefix(rt, invoice_id)
    collects = [c for c in sandbox.charges() if str(c["order_id"]).startswith(prefix)]
    assert len(collects) == 1
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_garbled_answer_after_charge_is_never_taken_as_success_unverified(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """A body that cannot be read is an unknown outcome: verify, not the body, decides."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["garbled_after_charge"])
    collect_invoices(rt, [invoice_id])
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED.value
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_server_error_before_charge_is_retried_to_success(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Exactly once: a 5xx may come after the charge, so it is unknown, and nothing is charged
    again until verify has said 'not found' a grace period after the send; then a new attempt,
    with a new order id, pays."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["server_error_before_charge"])
    first = collect_invoices(rt, [invoice_id])
    assert first.results[invoice_id] == "unknown"
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    assert len(attempts_of(rt, invoice_id)) == 1  # no second charge within the grace
    age_attempts(rt, rt.unknown_grace)
    settled = collect_invoices(rt, [invoice_id])  # 'not found' is final now: a quick retry
    assert invoice_id in settled.retry_in
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "not_due"  # its backoff
    clock.advance(timedelta(seconds=settled.retry_in[invoice_id] + 1))
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    attempts = attempts_of(rt, invoice_id)
    assert [a.status for a in attempts] == ["failed", "succeeded"]
    assert attempts[0].order_id != attempts[1].order_id
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_pending_is_neither_paid_nor_failed_until_verify_says_so(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """PENDING blocks any new charge; the janitor verifies it again until SUCCESS."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["pending_then_success"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "pending"
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "pending"
    assert len(attempts_of(rt, invoice_id)) == 1  # no second charge while pending
    for _ in range(5):
        clock.advance(timedelta(days=1))
        run_janitor(rt)
        if invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value:
            break
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    assert len(attempts_of(rt, invoice_id)) == 1
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_soft_decline_follows_the_dunning_ladder(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Insufficient funds: past_due, retried on the ladder's days, canceled at its end."""
    sub_id, invoice_id = _one_due_invoice(rt, sandbox, ["insufficient_funds"])
    first_failure = clock.now()
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "soft_declined"
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.PAST_DUE.value
    assert invoice_of(rt, invoice_id).next_attempt_at == first_failure + timedelta(days=1)
    # Not due yet: a duplicate task must not charge again.
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "not_due"
    assert len(attempts_of(rt, invoice_id)) == 1
    for day in (1, 3, 5, 7):
        clock.at = first_failure + timedelta(days=day)
        collect_invoices(rt, [invoice_id])
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.UNCOLLECTIBLE.value
    assert invoice.failure_count == 5
    assert len(attempts_of(rt, invoice_id)) == 5
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.CANCELED.value
    assert successful_charges(rt, sandbox, invoice_id) == []


def test_hard_decline_kills_the_token_and_falls_back_to_another_card(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """An expired token is never charged again; the customer's other live card pays."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["expired_token", "success"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "hard_declined"
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    first, second = attempts_of(rt, invoice_id)
    assert first.card_token_id != second.card_token_id
    with rt.sessions() as session:
        dead = session.get(CardToken, first.card_token_id)
        assert dead is not None and dead.status == "dead"
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_task_delivered_twice_at_once_charges_once(rt: Runtime, sandbox: Sandbox) -> None:
    """Two workers given the same invoices at the same moment: the invoice lock lets one in."""
    seed_plans(rt)
    for i in range(20):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    invoice_ids = renew(rt)
    barrier = threading.Barrier(2)

    def worker() -> None:
        barrier.wait()
        collect_invoices(rt, invoice_ids)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    collect_invoices(rt, invoice_ids)  # and once more, late
    for invoice_id in invoice_ids:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_worker_killed_after_write_ahead_before_the_call(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Died between committing the attempt and calling Fatora: nothing is charged until verify
    has waited out the grace period, then exactly one charge."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    report = charging.CollectionReport()
    calls = charging._start_attempts(rt, [invoice_id], report)  # the process dies here
    assert len(calls) == 1
    # The next run finds an in-flight attempt the gateway has never heard of: too early to say.
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    assert sandbox.charges() == []
    # Its request could have left until the end of the send window, then travelled for the
    # grace period: only after both does 'not found' mean 'never charged'.
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    collect_invoices(rt, [invoice_id])
    clock.advance(timedelta(minutes=1))  # past the quick retry's backoff
    collect_invoices(rt, [invoice_id])
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    statuses = [a.status for a in attempts_of(rt, invoice_id)]
    assert statuses == ["failed", "succeeded"]
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


@pytest.mark.parametrize("isolated", [False, True], ids=["batch", "invoice-by-invoice"])
def test_the_write_ahead_gives_each_invoice_its_attempt_and_in_flight_lease(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, isolated: bool
) -> None:
    """Committed with its attempt, each invoice counts one more attempt (the next order id is
    new) and is leased while its call may be under way: the retry sweep leaves it alone until
    the lease ends, and the invoice the write-ahead passed over is left as it was."""
    seed_plans(rt)
    for i in range(3):
        subscriber(rt, sandbox, ["success"], name=f"lease{i}")
    invoice_ids = renew(rt)
    skipped = invoice_ids[-1]
    with rt.sessions() as session, session.begin():
        session.get_one(Invoice, skipped).next_attempt_at = clock.now() + timedelta(days=1)
    before = {i: invoice_of(rt, i).attempt_count for i in invoice_ids}
    notes: dict[int, str] = {}
    calls = charging._write_ahead(rt, invoice_ids, notes, isolated=isolated)
    assert sorted(c.invoice_id for c in calls) == invoice_ids[:-1]
    assert notes == {skipped: "not_due"}
    for call in calls:
        invoice = invoice_of(rt, call.invoice_id)
        assert invoice.attempt_count == before[call.invoice_id] + 1
        assert invoice.next_attempt_at == clock.now() + charging.IN_FLIGHT_LEASE
        assert call.order_id.endswith(f"-{invoice.attempt_count}")
    assert invoice_of(rt, skipped).attempt_count == before[skipped]
    assert invoice_of(rt, skipped).next_attempt_at == clock.now() + timedelta(days=1)


def test_worker_killed_after_the_gateway_charged_before_recording(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """Died after Fatora took the money, before the result was written: verify recovers the
    record, and the invoice is not charged again."""
    _, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    calls = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    charging._charge(rt, calls[0], charging._Run())  # money taken; the process dies before _record
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED.value
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_auth_error_pauses_collection_and_fails_no_customer(
    clean_db: object, sandbox: Sandbox, clock: FixedClock, vault: object
) -> None:
    """A 401 is the merchant's problem: collection pauses, an alert is raised, no dunning."""
    from billing.crypto import TokenVault

    assert isinstance(vault, TokenVault)
    rt = make_runtime(clean_db, sandbox, clock, vault, api_key="WRONG-KEY")  # type: ignore[arg-type]
    sub_id, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "auth_error"
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "collection_paused"
    invoice = invoice_of(rt, invoice_id)
    assert invoice.failure_count == 0 and invoice.status == InvoiceStatus.OPEN.value
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    with rt.sessions() as session:
        assert session.get(ControlFlag, "collection_paused") is not None
        kinds = set(session.execute(select(Event.kind)).scalars())
    assert "alert.collection_paused" in kinds
    assert sandbox.charges() == []


def test_a_revoked_key_failing_a_whole_batch_pauses_collection_once(
    clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault
) -> None:
    """Every call of a batch gets a 401 at once (the key was revoked): each invoice is left
    for later, collection pauses, and one alert is raised; no customer is failed."""
    rt = make_runtime(clean_db, sandbox, clock, vault, api_key="REVOKED-KEY")
    seed_plans(rt)
    for i in range(6):
        subscriber(rt, sandbox, ["success"], name=f"k{i}")
    invoice_ids = renew(rt)
    report = collect_invoices(rt, invoice_ids)
    assert set(report.results.values()) == {"auth_error"}
    with rt.sessions() as session:
        assert session.get(ControlFlag, "collection_paused") is not None
        alerts = session.execute(
            select(Event.id).where(Event.kind == "alert.collection_paused")
        ).all()
    assert len(alerts) == 1
    for invoice_id in invoice_ids:
        invoice = invoice_of(rt, invoice_id)
        assert invoice.status == InvoiceStatus.OPEN.value and invoice.failure_count == 0
    assert sandbox.charges() == []


def test_a_bug_after_the_gateway_accepted_a_charge_never_leads_to_a_second_charge(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never charge twice: collect was accepted, then verify blew up with an unexpected error.
    The attempt stays 'taken or unknown' (accepted), the other invoices of the batch are
    recorded as usual, and a later 'not found' from verify is never read as 'not charged'."""
    seed_plans(rt)
    for i in range(4):
        subscriber(rt, sandbox, ["success"], name=f"b{i}")
    invoice_ids = renew(rt)
    broken = invoice_prefix(rt, invoice_ids[0])
    real_verify = rt.gateway.verify

    def verify_with_a_bug(order_id: str, transaction_id: str | None = None) -> Payment:
        payment = real_verify(order_id, transaction_id)
        if order_id.startswith(broken):
            raise RuntimeError("a bug while reading the answer")
        return payment

    monkeypatch.setattr(rt.gateway, "verify", verify_with_a_bug)
    report = collect_invoices(rt, invoice_ids)
    assert report.results[invoice_ids[0]] == "unknown"
    assert all(report.results[i] == "paid" for i in invoice_ids[1:])
    (attempt,) = attempts_of(rt, invoice_ids[0])
    assert attempt.call_ending == "accepted"

    def not_found(order_id: str, transaction_id: str | None = None) -> Payment:
        if order_id.startswith(broken):
            raise PaymentNotFound("Specified payment does not exists")
        return real_verify(order_id, transaction_id)

    monkeypatch.setattr(rt.gateway, "verify", not_found)
    rt.unknown_grace = timedelta(0)
    collect_invoices(rt, invoice_ids)
    collect_invoices(rt, invoice_ids)
    assert len(successful_charges(rt, sandbox, invoice_ids[0])) == 1
    assert [a.status for a in attempts_of(rt, invoice_ids[0])] == ["unknown"]


def test_a_payment_on_a_paused_subscription_leaves_it_paused_until_resumed(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """'Active' must never mean 'not billed': an invoice paid after the merchant paused the
    subscription settles the invoice, and the subscription stays paused (nothing is billed)
    until a resume restarts its schedule."""
    from billing.services.subscriptions import get_subscription, pause, resume

    sub_id, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    with rt.sessions() as session, session.begin():
        pause(session, get_subscription(session, sub_id), rt.clock.now())
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.PAUSED.value and sub.next_billing_at is None
    with rt.sessions() as session, session.begin():
        resume(session, get_subscription(session, sub_id), rt.clock.now())
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.ACTIVE.value and sub.next_billing_at is not None
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_a_payment_on_an_unpaid_subscription_makes_it_active_and_billed_again(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """An unpaid subscription (dunning ended, renewals stopped) whose open invoice gets paid is
    active again, and its schedule goes on from the end of the last invoiced period: it is
    not left 'active' with nothing ever billed again."""
    sub_id, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    with rt.sessions() as session, session.begin():
        sub = session.get(Subscription, sub_id)
        assert sub is not None
        period_end = sub.current_period_end
        sub.status = SubscriptionStatus.UNPAID.value
        sub.next_billing_at = None
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    sub = subscription_of(rt, sub_id)
    assert sub.status == SubscriptionStatus.ACTIVE.value
    assert period_end is not None and sub.next_billing_at == period_end


def test_live_mode_refuses_a_test_result(
    clean_db: object, sandbox: Sandbox, clock: FixedClock, vault: object
) -> None:
    """In live mode a payment the gateway reports in test mode never pays an invoice."""
    from billing.crypto import TokenVault

    assert isinstance(vault, TokenVault)
    rt = make_runtime(clean_db, sandbox, clock, vault, live=True)  # type: ignore[arg-type]
    _, invoice_id = _one_due_invoice(rt, sandbox, ["success"])
    collect_invoices(rt, [invoice_id])
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.OPEN.value
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status in (AttemptStatus.UNKNOWN.value, AttemptStatus.ANOMALY.value)


def test_an_invoice_of_a_canceled_subscription_is_voided_not_charged(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """Canceling stops the money: an open invoice is voided, never charged afterwards."""
    from billing.services.subscriptions import cancel, get_subscription

    sub_id, invoice_id = _one_due_invoice(rt, sandbox, ["insufficient_funds", "success"])
    collect_invoices(rt, [invoice_id])
    with rt.sessions() as session, session.begin():
        cancel(session, get_subscription(session, sub_id), rt.clock.now(), at_period_end=False)
    rt.clock.advance(timedelta(days=2))  # type: ignore[attr-defined]
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "void"
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.VOID.value
    assert len(attempts_of(rt, invoice_id)) == 1
    assert successful_charges(rt, sandbox, invoice_id) == []


def test_token_expiry_sweep_warns_once_before_a_renewal_after_expiry(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """A token dies six months after issue: the customer is warned once, a notice period ahead
    of the renewal that falls after its expiry."""
    from billing.services.cards import notice_period, sweep_expiring_tokens

    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    for _ in range(6):
        renew(rt)
        clock.advance(timedelta(days=31))
    renew(rt)
    due = subscription_of(rt, sub_id).next_billing_at
    assert due is not None
    clock.advance(due - notice_period() - clock.now() - timedelta(days=1))
    assert sweep_expiring_tokens(rt) == 0  # not yet: the renewal is further than the notice
    clock.advance(timedelta(days=2))
    assert sweep_expiring_tokens(rt) == 1
    assert sweep_expiring_tokens(rt) == 0


# -- the write-ahead in two waves ------------------------------------------------------------------


def _many_due_invoices(rt: Runtime, sandbox: Sandbox, count: int) -> list[int]:
    seed_plans(rt)
    for n in range(count):
        subscriber(rt, sandbox, ["success"], name=f"c{n}")
    return sorted(renew(rt))


def test_the_rest_of_a_batch_is_written_ahead_while_the_first_calls_are_under_way(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first wave's calls do not wait for the rest of the batch to be written ahead, and
    every invoice of both waves is still charged exactly once."""
    invoice_ids = _many_due_invoices(rt, sandbox, charging.FIRST_WAVE + 5)
    second_written = threading.Event()
    waited: list[bool] = []
    start_attempts = charging._start_attempts

    def counting_start(*args: object, **kwargs: object) -> list[object]:
        calls = start_attempts(*args, **kwargs)  # type: ignore[arg-type]
        if len(args[1]) < charging.FIRST_WAVE:  # type: ignore[arg-type]
            second_written.set()  # the second wave's attempts are committed
        return calls  # type: ignore[return-value]

    collect = rt.gateway.collect_payment

    def gated_collect(*args: object, **kwargs: object) -> object:
        # Without the waves, the second write-ahead would come only after every collect.
        waited.append(second_written.wait(timeout=5))
        return collect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(charging, "_start_attempts", counting_start)
    monkeypatch.setattr(rt.gateway, "collect_payment", gated_collect)
    report = collect_invoices(rt, invoice_ids)
    assert set(report.results.values()) == {"paid"}
    assert len(report.results) == len(invoice_ids)
    assert waited and all(waited)
    for invoice_id in invoice_ids:
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1
