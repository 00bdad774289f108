"""End to end: Flower, started as the README says, watching a real worker on real Redis and
PostgreSQL, read through its HTTP API as an operator's tools would.

Invariants: Flower answers nothing without its login; it lists the worker; its task list shows
the billing tasks with invoice ids as named arguments and results that say which invoices were
charged and what came of them; and nothing it shows (task arguments, results, errors, worker
details) holds a card token, the Fatora API key or the token key. The compose file's health
checks for the worker and for Flower are run against the same processes.

Redis db 13 of the test Redis server: this suite's own.
"""

from __future__ import annotations

import ast
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
import yaml
from celery import Celery
from sqlalchemy import Engine, select

from billing.clock import DatabaseClock
from billing.crypto import new_key
from billing.fatora.sandbox import Sandbox, ServerHandle, start_server_in_thread
from billing.models import Invoice
from tests.e2e.test_workers import _runtime
from tests.factories import seed_plans, subscriber
from tests.receivers import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CELERY = Path(sys.executable).with_name("celery")
START = datetime(2027, 5, 1, 7, 0, tzinfo=UTC)
PAYING = ("success", "success", "success")
DECLINED = ("insufficient_funds",)


def _redis_url() -> str:
    """The test Redis server of BILLING_TEST_REDIS_URL, database 13."""
    base = urlsplit(os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    return urlunsplit(base._replace(path="/13"))


REDIS_URL = _redis_url()


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
    app = Celery("flower-e2e-client", broker=REDIS_URL)
    app.conf.task_serializer = "json"
    yield app
    client.flushdb()


@pytest.fixture()
def gateway() -> Iterator[ServerHandle]:
    # A key of its own, so that the scan below looks for a value nobody else uses.
    sandbox = Sandbox(now=lambda: START, api_key=f"fatora-e2e-{secrets.token_hex(12)}")
    with start_server_in_thread(sandbox, latency_ms=5) as handle:
        yield handle


class Processes:
    """Flower and worker processes, stopped (with their children) at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=log
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture()
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    yield running
    running.stop_all()


class Flower:
    """A Flower process on 127.0.0.1, behind basic auth, and an HTTP client logged in to it."""

    def __init__(self, processes: Processes) -> None:
        self.port = free_port()
        self.login = f"ops:{secrets.token_urlsafe(16)}"
        self.base = f"http://127.0.0.1:{self.port}"
        # Exactly the README's command (and the compose service's), bound to this host only;
        # its environment is what compose gives it: the broker and its login, nothing else.
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "BILLING_BROKER_URL": REDIS_URL,
            "FLOWER_BASIC_AUTH": self.login,
        }
        args = [str(CELERY), "-A", "workers.app", "flower"]
        args += ["--address=127.0.0.1", f"--port={self.port}"]
        self.proc = processes.start("flower", args, self.env)
        self.processes = processes
        user, _, password = self.login.partition(":")
        self.http = httpx.Client(base_url=self.base, auth=(user, password), timeout=15)

    def wait_until_up(self, deadline_s: float = 60.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"Flower exited ({self.proc.returncode}):\n{self.processes.log('flower')}"
                )
            try:
                if httpx.get(f"{self.base}/healthcheck", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"Flower did not start:\n{self.processes.log('flower')}")

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
        return response.json()


@pytest.fixture()
def flower(processes: Processes, broker: Celery) -> Iterator[Flower]:
    running = Flower(processes)
    running.wait_until_up()
    yield running
    running.http.close()


def _worker_env(pg_url: str, gateway: ServerHandle, token_key: str) -> dict[str, str]:
    return {
        **os.environ,
        "BILLING_MODE": "test",
        "BILLING_DATABASE_URL": pg_url,
        "BILLING_BROKER_URL": REDIS_URL,
        "BILLING_TOKEN_KEY": token_key,
        "BILLING_CHARGE_BATCH_SIZE": "2",
        "BILLING_METRICS_PORT": "0",
        "FATORA_BASE_URL": gateway.url.rstrip("/") + "/v1",
        "FATORA_API_KEY": gateway.sandbox.api_key,
        "FATORA_MODE": "test",
        "FATORA_TIMEOUT_S": "5",
    }


def _compose_healthcheck(service: str) -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    test = compose["services"][service]["healthcheck"]["test"]
    assert isinstance(test, list)
    return [str(part) for part in test]


def _strings(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON document, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _leaks(document: Any, secret_values: list[str]) -> list[str]:
    """The secrets that appear in ``document``, as themselves or as Python shows them in a repr
    (task arguments and results are reprs: a backslash comes doubled)."""
    forms = {s: {s, repr(s)[1:-1]} for s in secret_values if s}
    return [
        secret
        for secret, shapes in forms.items()
        if any(shape in text for text in _strings(document) for shape in shapes)
    ]


def _wait_for_tasks(
    flower: Flower, expected_invoices: set[int], deadline_s: float = 90.0
) -> dict[str, dict[str, Any]]:
    """Flower's task list once every invoice has been through a charge task that succeeded."""
    deadline = time.monotonic() + deadline_s
    tasks: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        tasks = flower.get("/api/tasks")
        charged = {
            invoice_id
            for task in tasks.values()
            if task["name"] == "billing.charge_invoices" and task["state"] == "SUCCESS"
            for invoice_id in ast.literal_eval(task["kwargs"])["invoice_ids"]
        }
        if charged >= expected_invoices:
            return tasks
        time.sleep(0.5)
    summary = {task["name"]: task["state"] for task in tasks.values()}
    raise AssertionError(f"the charge tasks did not all succeed in Flower's view: {summary}")


def test_flower_shows_the_worker_and_readable_billing_tasks_without_secrets(
    clean_db: Engine,
    pg_url: str,
    gateway: ServerHandle,
    broker: Celery,
    flower: Flower,
    processes: Processes,
) -> None:
    # Nothing without the login, or with a wrong one.
    for path in ("/api/workers", "/api/tasks", "/tasks", "/"):
        assert httpx.get(flower.base + path, timeout=10).status_code == 401, path
    wrong = httpx.get(flower.base + "/api/tasks", auth=("ops", "not-it"), timeout=10)
    assert wrong.status_code == 401

    token_key = new_key()
    rt = _runtime(clean_db, gateway, token_key)
    DatabaseClock(clean_db).set(START)
    seed_plans(rt)
    sandbox = gateway.sandbox
    for i, behaviour in enumerate(PAYING + DECLINED):
        subscriber(rt, sandbox, [behaviour], name=f"f{i}")

    worker_name = f"celery@{socket.gethostname()}"
    worker_args = [str(CELERY), "-A", "workers.app", "worker", "-Q", "charges,maintenance"]
    worker_args += ["-c", "2", "--loglevel=INFO", "--without-mingle", "--without-gossip"]
    processes.start("worker", worker_args, _worker_env(pg_url, gateway, token_key))

    # The worker, as Flower lists it (asked through the broker).
    deadline = time.monotonic() + 60
    workers: dict[str, Any] = {}
    while worker_name not in workers and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = flower.get("/api/workers", refresh=1)
    assert worker_name in workers, f"Flower lists {sorted(workers)}:\n{processes.log('worker')}"
    queues = {queue["name"] for queue in workers[worker_name]["active_queues"]}
    assert queues == {"charges", "maintenance"}
    assert {"billing.renew", "billing.charge_invoices"} <= set(workers[worker_name]["registered"])

    # The renewal pass, as beat sends it: the worker invoices the due subscriptions and queues
    # their charges, two invoices per task.
    broker.send_task("billing.renew", queue="maintenance")
    deadline = time.monotonic() + 60
    invoices: dict[int, int] = {}
    while len(invoices) < len(PAYING + DECLINED) and time.monotonic() < deadline:
        time.sleep(0.3)
        with rt.sessions() as session:
            rows = session.execute(select(Invoice.id, Invoice.subscription_id)).all()
        invoices = {invoice_id: subscription_id for invoice_id, subscription_id in rows}
    assert len(invoices) == len(PAYING + DECLINED), processes.log("worker")

    tasks = _wait_for_tasks(flower, set(invoices))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for task in tasks.values():
        by_name.setdefault(task["name"], []).append(task)

    (renewal,) = by_name["billing.renew"]
    assert renewal["state"] == "SUCCESS" and renewal["worker"] == worker_name
    renewed = ast.literal_eval(renewal["result"])
    assert renewed["invoices"] == sorted(invoices)
    assert renewed["charge_tasks"] == 2

    charges = by_name["billing.charge_invoices"]
    assert len(charges) == 2
    seen: list[int] = []
    outcomes: dict[str, int] = {}
    for task in charges:
        # Ids only, named: no positional list to decode, no token, no amount.
        assert ast.literal_eval(task["args"]) in ((), [])
        kwargs = ast.literal_eval(task["kwargs"])
        assert set(kwargs) == {"invoice_ids"}
        assert all(isinstance(i, int) for i in kwargs["invoice_ids"])
        result = ast.literal_eval(task["result"])
        assert result["invoices"] == kwargs["invoice_ids"]
        assert set(result["results"]) == {str(i) for i in kwargs["invoice_ids"]}
        counts = {k: v for k, v in result.items() if isinstance(v, int)}
        assert sum(counts.values()) == len(kwargs["invoice_ids"])
        for word, count in counts.items():
            outcomes[word] = outcomes.get(word, 0) + count
        seen += kwargs["invoice_ids"]
    assert sorted(seen) == sorted(invoices)
    assert outcomes == {"paid": len(PAYING), "soft_declined": len(DECLINED)}

    # Nothing Flower shows holds a secret: the tasks, one by one, and the worker's details.
    secret_values = [*sandbox.issued_tokens(), sandbox.api_key, token_key]
    assert len(sandbox.issued_tokens()) == len(PAYING + DECLINED)
    documents = [tasks, *(flower.get(f"/api/task/info/{uuid}") for uuid in tasks)]
    documents.append(flower.get("/api/workers", refresh=1))
    for document in documents:
        assert not _leaks(document, secret_values), "Flower shows a secret"
    assert not _leaks(processes.log("flower"), secret_values)

    # The compose file's health checks, run against these processes.
    worker_check = _compose_healthcheck("worker")
    assert worker_check[0] == "CMD-SHELL"
    shell_check = worker_check[1].replace("$$", "$").replace("celery ", f"{CELERY} ", 1)
    check_env = {**_worker_env(pg_url, gateway, token_key), "HOSTNAME": socket.gethostname()}
    done = subprocess.run(
        ["sh", "-c", shell_check], env=check_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong" in done.stdout

    flower_check = _compose_healthcheck("flower")
    assert flower_check[:3] == ["CMD", "python", "-c"]
    code = flower_check[3].replace("127.0.0.1:5555", f"127.0.0.1:{flower.port}")
    assert code != flower_check[3]
    run_check = [sys.executable, "-c", code]
    healthy = subprocess.run(run_check, env=flower.env, capture_output=True, timeout=30)
    assert healthy.returncode == 0, healthy.stderr
    locked_out = {**flower.env, "FLOWER_BASIC_AUTH": "ops:wrong"}
    unhealthy = subprocess.run(run_check, env=locked_out, capture_output=True, timeout=30)
    assert unhealthy.returncode != 0
    assert b"401" in unhealthy.stderr
