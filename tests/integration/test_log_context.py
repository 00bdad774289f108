"""The charge path's log lines, against real PostgreSQL and the sandbox: every line carries the
invoice, subscription, order and attempt ids it is about, on the calling thread and on the
gateway threads, and never the card token. The worker and ``billing web`` log through the same
setup."""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from billing.cli import app
from billing.config import reset_settings_cache
from billing.crypto import new_key
from billing.fatora.sandbox import Sandbox
from billing.logs import MASK, configure_logging
from billing.migrate import upgrade
from billing.runtime import Runtime
from billing.services.charging import collect_invoices
from billing.services.customers import add_card, add_customer
from billing.services.subscriptions import create_subscription, plan_by_code
from tests.factories import attempts_of, invoice_of, renew, seed_plans, subscriber

ROOT = Path(__file__).resolve().parents[2]
CHARGE_IDS = ("invoice_id", "subscription_id", "order_id", "attempt_id")


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    """JSON lines from the root logger at INFO; the root logger is put back as it was."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    filters = {h: list(h.filters) for h in handlers}
    level = root.level
    stream = io.StringIO()
    configure_logging(level=logging.INFO, log_format="json", stream=stream)
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        handler.filters = filters[handler]
    root.setLevel(level)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_of_a_charge_carries_its_ids(
    rt: Runtime, sandbox: Sandbox, captured: io.StringIO
) -> None:
    """Two invoices charged in one batch, their gateway calls on pool threads at the same time:
    each line names one invoice with its own subscription, order and attempt."""
    seed_plans(rt)
    subs = {subscriber(rt, sandbox, [b], name=b) for b in ("success", "insufficient_funds")}
    invoice_ids = renew(rt)
    captured.truncate(0)
    captured.seek(0)

    report = collect_invoices(rt, invoice_ids)

    assert sorted(report.results.values()) == ["paid", "soft_declined"]
    expected = {}
    for invoice_id in invoice_ids:
        (attempt,) = attempts_of(rt, invoice_id)
        sub_id = invoice_of(rt, invoice_id).subscription_id
        expected[invoice_id] = {
            "invoice_id": invoice_id,
            "subscription_id": sub_id,
            "order_id": attempt.order_id,
            "attempt_id": attempt.id,
        }
    assert {e["subscription_id"] for e in expected.values()} == subs
    records = _records(captured)
    for record in records:
        assert {k: record.get(k) for k in CHARGE_IDS} == expected[record["invoice_id"]], record
    gateway = [r for r in records if r["logger"] == "billing.fatora"]
    assert len(gateway) == 4  # a collect and a verify per invoice, each on a call thread
    assert {r["invoice_id"] for r in gateway} == set(invoice_ids)
    assert threading.current_thread().name not in {r["thread"] for r in gateway}
    outcomes = [r["message"] for r in records if r["logger"] == "billing.charging"]
    assert sorted(outcomes) == [
        "attempt outcome declined: soft_declined",
        "attempt outcome succeeded: paid",
    ]
    assert len(records) == len(gateway) + len(outcomes)


def test_a_failure_on_a_gateway_thread_is_logged_with_its_ids_and_never_the_token(
    rt: Runtime, sandbox: Sandbox, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collect that raises with the card token in its message (a bug in a client, a proxy
    library): the traceback is logged, on the gateway thread, with the ids; the token read from
    the vault is not, though nothing in its shape gives it away."""
    token = "tok7Hq2Lm9Xc4Vn8Jh3Bq6Zr"
    seed_plans(rt)
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        customer = add_customer(session, external_id="c", name="C", email="c@example.com", now=now)
        card = add_card(session, rt.vault, customer=customer, token=token, now=now, issued_at=now)
        sub = create_subscription(
            session, customer=customer, plan=plan_by_code(session, "monthly"), now=now, card=card
        )
        sub_id = sub.id
    (invoice_id,) = renew(rt)

    def broken_collect(card_token: str, *_: object, **__: object) -> None:
        raise RuntimeError(f"connection reset while sending card token {card_token}")

    monkeypatch.setattr(rt.gateway, "collect_payment", broken_collect)
    captured.truncate(0)
    captured.seek(0)

    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"

    output = captured.getvalue()
    assert token not in output
    (attempt,) = attempts_of(rt, invoice_id)
    (failure,) = [r for r in _records(captured) if r["level"] == "error"]
    assert failure["message"] == f"collect failed for attempt {attempt.id}"
    assert f"RuntimeError: connection reset while sending card token {MASK}" in failure["exception"]
    assert (failure["invoice_id"], failure["subscription_id"]) == (invoice_id, sub_id)
    assert (failure["order_id"], failure["attempt_id"]) == (attempt.order_id, attempt.id)
    assert failure["thread"] != threading.current_thread().name  # a gateway call thread


def test_billing_web_logs_through_the_same_setup(
    monkeypatch: pytest.MonkeyPatch, captured: io.StringIO
) -> None:
    """``billing web`` installs the JSON format and the filters before serving."""
    import uvicorn

    token = Sandbox().issue_token("success")
    seen: dict[str, Any] = {}

    def serve(*_: object, **__: object) -> None:
        root = logging.getLogger()
        seen["formatters"] = [type(h.formatter).__name__ for h in root.handlers]
        logging.getLogger("billing.web").warning("return page for card_token=%s", token)

    monkeypatch.setattr(uvicorn, "run", serve)
    monkeypatch.setenv("BILLING_LOG_FORMAT", "json")
    reset_settings_cache()
    try:
        result = CliRunner().invoke(app, ["web", "--port", "8123"])
    finally:
        reset_settings_cache()
    assert result.exit_code == 0, result.output
    assert "JsonFormatter" in seen["formatters"]
    assert token not in result.output
    (line,) = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    assert line["message"] == f"return page for card_token={MASK}"


def test_a_worker_writes_json_lines_without_secrets(tmp_path: Path) -> None:
    """A real ``celery worker`` with BILLING_LOG_FORMAT=json: Celery's own lines, from start to
    ready, are JSON objects, and neither the API key nor the token key is in any of them."""
    url = f"sqlite:///{tmp_path / 'worker.sqlite3'}"
    upgrade(url)
    api_key, token_key = "live-key-0b9e7c1d5a", new_key()
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": url,
        "BILLING_BROKER_URL": "memory://",
        "BILLING_TOKEN_KEY": token_key,
        "FATORA_API_KEY": api_key,
        "BILLING_LOG_FORMAT": "json",
        "BILLING_METRICS_PORT": "0",
        "BILLING_MODE": "test",
        "FATORA_MODE": "test",
    }
    command = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "solo"]
    command += ["-l", "INFO", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=60)
            if line is None:
                break
            seen.append(line)
            if " ready." in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    records = [json.loads(line) for line in seen if line.strip()]
    assert any(r["message"].endswith(" ready.") for r in records), seen
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert api_key not in "".join(seen) and token_key not in "".join(seen)
