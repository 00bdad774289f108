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


def _add_customer(external_id: str = "C1") -> None:
    run(
        "customers",
        "add",
        "--external-id",
        external_id,
        "--name",
        "Amal",
        "--email",
        "amal@example.com",
        "--timezone",
        "Asia/Qatar",
    )


def _stored_tokens(url: str) -> list[str]:
    """The card tokens in the database, decrypted with the key the CLI used."""
    from billing.crypto import vault_from_settings

    vault = vault_from_settings()
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT ciphertext FROM card_tokens ORDER BY id")).all()
    engine.dispose()
    return [vault.decrypt(bytes(row[0])) for row in rows]


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ") and "Traceback" not in output
    return lines[0]


def test_a_card_token_written_on_the_command_line_is_refused_and_never_echoed(
    cli_env: str,
) -> None:
    """A token never sits in the process list or the shell history: `--token VALUE` is refused
    before anything is stored, with one line that says how to pass it (stdin, a file or an
    environment variable) and does not repeat the value."""
    _add_customer()
    for args in (("--token", TOKEN), (f"--token={TOKEN}",), ("--token", "tok_live_123")):
        output = run("cards", "add", "--customer", "C1", *args, ok=False)
        line = _one_error_line(output)
        assert "command line" in line
        for way in ("--token -", "--token-file PATH", "--token-env NAME"):
            assert way in line
        assert TOKEN not in output and "Ab+/Cd" not in output and "tok_live_123" not in output
    assert _stored_tokens(cli_env) == []


