"""An operator's hand on one invoice (real PostgreSQL): retry now, or void; never over a charge
whose outcome is unknown."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus
from billing.runtime import Runtime
from billing.services import charging
from billing.services.charging import collect_invoices
from billing.services.errors import BillingError
from billing.services.invoices import retry_now, void
from tests.factories import invoice_of, renew, seed_plans, subscriber, successful_charges


def _one(rt: Runtime, sandbox: Sandbox, behaviour: str) -> int:
    seed_plans(rt)
    subscriber(rt, sandbox, [behaviour])
    (invoice_id,) = renew(rt)
    return invoice_id


def test_retry_brings_a_dunning_step_forward(rt: Runtime, sandbox: Sandbox) -> None:
    """A customer who topped up their card is charged at once when the operator asks."""
    invoice_id = _one(rt, sandbox, "insufficient_funds")
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "soft_declined"
    with rt.sessions() as session, session.begin():
        retry_now(session, invoice_id, rt.clock.now())
    assert invoice_of(rt, invoice_id).next_attempt_at == rt.clock.now()
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "soft_declined"


def test_void_writes_an_invoice_off_and_nothing_charges_it(rt: Runtime, sandbox: Sandbox) -> None:
    """A voided invoice is never charged, by a retry or by the sweep."""
    invoice_id = _one(rt, sandbox, "success")
    with rt.sessions() as session, session.begin():
        void(session, invoice_id, rt.clock.now())
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == InvoiceStatus.VOID.value
    assert successful_charges(rt, sandbox, invoice_id) == []


@pytest.mark.parametrize("action", [retry_now, void])
def test_nothing_is_done_over_a_charge_whose_outcome_is_unknown(
    clean_db: Engine, rt: Runtime, sandbox: Sandbox, action: object
) -> None:
    """Exactly once, and no charge hidden: while an attempt may have landed, the operator can
    neither void the invoice (hiding a payment) nor queue another charge."""
    invoice_id = _one(rt, sandbox, "timeout_after_charge")
    charging._start_attempts(rt, [invoice_id], charging.CollectionReport())  # in flight
    with (
        pytest.raises(BillingError, match="not known yet"),
        rt.sessions() as session,
        session.begin(),
    ):
        action(session, invoice_id, rt.clock.now())  # type: ignore[operator]
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.OPEN.value
