"""The wording of errors, without a server: settings, database errors, token rotation, ticks."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import psycopg
import pytest
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError, ProgrammingError

from billing.cli.base import error_line
from billing.clock import ClockWouldGoBack, parse_instant
from billing.config import (
    BillingSettings,
    FatoraSettings,
    SettingsError,
    load_settings,
    reset_settings_cache,
)
from billing.crypto import TokensUnreadable, TokenVault, new_key
from billing.migrate import describe_database_error
from billing.runner import tick_problem


@pytest.fixture(autouse=True)
def _fresh_settings() -> None:
    reset_settings_cache()


def test_settings_errors_name_every_variable_on_one_line_without_the_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BILLING_MODE", "sometimes")
    monkeypatch.setenv("BILLING_DATABASE_URL", "oracle://scott:tiger-pw@db/orcl")
    monkeypatch.setenv("BILLING_RENEWAL_BATCH_SIZE", "lots")
    with pytest.raises(SettingsError) as caught:
        load_settings(BillingSettings)
    message = str(caught.value)
    assert "\n" not in message
    for expected in ("BILLING_MODE:", "BILLING_DATABASE_URL:", "BILLING_RENEWAL_BATCH_SIZE:"):
        assert expected in message
    assert "oracle is not supported" in message
    for value in ("sometimes", "tiger-pw", "scott", "lots"):
        assert value not in message


def test_fatora_settings_are_named_with_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATORA_CONNECT_TIMEOUT_S", "-1")
    with pytest.raises(SettingsError, match=r"^setting FATORA_CONNECT_TIMEOUT_S: input should be"):
        load_settings(FatoraSettings)


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:p@h:5432/d", "postgres://h/d", "postgresql+psycopg://h/d", "sqlite:///x.db"],
)
def test_the_supported_database_urls_are_accepted(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("BILLING_DATABASE_URL", url)
    assert load_settings(BillingSettings).database_url == url


def test_a_connection_failure_is_told_from_a_missing_table() -> None:
    refused = OperationalError(
        "SELECT card_token FROM cards WHERE secret = %(s)s",
        {"s": "tok_secret"},
        psycopg.OperationalError(
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused\n\tIs the server running on that host?"
        ),
    )
    line = describe_database_error(refused)
    assert line is not None
    assert line.startswith("cannot reach the database (")
    assert "Connection refused" in line and "BILLING_DATABASE_URL" in line
    assert "\n" not in line and "tok_secret" not in line and "SELECT" not in line

    missing = ProgrammingError(
        "SELECT 1 FROM invoices", {}, psycopg.errors.UndefinedTable('relation "x" does not exist')
    )
    line = describe_database_error(missing)
    assert line is not None and "schema is not up to date" in line
    assert line.endswith("run `billing db upgrade`")

    no_column = OperationalError("SELECT", {}, sqlite3.OperationalError("no such column: y"))
    assert "billing db upgrade" in str(describe_database_error(no_column))
    assert describe_database_error(ValueError("not a database error")) is None


def test_error_line_words_broker_failures_and_unknown_errors() -> None:
    broker = RuntimeError("Retry limit exceeded")
    broker.__cause__ = KombuOperationalError(
        "Error 111 connecting to 127.0.0.1:1. Connection refused."
    )
    assert error_line(broker).startswith("cannot reach Redis (Error 111 connecting to 127.0.0.1:1")
    assert error_line(KeyError("x")) == "KeyError: 'x' (run again with --debug for the traceback)"
    assert error_line(ValueError("two\nlines")) == "two lines"


def test_rotate_all_names_every_unreadable_card_and_returns_nothing() -> None:
    old, new, lost = new_key(), new_key(), new_key()
    stored = {1: TokenVault(old).encrypt("tok-1"), 2: TokenVault(lost).encrypt("tok-2")}
    stored[3] = TokenVault(lost).encrypt("tok-3")
    vault = TokenVault(f"{new},{old}")
    with pytest.raises(TokensUnreadable) as caught:
        vault.rotate_all(stored)
    assert caught.value.card_ids == [2, 3]
    assert "cards 2, 3 cannot be decrypted" in str(caught.value)
    assert "billing cards remove 2 --local-only" in str(caught.value)

    rotated = vault.rotate_all({1: stored[1]})
    ciphertext, fingerprint = rotated[1]
    assert TokenVault(new).decrypt(ciphertext) == "tok-1"
    assert fingerprint == TokenVault(new).fingerprint("tok-1")


def test_tick_problem_prefers_a_raised_task_and_says_nothing_when_all_settled() -> None:
    assert tick_problem({"not_settled": [], "failed_tasks": []}, 300) is None
    assert tick_problem({}, 300) is None
    waiting = tick_problem({"not_settled": ["a", "b"], "failed_tasks": []}, 2.5)
    assert waiting is not None and waiting.startswith("2 charge task(s) not settled after 2.5 s")
    failed = [{"task_id": "t1", "error": "KeyError"}, {"task_id": "t2", "error": "OSError"}]
    raised = tick_problem({"not_settled": ["a"], "failed_tasks": failed}, 300)
    assert raised is not None and raised.startswith("charge task t1 raised KeyError and 1 more")


def test_a_bad_time_is_quoted_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"'2027-13-45' \(month must be in 1\.\.12\)"):
        parse_instant("2027-13-45")
    assert parse_instant("2027-01-31T09:00:00+03:00") == datetime(2027, 1, 31, 6, tzinfo=UTC)


def test_the_clock_going_back_says_from_when_to_when() -> None:
    refused = ClockWouldGoBack(datetime(2027, 3, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC))
    assert str(refused) == (
        "the test clock is at 2027-03-01T00:00:00Z: 2027-02-01T00:00:00Z would move it back"
    )
