"""Benchmark: the month-start spike, every subscription due at the same moment.

Everything runs for real on this machine, as in ``bench/throughput.py`` (whose pieces this
reuses): ``celery -A workers.app worker`` processes on Redis (database 12, flushed before and
after), a PostgreSQL database of the benchmark's own (``billing_bench_spike``, dropped and
recreated on every run, dropped at the end) and the Fatora sandbox served over HTTP by uvicorn
in this process, answering every request after ``--latency-ms``. The workers and this process
read the database's test clock: it starts at the moment every subscription is due and is moved
on with real time at every poll, so that backoffs, in-flight leases and verify schedules come due
as they would in production (a frozen clock would leave any retried invoice unbilled).

Setup (``setup_s``, not measured as part of the spike): ``--subs`` customers, each with one good
card and an active subscription due at the clock's moment, written with COPY
(``bench/_seed.py``, ``seed_s``); the workers are started and consume the queues that renewal
and charging use in production (``maintenance`` for ``billing.renew``, ``charges`` for
``billing.charge_invoices``) and answer a ping. They have run no task yet.

The measured run does what production does. This process stands in for beat: it sends the
beat entries that go to the ``maintenance`` queue at once and then on their interval, with their
options (``schedules/beat.py``: ``billing.renew`` and ``billing.retry_due`` every 60 s,
``billing.janitor`` every 300 s). One ``billing.renew`` claims every due subscription (batches of
``BILLING_RENEWAL_BATCH_SIZE``, each committed) and queues each batch's charge tasks as soon as
the batch commits; a renew sent while one still runs claims what the other has not.

One query counts the invoices and the paid ones, every ``--subs`` / 200 000 seconds (0.1 s at
least, 0.5 s at most; the count takes about 13 ms at 100 000 invoices, so it costs PostgreSQL
about the same share of a core at every size). ``renewal_s`` is when every subscription has its
invoice and ``total_s`` when every invoice is paid (every card is a good one), both counted from
the first ``billing.renew``; ``charges_per_s`` is the invoices over ``charge_s`` =
``total_s - renewal_s`` (charging begins during the renewal, so this overstates the rate).
The resident memory of every worker process (main and pool children) is sampled every 0.5 s:
the peak of the sum (pages a child shares with its parent count in both) and of any one process.
The CPU time of the worker processes (user + system) and of the sandbox's thread over the run is
reported too.

Then exactly-once is checked against the sandbox's own list of charges: one SUCCESS per invoice,
one invoice per subscription, every invoice paid, one succeeded attempt per charge; any
deviation, or a run not settled within ``--timeout``, prints ``"exactly_once": false`` and exits
non-zero. One JSON line is printed.

``--cap N`` sets ``BILLING_GATEWAY_MAX_IN_FLIGHT=N`` for the workers (the cap's leases live in
the broker's Redis); keep ``--threads`` x pool children near N (``docs/OPERATIONS.md``).
``--renew-only`` runs the workers on ``maintenance`` alone: the charge tasks stay queued, and
``renew_task_s`` is when the last of them has been queued (the end of the renew task).

    .venv/bin/python bench/spike.py [--subs 100000] [--latency-ms 50] [--workers 1]
        [--concurrency 2] [--threads 100] [--batch 100] [--cap N] [--timeout 3600]
        [--renew-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine, select, text

# Run from a checkout without installing: the project root is the parent of bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bench_runtime, check_exactly_once
from bench.throughput import (
    ADMIN_URL,
    START,
    RssSampler,
    WorkerPool,
    cpu_delta,
    drop_database,
    fresh_services,
    seed,
    thread_cpu_seconds,
    wait_ready,
)
from billing.clock import DatabaseClock
from billing.crypto import TokenVault, new_key
from billing.fatora.sandbox import Sandbox, ServerHandle, start_server_in_thread
from billing.lifecycle import InvoiceStatus
from billing.models import Invoice
from billing.runtime import Runtime
from schedules.beat import BEAT_SCHEDULE

REDIS_URL = os.environ.get("BILLING_BENCH_SPIKE_REDIS_URL", "redis://127.0.0.1:6379/12")
DATABASE = "billing_bench_spike"
CHARGES = "charges"
MAINTENANCE = "maintenance"
# Seconds between two counts of the invoices, per invoice due (within POLL_MIN_S..POLL_MAX_S).
POLL_S_PER_SUB = 1 / 200_000
POLL_MIN_S = 0.1
POLL_MAX_S = 0.5


class Beat:
    """What ``celery beat`` sends to ``queues``: each interval entry of ``BEAT_SCHEDULE`` at the
    first ``tick`` and then every interval, with the entry's options (queue, expiry)."""

    def __init__(self, client: Celery, queues: set[str]) -> None:
        self.client = client
        self.entries = [
            (name, entry)
            for name, entry in BEAT_SCHEDULE.items()
            if isinstance(entry["schedule"], int | float) and entry["options"]["queue"] in queues
        ]
        self.next_at = {name: 0.0 for name, _ in self.entries}
        self.sent: Counter[str] = Counter()

    def tick(self, elapsed_s: float) -> None:
        for name, entry in self.entries:
            if elapsed_s >= self.next_at[name]:
                self.client.send_task(entry["task"], **entry["options"])
                self.next_at[name] += float(entry["schedule"])
                self.sent[entry["task"]] += 1


