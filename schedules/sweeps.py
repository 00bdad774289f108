"""Periodic sweeps besides renewal: due retries, and the janitor for unresolved charges.

* Due retries: open invoices whose ``next_attempt_at`` has passed (dunning steps, quick retries
  whose task was lost, invoices freed after a worker died, quarantined invoices whose retry time
  has come) are handed to the charge task again.
* The janitor verifies attempts left unknown or PENDING on a backoff schedule (5 minutes, 1 hour,
  6 hours, then daily) and raises an alert for any still unresolved past ``ALERT_AFTER``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from billing import metrics
from billing.attempts import UNRESOLVED_VALUES
from billing.lifecycle import InvoiceStatus
from billing.models import ChargeAttempt, Event, Invoice
from billing.runtime import Runtime
from billing.services.charging import (
    CLOSED_CHECKOUT_WATCHED,
    CollectionReport,
    collect_invoices,
)
from billing.services.events import record_event

log = logging.getLogger("billing.janitor")

ALERT_AFTER = timedelta(days=3)
SWEEP_LIMIT = 5000


def due_retries(rt: Runtime, *, now: datetime | None = None, limit: int = SWEEP_LIMIT) -> list[int]:
    """Open invoices due for a collection attempt (the charge task decides the rest).

    A quarantined invoice is skipped until its retry time. Quarantine also moves its
    ``next_attempt_at`` to that time, so the scan over ``ix_invoices_collectable`` does not meet
    it before; the condition here holds even if something else moved it back.
    """
    with rt.sessions() as session:
        at = now or rt.clock.now()
        rows = session.execute(
            select(Invoice.id)
            .where(
                Invoice.next_attempt_at.is_not(None),
                Invoice.next_attempt_at <= at,
                Invoice.status == InvoiceStatus.OPEN.value,
                or_(Invoice.quarantine_retry_at.is_(None), Invoice.quarantine_retry_at <= at),
            )
            .order_by(Invoice.next_attempt_at)
            .limit(limit)
        ).scalars()
        return list(rows)


@dataclass
class JanitorReport:
    settled: dict[int, str] = field(default_factory=dict)
    # Invoices found never charged, to be charged again after this many seconds.
    retry_in: dict[int, float] = field(default_factory=dict)
    still_unresolved: list[int] = field(default_factory=list)
    alerted: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # invoices whose chunk raised


def run_janitor(
    rt: Runtime, *, everything: bool = False, now: datetime | None = None
) -> JanitorReport:
    """Verify unresolved attempts that are due for it (or all of them, with ``everything``)."""
    at = now or rt.clock.now()
    with rt.sessions() as session:
        query = select(ChargeAttempt.invoice_id).where(
            or_(
                ChargeAttempt.status.in_(UNRESOLVED_VALUES),
                CLOSED_CHECKOUT_WATCHED,  # a closed hosted page may still be paid late
            )
        )
        if not everything:
            query = query.where(ChargeAttempt.next_verify_at <= at)
        invoice_ids = sorted(set(session.execute(query.limit(SWEEP_LIMIT)).scalars()))
    report = JanitorReport()
    try:
        for start in range(0, len(invoice_ids), rt.charge_batch_size):
            chunk = invoice_ids[start : start + rt.charge_batch_size]
            try:
                collection: CollectionReport = collect_invoices(rt, chunk, settle_only=True)
            except Exception:
                # One chunk that cannot be recorded must not keep the others unverified: it
                # stays unresolved (and is alerted on below once it is stale).
                log.exception("janitor: invoices %s could not be settled", chunk)
                report.failed.extend(chunk)
                continue
            report.settled.update(collection.results)
            report.retry_in.update(collection.retry_in)
    finally:
        _alert_stale(rt, at, report)
        metrics.janitor_finished(report)
    if report.failed:
        raise JanitorIncomplete(f"{len(report.failed)} invoice(s) could not be settled")
    return report


class JanitorIncomplete(RuntimeError):
    """Some chunks failed (logged); the others were settled and stale attempts alerted."""


def _alert_stale(rt: Runtime, now: datetime, report: JanitorReport) -> None:
    with rt.sessions() as session, session.begin():
        stale = session.execute(
            select(ChargeAttempt).where(
                ChargeAttempt.status.in_(UNRESOLVED_VALUES),
                ChargeAttempt.created_at <= now - ALERT_AFTER,
            )
        ).scalars()
        alerted_now: set[int] = set()  # recorded events are not readable before the commit
        for attempt in stale:
            report.still_unresolved.append(attempt.id)
            already = (
                attempt.invoice_id in alerted_now
                or session.execute(
                    select(Event.id).where(
                        Event.kind == "alert.attempt_unresolved",
                        Event.invoice_id == attempt.invoice_id,
                    )
                ).first()
                is not None
            )
            if not already:
                alerted_now.add(attempt.invoice_id)
                invoice = session.get(Invoice, attempt.invoice_id)
                record_event(
                    session,
                    "alert.attempt_unresolved",
                    invoice=invoice,
                    now=now,
                    payload={
                        "attempt_id": attempt.id,
                        "order_id": attempt.order_id,
                        "status": attempt.status,
                    },
                )
                report.alerted.append(attempt.id)
