"""`billing events list|deliver|retry` as an operator meets them, on PostgreSQL and on SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from billing.config import reset_settings_cache
from billing.notify import max_tries
from billing.runtime import reset_runtime
from tests.integration.test_cli import ROOT, _one_error_line, cli_env, run
from tests.receivers import Endpoint, http_endpoint

__all__ = ["cli_env"]  # the fixture, on both databases

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture()
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    """A merchant endpoint, configured as BILLING_WEBHOOK_URL (no SMTP: email is skipped)."""
    with http_endpoint(Endpoint()) as endpoint:
        monkeypatch.setenv("BILLING_WEBHOOK_URL", endpoint.url)
        monkeypatch.setenv("BILLING_WEBHOOK_SECRET", SECRET)
        monkeypatch.delenv("BILLING_SMTP_URL", raising=False)
        reset_settings_cache()
        reset_runtime()
        yield endpoint
    reset_settings_cache()


def _subscribe() -> None:
    run("plans", "sync", str(ROOT / "plans.example.toml"))
    run(
        "customers",
        "add",
        "--external-id",
        "C1",
        "--name",
        "Amal",
        "--email",
        "amal@example.com",
    )
    run(
        "subscriptions",
        "create",
        "--customer",
        "C1",
        "--plan",
        "basic-monthly",
        "--start",
        "2027-01-31T09:00:00Z",
    )


def test_deliver_sends_the_webhook_and_list_shows_it_delivered(
    cli_env: str, hook: Endpoint, tmp_path: Path
) -> None:
    """`events deliver` sends what is due (signed) and says how it went; `events list --json`
    then shows the event delivered, with its webhook channel sent; a second deliver sends
    nothing more."""
    run("clock", "set", "2027-01-01T00:00:00Z")
    _subscribe()
    counts = json.loads(run("events", "deliver", "--json"))
    assert counts["delivered"] == 1 and counts["failed"] == 0
    assert "delivered 0" in run("events", "deliver")
    [request] = hook.requests
    body = Webhook(SECRET).verify(request.body, request.headers)
    assert body["type"] == "subscription.created"
    [event] = json.loads(run("events", "list", "--json"))
    assert event["kind"] == "subscription.created" and event["status"] == "delivered"
    assert event["channels"]["webhook"]["status"] == "sent"
    assert event["delivered_at"] == "2027-01-01T00:00:00Z"
    assert request.headers["webhook-id"] == str(event["id"])
    assert "subscription.created" in run("events", "list")


def test_a_failing_endpoint_ends_failed_is_listed_and_can_be_retried(
    cli_env: str, hook: Endpoint
) -> None:
    """An endpoint that answers 500 for a day: after the bounded tries the event is failed and
    `events list --failed` shows it with the reason; once the endpoint is fixed,
    `events retry --all-failed` and the next deliver send it."""
    hook.default = 500
    run("clock", "set", "2027-01-01T00:00:00Z")
    _subscribe()
    for _ in range(max_tries()):
        run("events", "deliver")
        run("clock", "advance", "6h")
    assert len(hook.requests) == max_tries()
    [failed] = json.loads(run("events", "list", "--failed", "--json"))
    assert failed["status"] == "failed" and failed["attempts"] == max_tries()
    assert failed["last_error"] == "webhook: the webhook endpoint answered HTTP 500"
    text = run("events", "list", "--failed")
    assert "subscription.created" in text and "failed" in text
    assert json.loads(run("events", "list", "--status", "pending", "--json")) == []

    hook.default = 200
    assert json.loads(run("events", "retry", "--all-failed", "--json")) == {
        "retried": [failed["id"]]
    }
    assert json.loads(run("events", "deliver", "--json"))["delivered"] == 1
    assert "no failed event" in run("events", "list", "--failed")


def test_event_command_mistakes_are_one_line(cli_env: str) -> None:
    """A wrong status, an event that is not failed, or no event named: one line, no trace, and
    nothing changed."""
    line = _one_error_line(run("events", "list", "--status", "lost", ok=False))
    assert "pending, delivered, skipped, failed" in line
    line = _one_error_line(run("events", "retry", "999", ok=False))
    assert "not a failed event: 999" in line
    _one_error_line(run("events", "retry", ok=False))
    assert json.loads(run("events", "list", "--json")) == []
