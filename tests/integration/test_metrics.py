"""/metrics for real: `billing metrics` over real PostgreSQL and Redis (db 11), a scrape that
survives a database that is down or locked, and a real prefork worker whose pool processes
count the charges its own process serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select, text
from sqlalchemy.pool import NullPool

from billing import metrics
from billing.clock import DatabaseClock
from billing.crypto import TokenVault, new_key
from billing.db import make_engine, session_factory
from billing.fatora import FatoraClient
from billing.fatora.sandbox import Sandbox, ServerHandle, start_server_in_thread
from billing.lifecycle import InvoiceStatus
from billing.locks import PostgresAdvisoryLocker
from billing.models import Invoice
from billing.runtime import Runtime
from billing.services import control
from billing.services.charging import collect_invoices
from tests.factories import age_attempts, renew, seed_plans, subscriber

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = urlunsplit(
    urlsplit(os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))._replace(
        path="/11"
    )
)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture()
def redis11() -> Iterator[redis.Redis[bytes]]:
    """Redis db 11, emptied before and after."""
    client: redis.Redis[bytes] = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}", pytrace=False)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int, deadline_s: float = 30.0) -> Samples:
    """GET /metrics (retried until it answers) as samples."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                body = r.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def labelled(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def start(
    command: list[str], env: dict[str, str], stderr: int | IO[bytes] = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr
    )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def exporter(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "billing.cli", "metrics", "--port", str(port)]
    return start([*command, "--host", "127.0.0.1"], env)


# -- the standalone exporter ---------------------------------------------------------------


def test_the_exporter_answers_with_the_figures_of_the_database_and_redis(
    rt: Runtime, sandbox: Sandbox, pg_url: str, redis11: redis.Redis[bytes]
) -> None:
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="paid")
    subscriber(rt, sandbox, ["insufficient_funds"], name="dunned")
    subscriber(rt, sandbox, ["pending_then_success"], name="pending")
    ids = renew(rt)
    report = collect_invoices(rt, ids)
    assert sorted(report.results.values()) == ["paid", "pending", "soft_declined"]
    age_attempts(rt, timedelta(minutes=30))
    with rt.sessions() as session, session.begin():
        control.pause_collection(session, "authentication failed: test", rt.clock.now())
    redis11.rpush("charges", "a", "b", "c")
    redis11.rpush("maintenance\x06\x163", "d", "e")
    redis11.zadd("billing:gateway:in-flight", {"w1:1:lease": time.time() * 1000 + 60_000})

    port = free_port()
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": pg_url,
        "BILLING_BROKER_URL": REDIS_URL,
        "BILLING_GATEWAY_MAX_IN_FLIGHT": "4",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = exporter(env, port)
    try:
        got = scrape(port)
    finally:
        assert stop(proc) == 0  # SIGTERM: a clean stop
    assert labelled(got, "billing_invoices_open", dunning_step="0") == 1  # the pending one
    assert labelled(got, "billing_invoices_open", dunning_step="1") == 1  # one decline so far
    assert labelled(got, "billing_attempts_unresolved", kind="collect", status="pending") == 1
    assert labelled(got, "billing_attempts_unresolved", kind="collect", status="unknown") == 0
    oldest = labelled(got, "billing_attempts_unresolved_oldest_seconds", kind="collect")
    assert oldest is not None and 30 * 60 <= oldest < 40 * 60
    assert labelled(got, "billing_collection_paused") == 1
    assert labelled(got, "billing_queue_depth", queue="charges") == 3
    assert labelled(got, "billing_queue_depth", queue="maintenance") == 2
    assert labelled(got, "billing_queue_depth", queue="notifications") == 0
    assert labelled(got, "billing_gateway_slots_in_use") == 1
    assert labelled(got, "billing_gateway_slots_limit") == 4
    assert labelled(got, "billing_scrape_source_up", source="database") == 1
    assert labelled(got, "billing_scrape_source_up", source="redis") == 1
    body = "\n".join(name + str(labels) for name, labels in got)
    for secret in ("paid@example.com", sandbox.api_key, "postgres@"):
        assert secret not in body


def test_with_the_database_down_the_exporter_still_answers(redis11: redis.Redis[bytes]) -> None:
    redis11.rpush("notifications", "x")
    port = free_port()
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": "postgresql://billing:pw-in-url@127.0.0.1:1/billing",
        "BILLING_BROKER_URL": REDIS_URL,
    }
    proc = exporter(env, port)
    try:
        first = scrape(port)
        second = scrape(port)
    finally:
        stop(proc)
    assert proc.stderr is not None
    assert b"pw-in-url" not in proc.stderr.read()
    assert labelled(second, "billing_scrape_source_up", source="database") == 0
    assert labelled(first, "billing_scrape_errors_total", source="database") == 1
    assert labelled(second, "billing_scrape_errors_total", source="database") == 2
    assert labelled(second, "billing_collection_paused") is None  # no made-up figure
    assert labelled(second, "billing_queue_depth", queue="notifications") == 1


