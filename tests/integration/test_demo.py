"""The report's database reads on the real PostgreSQL, and ``billing demo`` end to end: its
report agrees with its own database, its HTML stands alone, and no log line reaches the screen."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from billing.fatora.sandbox import Sandbox
from billing.money import from_minor
from billing.report import build_report, load_facts
from billing.runtime import Runtime
from billing.services.charging import collect_invoices
from tests.factories import renew, seed_plans, subscriber


def test_load_facts_reads_invoices_customers_and_attempts(rt: Runtime, sandbox: Sandbox) -> None:
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="paying")
    subscriber(rt, sandbox, ["insufficient_funds"], name="declined")
    collect_invoices(rt, renew(rt))

    with rt.sessions() as session:
        facts = load_facts(session)

    by_customer = {i.customer: i for i in facts.invoices}
    assert set(by_customer) == {"paying", "declined"}
    assert by_customer["paying"].status == "paid"
    assert by_customer["paying"].paid_at is not None
    assert by_customer["declined"].status == "open"
    assert by_customer["declined"].failure_count == 1
    assert sorted(a.status for a in facts.attempts) == ["declined", "succeeded"]
    report = build_report(facts)
    assert (report.paid, report.entered_dunning, report.still_open) == (1, 1, 1)
    assert [(r.currency, r.total) for r in report.revenue] == [("QAR", Decimal("50.00"))]


def _run_demo(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", "demo"],
        cwd=folder,
        env={**os.environ, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_demo_runs_to_a_report_that_matches_its_database(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    # What an earlier run left (here, not even a database): the demo starts afresh.
    (var / "demo.sqlite3").write_text("not a database")
    (var / "demo.log").write_text("an earlier run's line\n")

    done = _run_demo(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]

    # Nothing but the demo's own output: no log line on either stream.
    assert done.stderr == ""
    for raw in ("fatora POST", "WARNING", "INFO", "kombu", "Traceback"):
        assert raw not in done.stdout
    assert "charged twice: 0; taken but not recorded: 0" in done.stdout
    assert "recovered by dunning" in done.stdout and "time taken" in done.stdout
    assert "93/93" in done.stdout  # the progress bar's last state

    # The charges ran as Celery tasks taken by a worker, and their lines went to the log file.
    log = (var / "demo.log").read_text()
    assert "an earlier run's line" not in log
    assert "Task billing.charge_invoices[" in log and "succeeded in" in log
    assert "fatora POST /v1/payments/collect-payment" in log

    report = json.loads((var / "report.json").read_text())
    db = sqlite3.connect(var / "demo.sqlite3")
    try:
        invoices = db.execute(
            "SELECT id, status, currency, amount_minor, failure_count FROM invoices"
        ).fetchall()
        attempts = db.execute("SELECT invoice_id, status FROM charge_attempts").fetchall()
        twice = db.execute(
            "SELECT invoice_id FROM charge_attempts WHERE status = 'succeeded' "
            "GROUP BY invoice_id HAVING count(*) > 1"
        ).fetchall()
    finally:
        db.close()

    statuses = [status for _, status, _, _, _ in invoices]
    paid = [row for row in invoices if row[1] == "paid"]
    assert report["invoices"] == len(invoices)
    assert report["paid"] == len(paid)
    assert report["recovered_by_dunning"] == sum(1 for row in paid if row[4] > 0)
    assert report["lost"] == statuses.count("uncollectible") + statuses.count("void")
    assert report["open"] == statuses.count("open")
    totals: dict[str, int] = {}
    for _, _, currency, amount_minor, _ in paid:
        totals[currency] = totals.get(currency, 0) + amount_minor
    assert {c: Decimal(r["total"]) for c, r in report["revenue"].items()} == {
        c: from_minor(minor, c) for c, minor in totals.items()
    }
    for revenue in report["revenue"].values():
        assert sum(Decimal(v) for v in revenue["by_month"].values()) == Decimal(revenue["total"])
    assert report["attempts"] == len(attempts)
    outcomes: dict[str, int] = {}
    for _, status in attempts:
        outcomes[status] = outcomes.get(status, 0) + 1
    assert report["attempts_by_outcome"] == outcomes
    per_invoice = {invoice_id: 0 for invoice_id, *_ in invoices}
    for invoice_id, _ in attempts:
        per_invoice[invoice_id] += 1
    spread: dict[str, int] = {}
    for count in per_invoice.values():
        spread[str(count)] = spread.get(str(count), 0) + 1
    assert report["attempts_per_invoice"] == spread
    assert twice == []

    # The tour's bad days all happened: recoveries (the pay link, a new card), losses, both
    # currencies paid.
    assert report["recovered_by_dunning"] >= 2
    assert report["lost"] >= 1
    assert set(report["revenue"]) == {"QAR", "KWD"}
    assert outcomes.get("declined", 0) > 0 and outcomes.get("failed", 0) > 0
    assert 0 < report["elapsed_s"] < 120

    page = (var / "report.html").read_text()
    assert page.count("<svg") >= 4  # revenue per currency, the dunning funnel, the outcomes
    for outside in ("http://", "https://", "<script", "src=", "href=", "url("):
        assert outside not in page
