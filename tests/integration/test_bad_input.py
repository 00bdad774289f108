"""Malformed plans files, through the command line, on the real PostgreSQL.

Each file of ``tests/corpus/plans`` holds one kind of mistake (its first line says which, unless
the file is binary or empty). ``billing plans check`` and ``billing plans sync`` must both refuse
it, on standard error, with lines that name the file, the entry and the field (``EXPECTED``), and
the database must be left exactly as it was: the same rows in plans, plan_prices and
dunning_policies, not merely the same counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from billing.attempts import SEND_WINDOW, UNRESOLVED_VALUES
from billing.cli import app
from billing.clock import FixedClock
from billing.config import reset_settings_cache
from billing.crypto import TokenVault, new_key
from billing.db import get_engine
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.lifecycle import InvoiceStatus
from billing.models import Base, Event
from billing.money import from_minor
from billing.plans import load_plans
from billing.runtime import Runtime, reset_runtime
from billing.services import control
from billing.services.charging import collect_invoices
from billing.services.plans_sync import sync_plans
from schedules.sweeps import run_janitor
from tests.corpus.answers import Answer as CorpusAnswer
from tests.corpus.answers import confirms, everything, values_for
from tests.factories import (
    Monotonic,
    age_attempts,
    attempts_of,
    invoice_of,
    renew,
    seed_plans,
    subscriber,
    successful_charges,
)
from tests.integration.conftest import START, make_runtime

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus" / "plans"
TABLES = ("plans", "plan_prices", "dunning_policies")

# File -> fragments its error output must contain: where (entry.field) and what.
EXPECTED: dict[str, tuple[str, ...]] = {
    # syntax: the line, and the entry and key read from the lines around it
    "syntax-unclosed-string.toml": ("plans.basic.name", "invalid TOML", "line 3"),
    "syntax-missing-equals.toml": ("plans.basic.amount", "Expected '='", "line 4"),
    "syntax-unclosed-header.toml": ("plans.basic", "table declaration", "line 2"),
    "syntax-bad-value.toml": ("plans.basic.amount", "invalid TOML", "line 4"),
    "syntax-duplicate-key.toml": ("plans.basic.amount", "Cannot overwrite", "line 7"),
    "syntax-duplicate-table.toml": ("plans.basic", "twice", "line 8"),
    "syntax-nesting-too-deep.toml": ("plans.basic.tags", "nested too deeply", "line 7"),
    "syntax-number-too-long.toml": ("plans.basic.trial_days", "too many digits", "line 7"),
    "syntax-raw-nul.toml": ("plans.basic.name", "Illegal character", "line 3"),
    "syntax-not-toml.toml": ("invalid TOML", "line 2"),
    "syntax-yaml.toml": ("invalid TOML", "line 2"),
    # duplicates
    "duplicate-code-case.toml": ("plans.Basic", "duplicates 'basic'"),
    "duplicate-dunning-case.toml": ("dunning.GENTLE", "duplicates 'gentle'"),
    # empty, binary, encodings
    "empty.toml": ("defines no plans",),
    "comments-only.toml": ("defines no plans",),
    "dunning-only.toml": ("defines no plans",),
    "binary-garbage.toml": ("not UTF-8", "line 1"),
    "binary-gzip.toml": ("not UTF-8", "line 1"),
    "encoding-latin1.toml": ("plans.basic.name", "not UTF-8", "line 3"),
    "encoding-cp1256.toml": ("plans.basic.name", "not UTF-8", "line 3"),
    "encoding-utf16.toml": ("UTF-16", "save the file as UTF-8"),
    # wrong types
    "type-amount-float.toml": ("plans.basic.amount", "not the TOML float"),
    "type-amount-integer.toml": ("plans.basic.amount", "not an integer"),
    "type-amount-boolean.toml": ("plans.basic.amount", "not a boolean"),
    "type-amount-date.toml": ("plans.basic.amount", "not a date"),
    "type-amount-inf.toml": ("plans.basic.amount", "float"),
    "type-currency-integer.toml": ("plans.basic.currency", "must be a string"),
    "type-name-array.toml": ("plans.basic.name", "non-empty string"),
    "type-interval-integer.toml": ("plans.basic.interval", "not one of day, week, month, year"),
    "type-interval-count-string.toml": ("plans.basic.interval_count", "integer >= 1"),
    "type-interval-count-float.toml": ("plans.basic.interval_count", "integer >= 1"),
    "type-trial-days-string.toml": ("plans.basic.trial_days", "integer >= 0"),
    "type-trial-days-boolean.toml": ("plans.basic.trial_days", "integer >= 0"),
    "type-dunning-integer.toml": ("plans.basic.dunning", "policy code string"),
    "type-description-table.toml": ("plans.basic.description", "not a table"),
    "type-cron-array.toml": ("plans.basic.cron", "not an array"),
    "type-retry-days-string.toml": ("dunning.standard.retry_after_days", "list of whole days"),
    "type-retry-days-floats.toml": ("dunning.standard.retry_after_days", "whole numbers"),
    "type-final-action-boolean.toml": ("dunning.standard.final_action", "not one of"),
    "type-plans-array.toml": ("plans: must be a table of entries, not an array",),
    "type-plan-not-a-table.toml": ("plans.basic: must be a table, not a string",),
    "type-dunning-section-string.toml": ("dunning: must be a table of entries",),
    # currencies
    "currency-unknown.toml": ("plans.basic.currency", "unknown currency 'QQQ'"),
    "currency-two-letters.toml": ("plans.basic.currency", "unknown currency 'QA'"),
    "currency-symbol.toml": ("plans.basic.currency", "unknown currency"),
    "currency-numeric-code.toml": ("plans.basic.currency", "unknown currency '634'"),
    "currency-empty.toml": ("plans.basic.currency", "unknown currency ''"),
    "currency-padded.toml": ("plans.basic.currency", "unknown currency ' QAR '"),
    "currency-no-currency.toml": ("plans.basic.currency", "XXX is not legal tender"),
    "currency-testing.toml": ("plans.basic.currency", "XTS is not legal tender"),
    "currency-gold.toml": ("plans.basic.currency", "XAU is not legal tender"),
    "currency-obsolete.toml": ("plans.basic.currency", "DEM is not legal tender"),
    # too many decimals for the currency
    "decimals-qar-3.toml": ("plans.basic.amount", "has 3 decimals but QAR allows 2"),
    "decimals-kwd-4.toml": ("plans.basic.amount", "has 4 decimals but KWD allows 3"),
    "decimals-bhd-4.toml": ("plans.basic.amount", "has 4 decimals but BHD allows 3"),
    "decimals-iqd-4.toml": ("plans.basic.amount", "has 4 decimals but IQD allows 3"),
    "decimals-jpy-1.toml": ("plans.basic.amount", "has 1 decimal but JPY allows none"),
    "decimals-sar-many.toml": ("plans.basic.amount", "has 9 decimals but SAR allows 2"),
    # amounts that are no decimal string, or not positive
    "amount-exponent.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-thousands-separator.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-spaces.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-arabic-digits.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-plus-sign.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-trailing-point.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-empty.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-with-currency.toml": ("plans.basic.amount", "not a decimal string"),
    "amount-negative.toml": ("plans.basic.amount", "must be positive"),
    "amount-zero.toml": ("plans.basic.amount", "must be positive"),
    "amount-zero-decimals.toml": ("plans.basic.amount", "must be positive"),
    "amount-negative-zero.toml": ("plans.basic.amount", "must be positive"),
    # schedules
    "cron-six-fields.toml": ("plans.basic.cron", "must have 5 fields"),
    "cron-out-of-range.toml": ("plans.basic.cron", "out of range"),
    "cron-never-fires.toml": ("plans.basic.cron", "never fires"),
    "cron-alias-reboot.toml": ("plans.basic.cron", "'@reboot' is not supported"),
    "cron-words.toml": ("plans.basic.cron", "must have 5 fields"),
    "cron-empty.toml": ("plans.basic.cron", "must have 5 fields"),
    "cron-too-long.toml": ("plans.basic.cron", "at most 120"),
    "cron-and-interval.toml": ("plans.basic.cron", "not both"),
    "cron-and-interval-missing.toml": ("plans.basic.interval", "give interval"),
    "cron-interval-count.toml": ("plans.basic.interval_count", "not cron plans"),
    "interval-unknown.toml": ("plans.basic.interval", "'fortnight' is not one of"),
    "interval-count-zero.toml": ("plans.basic.interval_count", "integer >= 1"),
    "trial-days-negative.toml": ("plans.basic.trial_days", "integer >= 0"),
    # dunning policies
    "dunning-unknown-policy.toml": ("plans.basic.dunning", "unknown dunning policy 'gentle'"),
    "dunning-builtin-replaced.toml": ("plans.basic.dunning", "'standard' (defined: gentle)"),
    "dunning-bad-final-action.toml": ("dunning.standard.final_action", "'delete' is not one of"),
    "dunning-retry-not-increasing.toml": ("dunning.standard.retry_after_days", "increasing"),
    "dunning-retry-empty.toml": ("dunning.standard.retry_after_days", "at least one"),
    "dunning-retry-zero.toml": ("dunning.standard.retry_after_days", "positive"),
    "dunning-missing-keys.toml": (
        "dunning.standard.retry_after_days: missing",
        "dunning.standard.final_action: missing",
    ),
    "dunning-unknown-key.toml": ("dunning.standard.retries", "unknown key"),
    # huge values: refused here, not half-written by the database
    "huge-amount-bigint.toml": ("plans.basic.amount", "too large: at most QAR92,233,720,368"),
    "huge-amount-digits.toml": ("plans.basic.amount", "no currency allows that many digits"),
    "huge-amount-jpy.toml": ("plans.basic.amount", "too large"),
    "huge-trial-days.toml": ("plans.basic.trial_days", "at most 36500"),
    "huge-interval-count.toml": ("plans.basic.interval_count", "at most 1200 for a month plan"),
    "huge-interval-count-years.toml": ("plans.basic.interval_count", "at most 100 for a year"),
    "huge-retry-day.toml": ("dunning.standard.retry_after_days", "at most 36500"),
    "huge-name.toml": ("plans.basic.name", "at most 200"),
    "huge-code.toml": ("plans.bbbb", "at most 64"),
    "huge-dunning-code.toml": ("dunning.dddd", "at most 64"),
    # control characters
    "control-nul-in-name.toml": ("plans.basic.name", "control characters"),
    "control-newline-in-name.toml": ("plans.basic.name", "control characters"),
    "control-nul-in-description.toml": ("plans.basic.description", "control characters"),
    "control-escape-in-key.toml": ("'plans.basic.col\\x1b[31mour'", "unknown key"),
    # codes and keys
    "unknown-top-level.toml": ("plan: unknown top-level table", "did you mean 'plans'"),
    "unknown-key.toml": ("plans.basic.colour", "unknown key 'colour'"),
    "unknown-key-typo.toml": ("plans.basic.intervall", "did you mean 'interval'"),
    "code-uppercase.toml": ("plans.Basic", "must match"),
    "code-space.toml": ("plans.basic plan", "must match"),
    "code-dot.toml": ("plans.basic.v2", "must match"),
    "missing-required-keys.toml": (
        "plans.basic.name: missing",
        "plans.basic.amount: missing",
        "plans.basic.currency: missing",
    ),
    "many-mistakes.toml": (
        "plans.basic.amount",
        "plans.basic.interval",
        "plans.basic.trial_days",
        "plans.kwd.amount",
        "plans.kwd.cron",
    ),
}


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def snapshot(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the plan tables, in key order."""
    rows: dict[str, list[tuple[object, ...]]] = {}
    with engine.connect() as conn:
        for name in TABLES:
            table = Base.metadata.tables[name]
            keys = ", ".join(c.name for c in table.primary_key.columns)
            query = text(f"SELECT * FROM {name} ORDER BY {keys}")
            rows[name] = [tuple(row) for row in conn.execute(query)]
    return rows