def test_a_card_token_is_read_from_stdin_a_file_or_an_environment_variable(
    cli_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three ways in store exactly the token given (a file's trailing newline is not part of
    it), and giving none or two of them is one clear error line."""
    _add_customer()
    from_stdin, from_file, from_env = TOKEN + "s", TOKEN + "f", TOKEN + "e"
    run("cards", "add", "--customer", "C1", "--token", "-", input=from_stdin + "\n")
    token_file = tmp_path / "token.txt"
    token_file.write_text(from_file + "\n")
    run("cards", "add", "--customer", "C1", "--token-file", str(token_file))
    monkeypatch.setenv("MY_CARD_TOKEN", from_env)
    run("cards", "add", "--customer", "C1", "--token-env", "MY_CARD_TOKEN")
    assert _stored_tokens(cli_env) == [from_stdin, from_file, from_env]

    line = _one_error_line(run("cards", "add", "--customer", "C1", ok=False))
    assert "missing" in line and "--token-file PATH" in line
    both = ("--token-file", str(token_file), "--token-env", "MY_CARD_TOKEN")
    line = _one_error_line(run("cards", "add", "--customer", "C1", *both, ok=False))
    assert "one way only" in line


def test_token_source_errors_never_repeat_what_was_given(cli_env: str, tmp_path: Path) -> None:
    """A token pasted where a file name or a variable name belongs is not echoed back either."""
    _add_customer()
    for args in (
        ("--token-file", str(tmp_path / TOKEN)),
        ("--token-env", TOKEN),
        ("--token-env", "UNSET_CARD_TOKEN_VARIABLE"),
    ):
        output = run("cards", "add", "--customer", "C1", *args, ok=False)
        _one_error_line(output)
        assert args[1] not in output and "Ab+/Cd" not in output
    assert _stored_tokens(cli_env) == []


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


def _quarantine_both(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """Through the real passes (called directly: no broker is involved): C1's renewal raises
    (its time zone left the tz database), C2's invoice raises in the write-ahead. Returns C1's
    subscription, C2's and C2's invoice."""
    from billing.runtime import get_runtime
    from billing.services import dunning_flow
    from billing.services.charging import collect_invoices
    from schedules.renewal import run_renewal_pass

    run("plans", "sync", str(ROOT / "plans.example.toml"))
    run("clock", "set", "2027-01-31T09:00:00Z")
    subs = []
    for external_id in ("C1", "C2"):
        _add_customer(external_id)
        created = run(
            "subscriptions", "create", "--customer", external_id, "--plan", "basic-monthly"
        )
        subs.append(int(created.strip()))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE customers SET timezone = 'US/Pacific-New' WHERE external_id = 'C1'")
        )
    engine.dispose()

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("card store unreachable")

    monkeypatch.setattr(dunning_flow, "usable_card", broken)
    rt = get_runtime()
    renewed = run_renewal_pass(rt)
    assert renewed.quarantined == [subs[0]]
    (invoice_id,) = renewed.invoice_ids
    assert collect_invoices(rt, [invoice_id]).results == {invoice_id: "quarantined"}
    return subs[0], subs[1], invoice_id


def test_quarantine_list_shows_what_was_set_aside_and_why(
    cli_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator sees every quarantined row (table, id, since, reason, next retry), as a
    table and as JSON, and never more than the exception's class and message."""
    assert "nothing is quarantined" in run("quarantine", "list")
    assert json.loads(run("quarantine", "list", "--json")) == []
    sub_id, _, invoice_id = _quarantine_both(cli_env, monkeypatch)
    rows = json.loads(run("quarantine", "list", "--json"))
    by_table = {r["table"]: r for r in rows}
    assert len(rows) == 2
    assert (by_table["subscriptions"]["id"], by_table["invoices"]["id"]) == (sub_id, invoice_id)
    for row in rows:
        assert row["since"] == "2027-01-31T09:00:00Z"
        assert row["next_retry"] == "2027-01-31T10:00:00Z"
    assert "US/Pacific-New" in by_table["subscriptions"]["reason"]
    assert by_table["invoices"]["reason"] == "RuntimeError: card store unreachable"
    shown = run("quarantine", "list")
    for expected in ("subscriptions", "invoices", "RuntimeError", "next_retry"):
        assert expected in shown


def test_quarantine_release_frees_rows_at_once(
    cli_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Release clears the quarantine and makes the row due now (the next pass tries it), with
    a row.released event; a row that was not quarantined or does not exist is said so."""
    sub_id, other_sub_id, invoice_id = _quarantine_both(cli_env, monkeypatch)
    released = json.loads(
        run(
            "quarantine",
            "release",
            "--subscription",
            str(sub_id),
            "--invoice",
            str(invoice_id),
            "--json",
        )
    )
    assert released == [
        {"table": "subscriptions", "id": sub_id, "released": True},
        {"table": "invoices", "id": invoice_id, "released": True},
    ]
    assert json.loads(run("quarantine", "list", "--json")) == []
    (invoice,) = json.loads(run("invoices", "list", "--subscription", str(other_sub_id), "--json"))
    assert invoice["next_attempt_at"] == "2027-01-31T09:00:00Z"  # due again at once
    assert invoice["quarantined_at"] is None
    engine = create_engine(cli_env)
    with engine.connect() as conn:
        payloads = conn.execute(
            text("SELECT payload FROM events WHERE kind = 'row.released' ORDER BY id")
        ).scalars()
        events = [p if isinstance(p, dict) else json.loads(p) for p in payloads]
    engine.dispose()
    assert [(e["table"], e["id"], e["by"]) for e in events] == [
        ("subscriptions", sub_id, "operator"),
        ("invoices", invoice_id, "operator"),
    ]
    again = run("quarantine", "release", "--invoice", str(invoice_id))
    assert "was not quarantined" in again
    assert "no invoice 999" in _one_error_line(
        run("quarantine", "release", "--invoice", "999", ok=False)
    )
    assert "--subscription" in _one_error_line(run("quarantine", "release", ok=False))


def test_reconcile_after_restore_reports_what_it_asked(cli_env: str) -> None:
    """An operator restoring a backup gets a plain account of what was asked and found; on a
    database with nothing due and nothing open, nothing is asked and nothing is charged."""
    out = run("reconcile", "--after-restore")
    assert "invoiced 0 due period(s) again" in out
    assert "no payment made after the backup was found" in out
    data = json.loads(run("reconcile", "--after-restore", "--json"))
    assert (data["invoices_created"], data["order_ids_asked"], data["found"]) == (0, 0, {})


def test_invoices_link_names_a_missing_invoice_in_one_line(cli_env: str) -> None:
    """An operator asking for a link to an invoice that does not exist gets one clear line."""
    out = run("invoices", "link", "999", ok=False)
    assert "no invoice 999" in out
    assert "Traceback" not in out
