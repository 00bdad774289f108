"""Thin Celery tasks: ids in, a billing service call, a summary out.

Arguments are ids only, passed by name (Flower shows ``{'invoice_ids': [1, 2]}``), and results
are small JSON dicts of ids, counts and outcome words: an operator reads in Flower's task list
which invoices a task took and what came of each. Nothing here decides anything about money.
Every task is safe to run twice: the services lock and check state before acting.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from celery.result import AsyncResult

from billing.runtime import get_runtime
from billing.services.charging import CollectionReport, collect_invoices
from schedules.renewal import run_renewal_pass
from schedules.sweeps import due_retries, run_janitor
from workers.app import app

log = logging.getLogger("billing.tasks")


def enqueue_charges(
    invoice_ids: Sequence[int], *, countdown: float | None = None
) -> list[AsyncResult]:
    """Queue charge tasks in batches. Call only after the commit that created the invoices."""
    size = get_runtime().charge_batch_size
    ids = sorted(set(invoice_ids))
    return [
        charge_invoices.apply_async(kwargs={"invoice_ids": ids[i : i + size]}, countdown=countdown)
        for i in range(0, len(ids), size)
    ]


@app.task(name="billing.charge_invoices", ignore_result=False)
def charge_invoices(invoice_ids: list[int]) -> dict[str, Any]:
    report = collect_invoices(get_runtime(), invoice_ids)
    enqueue_retries(report.retry_in)
    return charge_summary(invoice_ids, report)


def charge_summary(invoice_ids: Sequence[int], report: CollectionReport) -> dict[str, Any]:
    """A charge task's result: its invoices, how many came to each outcome (``paid``,
    ``soft_declined``, ``unknown``...), then each invoice's outcome (``results``, which
    ``billing tick --wait`` counts) and the quick retries queued (``retry_in``)."""
    counts = Counter(report.results.values())
    return {
        "invoices": sorted(set(invoice_ids)),
        **dict(sorted(counts.items())),
        **report.as_dict(),
    }


def enqueue_retries(retry_in: dict[int, float]) -> None:
    """Quick retries of transient faults: grouped by delay so a batch stays a batch."""
    by_delay: dict[float, list[int]] = defaultdict(list)
    for invoice_id, delay in retry_in.items():
        # Rounded up: a task that came early would find the invoice not due yet.
        by_delay[math.ceil(delay * 10) / 10].append(invoice_id)
    for delay, ids in by_delay.items():
        enqueue_charges(ids, countdown=delay)


@app.task(name="billing.renew", ignore_result=True)
def renew() -> dict[str, Any]:
    tasks: list[AsyncResult] = []
    # Each batch's charges are queued as soon as it has committed.
    report = run_renewal_pass(
        get_runtime(), on_batch=lambda batch: tasks.extend(enqueue_charges(batch.invoice_ids))
    )
    return {
        "claimed": report.claimed,
        "invoices": sorted(report.invoice_ids),  # created, and queued for a charge
        "charge_tasks": len(tasks),
        "quarantined": len(report.quarantined),
    }


@app.task(name="billing.retry_due", ignore_result=True)
def retry_due() -> dict[str, Any]:
    ids = due_retries(get_runtime())
    tasks = enqueue_charges(ids)
    return {"invoices": sorted(ids), "charge_tasks": len(tasks)}


@app.task(name="billing.janitor", ignore_result=True)
def janitor() -> dict[str, Any]:
    report = run_janitor(get_runtime())
    enqueue_retries(report.retry_in)  # invoices verify showed were never charged
    return {
        "settled": {str(k): v for k, v in sorted(report.settled.items())},  # invoice: outcome
        "requeued": sorted(report.retry_in),  # invoices queued for a new charge
        "unresolved": len(report.still_unresolved),  # attempts verify could not settle yet
        "alerted": len(report.alerted),
    }


@app.task(name="billing.token_expiry_sweep", ignore_result=True)
def token_expiry_sweep() -> dict[str, int]:
    from billing.services.cards import sweep_expiring_tokens

    return {"card_expiring_notices": sweep_expiring_tokens(get_runtime())}


@app.task(name="billing.deactivate_unneeded_tokens", ignore_result=True)
def deactivate_unneeded_tokens() -> dict[str, int]:
    """Deactivate at Fatora the tokens of customers whose subscriptions have all ended."""
    from dataclasses import asdict

    from billing.services.cards import deactivate_unneeded_tokens as sweep

    return asdict(sweep(get_runtime()))


@app.task(name="billing.deliver_events", ignore_result=True)
def deliver_events() -> dict[str, int]:
    """Deliver the outbox (queue ``notifications``): no arguments, so no secret or address is
    ever one; the channels come from the settings of the worker."""
    from billing.services.notifications import channels_from_settings, deliver_due

    with channels_from_settings() as channels:
        return deliver_due(get_runtime(), channels).as_dict()


@app.task(name="billing.noop", ignore_result=False)
def noop() -> None:
    """Does nothing: the benchmark's measure of Celery's own cost per task."""