@pytest.fixture(scope="module")
def seeded(pg_engine: Engine) -> Iterator[dict[str, list[tuple[object, ...]]]]:
    """A database holding the example file's plans, through the command line; the rows as
    they are after that sync."""
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BILLING_DATABASE_URL", pg_engine.url.render_as_string(hide_password=False))
        env.setenv("BILLING_TOKEN_KEY", new_key())
        env.setenv("BILLING_MODE", "test")
        env.setenv("BILLING_BROKER_URL", "memory://")
        env.setenv("FATORA_BASE_URL", "sandbox://embedded")
        reset_settings_cache()
        reset_runtime()
        result = run("plans", "sync", str(ROOT / "plans.example.toml"))
        assert result.exit_code == 0, result.output
        before = snapshot(pg_engine)
        assert all(before[name] for name in TABLES)  # something to leave untouched
        yield before
        reset_settings_cache()
        reset_runtime()
        get_engine.cache_clear()


def test_the_corpus_and_its_expectations_match() -> None:
    """Every file of the corpus has its expected fragments, and every expectation a file."""
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("command", ["check", "sync"])
def test_a_malformed_plans_file_is_refused_and_nothing_is_written(
    seeded: dict[str, list[tuple[object, ...]]], pg_engine: Engine, command: str, name: str
) -> None:
    """Refused as a plans file mistake (not a crash), every line naming the file, the lines
    naming the entry and the field, and not one row changed."""
    path = str(CORPUS / name)
    result = run("plans", command, path)
    output = result.output
    assert result.exit_code == 1, output
    assert result.stdout == ""
    assert "Traceback" not in output
    lines = output.splitlines()
    assert lines[-1].startswith(f"error: {path}: ") and "nothing was written" in lines[-1]
    assert lines[:-1] and all(line.startswith(f"{path}: ") for line in lines[:-1]), output
    for fragment in EXPECTED[name]:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    # No byte of the file reaches the terminal unescaped.
    assert not any(ch in output for ch in "\x00\x1b\x7f"), output
    assert snapshot(pg_engine) == seeded


