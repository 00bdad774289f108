"""Exactly once under every ambiguous answer, on the real PostgreSQL.

Each test names the invariant it protects. The gateway is the in-process sandbox, taught the
answers a real edge gives: an HTML 504 whose charge lands later, a request held on its way, a
verify that lags, an accepted collect in an undocumented shape, PROCESSING, a broken route.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError

from billing.attempts import SEND_WINDOW, AttemptStatus
from billing.clock import FixedClock
from billing.crypto import TokenVault, new_key
from billing.db import make_engine
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.locks import PostgresAdvisoryLocker
from billing.models import CardToken, ChargeAttempt, Event
from billing.runtime import Runtime
from billing.services import charging, control
from billing.services.charging import collect_invoices
from schedules.sweeps import run_janitor
from tests.factories import (
    Monotonic,
    age_attempts,
    attempts_of,
    invoice_of,
    renew,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)
from tests.integration.conftest import START, make_runtime


@pytest.fixture()
def mono() -> Monotonic:
    return Monotonic()


@pytest.fixture()
def gateway(mono: Monotonic) -> Sandbox:
    return Sandbox(now=lambda: START, monotonic=mono, land_delay_s=1.0, verify_lag_s=1.0)


@pytest.fixture()
def rt(clean_db: Engine, gateway: Sandbox, clock: FixedClock, vault: TokenVault) -> Runtime:
    return make_runtime(clean_db, gateway, clock, vault)


def _due(rt: Runtime, sandbox: Sandbox, behaviours: list[str]) -> list[int]:
    seed_plans(rt)
    for i, behaviour in enumerate(behaviours):
        subscriber(rt, sandbox, [behaviour], name=f"c{i}")
    return renew(rt)


def _events(rt: Runtime, kind: str) -> list[Event]:
    with rt.sessions() as session:
        return list(session.execute(select(Event).where(Event.kind == kind)).scalars())


def _cards(rt: Runtime) -> list[str]:
    with rt.sessions() as session:
        return [c.status for c in session.execute(select(CardToken)).scalars()]


def _with_transport(rt: Runtime, transport: httpx.BaseTransport) -> Runtime:
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1",
        "E4B73FEE-F492-4607-A38D-852B0EBC91C9",
        mode="test",
        timeout_s=5,
        transport=transport,
    )
    return rt


# -- 1. an ambiguous failure is not final ----------------------------------------------------


def test_an_edge_504_whose_charge_lands_later_is_charged_once(
    rt: Runtime, gateway: Sandbox, mono: Monotonic
) -> None:
    """Exactly once: an HTML 504 from an edge may hide a charge that lands a second later.
    Retries (task redeliveries, the retry sweep) verify and wait; nothing is charged again."""
    (invoice_id,) = _due(rt, gateway, ["edge_504_lands_later"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    for _ in range(4):  # quick retries while the charge is still on its way
        assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    assert len(attempts_of(rt, invoice_id)) == 1
    mono.now += 1.5  # the charge behind the 504 lands
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    collect_invoices(rt, [invoice_id])
    assert len(successful_charges(rt, gateway, invoice_id)) == 1
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value


def test_a_broken_verify_route_settles_nothing_as_never_charged(
    rt: Runtime, gateway: Sandbox, mono: Monotonic
) -> None:
    """No charge unrecorded: an HTML 404 from verify is not Fatora's 'not found'. Reconcile
    with verify's route broken leaves every unknown attempt unknown and pauses collection."""
    (invoice_id,) = _due(rt, gateway, ["timeout_lands_later"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    mono.now += 1.5  # the held request lands: the customer has paid
    gateway.broken_routes = {"verify"}
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)  # long past any grace
    run_janitor(rt, everything=True)
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.UNKNOWN.value
    with rt.sessions() as session:
        assert control.collection_paused(session) is not None
    gateway.broken_routes = set()
    run_janitor(rt, everything=True)
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    assert len(successful_charges(rt, gateway, invoice_id)) == 1


class SlowTransport(SandboxTransport):
    """Every call takes ``latency_s`` of real time."""

    def __init__(self, sandbox: Sandbox, latency_s: float) -> None:
        super().__init__(sandbox)
        self.latency_s = latency_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        time.sleep(self.latency_s)
        return super().handle_request(request)


def test_the_grace_counts_from_the_send_not_from_the_write(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """Exactly once: a call that waited for a call thread behind others is judged from when it
    was sent. Counting from the write-ahead, the later ones of a batch read their lagging
    'not found' as final at once and were charged again."""
    sandbox = Sandbox(now=lambda: START, land_delay_s=30.0)  # real time: lands long after
    rt = _with_transport(make_runtime(clean_db, sandbox, clock, vault), SlowTransport(sandbox, 0.2))
    rt.charge_concurrency = 1
    rt.unknown_grace = timedelta(seconds=1.5)
    invoice_ids = _due(rt, sandbox, ["edge_504_lands_later"] * 6)
    report = collect_invoices(rt, invoice_ids)
    # Each call was answered 0.4 s after it was sent; the last were sent 2 s after the write.
    assert set(report.results.values()) == {"unknown"}
    with rt.sessions() as session:
        attempts = list(session.execute(select(ChargeAttempt)).scalars())
    assert len(attempts) == 6
    assert all(a.sent_wall_at is not None and a.sent_wall_at > a.created_wall_at for a in attempts)
    assert max(a.sent_wall_at - a.created_wall_at for a in attempts) > timedelta(seconds=1.5)


class LaggingVerify(SandboxTransport):
    """Verify answers Fatora's 404 'not found' while ``lagging`` is set."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self.lagging = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.lagging and request.url.path.endswith("/payments/verify"):
            body = b'{"status":"ERROR","error":"Specified payment does not exists"}'
            return httpx.Response(404, content=body)
        return super().handle_request(request)


def test_an_accepted_collect_in_an_undocumented_shape_is_never_charged_again(
    rt: Runtime, gateway: Sandbox
) -> None:
    """Exactly once: {"status":"SUCCESS","result":{"status":"APPROVED"}} means the gateway took
    the money. However long verify lags, its 'not found' never makes the invoice chargeable."""
    transport = LaggingVerify(gateway)
    _with_transport(rt, transport)
    (invoice_id,) = _due(rt, gateway, ["approved_shape"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.call_ending == "accepted"
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace + timedelta(days=1))
    run_janitor(rt, everything=True)
    collect_invoices(rt, [invoice_id])
    assert len(attempts_of(rt, invoice_id)) == 1
    transport.lagging = False
    run_janitor(rt, everything=True)
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    assert len(successful_charges(rt, gateway, invoice_id)) == 1


@pytest.mark.parametrize("behaviour", ["processing", "error_envelope_after_charge"])
def test_money_taken_behind_an_unclear_envelope_is_verified_and_recorded(
    rt: Runtime, gateway: Sandbox, behaviour: str
) -> None:
    """No charge unrecorded: PROCESSING, or an ERROR envelope without decline words, is not a
    rejection. Verify finds the money and the invoice is paid, with no alert."""
    (invoice_id,) = _due(rt, gateway, [behaviour])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert len(successful_charges(rt, gateway, invoice_id)) == 1
    assert _events(rt, "alert.charge_rejected") == []


def test_a_verify_that_lags_the_charge_is_waited_for(
    rt: Runtime, gateway: Sandbox, mono: Monotonic
) -> None:
    """Exactly once: collect said SUCCESS, verify does not know the payment yet. The attempt
    stays unknown (accepted) until verify catches up; it is never charged again."""
    (invoice_id,) = _due(rt, gateway, ["verify_lags"])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    mono.now += 1.5
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert len(successful_charges(rt, gateway, invoice_id)) == 1


# -- 2. a systemic failure is not a card failure ---------------------------------------------


def test_a_broken_collect_route_kills_no_card_and_duns_no_one(
    rt: Runtime, gateway: Sandbox, clock: FixedClock
) -> None:
    """No customer harmed by our failure: an HTML 404 from collect-payment (a wrong base URL)
    pauses collection with one alert; every card stays alive, every subscription active. Once
    repaired and resumed, each invoice is charged exactly once."""
    invoice_ids = _due(rt, gateway, ["success"] * 3)
    gateway.broken_routes = {"collect-payment"}
    report = collect_invoices(rt, invoice_ids)
    assert set(report.results.values()) == {"collection_paused"}
    assert _cards(rt) == ["active"] * 3
    for invoice_id in invoice_ids:
        sub = subscription_of(rt, invoice_of(rt, invoice_id).subscription_id)
        assert sub.status == SubscriptionStatus.ACTIVE.value
    assert len(_events(rt, "alert.collection_paused")) == 1
    assert _events(rt, "invoice.payment_failed") == []
    gateway.broken_routes = set()
    with rt.sessions() as session, session.begin():
        control.resume_collection(session, rt.clock.now())
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    collect_invoices(rt, invoice_ids)  # verify: never charged
    clock.advance(timedelta(minutes=1))
    collect_invoices(rt, invoice_ids)
    for invoice_id in invoice_ids:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
        assert len(successful_charges(rt, gateway, invoice_id)) == 1


@pytest.mark.parametrize("behaviour", ["invalid_api_key_envelope", "merchant_token_expired"])
def test_key_words_in_a_failure_envelope_pause_collection_not_the_card(
    rt: Runtime, gateway: Sandbox, behaviour: str
) -> None:
    """No customer harmed by our failure: 'Invalid API Key' or 'Merchant token expired' in a
    FAILURE envelope is about the merchant's key. Collection pauses; no dunning, no dead card."""
    (invoice_id,) = _due(rt, gateway, [behaviour])
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "auth_error"
    assert _cards(rt) == ["active"]
    assert invoice_of(rt, invoice_id).failure_count == 0
    assert len(_events(rt, "alert.collection_paused")) == 1


def test_an_implausible_share_of_hard_declines_trips_the_breaker(
    rt: Runtime, gateway: Sandbox
) -> None:
    """No customer harmed by our failure: when most of a batch comes back hard-declined, the
    cause is a route or a key, not the cards. No card is marked dead, no one is dunned, and
    collection pauses with an alert."""
    invoice_ids = _due(rt, gateway, ["expired_token"] * 8 + ["success"] * 2)
    report = collect_invoices(rt, invoice_ids)
    assert "hard_declined" not in report.results.values()
    assert _cards(rt).count("dead") == 0
    assert _events(rt, "invoice.payment_failed") == []
    with rt.sessions() as session:
        reason = control.collection_paused(session)
    assert reason is not None and "hard declines" in reason


def test_a_few_hard_declines_are_believed(rt: Runtime, gateway: Sandbox) -> None:
    """The breaker does not stop real declines: two dead tokens among ten are dead."""
    invoice_ids = _due(rt, gateway, ["expired_token"] * 2 + ["success"] * 8)
    report = collect_invoices(rt, invoice_ids)
    assert list(report.results.values()).count("hard_declined") == 2
    assert _cards(rt).count("dead") == 2


# -- 3. the fence is in the database ---------------------------------------------------------


def test_the_database_refuses_a_second_unresolved_attempt(rt: Runtime, gateway: Sandbox) -> None:
    """At most one attempt per invoice whose outcome is unknown, whatever the code does."""
    (invoice_id,) = _due(rt, gateway, ["timeout_after_charge"])
    (call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    with pytest.raises(IntegrityError), rt.sessions() as session, session.begin():
        first = session.get(ChargeAttempt, call.attempt_id)
        assert first is not None
        session.add(
            ChargeAttempt(
                invoice_id=invoice_id,
                card_token_id=first.card_token_id,
                order_id="SECOND",
                amount_minor=first.amount_minor,
                currency=first.currency,
                status=AttemptStatus.IN_FLIGHT.value,
                created_at=first.created_at,
                created_wall_at=first.created_wall_at,
                updated_at=first.updated_at,
            )
        )


def test_two_workers_recording_one_attempt_raise_no_false_duplicate(
    rt: Runtime, gateway: Sandbox
) -> None:
    """One payment, one record: when two workers (a lost lock) both verify and record the same
    attempt, the second finds it settled and leaves it; no duplicate-payment alert, whose
    runbook advice would refund the only payment."""
    (invoice_id,) = _due(rt, gateway, ["success"])
    (call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    outcome = charging._charge(rt, call, charging._Run())
    first, second = charging.CollectionReport(), charging.CollectionReport()
    charging._record(rt, [(call, outcome)], first)
    charging._record(rt, [(call, outcome)], second)
    assert (first.results[invoice_id], second.results[invoice_id]) == ("paid", "already_settled")
    assert _events(rt, "alert.duplicate_payment") == []
    assert len(_events(rt, "invoice.paid")) == 1


def test_the_lock_survives_an_idle_in_transaction_timeout(
    pg_url: str, clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """One worker per invoice: on a server that ends transactions idle for 300 ms (common on
    managed PostgreSQL), the lock held across a slow gateway call is not lost."""
    engine = make_engine(
        pg_url, connect_args={"options": "-c idle_in_transaction_session_timeout=300"}
    )
    try:
        locker = PostgresAdvisoryLocker(engine)
        other = PostgresAdvisoryLocker(clean_db)
        with locker.hold([4242]) as held:
            assert held.ids == [4242]
            time.sleep(1.0)  # a gateway call
            assert held.check()
            with other.hold([4242]) as second:
                assert second.ids == []  # still locked: the second worker stays out
    finally:
        engine.dispose()


def test_a_lost_lock_stops_the_calls_not_yet_sent(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """Exactly once: when the lock connection dies mid-batch, no further request is sent under
    it; what was not sent is retried later, each invoice charged exactly once."""
    sandbox = Sandbox(now=lambda: START)
    rt = _with_transport(
        make_runtime(clean_db, sandbox, clock, vault), SlowTransport(sandbox, 0.25)
    )
    rt.charge_concurrency = 1
    invoice_ids = _due(rt, sandbox, ["success"] * 8)
    killer = threading.Thread(target=_kill_lock_connection, args=(clean_db, 0.8))
    killer.start()
    report = collect_invoices(rt, invoice_ids)
    killer.join()
    assert report.stopped == "invoice lock lost"
    assert "not_sent" in report.results.values()
    for _ in range(2):
        collect_invoices(rt, invoice_ids)
    for invoice_id in invoice_ids:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def _kill_lock_connection(engine: Engine, after_s: float) -> None:
    time.sleep(after_s)
    with engine.begin() as conn:
        killed = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND query LIKE '%pg_try_advisory_xact_lock%'"
            )
        ).all()
    assert killed, "no lock connection found"


# -- 4. no silent loops ----------------------------------------------------------------------


def test_a_token_that_cannot_be_read_is_an_internal_failure_with_an_alert(
    clean_db: Engine, gateway: Sandbox, clock: FixedClock, vault: TokenVault
) -> None:
    """A failure before any request is sent charges nothing and raises an alert, repeated daily
    while it lasts; it does not loop every few hours, and the customer is not dunned."""
    rt = make_runtime(clean_db, gateway, clock, vault)
    (invoice_id,) = _due(rt, gateway, ["success"])
    rt.with_vault(TokenVault(new_key()))  # a key-rotation mistake: the old key is gone
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "internal_error"
    invoice = invoice_of(rt, invoice_id)
    assert invoice.next_attempt_at == clock.now() + charging.INTERNAL_RETRY
    assert invoice.failure_count == 0
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "not_due"
    assert len(_events(rt, "alert.charge_internal_error")) == 1
    clock.advance(charging.INTERNAL_RETRY)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "internal_error"
    assert len(_events(rt, "alert.charge_internal_error")) == 2  # one a day
    assert gateway.charges() == []


def test_a_card_whose_collect_always_fails_is_retried_a_bounded_number_of_times(
    rt: Runtime, gateway: Sandbox, clock: FixedClock
) -> None:
    """No endless quiet loop: a collect that always answers 5xx is retried fast a few times,
    then every six hours with one alert; the customer is not dunned for our failures."""
    (invoice_id,) = _due(rt, gateway, ["server_error_always"])
    for _ in range(14):  # the retry sweep, every ten minutes for over two hours
        collect_invoices(rt, [invoice_id])
        age_attempts(rt, SEND_WINDOW + rt.unknown_grace)  # verify's 'not found' is final now
        clock.advance(timedelta(minutes=10))
    assert len(attempts_of(rt, invoice_id)) == 5  # the fast retries, then nothing for hours
    invoice = invoice_of(rt, invoice_id)
    assert invoice.failure_count == 0
    assert invoice.next_attempt_at is not None
    assert invoice.next_attempt_at - clock.now() > timedelta(hours=5)
    assert len(_events(rt, "alert.collection_stalled")) == 1
    assert gateway.charges() == []
