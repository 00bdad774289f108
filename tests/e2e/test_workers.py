"""End to end: real Celery worker processes on real Redis and PostgreSQL, against the sandbox
served over HTTP. Each test checks exactly-once against the sandbox's own list of charges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select

from billing.attempts import SEND_WINDOW, order_prefix
from billing.clock import DatabaseClock
from billing.crypto import TokenVault
from billing.db import session_factory
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, ServerHandle, start_server_in_thread
from billing.lifecycle import InvoiceStatus
from billing.locks import PostgresAdvisoryLocker
from billing.models import CardToken, ChargeAttempt, Event, Invoice, Subscription
from billing.runtime import Runtime
from billing.services import control
from schedules.renewal import run_renewal_pass
from schedules.sweeps import due_retries, run_janitor
from tests.factories import age_attempts, seed_plans, subscriber

pytestmark = pytest.mark.e2e

REDIS_URL = os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parents[2]
START = datetime(2027, 1, 31, 7, 0, tzinfo=UTC)
GRACE_S = 2.0


@pytest.fixture()
def broker() -> Iterator[Celery]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL}: {exc}. Start it (see .ci/run).", pytrace=False
        )
    client.flushdb()
    app = Celery("e2e-client", broker=REDIS_URL)
    app.conf.task_serializer = "json"
    yield app
    client.flushdb()


@pytest.fixture()
def gateway_server() -> Iterator[ServerHandle]:
    sandbox = Sandbox(now=lambda: START)
    with start_server_in_thread(sandbox, latency_ms=20, hang_s=3.0) as handle:
        yield handle


@pytest.fixture()
def token_key() -> str:
    from billing.crypto import new_key

    return new_key()


class Workers:
    """Starts and kills real ``celery worker`` processes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, concurrency: int = 2) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "-Q",
                "charges",
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--loglevel=WARNING",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children: no chance to finish anything."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def workers(
    pg_url: str,
    gateway_server: ServerHandle,
    token_key: str,
    broker: Celery,
) -> Iterator[Workers]:
    env = {
        **os.environ,
        "BILLING_MODE": "test",
        "BILLING_DATABASE_URL": pg_url,
        "BILLING_BROKER_URL": REDIS_URL,
        "BILLING_TOKEN_KEY": token_key,
        "BILLING_UNKNOWN_GRACE_S": str(GRACE_S),
        "BILLING_CHARGE_BATCH_SIZE": "10",
        "BILLING_METRICS_PORT": "0",  # several workers on one host: none serves /metrics
        "FATORA_BASE_URL": gateway_server.url.rstrip("/") + "/v1",
        "FATORA_MODE": "test",
        "FATORA_TIMEOUT_S": "1",
    }
    pool = Workers(env)
    yield pool
    pool.stop_all()


def _runtime(engine: Engine, server: ServerHandle, key: str) -> Runtime:
    gateway = FatoraClient(
        server.url.rstrip("/") + "/v1", server.sandbox.api_key, mode="test", timeout_s=1
    )
    rt = Runtime(
        engine=engine,
        sessions=session_factory(engine),
        clock=DatabaseClock(engine),
        gateway=gateway,
        locker=PostgresAdvisoryLocker(engine),
        live_gateway=False,
        unknown_grace=timedelta(seconds=GRACE_S),
        charge_batch_size=10,
    )
    return rt.with_vault(TokenVault(key))


def _send(broker: Celery, invoice_ids: list[int], size: int = 10) -> None:
    for i in range(0, len(invoice_ids), size):
        broker.send_task(
            "billing.charge_invoices", args=[invoice_ids[i : i + size]], queue="charges"
        )


