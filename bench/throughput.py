"""Benchmark: charge throughput of real Celery workers against the cost of an empty task.

Everything runs for real on this machine: ``celery -A workers.app worker`` processes on Redis
(database 14, flushed before and after), a PostgreSQL database of the benchmark's own
(``billing_bench_tp``, dropped and recreated on every run, dropped at the end) and the Fatora
sandbox served over HTTP by uvicorn in this process, answering every request after
``--latency-ms``.

The workers are warmed first: each pool child charges, on average, two full batches of invoices
of their own (so that every call thread has started and holds its connection, and the statements
are compiled, as in a long-running worker); those are not measured. Two phases then alternate
for ``--rounds`` rounds on the same warm workers, each round with its share of the work,
measured the same way: with the workers' consumers of the ``charges`` queue cancelled, the whole
load is queued; the clock starts when the consumers are added back and stops at the first 0.1 s
poll that sees all of the work done (the time to drain a preloaded queue, without the client's
enqueueing speed in it).

1. ``billing.noop`` x ``--noop``: Celery's own cost per task (receive, ack, result write).
   Completion is counted by the result records the workers write to Redis.
2. ``billing.charge_invoices`` over ``--n`` due invoices in batches of ``--batch``: each
   invoice is locked, written ahead, collected and verified at the sandbox, and recorded.
   Completion is counted as for the noop tasks, by the result records of the charge tasks (a
   task writes its result once every invoice of its batch is recorded); no poll reads the
   database, whose CPU is measured (a ``COUNT(*)`` of paid invoices ten times a second was a
   large part of it at 100 000 invoices). The CPU time of the
   worker process trees (user + system, psutil) is read before and after; the sandbox's CPU
   (a thread of this process) is reported on its own.

Then exactly-once is checked against the sandbox's own list of charges, warm-up included (one
SUCCESS per invoice, every invoice paid, one succeeded attempt each); any deviation exits non-zero.
One JSON line is printed: ``ratio`` is charges/s over noop tasks/s over all rounds,
``median_ratio`` the median of the rounds' own ratios (the target is >= 1.2); the workers'
resident memory (main and pool children, summed) is sampled every 0.5 s over the measured rounds.

The defaults are the sizing ``docs/OPERATIONS.md`` recommends for a 50 ms gateway: as many call
threads per pool child as invoices per charge task, so that a batch's calls leave together.

    .venv/bin/python bench/throughput.py [--n 10000] [--noop 10000] [--latency-ms 50]
        [--workers 1] [--concurrency 2] [--batch 100] [--threads 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

# Run from a checkout without installing: the project root is the parent of bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bench_runtime, check_exactly_once
from bench._seed import seed_due
from billing.clock import DatabaseClock
from billing.config import reset_settings_cache
from billing.crypto import TokenVault, new_key
from billing.db import make_engine, normalize_url
from billing.dunning import STANDARD
from billing.fatora.sandbox import Sandbox, ServerHandle, start_server_in_thread
from billing.periods import Interval
from billing.plans import PlansConfig, PlanSpec
from billing.runtime import Runtime
from schedules.renewal import run_renewal_pass

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "BILLING_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("BILLING_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
DATABASE = "billing_bench_tp"
QUEUE = "charges"
# The frozen test clock shared by the workers (through the database) and the sandbox.
START = datetime(2027, 1, 31, 7, 0, tzinfo=UTC)
POLL_S = 0.1
RESULT_KEY_PREFIX = "celery-task-meta-"


# -- database --------------------------------------------------------------------------------


def recreate_database(admin_url: str, name: str) -> str:
    """Drop and create ``name`` on the server of ``admin_url``; its URL."""
    admin = make_url(normalize_url(admin_url))
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote_identifier(name)
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def fresh_services(
    database: str, redis_url: str, *, pool_size: int
) -> tuple[redis.Redis[bytes], Engine, Celery]:
    """Test mode (the bench process sets the shared test clock, which test mode alone allows),
    the benchmark's Redis database emptied, its PostgreSQL database made anew and migrated: the
    Redis client, an engine on that database, and a Celery client that sends on that Redis."""
    from billing.migrate import upgrade

    os.environ["BILLING_MODE"] = "test"
    reset_settings_cache()
    store = redis.Redis.from_url(redis_url)
    store.flushdb()
    url = recreate_database(ADMIN_URL, database)
    upgrade(url)
    client = Celery("bench-client", broker=redis_url)
    client.conf.task_serializer = "json"
    return store, make_engine(url, pool_size=pool_size), client


def drop_database(admin_url: str, name: str) -> None:
    engine = create_engine(make_url(normalize_url(admin_url)), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote_identifier(name)
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        engine.dispose()


def bench_plans() -> PlansConfig:
    monthly = PlanSpec(
        code="bench-monthly",
        name="Bench monthly",
        amount=Decimal("50.00"),
        currency="QAR",
        interval=Interval.MONTH,
        interval_count=1,
        cron=None,
        trial_days=0,
        dunning=STANDARD.code,
    )
    return PlansConfig(plans={"bench-monthly": monthly}, dunning={STANDARD.code: STANDARD})


def seed(rt: Runtime, sandbox: Sandbox, vault: TokenVault, n: int) -> None:
    """``n`` customers, each with one ``success`` card and an active subscription due now.

    Bulk SQL instead of the per-row services: the rows are the ones the services would write
    (encrypted token, keyed fingerprint, lifetime from issue), without the per-row round trips.
    """
    seed_due(rt, sandbox, vault, n, plans=bench_plans(), plan="bench-monthly", at=START)


# -- workers ---------------------------------------------------------------------------------


class WorkerPool:
    """Real ``celery worker`` processes, each the leader of its own process group."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []

    def start(self, count: int, concurrency: int) -> None:
        host = os.uname().nodename
        for i in range(count):
            name = f"tp{i + 1}@{host}"
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "workers.app",
                        "worker",
                        "-Q",
                        QUEUE,
                        "-c",
                        str(concurrency),
                        "-n",
                        name,
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
            )
            self.names.append(name)

    def processes(self) -> list[psutil.Process]:
        """Every worker process: the main ones and their pool children."""
        found: list[psutil.Process] = []
        for proc in self.procs:
            try:
                main = psutil.Process(proc.pid)
                found.append(main)
                found.extend(main.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return found

    def cpu_seconds(self) -> dict[int, float]:
        """User + system CPU seconds of every worker process, by pid."""
        times: dict[int, float] = {}
        for proc in self.processes():
            try:
                cpu = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            times[proc.pid] = cpu.user + cpu.system
        return times

    def check_alive(self) -> None:
        for name, proc in zip(self.names, self.procs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with status {proc.returncode}")

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is still there."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class RssSampler:
    """The resident memory of every worker process (main and pool children), sampled every
    ``every_s`` on a thread of its own: the peak of their sum and of any one process, and the
    sum at the first and the last sample, in MB."""

    def __init__(self, pool: WorkerPool, every_s: float = 0.5) -> None:
        self._pool = pool
        self._every_s = every_s
        self._stop = threading.Event()
        self.sums: list[float] = []
        self.peak_process_mb = 0.0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        sizes: list[float] = []
        for proc in self._pool.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                sizes.append(proc.memory_info().rss / 2**20)
        if sizes:
            self.sums.append(sum(sizes))
            self.peak_process_mb = max(self.peak_process_mb, max(sizes))

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self._sample()

    def start(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def figures(self) -> dict[str, float]:
        return {
            "worker_rss_mb_first": round(self.sums[0], 1),
            "worker_rss_mb_last": round(self.sums[-1], 1),
            "worker_rss_mb_peak": round(max(self.sums), 1),
            "worker_rss_mb_peak_process": round(self.peak_process_mb, 1),
        }


def wait_ready(client: Celery, pool: WorkerPool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool.check_alive()
        replies = client.control.ping(destination=pool.names, timeout=1.0)
        answered = {name for reply in replies or [] for name in reply}
        if answered >= set(pool.names):
            return
    raise RuntimeError(f"workers not ready after {timeout_s:.0f} s")


def set_consuming(client: Celery, pool: WorkerPool, on: bool) -> None:
    """Add or cancel every worker's consumer of the charges queue, and wait for the answers."""
    control = client.control.add_consumer if on else client.control.cancel_consumer
    replies = control(QUEUE, destination=pool.names, reply=True, timeout=5.0)
    answered = {name for reply in replies or [] for name in reply}
    if answered != set(pool.names):
        raise RuntimeError(f"consumer {'add' if on else 'cancel'} not acknowledged: {replies}")


def drain(
    client: Celery,
    pool: WorkerPool,
    done: Callable[[], bool],
    timeout_s: float,
    what: str,
) -> float:
    """Let the workers consume the preloaded queue; seconds until ``done()`` is first seen."""
    started = time.perf_counter()
    set_consuming(client, pool, on=True)
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout_s:.0f} s")
        pool.check_alive()
        time.sleep(POLL_S)
    return time.perf_counter() - started


def send_tasks(client: Celery, name: str, args: Iterable[list[Any]]) -> list[str]:
    ids: list[str] = []
    for task_args in args:
        task_id = str(uuid.uuid4())
        client.send_task(name, args=task_args, queue=QUEUE, task_id=task_id)
        ids.append(task_id)
    return ids


def results_done(store: redis.Redis[bytes], task_ids: list[str]) -> Callable[[], bool]:
    """True once every task has a result record (one EXISTS over all keys per poll)."""
    keys = [RESULT_KEY_PREFIX + task_id for task_id in task_ids]

    def done() -> bool:
        return int(store.exists(*keys)) == len(keys)

    return done


# -- measurement helpers ---------------------------------------------------------------------


def thread_cpu_seconds(thread_name: str) -> float:
    """CPU seconds of this process's thread called ``thread_name`` (0 if there is none)."""
    native = {t.native_id for t in threading.enumerate() if t.name == thread_name}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in native)


_CLIENT = re.compile(r"\(\d+\)|\[local\]")


def postgres_cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds of this machine's PostgreSQL server processes (none if remote),
    by role: ``backends`` (the connections doing the work), ``autovacuum`` (its launcher and
    workers: cleaning up after the work, whenever they run) and ``background`` (checkpointer,
    writers and the rest)."""
    totals = dict.fromkeys(("backends", "autovacuum", "background"), 0.0)
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times = proc.info.get("cpu_times")
        if proc.info.get("name") not in ("postgres", "postmaster") or times is None:
            continue
        title = " ".join(proc.info.get("cmdline") or ())
        if "autovacuum" in title:
            role = "autovacuum"
        elif _CLIENT.search(title):  # "postgres: ... user db 127.0.0.1(54042) idle"
            role = "backends"
        else:
            role = "background"
        totals[role] += times.user + times.system
    return totals


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


def share(total: int, parts: int, index: int) -> int:
    """The ``index``-th of ``parts`` near-equal shares of ``total`` (they add up to it)."""
    return total // parts + (1 if index < total % parts else 0)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=10000, help="subscriptions / invoices")
    parser.add_argument("--noop", type=int, default=10000, help="billing.noop tasks")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="sandbox answer delay")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children each")
    parser.add_argument("--batch", type=int, default=100, help="invoices per charge task")
    parser.add_argument("--threads", type=int, default=100, help="call threads per child")
    parser.add_argument("--rounds", type=int, default=5, help="noop/charge phase pairs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    store, engine, client = fresh_services(DATABASE, REDIS_URL, pool_size=4)
    key = new_key()
    vault = TokenVault(key)
    sandbox = Sandbox(now=lambda: START)
    server: ServerHandle | None = None
    pool: WorkerPool | None = None
    try:
        server = start_server_in_thread(sandbox, latency_ms=args.latency_ms)
        base_url = server.url.rstrip("/") + "/v1"
        rt = bench_runtime(engine, base_url, sandbox, vault)
        DatabaseClock(engine).set(START)
        # Two full warm-up batches per pool child, billed before the measurement.
        slots = 2 * args.workers * args.concurrency
        warm = args.batch * slots
        seed(rt, sandbox, vault, warm + args.n)
        invoice_ids = sorted(run_renewal_pass(rt).invoice_ids)
        if len(invoice_ids) != warm + args.n:
            raise RuntimeError(f"renewal made {len(invoice_ids)} invoices, not {warm + args.n}")
        all_ids = invoice_ids
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))

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
        pool = WorkerPool(env)
        pool.start(args.workers, args.concurrency)
        wait_ready(client, pool)

        # Warm-up: every pool child imports the tasks, builds its runtime and charges full
        # batches of its own (database connections, compiled statements, every call thread and
        # its gateway connection), as a long-running worker has before any measurement.
        warm_ids, invoice_ids = invoice_ids[:warm], invoice_ids[warm:]
        set_consuming(client, pool, on=False)
        warm_tasks = send_tasks(
            client,
            "billing.charge_invoices",
            ([warm_ids[i::slots]] for i in range(slots)),
        )
        drain(client, pool, results_done(store, warm_tasks), args.timeout, "warm-up")

        # The two phases alternate for --rounds rounds, each round with its share of the noop
        # tasks and of the invoices, so that a slow spell of the machine weighs on both alike.
        noop_s = charge_s = cpu_s = sandbox_s = 0.0
        postgres = dict.fromkeys(postgres_cpu_seconds(), 0.0)
        round_ratios: list[float] = []
        billed = warm
        sampler = RssSampler(pool).start()
        for r in range(args.rounds):
            # Phase 1: the noop tasks. noop keeps its result (ignore_result=False), so each
            # task ends with a result record written to Redis by the worker, as each charge
            # task does; both phases are polled the same way (one EXISTS every 0.1 s), which
            # puts no load on the workers or the database.
            noops = share(args.noop, args.rounds, r)
            set_consuming(client, pool, on=False)
            noop_ids = send_tasks(client, "billing.noop", ([] for _ in range(noops)))
            round_noop_s = drain(client, pool, results_done(store, noop_ids), args.timeout, "noop")

            # Phase 2: the charges.
            mine = invoice_ids[billed - warm : billed - warm + share(args.n, args.rounds, r)]
            billed += len(mine)
            set_consuming(client, pool, on=False)
            batches = [mine[i : i + args.batch] for i in range(0, len(mine), args.batch)]
            charge_tasks = send_tasks(client, "billing.charge_invoices", ([b] for b in batches))
            cpu_before = pool.cpu_seconds()
            sandbox_before = thread_cpu_seconds("fatora-sandbox")
            postgres_before = postgres_cpu_seconds()
            round_charge_s = drain(
                client,
                pool,
                results_done(store, charge_tasks),
                args.timeout,
                "charges",
            )
            cpu_s += cpu_delta(cpu_before, pool.cpu_seconds())
            sandbox_s += thread_cpu_seconds("fatora-sandbox") - sandbox_before
            for role, seconds in postgres_cpu_seconds().items():
                postgres[role] += seconds - postgres_before[role]
            noop_s += round_noop_s
            charge_s += round_charge_s
            round_ratios.append(round((len(mine) / round_charge_s) / (noops / round_noop_s), 3))

        sampler.stop()
        check_exactly_once(rt, sandbox, all_ids)
        charges_per_s = args.n / charge_s
        noop_per_s = args.noop / noop_s
        return {
            "n": args.n,
            "latency_ms": args.latency_ms,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "batch": args.batch,
            "threads": args.threads,
            "rounds": args.rounds,
            "charges_per_s": round(charges_per_s, 1),
            "noop_tasks_per_s": round(noop_per_s, 1),
            "ratio": round(charges_per_s / noop_per_s, 3),
            "median_ratio": round(statistics.median(round_ratios), 3),
            "round_ratios": round_ratios,
            "cpu_ms_per_charge": round(1000 * cpu_s / args.n, 3),
            "sandbox_cpu_ms_per_charge": round(1000 * sandbox_s / args.n, 3),
            "postgres_cpu_ms_per_charge": round(1000 * sum(postgres.values()) / args.n, 3),
            "postgres_cpu_ms_per_charge_by_role": {
                role: round(1000 * seconds / args.n, 3) for role, seconds in postgres.items()
            },
            "charge_s": round(charge_s, 3),
            "noop_s": round(noop_s, 3),
            **sampler.figures(),
            "exactly_once": True,
        }
    finally:
        if pool is not None:
            pool.stop()
        if server is not None:
            server.stop()
        client.close()
        engine.dispose()
        store.flushdb()
        store.close()
        drop_database(ADMIN_URL, DATABASE)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