def test_a_byte_order_mark_is_not_a_mistake(tmp_path: Path) -> None:
    """A UTF-8 file that an editor started with a byte-order mark reads like any other."""
    path = tmp_path / "plans.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (ROOT / "plans.example.toml").read_bytes())
    assert set(load_plans(path).plans) == set(load_plans(ROOT / "plans.example.toml").plans)


def test_the_largest_values_the_file_allows_are_stored_whole(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """The limits are the database's: one past them is refused (the corpus above), and the
    values at them go into PostgreSQL whole (in a transaction rolled back afterwards)."""
    code, policy = "p" * 64, "d" * 64
    cron = ",".join(str(minute) for minute in range(0, 60, 2)) + " 0 1 1 *"
    assert len(cron) <= 120
    path = tmp_path / "plans.toml"
    path.write_text(
        f"""
[plans.{code}]
name = "{"N" * 200}"
amount = "92233720368547758.07"
currency = "QAR"
interval = "month"
interval_count = 1200
trial_days = 36500
dunning = "{policy}"

[plans.yen]
name = "Yen"
amount = "9223372036854775807"
currency = "JPY"
cron = "{cron}"
dunning = "{policy}"

[dunning.{policy}]
retry_after_days = [1, 36500]
final_action = "pause"
""",
        encoding="utf-8",
    )
    config = load_plans(path)
    with pg_engine.connect() as conn:
        transaction = conn.begin()
        try:
            with Session(bind=conn) as session:
                sync_plans(session, config, datetime(2026, 1, 31, tzinfo=UTC))
                stored = session.execute(
                    text(
                        "SELECT p.code, length(p.name), p.interval_count, p.trial_days, p.cron, "
                        "pp.amount_minor FROM plans p JOIN plan_prices pp ON pp.plan_id = p.id "
                        "WHERE p.code IN (:code, 'yen') ORDER BY p.code"
                    ),
                    {"code": code},
                ).all()
                days = session.execute(
                    text("SELECT retry_after_days FROM dunning_policies WHERE code = :code"),
                    {"code": policy},
                ).scalar_one()
        finally:
            transaction.rollback()
    assert [tuple(row) for row in stored] == [
        (code, 200, 1200, 36500, None, 2**63 - 1),
        ("yen", 3, 1, 0, cron, 2**63 - 1),
    ]
    assert days == [1, 36500]


# -- gateway answers --------------------------------------------------------------------------
#
# Each answer of the corpus (tests/corpus/gateway, and the large and odd-status ones built in
# tests/corpus/answers.py) is served by the real client's transport seam in place of Fatora's:
#
# * "collect, charged": the charge reaches the gateway and the money moves; its answer is lost
#   and the corpus answer arrives instead (money taken, answer bad);
# * "collect, not charged": the corpus answer arrives and no money moved;
# * "verify": the charge went through normally, every verify answer is the corpus answer.
#
# While the storm lasts (a collection run and a janitor pass), then for a few calm rounds (the
# real answers, collection resumed, time passing), the invariants hold: no invoice paid unless
# a verify answer confirmed its order id, amount, currency and live mode; no invoice charged
# twice; every charge the gateway holds recorded on an attempt that is paid, an anomaly for a
# human, or unresolved with a verify scheduled; nothing raised.

TARGETS = ("collect, charged", "collect, not charged", "verify")
AMOUNT = Decimal("50.00")


class Storm(SandboxTransport):
    """The sandbox, except that while ``raging`` the ``target`` call gets ``answer``."""

    def __init__(self, sandbox: Sandbox, answer: CorpusAnswer, target: str) -> None:
        super().__init__(sandbox)
        self.answer = answer
        self.path = "/payments/verify" if target == "verify" else "/payments/collect-payment"
        self.charged = target == "collect, charged"
        self.raging = True
        self.verify_answers: list[tuple[str, bytes]] = []  # (order id, body) as the client got them

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.read())
        order_id = str(payload.get("order_id", ""))
        if not (self.raging and request.url.path.endswith(self.path)):
            response = super().handle_request(request)
            body = response.content
        else:
            transaction_id = str(payload.get("transaction_id") or "T-none")
            if self.charged:
                real = json.loads(super().handle_request(request).content)
                transaction_id = real["result"]["transaction_id"]
            values = values_for(order_id, transaction_id, AMOUNT, "QAR")
            response = self.answer.response(values)
            body = self.answer.filled(values)
        if request.url.path.endswith("/payments/verify"):
            self.verify_answers.append((order_id, body))
        return response