def _settle_everything(rt: Runtime, broker: Celery, deadline_s: float = 90.0) -> None:
    """Drive retries and the janitor until no invoice is open (as beat would, faster): each
    round, a minute passes on the test clock, so that quick retries' backoffs run out."""
    clock = DatabaseClock(rt.engine)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        clock.set(clock.now() + timedelta(minutes=1))
        with rt.sessions() as session:
            open_count = len(
                session.execute(
                    select(Invoice.id).where(Invoice.status == InvoiceStatus.OPEN.value)
                ).all()
            )
        if open_count == 0:
            return
        time.sleep(1.0)
        settled = run_janitor(rt, everything=True)
        # As the janitor task does: invoices found never charged are charged again.
        _send(broker, sorted(set(due_retries(rt)) | set(settled.retry_in)))
    with rt.sessions() as session:
        paused = control.collection_paused(session)
        kinds = Counter(
            f"{a.status}/{a.classification}"
            for a in session.execute(select(ChargeAttempt)).scalars()
        )
    raise AssertionError(
        f"{open_count} invoice(s) still open after {deadline_s} s "
        f"(collection paused: {paused}; attempts: {dict(kinds)})"
    )


def _wait_until_idle(rt: Runtime, broker: Celery, deadline_s: float = 30.0) -> None:
    """No charge task queued and no attempt in flight: every worker has recorded its answers."""
    client = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with rt.sessions() as session:
            in_flight = session.execute(
                select(ChargeAttempt.id).where(ChargeAttempt.status == "in_flight")
            ).first()
        if in_flight is None and client.llen("charges") == 0:
            time.sleep(1.0)  # a task just taken may not have written its attempt yet
            with rt.sessions() as session:
                again = session.execute(
                    select(ChargeAttempt.id).where(ChargeAttempt.status == "in_flight")
                ).first()
            if again is None:
                return
        time.sleep(0.2)
    raise AssertionError("the workers did not settle down")


def _assert_exactly_once(rt: Runtime, sandbox: Sandbox) -> int:
    """Every invoice paid by exactly one charge, and every charge taken is on record."""
    with rt.sessions() as session:
        invoices = list(session.execute(select(Invoice)).scalars())
        succeeded = {
            a.order_id: a
            for a in session.execute(
                select(ChargeAttempt).where(ChargeAttempt.status == "succeeded")
            ).scalars()
        }
    taken = [c for c in sandbox.charges() if c["status"] == "SUCCESS"]
    per_invoice = Counter(str(c["order_id"]).rsplit("-", 1)[0] for c in taken)
    assert all(i.status == InvoiceStatus.PAID.value for i in invoices)
    assert {order_prefix(i.subscription_id, i.period_start)[:-1] for i in invoices} == set(
        per_invoice
    )
    assert max(per_invoice.values()) == 1, "an invoice was charged twice"
    assert {str(c["order_id"]) for c in taken} == set(succeeded), "a charge is not on record"
    return len(invoices)


def test_many_subscriptions_over_several_periods_with_every_task_delivered_twice(
    clean_db: Engine,
    gateway_server: ServerHandle,
    workers: Workers,
    broker: Celery,
    token_key: str,
) -> None:
    """Invariant: one successful charge per invoice, every charge recorded, over three periods,
    with faults (timeouts after charging, 5xx, PENDING) and every charge task sent twice."""
    rt = _runtime(clean_db, gateway_server, token_key)
    clock = DatabaseClock(clean_db)
    clock.set(START)
    seed_plans(rt)
    sandbox = gateway_server.sandbox
    behaviours = [
        "success",
        "timeout_after_charge",
        "server_error_before_charge",
        "pending_then_success",
    ]
    for i in range(24):
        subscriber(rt, sandbox, [behaviours[i % len(behaviours)]], name=f"c{i}")
    workers.start("w1")
    workers.start("w2")
    for month in range(3):
        clock.set(START + timedelta(days=31 * month))
        ids = run_renewal_pass(rt).invoice_ids
        assert len(ids) == 24
        _send(broker, ids)
        _send(broker, ids)  # every task delivered twice
        _settle_everything(rt, broker)
    assert _assert_exactly_once(rt, sandbox) == 72