def test_a_locked_table_costs_the_scrape_its_timeout_not_the_scrape(
    clean_db: Engine, pg_url: str
) -> None:
    """Scrape-time queries give up after their timeout; the scrape answers without them."""
    engine = make_engine(pg_url, poolclass=NullPool)
    collector = metrics.BillingCollector(
        {
            "database": lambda: metrics.database_families(
                metrics.read_database(engine), datetime.now(UTC)
            )
        }
    )
    with clean_db.connect() as blocker:
        blocker.execute(text("LOCK TABLE invoices IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        families = {f.name: f for f in collector.collect()}
        elapsed = time.monotonic() - started
        blocker.rollback()
    assert elapsed < metrics.QUERY_TIMEOUT_MS / 1000 + 2
    assert [s.value for s in families["billing_scrape_source_up"].samples] == [0]
    # Once the lock is gone, the same collector reads the figures again.
    families = {f.name: f for f in collector.collect()}
    assert [s.value for s in families["billing_scrape_source_up"].samples] == [1]
    assert "billing_collection_paused" in families
    engine.dispose()


# -- a real worker: pool processes count, the worker's own process serves ------------------

START = datetime(2027, 1, 31, 7, 0, tzinfo=UTC)


@pytest.fixture()
def gateway_server() -> Iterator[ServerHandle]:
    with start_server_in_thread(Sandbox(now=lambda: START)) as handle:
        yield handle


def test_a_prefork_worker_serves_what_its_pool_processes_counted(
    clean_db: Engine,
    pg_url: str,
    gateway_server: ServerHandle,
    redis11: redis.Redis[bytes],
    tmp_path: Path,
) -> None:
    key = new_key()
    gateway = FatoraClient(
        gateway_server.url.rstrip("/") + "/v1", gateway_server.sandbox.api_key, mode="test"
    )
    rt = Runtime(
        engine=clean_db,
        sessions=session_factory(clean_db),
        clock=DatabaseClock(clean_db),
        gateway=gateway,
        locker=PostgresAdvisoryLocker(clean_db),
        live_gateway=False,
    ).with_vault(TokenVault(key))
    DatabaseClock(clean_db).set(START)
    seed_plans(rt)
    for i in range(4):
        subscriber(rt, gateway_server.sandbox, ["success"], name=f"w{i}")
    ids = renew(rt)
    assert len(ids) == 4

    port = free_port()
    env = {
        **os.environ,
        "BILLING_MODE": "test",
        "BILLING_DATABASE_URL": pg_url,
        "BILLING_BROKER_URL": REDIS_URL,
        "BILLING_TOKEN_KEY": key,
        "BILLING_METRICS_PORT": str(port),
        "BILLING_METRICS_HOST": "127.0.0.1",
        "FATORA_BASE_URL": gateway_server.url.rstrip("/") + "/v1",
        "FATORA_API_KEY": gateway_server.sandbox.api_key,
        "FATORA_MODE": "test",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = start(
        [
            sys.executable,
            *("-m", "celery", "-A", "workers.app", "worker", "-Q", "charges"),
            *("--pool", "prefork", "-c", "2", "-n", "metrics@%h"),
            *("--without-mingle", "--without-gossip", "--loglevel=WARNING"),
        ],
        env,
        stderr=(tmp_path / "worker.log").open("wb"),
    )
    try:
        scrape(port, deadline_s=60)  # served as soon as the worker starts
        own_dir = Path(tempfile.gettempdir()) / f"billing-metrics-{worker.pid}"
        assert own_dir.is_dir()
        client = Celery("metrics-test", broker=REDIS_URL)
        for half in (ids[:2], ids[2:]):
            client.send_task("billing.charge_invoices", args=[half], queue="charges")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with rt.sessions() as session:
                open_ = session.execute(
                    select(Invoice.id).where(Invoice.status != InvoiceStatus.PAID.value)
                ).first()
            if open_ is None:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the worker did not charge the invoices")
        got = scrape(port)
        # Counted in the pool processes, added up by the worker's own process.
        writers = {int(p.stem.rsplit("_", 1)[1]) for p in own_dir.glob("*.db")}
        assert writers and worker.pid not in writers
    finally:
        code = stop(worker, timeout_s=60)
    assert code == 0, (tmp_path / "worker.log").read_text()
    log = (tmp_path / "worker.log").read_text()
    assert "metrics: not served" not in log and "not read" not in log, log
    assert labelled(got, "billing_charges_total", outcome="succeeded", currency="QAR") == 4
    assert labelled(got, "billing_collected_amount_total", currency="QAR") == 200
    collects = labelled(got, "billing_gateway_request_duration_seconds_count", call="collect")
    assert collects == 4
    assert labelled(got, "billing_gateway_requests_total", call="collect", result="2xx") == 4
    assert labelled(got, "billing_invoices_open", dunning_step="0") == 0
    assert labelled(got, "billing_scrape_source_up", source="database") == 1
    assert labelled(got, "billing_queue_depth", queue="charges") == 0
    assert not own_dir.exists()  # the worker removed the directory it made