def set_queue(client: Celery, pool: WorkerPool, queue: str, on: bool) -> None:
    """Add or cancel every worker's consumer of ``queue``, and wait for the answers."""
    control = client.control.add_consumer if on else client.control.cancel_consumer
    replies = control(queue, destination=pool.names, reply=True, timeout=5.0)
    answered = {name for reply in replies or [] for name in reply}
    if answered != set(pool.names):
        raise RuntimeError(f"consumer {'add' if on else 'cancel'} {queue}: {replies}")


def invoice_counts(engine: Engine) -> tuple[int, int]:
    """The invoices, and the paid ones, in one query."""
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT count(*), count(*) FILTER (WHERE status = :paid) FROM invoices"),
            {"paid": InvoiceStatus.PAID.value},
        ).one()
    return int(row[0]), int(row[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subs", type=int, default=100_000, help="subscriptions due at once")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="sandbox answer delay")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children each")
    parser.add_argument(
        "--threads", type=int, default=100, help="call threads per child (CHARGE_CONCURRENCY)"
    )
    parser.add_argument("--batch", type=int, default=100, help="invoices per charge task")
    parser.add_argument(
        "--cap", type=int, default=None, help="BILLING_GATEWAY_MAX_IN_FLIGHT (default: none)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    parser.add_argument(
        "--renew-only", action="store_true", help="renew only: no worker consumes the charges"
    )
    args = parser.parse_args(argv)
    if args.subs < 1 or args.workers < 1 or args.concurrency < 1:
        parser.error("--subs, --workers and --concurrency must be >= 1")
    if args.cap is not None and args.cap < 1:
        parser.error("--cap must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_started = time.perf_counter()
    store, engine, client = fresh_services(DATABASE, REDIS_URL, pool_size=2)
    key = new_key()
    vault = TokenVault(key)
    sandbox = Sandbox(now=lambda: START)
    server: ServerHandle | None = None
    pool: WorkerPool | None = None
    sampler: RssSampler | None = None
    try:
        server = start_server_in_thread(sandbox, latency_ms=args.latency_ms)
        base_url = server.url.rstrip("/") + "/v1"
        rt = bench_runtime(engine, base_url, sandbox, vault)
        clock = DatabaseClock(engine)
        clock.set(START)
        seed_started = time.perf_counter()
        seed(rt, sandbox, vault, args.subs)
        seed_s = time.perf_counter() - seed_started
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()

        env = {
            **os.environ,
            "BILLING_MODE": "test",
            "BILLING_DATABASE_URL": engine.url.render_as_string(hide_password=False),
            "BILLING_BROKER_URL": REDIS_URL,
            "BILLING_TOKEN_KEY": key,
            "BILLING_CHARGE_BATCH_SIZE": str(args.batch),
            "BILLING_CHARGE_CONCURRENCY": str(args.threads),
            "FATORA_BASE_URL": base_url,
            "FATORA_MODE": "test",
            "FATORA_API_KEY": sandbox.api_key,
        }
        if args.cap is not None:
            env["BILLING_GATEWAY_MAX_IN_FLIGHT"] = str(args.cap)
        pool = WorkerPool(env)
        # Started on the charges queue; the maintenance queue is added (and, renewing only,
        # the charges queue cancelled) before anything is sent.
        pool.start(args.workers, args.concurrency)
        wait_ready(client, pool)
        set_queue(client, pool, MAINTENANCE, on=True)
        queues = {MAINTENANCE}
        if args.renew_only:
            set_queue(client, pool, CHARGES, on=False)
        else:
            queues.add(CHARGES)
        setup_s = time.perf_counter() - setup_started

        # The measured run: beat's maintenance entries from now on, until all is settled.
        beat = Beat(client, queues)
        charge_tasks = math.ceil(args.subs / args.batch)
        sampler = RssSampler(pool).start()
        cpu_before = pool.cpu_seconds()
        sandbox_before = thread_cpu_seconds("fatora-sandbox")
        poll_s = min(POLL_MAX_S, max(POLL_MIN_S, args.subs * POLL_S_PER_SUB))
        renewal_s: float | None = None
        renew_task_s: float | None = None
        total_s: float | None = None
        problem: str | None = None
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            clock.set(START + timedelta(seconds=elapsed))  # the test clock runs with real time
            beat.tick(elapsed)
            invoices, paid = invoice_counts(engine)
            elapsed = time.perf_counter() - started
            if renewal_s is None and invoices >= args.subs:
                renewal_s = elapsed
            if args.renew_only:
                if renewal_s is not None and int(store.llen(CHARGES)) >= charge_tasks:
                    renew_task_s = elapsed
                    break
            elif paid >= args.subs:
                total_s = elapsed
                break
            if elapsed > args.timeout:
                problem = f"not settled after {args.timeout:g} s: {invoices} invoices, {paid} paid"
                break
            pool.check_alive()
            time.sleep(poll_s)
        cpu_s = cpu_delta(cpu_before, pool.cpu_seconds())
        sandbox_s = thread_cpu_seconds("fatora-sandbox") - sandbox_before
        sampler.stop()
        figures, sampler = sampler.figures(), None

        result: dict[str, Any] = {
            "subs": args.subs,
            "latency_ms": args.latency_ms,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "threads": args.threads,
            "batch": args.batch,
            "cap": args.cap,
            "poll_s": round(poll_s, 3),
            "renewal_s": _round(renewal_s),
        }
        if args.renew_only:
            result["renew_task_s"] = _round(renew_task_s)
        else:
            charge_s = None if total_s is None or renewal_s is None else total_s - renewal_s
            result.update(
                total_s=_round(total_s),
                charge_s=_round(charge_s),
                charges_per_s=round(args.subs / charge_s, 1) if charge_s else None,
            )
        result.update(
            peak_rss_mb=figures["worker_rss_mb_peak"],
            peak_rss_process_mb=figures["worker_rss_mb_peak_process"],
            worker_cpu_s=round(cpu_s, 2),
            sandbox_cpu_s=round(sandbox_s, 2),
            beat_sent=dict(sorted(beat.sent.items())),
            setup_s=round(setup_s, 2),
            seed_s=round(seed_s, 2),
        )
        if args.renew_only:
            if problem is not None:
                result["problem"] = problem
            return result
        if problem is None:
            problem = _exactly_once_problem(rt, sandbox, args.subs)
        result["exactly_once"] = problem is None
        if problem is not None:
            result["problem"] = problem
        return result
    finally:
        if sampler is not None:
            sampler.stop()
        if pool is not None:
            pool.stop()
        if server is not None:
            server.stop()
        client.close()
        engine.dispose()
        store.flushdb()
        store.close()
        drop_database(ADMIN_URL, DATABASE)


def _exactly_once_problem(rt: Runtime, sandbox: Sandbox, subs: int) -> str | None:
    """None if every subscription has one invoice, charged once and paid; else what is wrong."""
    with rt.sessions() as session:
        invoice_ids = list(session.execute(select(Invoice.id)).scalars())
    if len(invoice_ids) != subs:
        return f"{len(invoice_ids)} invoices for {subs} subscriptions"
    try:
        check_exactly_once(rt, sandbox, invoice_ids)
    except SystemExit as exc:
        return str(exc)
    return None


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result), flush=True)
    if result.get("exactly_once") is False or "problem" in result:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