def test_worker_killed_mid_charges_loses_and_doubles_nothing(
    clean_db: Engine,
    gateway_server: ServerHandle,
    workers: Workers,
    broker: Celery,
    token_key: str,
) -> None:
    """Invariant: a worker SIGKILLed in the middle of charges neither loses a charge nor lets
    another worker charge an invoice twice; the survivors settle everything with verify."""
    rt = _runtime(clean_db, gateway_server, token_key)
    clock = DatabaseClock(clean_db)
    clock.set(START)
    seed_plans(rt)
    sandbox = gateway_server.sandbox
    for i in range(60):
        subscriber(rt, sandbox, ["timeout_after_charge" if i % 5 == 0 else "success"], name=f"k{i}")
    ids = run_renewal_pass(rt).invoice_ids
    victim = workers.start("victim", concurrency=2)
    _send(broker, ids)
    deadline = time.monotonic() + 60
    while not sandbox.charges() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    workers.kill(victim)
    # The dead worker cannot say when it sent its requests: each may have left up to the end of
    # the send window. Let that much real time pass (the grace after it is the test's own).
    age_attempts(rt, SEND_WINDOW)
    taken_at_kill = len(sandbox.charges())
    assert 0 < taken_at_kill < len(ids), "the kill should land in the middle of the charges"
    workers.start("survivor")
    # Invoices the dead worker held come back once their in-flight lease is over.
    clock.set(START + timedelta(minutes=20))
    _send(broker, due_retries(rt))
    _settle_everything(rt, broker)
    assert _assert_exactly_once(rt, sandbox) == 60


