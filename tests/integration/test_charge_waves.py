"""The two-wave write-ahead (``charging._written_ahead`` / ``_exchange``) on real PostgreSQL and
the sandbox: a run stopped between the waves, a second write-ahead that fails, and two workers
with overlapping batches each leave every invoice charged at most once and none forgotten.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from billing.fatora.sandbox import Sandbox
from billing.lifecycle import InvoiceStatus
from billing.locks import Held, InvoiceLocker
from billing.runtime import Runtime
from billing.services import charging
from billing.services.charging import collect_invoices
from schedules.sweeps import due_retries
from tests.factories import (
    attempts_of,
    invoice_of,
    renew,
    seed_plans,
    subscriber,
    successful_charges,
)


def _due_invoices(rt: Runtime, sandbox: Sandbox, count: int) -> list[int]:
    seed_plans(rt)
    for n in range(count):
        subscriber(rt, sandbox, ["success"], name=f"r{n}")
    return sorted(renew(rt))


class _LosingLocker:
    """The real advisory locks, reported lost at the first check (a cut lock connection)."""

    def __init__(self, inner: InvoiceLocker) -> None:
        self.inner = inner

    @contextmanager
    def hold(self, invoice_ids: Sequence[int]) -> Iterator[Held]:
        with self.inner.hold(invoice_ids) as held:
            yield Held(held.ids, lambda: False)


def _slow_collect(rt: Runtime, monkeypatch: pytest.MonkeyPatch, delay_s: float) -> list[str]:
    """collect-payment takes ``delay_s`` (a real gateway's latency); returns the order ids sent."""
    collect = rt.gateway.collect_payment
    sent: list[str] = []
    lock = threading.Lock()

    def slow(*args: object, **kwargs: object) -> object:
        with lock:
            sent.append(str(args[1]))
        time.sleep(delay_s)
        return collect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rt.gateway, "collect_payment", slow)
    return sent


# -- a stop between the waves -----------------------------------------------------------------


def test_a_stop_before_the_second_wave_notes_every_held_invoice(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock is found lost while the first wave is under way: the second wave is not written
    ahead, and every invoice the run held still has its word in the report (``not_sent`` for
    those never written ahead), so that what a task did stays readable in Flower."""
    invoice_ids = _due_invoices(rt, sandbox, charging.FIRST_WAVE + 5)
    monkeypatch.setattr(charging, "LOCK_CHECK_S", 0.0)
    monkeypatch.setattr(rt, "locker", _LosingLocker(rt.locker))
    _slow_collect(rt, monkeypatch, 0.05)
    report = collect_invoices(rt, invoice_ids)
    assert report.stopped == "invoice lock lost"
    silent = sorted(set(invoice_ids) - set(report.results))
    assert silent == [], f"held, never written ahead, not in the report: {silent}"


def test_a_stop_before_the_second_wave_loses_no_invoice(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same stop: no money moves twice or is lost. The second wave's invoices have no
    attempt and stay due, so the retry sweep brings them back; the next run charges each once."""
    invoice_ids = _due_invoices(rt, sandbox, charging.FIRST_WAVE + 5)
    monkeypatch.setattr(charging, "LOCK_CHECK_S", 0.0)
    real_locker = rt.locker
    monkeypatch.setattr(rt, "locker", _LosingLocker(real_locker))
    _slow_collect(rt, monkeypatch, 0.05)
    collect_invoices(rt, invoice_ids)
    rest = invoice_ids[charging.FIRST_WAVE :]
    assert all(not attempts_of(rt, i) for i in rest)
    assert set(rest) <= set(due_retries(rt))
    monkeypatch.setattr(rt, "locker", real_locker)
    monkeypatch.setattr(charging, "LOCK_CHECK_S", 1.0)
    collect_invoices(rt, rest)
    for invoice_id in invoice_ids:
        assert len(successful_charges(rt, sandbox, invoice_id)) <= 1
    for invoice_id in rest:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value


# -- a failed second write-ahead ----------------------------------------------------------------


def _failing_second_wave(monkeypatch: pytest.MonkeyPatch) -> None:
    start_attempts = charging._start_attempts

    def failing_second(*args: object, **kwargs: object) -> list[object]:
        if len(args[1]) < charging.FIRST_WAVE:  # type: ignore[arg-type]
            raise RuntimeError("the database went away")
        return start_attempts(*args, **kwargs)  # type: ignore[arg-type,return-value]

    monkeypatch.setattr(charging, "_start_attempts", failing_second)


def test_a_failed_second_write_ahead_loses_no_charge_and_the_next_run_bills_the_rest(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker fails between the two waves (the database refuses the second write-ahead): the
    first wave's charges are recorded, the rest has no attempt, and the next run charges the rest;
    no invoice is charged twice or left out."""
    invoice_ids = _due_invoices(rt, sandbox, charging.FIRST_WAVE + 5)
    _failing_second_wave(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        collect_invoices(rt, invoice_ids)
    first, rest = invoice_ids[: charging.FIRST_WAVE], invoice_ids[charging.FIRST_WAVE :]
    assert all(invoice_of(rt, i).status == InvoiceStatus.PAID.value for i in first)
    assert all(not attempts_of(rt, i) for i in rest)
    monkeypatch.undo()
    report = collect_invoices(rt, invoice_ids)
    assert {report.results[i] for i in rest} == {"paid"}
    for invoice_id in invoice_ids:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_a_failed_second_write_ahead_sends_every_first_wave_call(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second write-ahead fails while the first wave's calls are under way, on a gateway slow
    enough (100 ms a call, 8 call threads) that most of them have not started: every committed
    attempt of the first wave is still sent and its charge recorded, then the error is raised.
    Cancelled instead, they would sit in flight, unsent, until the send window and the grace
    had passed."""
    invoice_ids = _due_invoices(rt, sandbox, charging.FIRST_WAVE + 5)
    sent = _slow_collect(rt, monkeypatch, 0.1)
    _failing_second_wave(monkeypatch)
    with pytest.raises(RuntimeError, match="went away"):
        collect_invoices(rt, invoice_ids)
    first = invoice_ids[: charging.FIRST_WAVE]
    uncharged = [i for i in first if not successful_charges(rt, sandbox, i)]
    assert len(sent) == charging.FIRST_WAVE, f"{len(sent)} of {charging.FIRST_WAVE} calls sent"
    assert uncharged == []


# -- two workers, overlapping batches ----------------------------------------------------------


def test_overlapping_batches_of_two_workers_charge_each_invoice_once(
    rt: Runtime, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers get overlapping batches (a redelivered task and a retry sweep) while both
    run two waves with a slow gateway: the advisory locks split them, no deadlock, no invoice
    charged twice, none left out."""
    invoice_ids = _due_invoices(rt, sandbox, 2 * charging.FIRST_WAVE + 10)
    _slow_collect(rt, monkeypatch, 0.02)
    errors: list[BaseException] = []
    reports: list[charging.CollectionReport] = []

    def worker(ids: list[int]) -> None:
        try:
            reports.append(collect_invoices(rt, ids))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(invoice_ids[:40],)),
        threading.Thread(target=worker, args=(invoice_ids[15:],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    busy = {i for r in reports for i, word in r.results.items() if word == "busy"}
    if busy:  # held by the other worker at the time: that worker charged it, or does now
        collect_invoices(rt, sorted(busy))
    for invoice_id in invoice_ids:
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
