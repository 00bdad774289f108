"""One scheduler pass and one reconciliation pass, as the command line runs them.

``tick`` renews what is due and queues the charges (plus due retries) exactly as beat's tasks
do. With ``now`` (test mode only) it first sets the test clock to that moment, so that the
workers charging what it queues see the same time. With ``wait`` it follows the queued charge
tasks until each has settled: paid, declined and scheduled for retry, or left unknown for the
janitor.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from billing.clock import DatabaseClock, TestClockRefused
from billing.config import BillingMode, get_settings
from billing.runtime import get_runtime

if TYPE_CHECKING:
    from celery.result import AsyncResult


def tick(
    *, now: datetime | None = None, wait: bool = False, timeout: float = 300.0
) -> dict[str, Any]:
    from schedules.renewal import run_renewal_pass
    from schedules.sweeps import due_retries
    from workers.tasks import enqueue_charges

    if now is not None and get_settings().mode is not BillingMode.TEST:
        raise TestClockRefused("--now is refused in live mode (set BILLING_MODE=test)")
    rt = get_runtime()
    if now is not None:
        # The whole system runs as of that moment: the workers that charge what this pass
        # queues, the retries and the janitor all read the same test clock.
        DatabaseClock(rt.engine).set(now)
    renewal = run_renewal_pass(rt, now=now)
    retries = [i for i in due_retries(rt, now=now) if i not in set(renewal.invoice_ids)]
    pending = enqueue_charges(renewal.invoice_ids + retries)
    result: dict[str, Any] = {
        "claimed": renewal.claimed,
        "invoices_created": len(renewal.invoice_ids),
        "canceled_at_period_end": len(renewal.canceled),
        "quarantined": len(renewal.quarantined),
        "released": len(renewal.released),
        "retries_queued": len(retries),
        "charge_tasks": len(pending),
    }
    if not wait:
        return result
    result.update(follow_charges(pending, timeout))
    return result


def follow_charges(pending: Sequence[AsyncResult], timeout: float) -> dict[str, Any]:
    """Wait up to ``timeout`` seconds in all for the charge tasks to settle.

    ``outcomes`` counts each invoice's result, plus a ``not settled`` entry for each task still
    unfinished at the deadline (no worker took it, or it is still running) and a ``failed``
    entry for each task that raised. ``not_settled`` and ``failed_tasks`` (task id and the
    exception's class, never its message) say which, so that the caller can exit non-zero.
    """
    from celery.exceptions import TimeoutError as ResultTimeout

    outcomes: Counter[str] = Counter()
    not_settled: list[str] = []
    failed: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    try:
        for task in pending:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                report = task.get(timeout=remaining, propagate=True, interval=0.05)
            except ResultTimeout:
                outcomes["not settled (TimeoutError)"] += 1
                not_settled.append(str(task.id))
                continue
            except Exception as exc:
                outcomes[f"failed ({type(exc).__name__})"] += 1
                failed.append({"task_id": str(task.id), "error": type(exc).__name__})
                continue
            for word in report.get("results", {}).values():
                outcomes[word] += 1
    finally:
        # A result still waited for stays registered with the result backend, and Celery
        # would unsubscribe it from AsyncResult.__del__ while the interpreter shuts down,
        # printing an error: stop waiting for each now.
        for task in pending:
            backend = getattr(task, "backend", None)
            if backend is not None and hasattr(backend, "remove_pending_result"):
                backend.remove_pending_result(task)
    return {
        "outcomes": dict(sorted(outcomes.items())),
        "not_settled": not_settled,
        "failed_tasks": failed,
    }


def tick_problem(result: dict[str, Any], timeout: float) -> str | None:
    """Why ``tick --wait`` did not end well, as one line; ``None`` if every charge settled."""
    not_settled = len(result.get("not_settled") or [])
    failed = result.get("failed_tasks") or []
    if failed:
        first = failed[0]
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        return (
            f"charge task {first['task_id']} raised {first['error']}{more}: see the worker's "
            "log; its invoices are tried again by the next pass"
        )
    if not_settled:
        return (
            f"{not_settled} charge task(s) not settled after {timeout:g} s: is a worker running "
            "(`celery -A workers.app worker`)? They are charged once one takes them"
        )
    return None


def describe_tick(result: dict[str, Any]) -> str:
    lines = [
        f"renewed {_count(result['invoices_created'], 'subscription', 'subscriptions')} "
        f"({result['claimed']} claimed, {result['canceled_at_period_end']} canceled at period end)",
        f"queued {_count(result['charge_tasks'], 'charge task', 'charge tasks')}, "
        f"including {_count(result['retries_queued'], 'due retry', 'due retries')}",
    ]
    if result.get("quarantined") or result.get("released"):
        lines.append(
            f"quarantined {result['quarantined']} subscription(s) that raised, "
            f"released {result['released']} (`billing quarantine list`)"
        )
    for word, count in result.get("outcomes", {}).items():
        lines.append(f"  {word}: {count}")
    return "\n".join(lines)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def reconcile() -> dict[str, Any]:
    """Verify every unresolved charge now; invoices found never charged are queued again (after
    their retry delay), as the janitor task does."""
    from schedules.sweeps import run_janitor
    from workers.tasks import enqueue_retries

    report = run_janitor(get_runtime(), everything=True)
    enqueue_retries(report.retry_in)
    return {
        "settled": {str(k): v for k, v in sorted(report.settled.items())},
        "retries_queued": len(report.retry_in),
        "still_unresolved": report.still_unresolved,
        "alerted": report.alerted,
    }


def describe_reconcile(result: dict[str, Any]) -> str:
    if not result["settled"]:
        return "nothing to reconcile"
    counts = Counter(result["settled"].values())
    return "\n".join(f"{word}: {count}" for word, count in sorted(counts.items()))


def reconcile_after_restore() -> dict[str, Any]:
    """``billing reconcile --after-restore``: see ``billing.services.restore``; then the usual
    reconcile, so that what the restore left unresolved is verified too (nothing is queued)."""
    from billing.services.restore import reconcile_after_restore as after_restore
    from schedules.sweeps import run_janitor

    rt = get_runtime()
    report = after_restore(rt).as_dict()
    settled = run_janitor(rt, everything=True)
    report["settled"] = {str(k): v for k, v in sorted(settled.settled.items())}
    return report


def describe_restore(result: dict[str, Any]) -> str:
    found = Counter(result["found"].values())
    lines = [
        f"invoiced {result['invoices_created']} due period(s) again (nothing charged)",
        f"asked the gateway about {result['order_ids_asked']} order id(s)",
    ]
    lines += [f"  {word}: {count}" for word, count in sorted(found.items())]
    if not found:
        lines.append("  no payment made after the backup was found")
    return "\n".join(lines)
