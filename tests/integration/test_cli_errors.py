"""Every mistake an operator can make gives one line on standard error, naming the cause and
what to do, and a non-zero exit; ``--debug`` (or ``BILLING_DEBUG=1``) shows the traceback.

Against the real PostgreSQL: an unreachable one (a closed port), an empty one (never migrated)
and the suite's own migrated database; the daemons are started as real ``celery`` processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult, EagerResult
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from billing.cli import app
from billing.config import reset_settings_cache
from billing.crypto import TokenVault, new_key
from billing.db import get_engine, session_factory
from billing.models import CardToken
from billing.runtime import reset_runtime
from tests.integration.conftest import PG_URL

ROOT = Path(__file__).resolve().parents[2]
# Nothing listens on port 1: every connection to it is refused at once.
REFUSED_PG = "postgresql://billing:pg-s3cret-pw@127.0.0.1:1/billing"
REFUSED_REDIS = "redis://127.0.0.1:1/0"
SECRET = "s3cret-pw-never-shown"


# -- helpers ---------------------------------------------------------------------------------


def _reset() -> None:
    reset_settings_cache()
    reset_runtime()
    get_engine.cache_clear()


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A working test-mode environment on a fresh SQLite file; a test overrides what it breaks."""
    values = {
        "BILLING_MODE": "test",
        "BILLING_DATABASE_URL": f"sqlite:///{tmp_path / 'billing.sqlite3'}",
        "BILLING_BROKER_URL": "memory://",
        "BILLING_TOKEN_KEY": new_key(),
        "FATORA_BASE_URL": "sandbox://embedded",
        "FATORA_MODE": "test",
    }
    monkeypatch.delenv("BILLING_DEBUG", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    _reset()
    yield values
    _reset()


def use(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    _reset()


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def one_error(result: Result, *causes: str) -> str:
    """The command failed with exactly one line on standard error, ``error: ...``, naming every
    cause given (case-insensitive), and no traceback anywhere."""
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for cause in causes:
        assert cause.lower() in line.lower(), line
    return line


def run_billing(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real ``billing`` script (``billing.cli:main``) in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def empty_pg() -> Iterator[str]:
    """A PostgreSQL database that exists and answers, with no schema (never migrated)."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"billing_empty_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    get_engine.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# -- the database: unreachable, or reachable without the schema --------------------------------


@pytest.mark.parametrize(
    "args", [("db", "upgrade"), ("tick",), ("reconcile",), ("clock", "show"), ("plans", "list")]
)
def test_an_unreachable_database_is_named_as_such_never_as_an_old_schema(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    """A wrong port says 'connection refused' and what to check, not 'is the schema up to
    date?'; the password of the URL is never shown."""
    use(monkeypatch, BILLING_DATABASE_URL=REFUSED_PG)
    line = one_error(cli(*args), "cannot reach the database", "refused", "BILLING_DATABASE_URL")
    assert "schema" not in line and "upgrade" not in line
    assert "pg-s3cret-pw" not in line


@pytest.mark.parametrize("args", [("tick",), ("reconcile",), ("clock", "show"), ("plans", "list")])
def test_a_database_without_the_schema_says_to_run_db_upgrade(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, empty_pg: str, args: tuple[str, ...]
) -> None:
    use(monkeypatch, BILLING_DATABASE_URL=empty_pg)
    line = one_error(cli(*args), "schema is not up to date", "billing db upgrade")
    assert "cannot reach" not in line


def test_db_upgrade_of_a_revision_that_does_not_exist_lists_the_real_ones(
    env: dict[str, str], empty_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, BILLING_DATABASE_URL=empty_pg)
    line = one_error(cli("db", "upgrade", "nonexistentrev"), "nonexistentrev", "0001", "head")
    assert "no schema revision" in line
    assert cli("db", "upgrade").exit_code == 0  # and the real thing works on the same database


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "args", "cause"),
    [
        ("BILLING_MODE", "bogus", ("clock", "show"), "'live' or 'test'"),
        ("FATORA_TIMEOUT_S", "abc", ("tick",), "valid number"),
        ("BILLING_DATABASE_URL", "garbage", ("plans", "list"), "not a database URL"),
        (
            "BILLING_DATABASE_URL",
            f"mysql://shop:{SECRET}@db.example/billing",
            ("db", "upgrade"),
            "mysql is not supported",
        ),
        ("BILLING_BROKER_URL", f"garbage-{SECRET}", ("tick",), "not a broker URL"),
        ("BILLING_CHARGE_BATCH_SIZE", "0", ("tick",), "greater than or equal to 1"),
    ],
)
def test_a_wrong_setting_is_one_line_naming_the_variable_never_its_value(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    args: tuple[str, ...],
    cause: str,
) -> None:
    use(monkeypatch, **{variable: value})
    result = cli(*args)
    line = one_error(result, variable, cause)
    assert value not in result.output and SECRET not in result.output, line


# -- card token keys ---------------------------------------------------------------------------


def test_keys_rotate_with_a_malformed_key_names_the_variable_not_the_value(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    use(monkeypatch, BILLING_TOKEN_KEY=f"not-a-key-{SECRET}")
    result = cli("keys", "rotate")
    one_error(result, "BILLING_TOKEN_KEY", "not a Fernet key", "billing keys new")
    assert SECRET not in result.output


def _store_cards(engine: Engine, vault: TokenVault, customer_id: int, count: int) -> list[int]:
    from datetime import UTC, datetime

    from billing.models import Customer
    from billing.services.customers import add_card

    sessions = session_factory(engine)
    ids = []
    with sessions() as session, session.begin():
        customer = session.get_one(Customer, customer_id)
        for i in range(count):
            token = f"tok-{uuid.uuid4().hex}-{i}"
            card = add_card(session, vault, customer=customer, token=token, now=datetime.now(UTC))
            session.flush()
            ids.append(card.id)
    return ids


def test_keys_rotate_names_the_card_it_cannot_decrypt_and_changes_nothing(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, clean_db: Engine
) -> None:
    """One card stored under a key that is gone: rotation names that card and the command
    that removes it, and re-encrypts nothing (all or nothing)."""
    url = clean_db.url.render_as_string(hide_password=False)
    old_key, new, lost = new_key(), new_key(), new_key()
    use(monkeypatch, BILLING_DATABASE_URL=url, BILLING_TOKEN_KEY=old_key)
    customer = cli(
        "customers", "add", "--external-id", "C1", "--name", "Amal", "--email", "a@example.com"
    )
    assert customer.exit_code == 0, customer.output
    readable = _store_cards(clean_db, TokenVault(old_key), int(customer.stdout), 2)
    (unreadable,) = _store_cards(clean_db, TokenVault(lost), int(customer.stdout), 1)
    with clean_db.connect() as conn:
        before = dict(conn.execute(select(CardToken.id, CardToken.ciphertext)).all())

    use(monkeypatch, BILLING_TOKEN_KEY=f"{new},{old_key}")
    line = one_error(
        cli("keys", "rotate"),
        f"card {unreadable} cannot be decrypted",
        f"billing cards remove {unreadable} --local-only",
        "nothing was re-encrypted",
    )
    assert not any(f"card {card} " in line for card in readable)
    with clean_db.connect() as conn:
        assert dict(conn.execute(select(CardToken.id, CardToken.ciphertext)).all()) == before

    with clean_db.begin() as conn:  # the card removed, the rotation goes through
        conn.execute(text("DELETE FROM card_tokens WHERE id = :id"), {"id": unreadable})
    done = cli("keys", "rotate")
    assert done.exit_code == 0 and "2 token(s) re-encrypted" in done.stdout, done.output
    only_new = TokenVault(new)
    with clean_db.connect() as conn:
        for ciphertext in conn.execute(select(CardToken.ciphertext)).scalars():
            assert only_new.decrypt(ciphertext).startswith("tok-")


# -- what the output shows ---------------------------------------------------------------------


def test_messages_keep_their_brackets(env: dict[str, str], tmp_path: Path) -> None:
    """Rich markup never eats a part of a message: a pattern, a TOML table name."""
    bad_code = tmp_path / "bad.toml"
    bad_code.write_text('[plans."Basic Monthly"]\nname = "B"\namount = "5.00"\ncurrency = "QAR"\n')
    assert "must match [a-z0-9][a-z0-9_-]*" in cli("plans", "check", str(bad_code)).stderr
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    assert "(expected [plans.CODE] tables)" in cli("plans", "check", str(empty)).stderr


def test_tables_are_never_cut_when_the_output_is_not_a_terminal(
    env: dict[str, str], tmp_path: Path
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    code = "basic-monthly-for-the-long-established-shops-of-the-old-souq"
    name = "A name long enough to need more than eighty columns [with brackets]"
    plans = tmp_path / "plans.toml"
    plans.write_text(
        f'[plans.{code}]\nname = "{name}"\namount = "50.00"\ncurrency = "QAR"\ninterval = "month"\n'
    )
    assert cli("plans", "sync", str(plans)).exit_code == 0
    listed = cli("plans", "list")
    assert listed.exit_code == 0, listed.output
    assert code in listed.stdout and name in listed.stdout
    assert "…" not in listed.stdout


def test_help_shows_no_bool_type_no_double_backticks_and_tick_counts_in_words(
    env: dict[str, str],
) -> None:
    for args in (("--help",), ("tick", "--help"), ("db", "downgrade", "--help")):
        shown = cli(*args)
        assert shown.exit_code == 0, shown.output
        assert "<bool>" not in shown.stdout and "``" not in shown.stdout, shown.stdout
    assert "--debug" in cli("--help").stdout
    assert cli("db", "upgrade").exit_code == 0
    ticked = cli("tick")
    assert ticked.exit_code == 0, ticked.output
    assert "including 0 due retries" in ticked.stdout and "retr(ies)" not in ticked.stdout


# -- destructive commands ----------------------------------------------------------------------


def test_db_downgrade_asks_first_and_needs_yes_when_nobody_can_answer(
    env: dict[str, str],
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    engine = create_engine(env["BILLING_DATABASE_URL"])
    tables = set(inspect(engine).get_table_names())
    assert "invoices" in tables

    one_error(cli("db", "downgrade", "base"), "drops every table", "--yes")
    assert set(inspect(engine).get_table_names()) == tables
    declined = cli("db", "downgrade", "base", input="n\n")
    assert declined.exit_code != 0
    assert set(inspect(engine).get_table_names()) == tables
    one_error(cli("db", "downgrade", "nosuchrev", "--yes"), "no schema revision 'nosuchrev'")

    done = cli("db", "downgrade", "base", "--yes")
    assert done.exit_code == 0, done.output
    assert "invoices" not in inspect(engine).get_table_names()
    engine.dispose()


# -- the test clock, ports, dates ---------------------------------------------------------------


def test_clock_set_refuses_to_move_back_without_backwards(env: dict[str, str]) -> None:
    assert cli("db", "upgrade").exit_code == 0
    assert cli("clock", "set", "2027-03-01T00:00:00Z").exit_code == 0
    one_error(cli("clock", "set", "2027-02-01T00:00:00Z"), "would move it back", "--backwards")
    assert cli("clock", "show").stdout.startswith("2027-03-01T00:00:00Z")
    moved = cli("clock", "set", "2027-02-01T00:00:00Z", "--backwards")
    assert moved.exit_code == 0 and moved.stdout.strip() == "2027-02-01T00:00:00Z"
    assert cli("clock", "set", "2027-02-02T00:00:00Z").exit_code == 0  # forward needs nothing


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("sandbox", "--port", "99999"), "'--port'"),
        (("sandbox", "--port", "0"), "'--port'"),
        (("tick", "--now", "2027-13-45"), "'--now'"),
        (("clock", "set", "2027-13-45"), "'AT'"),
        (("clock", "advance", "tomorrow"), "not a duration"),
        (("nosuchcommand",), "No such command"),
    ],
)
def test_a_bad_value_names_the_option_in_one_line(
    env: dict[str, str], args: tuple[str, ...], named: str
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    line = one_error(cli(*args), named)
    if "2027-13-45" in args:
        assert "month must be in 1..12" in line


# -- tick --wait -------------------------------------------------------------------------------


@pytest.fixture()
def workerless() -> Iterator[Celery]:
    """A Celery app whose tasks nobody consumes (in-memory broker, RPC results): what a tick
    meets when no worker runs."""
    nobody = Celery("nobody", broker="memory://", backend="rpc://")

    @nobody.task(name="billing.charge_invoices")
    def charge(invoice_ids: list[int]) -> dict[str, Any]:
        raise AssertionError("no worker runs this")

    yield nobody
    nobody.close()


def test_tick_wait_without_a_worker_exits_non_zero_and_leaves_nothing_waiting(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, workerless: Celery
) -> None:
    import workers.tasks

    sent: list[AsyncResult] = []

    def enqueue(invoice_ids: list[int], **_: Any) -> list[AsyncResult]:
        sent.extend(workerless.send_task("billing.charge_invoices", args=[[i]]) for i in (1, 2))
        return sent

    monkeypatch.setattr(workers.tasks, "enqueue_charges", enqueue)
    assert cli("db", "upgrade").exit_code == 0
    result = cli("tick", "--wait", "--timeout", "1")
    one_error(result, "2 charge task(s) not settled after 1 s", "is a worker running")
    assert "not settled (TimeoutError): 2" in result.stdout
    # Nothing left registered with the result backend: Celery would unsubscribe it from
    # AsyncResult.__del__ while the interpreter shuts down, and print an error.
    waiting = set(workerless.backend._pending_results.concrete)
    assert not waiting & {task.id for task in sent}


def test_tick_wait_exits_non_zero_when_a_charge_task_raised(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks

    def enqueue(invoice_ids: list[int], **_: Any) -> list[AsyncResult]:
        failed = EagerResult("task-that-raised", RuntimeError("card store down"), "FAILURE")
        settled = EagerResult("task-that-ran", {"results": {"7": "paid"}}, "SUCCESS")
        return [settled, failed]

    monkeypatch.setattr(workers.tasks, "enqueue_charges", enqueue)
    assert cli("db", "upgrade").exit_code == 0
    result = cli("tick", "--wait", "--json")
    line = one_error(result, "charge task task-that-raised raised RuntimeError", "worker's log")
    assert "card store down" not in line  # the class only: a message may quote anything
    assert '"paid": 1' in result.stdout


# -- one line for anything, the traceback with --debug ------------------------------------------


def test_any_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing import runner

    def broken() -> dict[str, Any]:
        raise KeyError("a bug nobody foresaw")

    monkeypatch.setattr(runner, "reconcile", broken)
    one_error(cli("reconcile"), "KeyError", "a bug nobody foresaw", "--debug")

    debugged = cli("--debug", "reconcile")
    assert isinstance(debugged.exception, KeyError)  # let through, with its traceback
    monkeypatch.setenv("BILLING_DEBUG", "1")
    assert isinstance(cli("reconcile").exception, KeyError)


def test_the_billing_script_prints_one_line_or_with_debug_the_traceback(
    env: dict[str, str],
) -> None:
    broken = {**env, "BILLING_DATABASE_URL": REFUSED_PG}
    plain = run_billing("clock", "show", env=broken)
    assert plain.returncode == 1
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("error: cannot reach")
    debugged = run_billing("--debug", "clock", "show", env=broken)
    assert debugged.returncode == 1
    assert "Traceback (most recent call last)" in debugged.stderr
    assert "OperationalError" in debugged.stderr
    by_env = run_billing("clock", "show", env={**broken, "BILLING_DEBUG": "1"})
    assert "Traceback (most recent call last)" in by_env.stderr


# -- the daemons -------------------------------------------------------------------------------


def _daemon(args: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """Start ``celery -A workers.app ARGS`` and expect it to refuse at once: its one error line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "BILLING_METRICS_PORT": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise AssertionError(f"celery {args[0]} started instead of refusing") from None
    assert proc.returncode == 1, err
    # Celery may warn first (e.g. about running as root); the refusal is one line, the last.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert errors[0].startswith("error: refusing to start: "), errors[0]
    return errors[0]


WORKER = ["worker", "--pool", "solo", "--without-mingle", "--without-gossip"]


def test_a_worker_without_a_token_key_refuses_to_start(tmp_path: Path, pg_url: str) -> None:
    line = _daemon(
        WORKER,
        {
            "BILLING_DATABASE_URL": pg_url,
            "BILLING_BROKER_URL": REFUSED_REDIS,
            "BILLING_TOKEN_KEY": "",
        },
        tmp_path,
    )
    assert "BILLING_TOKEN_KEY is empty" in line or "BILLING_TOKEN_KEY is not set" in line


@pytest.mark.parametrize(
    ("database", "cause"),
    [
        ("refused", "cannot reach the database"),
        ("empty", "the database has no schema yet: run `billing db upgrade`"),
        ("migrated", "cannot reach the broker at redis://"),
    ],
)
def test_a_worker_refuses_a_database_or_broker_it_cannot_use(
    tmp_path: Path, pg_url: str, empty_pg: str, database: str, cause: str
) -> None:
    url = {"refused": REFUSED_PG, "empty": empty_pg, "migrated": pg_url}[database]
    line = _daemon(
        WORKER,
        {
            "BILLING_DATABASE_URL": url,
            "BILLING_BROKER_URL": REFUSED_REDIS,
            "BILLING_TOKEN_KEY": new_key(),
        },
        tmp_path,
    )
    assert cause in line
    assert "pg-s3cret-pw" not in line


def test_beat_refuses_a_broker_it_cannot_reach_and_bad_settings(tmp_path: Path) -> None:
    schedule = str(tmp_path / "beat-schedule")
    line = _daemon(["beat", "-s", schedule], {"BILLING_BROKER_URL": REFUSED_REDIS}, tmp_path)
    assert re.search(r"cannot reach the broker at redis://\S*127\.0\.0\.1:1/0", line), line
    line = _daemon(["beat", "-s", schedule], {"BILLING_MODE": "bogus"}, tmp_path)
    assert "BILLING_MODE" in line and "bogus" not in line