def _storm_runtime(
    engine: Engine, clock: FixedClock, vault: TokenVault, answer: CorpusAnswer, target: str
) -> tuple[Runtime, Sandbox, Storm]:
    sandbox = Sandbox(mode="live", now=lambda: START, monotonic=Monotonic())
    storm = Storm(sandbox, answer, target)
    rt = make_runtime(engine, sandbox, clock, vault, live=True)
    rt.gateway.close()
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1", sandbox.api_key, mode="live", timeout_s=5, transport=storm
    )
    return rt, sandbox, storm


def _holds(rt: Runtime, sandbox: Sandbox, storm: Storm, invoice_id: int) -> None:
    invoice = invoice_of(rt, invoice_id)
    charges = successful_charges(rt, sandbox, invoice_id)
    attempts = {a.order_id: a for a in attempts_of(rt, invoice_id)}
    assert len(charges) <= 1, "charged twice"
    for charge in charges:
        attempt = attempts.get(str(charge["order_id"]))
        assert attempt is not None, "a charge no attempt knows of"
        assert attempt.status in ("succeeded", "anomaly", *UNRESOLVED_VALUES), attempt.status
    for attempt in attempts.values():
        if attempt.status in UNRESOLVED_VALUES:
            assert attempt.next_verify_at is not None, "unresolved and forgotten"
    if invoice.status == InvoiceStatus.PAID.value:
        (paid,) = [a for a in attempts.values() if a.id == invoice.paid_attempt_id]
        assert paid.status == "succeeded"
        assert [(c["order_id"], Decimal(str(c["amount"])), c["currency"]) for c in charges] == [
            (paid.order_id, from_minor(invoice.amount_minor, invoice.currency), invoice.currency)
        ]
        assert any(
            order_id == paid.order_id
            and confirms(body, order_id=order_id, amount=AMOUNT, currency="QAR")
            for order_id, body in storm.verify_answers
        ), "paid without a verify answer that confirms it"


