"""How a batch's gateway calls and its records interleave, on real PostgreSQL and the sandbox.

Collection records outcomes while later calls are still under way. These tests pin down what
that must never cost: a failure while recording lets no call outlive its invoice lock and loses
no charge, and one slow call does not hold back the record of the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine, select

from billing.attempts import SEND_WINDOW
from billing.clock import FixedClock
from billing.crypto import TokenVault
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.lifecycle import InvoiceStatus
from billing.models import ChargeAttempt
from billing.runtime import Runtime
from billing.services import charging
from billing.services.charging import collect_invoices
from tests.factories import (
    age_attempts,
    invoice_of,
    invoice_prefix,
    renew,
    seed_plans,
    subscriber,
    successful_charges,
)
from tests.integration.conftest import make_runtime


class SlowTransport(SandboxTransport):
    """The sandbox, answering every call after ``latency_ms``; a call whose body names
    ``held_marker`` is held until ``release`` is set."""

    def __init__(self, sandbox: Sandbox, latency_ms: float, held_marker: bytes = b"") -> None:
        super().__init__(sandbox, latency_ms=latency_ms)
        self.held_marker = held_marker
        self.release = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.held_marker and self.held_marker in request.read():
            assert self.release.wait(30), "the held call was never released"
        return super().handle_request(request)


def _runtime(
    engine: Engine,
    sandbox: Sandbox,
    clock: FixedClock,
    vault: TokenVault,
    transport: httpx.BaseTransport,
    concurrency: int,
) -> Runtime:
    rt = make_runtime(engine, sandbox, clock, vault)
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1", sandbox.api_key, mode="test", timeout_s=5, transport=transport
    )
    rt.charge_concurrency = concurrency
    return rt


@pytest.fixture()
def due(
    clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault
) -> Iterator[tuple[Engine, list[int]]]:
    """Twelve open invoices, each with a card that pays."""
    rt = make_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    for i in range(12):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    yield clean_db, renew(rt)


def test_a_failure_while_recording_leaves_no_call_running_and_loses_no_charge(
    due: tuple[Engine, list[int]],
    sandbox: Sandbox,
    clock: FixedClock,
    vault: TokenVault,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never lose the record of a charge; never charge twice. The database fails when the first
    answers are to be recorded: collection stops only after every call already under way has
    ended (no invoice lock is let go mid-call), calls not begun are dropped, and later runs
    recover every charge the gateway took from verify, charging each invoice exactly once."""
    engine, invoice_ids = due
    rt = _runtime(engine, sandbox, clock, vault, SlowTransport(sandbox, latency_ms=150), 4)
    recorded: list[int] = []

    def database_gone(rt: Runtime, results: list[object], report: object) -> None:
        recorded.append(len(results))
        raise RuntimeError("the database went away")

    with monkeypatch.context() as patch:
        patch.setattr(charging, "_record", database_gone)
        with pytest.raises(RuntimeError, match="went away"):
            collect_invoices(rt, invoice_ids)
        taken = {str(c["order_id"]) for c in sandbox.charges()}
        time.sleep(0.3)
        # Nothing was still on its way to the gateway when the invoices were let go.
        assert {str(c["order_id"]) for c in sandbox.charges()} == taken
    assert len(recorded) == 1
    # The calls under way ran to their end; the last round never began.
    assert len(taken) < len(invoice_ids)
    # What could not be recorded is not forgotten: the attempts the gateway accepted are marked
    # so, and a later 'not found' will never be read as 'never charged' for them.
    with rt.sessions() as session:
        marked = set(
            session.execute(
                select(ChargeAttempt.order_id).where(ChargeAttempt.call_ending == "accepted")
            ).scalars()
        )
    assert marked == taken

    # Let real time pass for the dropped ones: the send window, then the grace period.
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    for _ in range(3):
        collect_invoices(rt, invoice_ids)
        clock.advance(timedelta(minutes=1))  # past the quick retries' backoff
    for invoice_id in invoice_ids:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_one_slow_call_does_not_hold_back_the_record_of_the_others(
    due: tuple[Engine, list[int]], sandbox: Sandbox, clock: FixedClock, vault: TokenVault
) -> None:
    """The sooner a taken charge is on record, the less a crash can leave unknown: answers are
    recorded while a slow call of the same batch is still waiting for the gateway."""
    engine, invoice_ids = due
    slow = invoice_ids[0]
    marker = invoice_prefix(make_runtime(engine, sandbox, clock, vault), slow).encode()
    transport = SlowTransport(sandbox, 10, held_marker=marker)
    rt = _runtime(engine, sandbox, clock, vault, transport, len(invoice_ids))
    failures: list[BaseException] = []

    def collect() -> None:
        try:
            collect_invoices(rt, invoice_ids)
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    worker = threading.Thread(target=collect)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        others_paid = False
        while time.monotonic() < deadline and not others_paid:
            others_paid = all(
                invoice_of(rt, i).status == InvoiceStatus.PAID.value for i in invoice_ids[1:]
            )
            time.sleep(0.05)
        assert others_paid
        assert invoice_of(rt, slow).status == InvoiceStatus.OPEN.value  # its call still waits
    finally:
        transport.release.set()
        worker.join(30)
    assert not worker.is_alive() and failures == []
    assert invoice_of(rt, slow).status == InvoiceStatus.PAID.value
    for invoice_id in invoice_ids:
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1
