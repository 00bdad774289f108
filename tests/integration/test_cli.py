"""The command line as a new user meets it, on PostgreSQL and on SQLite."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from billing.cli import app
from billing.config import reset_settings_cache
from billing.crypto import new_key
from billing.db import get_engine
from billing.runtime import reset_runtime

ROOT = Path(__file__).resolve().parents[2]
BAD_PLANS = """
[plans.basic]
name = "Basic"
amount = "50.001"
currency = "QAR"
interval = "month"

[plans.office]
name = "Office"
amount = "1.250"
currency = "XYZ"
cron = "61 9 * * MON"
trial_days = -3
dunning = "gentle"
"""
TOKEN = "Ab+/Cd|Ef\\\\12zZ=="  # what a Fatora token looks like: + / \\ |


@pytest.fixture(params=["postgresql", "sqlite"])
def cli_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_db: object,
) -> Iterator[str]:
    if request.param == "postgresql":
        url = str(clean_db.url.render_as_string(hide_password=False))  # type: ignore[attr-defined]
    else:
        url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    monkeypatch.setenv("BILLING_DATABASE_URL", url)
    monkeypatch.setenv("BILLING_TOKEN_KEY", new_key())
    monkeypatch.setenv("BILLING_MODE", "test")
    monkeypatch.setenv("BILLING_BROKER_URL", "memory://")
    monkeypatch.setenv("FATORA_BASE_URL", "sandbox://embedded")
    reset_settings_cache()
    reset_runtime()
    run("db", "upgrade")
    yield url
    reset_settings_cache()
    reset_runtime()
    get_engine.cache_clear()


def run(*args: str, input: str | None = None, ok: bool = True) -> str:
    result = CliRunner().invoke(app, list(args), input=input)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result.output


def test_a_plans_file_with_mistakes_is_rejected_whole(cli_env: str, tmp_path: Path) -> None:
    """Every mistake is named with file, entry and field; nothing is written."""
    bad = tmp_path / "plans.toml"
    bad.write_text(BAD_PLANS)
    output = run("plans", "sync", str(bad), ok=False)
    for expected in (
        "plans.basic.amount",
        "plans.office.currency",
        "plans.office.cron",
        "plans.office.trial_days",
        "plans.office.dunning",
        str(bad),
    ):
        assert expected in output
    assert "Traceback" not in output
    assert json.loads(run("plans", "list", "--json")) == []


def test_valid_plans_sync_twice_changes_nothing_the_second_time(cli_env: str) -> None:
    """Sync is idempotent."""
    example = str(ROOT / "plans.example.toml")
    run("plans", "check", example)
    first = json.loads(run("plans", "sync", example, "--json"))["changes"]
    assert any("create plan basic-monthly" in c for c in first)
    assert json.loads(run("plans", "sync", example, "--json"))["changes"] == []


def test_customer_card_subscription_and_the_token_is_not_readable_at_rest(cli_env: str) -> None:
    """The whole path a merchant walks; the card token is stored only encrypted."""
    run("plans", "sync", str(ROOT / "plans.example.toml"))
    customer = json.loads(
        run(
            "customers",
            "add",
            "--external-id",
            "C1",
            "--name",
            "Amal",
            "--email",
            "amal@example.com",
            "--timezone",
            "Asia/Qatar",
            "--json",
        )
    )
    assert customer["external_id"] == "C1"
    card_id = run("cards", "add", "--customer", "C1", "--token", "-", input=TOKEN + "\n").strip()
    sub = json.loads(
        run(
            "subscriptions",
            "create",
            "--customer",
            "C1",
            "--plan",
            "basic-monthly",
            "--card",
            card_id,
            "--start",
            "2027-01-31T09:00:00Z",
            "--json",
        )
    )
    assert sub["status"] == "active" and sub["next_billing_at"] == "2027-01-31T09:00:00Z"
    shown = json.loads(run("subscriptions", "show", str(sub["id"]), "--json"))
    assert shown["invoices"] == []
    listed = json.loads(run("subscriptions", "list", "--status", "active", "--json"))
    assert [s["id"] for s in listed] == [sub["id"]]
    # The raw database never holds the token in the clear, nor does any command's output.
    engine = create_engine(cli_env)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT ciphertext, fingerprint FROM card_tokens")).all()
    engine.dispose()
    assert len(rows) == 1
    stored = bytes(rows[0][0]) + rows[0][1].encode()
    real = TOKEN.replace("\\\\", "\\").encode()
    assert real not in stored and b"Ab+/Cd" not in stored
    assert "Ab+/Cd" not in run("subscriptions", "show", str(sub["id"]), "--json")


def test_errors_are_one_line_never_a_traceback(cli_env: str) -> None:
    output = run("subscriptions", "create", "--customer", "nobody", "--plan", "x", ok=False)
    assert "no customer with external id 'nobody'" in output
    assert "Traceback" not in output
    assert "must be one of" in run("invoices", "list", "--status", "late", ok=False)


def test_the_test_clock_moves_and_is_refused_in_live_mode(
    cli_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("clock", "set", "2027-01-31T00:00:00Z")
    assert run("clock", "advance", "1d").strip() == "2027-02-01T00:00:00Z"
    monkeypatch.setenv("BILLING_MODE", "live")
    reset_settings_cache()
    assert "refused in live mode" in run("clock", "set", "2027-01-31T00:00:00Z", ok=False)
    os.environ["BILLING_MODE"] = "test"
    reset_settings_cache()