def _weather(rt: Runtime, sandbox: Sandbox, storm: Storm, clock: FixedClock) -> int:
    """The storm (a collection run, a janitor pass), then calm rounds; the invariants after
    each step. Returns the invoice's id."""
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    collect_invoices(rt, [invoice_id])
    _holds(rt, sandbox, storm, invoice_id)
    run_janitor(rt, everything=True)
    _holds(rt, sandbox, storm, invoice_id)
    storm.raging = False
    for _ in range(2):  # the first settles what the storm left, the second retries a decline
        with rt.sessions() as session, session.begin():
            control.resume_collection(session, rt.clock.now())
        age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
        run_janitor(rt, everything=True)
        collect_invoices(rt, [invoice_id])
        _holds(rt, sandbox, storm, invoice_id)
        clock.advance(timedelta(days=2))  # a dunning retry falls due
    return invoice_id


# Every status class and the odd codes; the unit tests (test_gateway_corpus) take every code.
STATUS_SAMPLE = frozenset((100, 201, 204, 302, 402, 404, 422, 451, 503, 599, 999))


def _gateway_cases() -> list[Any]:
    cases = []
    for answer in everything():
        code = answer.name.removeprefix("status-")
        if code.isdigit() and int(code) not in STATUS_SAMPLE:
            continue
        for target in TARGETS:
            marks = []
            cases.append(pytest.param(answer, target, id=f"{answer.name}/{target}", marks=marks))
    return cases