def _billing(env: dict[str, str], *args: str, timeout_s: float = 120.0) -> dict[str, object]:
    """Run the ``billing`` command line as an operator would; its ``--json`` answer."""
    done = subprocess.run(
        [sys.executable, "-m", "billing.cli", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_the_command_line_drives_a_billing_day_against_real_workers(
    clean_db: Engine,
    gateway_server: ServerHandle,
    workers: Workers,
    broker: Celery,
    token_key: str,
) -> None:
    """Invariant, driven only through ``billing tick --now --wait`` and ``billing reconcile``
    with real workers on Redis: each invoice paid at most once and every charge on record;
    ``--wait`` returns with every queued charge settled (paid, declined, pending or queued for
    a retry), and after reconcile nothing is left unknown."""
    rt = _runtime(clean_db, gateway_server, token_key)
    DatabaseClock(clean_db).set(START - timedelta(hours=1))
    seed_plans(rt)
    sandbox = gateway_server.sandbox
    behaviours = [
        "success",
        "timeout_after_charge",
        "server_error_before_charge",
        "pending_then_success",
        "insufficient_funds",
    ]
    for i in range(10):
        subscriber(rt, sandbox, [behaviours[i % len(behaviours)]], name=f"cli{i}", start=START)
    workers.start("cli")

    ticked = _billing(workers.env, "tick", "--now", START.isoformat(), "--wait", "--timeout", "60")
    assert ticked["invoices_created"] == 10
    outcomes = ticked["outcomes"]
    assert isinstance(outcomes, dict)
    assert sum(outcomes.values()) == 10, outcomes
    assert outcomes.get("paid", 0) >= 4, outcomes  # success, and timeout_after_charge via verify
    assert outcomes.get("soft_declined") == 2, outcomes
    assert not any(word.startswith("not settled") for word in outcomes), outcomes
    assert DatabaseClock(clean_db).now() == START  # the workers ran as of --now

    # The 5xx before charging is unknown until reconcile finds it never charged once the grace
    # has passed; reconcile then queues it again. PENDING payments are settled by reconcile too,
    # run until it has nothing left.
    deadline = time.monotonic() + 60
    unresolved: object = None
    minutes = 0
    while time.monotonic() < deadline:
        minutes += 1  # as beat would, a minute later: quick retries whose backoff has passed
        _billing(workers.env, "tick", "--now", (START + timedelta(minutes=minutes)).isoformat())
        reconciled = _billing(workers.env, "reconcile")
        unresolved = reconciled["still_unresolved"]
        with rt.sessions() as session:
            open_ids = [
                i.id
                for i in session.execute(select(Invoice)).scalars()
                if i.status == InvoiceStatus.OPEN.value and i.failure_count == 0
            ]
        if not unresolved and not open_ids:
            break
        time.sleep(0.5)
    assert not unresolved
    with rt.sessions() as session:
        left = session.execute(
            select(ChargeAttempt).where(
                ChargeAttempt.status.in_(["in_flight", "unknown", "pending"])
            )
        ).all()
        invoices = list(session.execute(select(Invoice)).scalars())
    assert left == []
    taken = [c for c in sandbox.charges() if c["status"] == "SUCCESS"]
    per_invoice = Counter(str(c["order_id"]).rsplit("-", 1)[0] for c in taken)
    assert max(per_invoice.values()) == 1, "an invoice was charged twice"
    assert len(invoices) == 10
    paid = {
        order_prefix(i.subscription_id, i.period_start)[:-1]
        for i in invoices
        if i.status == InvoiceStatus.PAID.value
    }
    assert len(paid) == 8  # everything but the two declines
    assert paid <= set(per_invoice)
    with rt.sessions() as session:
        on_record = set(
            session.execute(
                select(ChargeAttempt.order_id).where(ChargeAttempt.status == "succeeded")
            ).scalars()
        )
    assert {str(c["order_id"]) for c in taken} == on_record, "a charge is not on record"


def test_ambiguous_answers_and_a_broken_route_charge_every_card_exactly_once(
    clean_db: Engine,
    gateway_server: ServerHandle,
    workers: Workers,
    broker: Celery,
    token_key: str,
) -> None:
    """Invariant, with real workers on Redis and PostgreSQL: against a gateway whose edge
    answers HTML 504s for charges that land later, holds requests, lags on verify, accepts in
    shapes nobody documented, says PROCESSING or ERROR after taking the money, and whose
    collect route is broken for a while: every card is charged exactly once per period, every
    charge is recorded as a paid invoice, and no card dies and no customer is dunned for a
    failure that was not theirs."""
    rt = _runtime(clean_db, gateway_server, token_key)
    clock = DatabaseClock(clean_db)
    clock.set(START)
    seed_plans(rt)
    sandbox = gateway_server.sandbox
    behaviours = [
        "edge_504_lands_later",
        "timeout_lands_later",
        "verify_lags",
        "approved_shape",
        "processing",
        "error_envelope_after_charge",
        "success",
    ]
    for i in range(14):
        subscriber(rt, sandbox, [behaviours[i % len(behaviours)]], name=f"a{i}")
    workers.start("w1")
    workers.start("w2")
    for month in range(2):
        clock.set(START + timedelta(days=31 * month))
        ids = run_renewal_pass(rt).invoice_ids
        assert len(ids) == 14
        if month == 0:
            sandbox.broken_routes = {"collect-payment"}  # a wrong route, for a while
            _send(broker, ids)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with rt.sessions() as session:
                    if control.collection_paused(session) is not None:
                        break
                time.sleep(0.2)
            sandbox.broken_routes = set()
            _wait_until_idle(rt, broker)  # answers from the broken route are all recorded
            with rt.sessions() as session, session.begin():
                assert control.resume_collection(session, clock.now())
        _send(broker, ids)
        _send(broker, ids)  # and delivered twice
        _settle_everything(rt, broker)
    assert _assert_exactly_once(rt, sandbox) == 28
    with rt.sessions() as session:
        cards = list(session.execute(select(CardToken.status)).scalars())
        failed = session.execute(
            select(Event.id).where(
                Event.kind.in_(["invoice.payment_failed", "alert.duplicate_payment"])
            )
        ).all()
        subs = list(session.execute(select(Subscription.status)).scalars())
    assert set(cards) == {"active"}
    assert failed == []
    assert set(subs) == {"active"}