@pytest.mark.parametrize(("answer", "target"), _gateway_cases())
def test_a_bad_gateway_answer_loses_no_money_and_pays_nothing_unverified(
    clean_db: Engine,
    clock: FixedClock,
    vault: TokenVault,
    caplog: pytest.LogCaptureFixture,
    answer: CorpusAnswer,
    target: str,
) -> None:
    rt, sandbox, storm = _storm_runtime(clean_db, clock, vault, answer, target)
    with caplog.at_level(logging.ERROR, logger="billing"):
        invoice_id = _weather(rt, sandbox, storm, clock)
    # No exception escaped the client into the charge path (those are logged with a traceback).
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    charges = successful_charges(rt, sandbox, invoice_id)
    invoice = invoice_of(rt, invoice_id)
    if not charges:
        assert invoice.status != InvoiceStatus.PAID.value
        return
    # The money the gateway holds is the invoice's payment, or waits for a human or the janitor.
    (attempt,) = [a for a in attempts_of(rt, invoice_id) if a.order_id == charges[0]["order_id"]]
    with rt.sessions() as session:
        mismatch = session.execute(
            select(Event.id).where(
                Event.kind == "alert.payment_mismatch", Event.invoice_id == invoice_id
            )
        ).first()
    assert (
        invoice.status == InvoiceStatus.PAID.value
        or (attempt.status == "anomaly" and mismatch is not None)
        or attempt.status in UNRESOLVED_VALUES
    ), (invoice.status, attempt.status)
