"""The billing report's figures and renderings, from facts made by hand."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from billing.report import (
    AttemptFacts,
    Facts,
    InvoiceFacts,
    build_report,
    column_chart,
    month_range,
    render_html,
    render_text,
    summary_rows,
)


def _invoice(
    invoice_id: int,
    status: str,
    *,
    currency: str = "QAR",
    amount_minor: int = 5000,
    failures: int = 0,
    paid_at: datetime | None = None,
) -> InvoiceFacts:
    return InvoiceFacts(
        invoice_id=invoice_id,
        customer=f"c{invoice_id}",
        currency=currency,
        amount_minor=amount_minor,
        status=status,
        failure_count=failures,
        paid_at=paid_at,
    )


def _attempts(*pairs: tuple[int, str]) -> tuple[AttemptFacts, ...]:
    return tuple(
        AttemptFacts(attempt_id=n, invoice_id=invoice_id, status=status, kind="collect")
        for n, (invoice_id, status) in enumerate(pairs, start=1)
    )


JAN = datetime(2027, 1, 31, 7, tzinfo=UTC)
MAR = datetime(2027, 3, 3, 7, tzinfo=UTC)

FACTS = Facts(
    invoices=(
        _invoice(1, "paid", paid_at=JAN),
        _invoice(2, "paid", failures=2, paid_at=MAR),  # recovered by dunning
        _invoice(3, "uncollectible", failures=4),
        _invoice(4, "void", failures=1),
        _invoice(5, "open", failures=1),
        _invoice(6, "open"),  # not tried yet: no attempt
        _invoice(7, "paid", currency="KWD", amount_minor=1250, paid_at=MAR),
    ),
    attempts=_attempts(
        (1, "succeeded"),
        (2, "declined"),
        (2, "declined"),
        (2, "succeeded"),
        (3, "declined"),
        (3, "declined"),
        (3, "failed"),
        (3, "declined"),
        (4, "declined"),
        (5, "pending"),
        (7, "succeeded"),
    ),
)


def test_counts_paid_recovered_lost_and_open() -> None:
    report = build_report(FACTS, elapsed_s=12.34)
    assert (report.invoices, report.paid, report.recovered) == (7, 3, 1)
    assert report.paid_without_dunning == 2
    assert (report.lost, report.still_open) == (2, 2)
    assert report.elapsed_s == 12.34


def test_revenue_per_currency_and_month_fills_the_months_without_payment() -> None:
    report = build_report(FACTS)
    assert report.months == ("2027-01", "2027-02", "2027-03")
    revenue = {r.currency: r for r in report.revenue}
    assert list(revenue) == ["KWD", "QAR"]
    assert revenue["QAR"].total_minor == 10000
    assert str(revenue["QAR"].total) == "100.00"
    assert revenue["QAR"].by_month == (("2027-01", 5000), ("2027-02", 0), ("2027-03", 5000))
    assert str(revenue["KWD"].total) == "1.250"
    assert revenue["KWD"].by_month == (("2027-01", 0), ("2027-02", 0), ("2027-03", 1250))


def test_attempts_per_invoice_count_invoices_never_tried() -> None:
    report = build_report(FACTS)
    assert report.attempts == 11
    assert report.attempts_per_invoice == ((0, 1), (1, 4), (3, 1), (4, 1))
    assert round(report.mean_attempts, 3) == round(11 / 7, 3)
    assert report.attempts_by_outcome == (
        ("succeeded", 3),
        ("declined", 6),
        ("failed", 1),
        ("pending", 1),
    )


def test_dunning_funnel_narrows_step_by_step_and_ends_in_outcomes() -> None:
    report = build_report(FACTS)
    assert report.entered_dunning == 4
    assert report.dunning_steps == ((1, 4), (2, 2), (3, 1), (4, 1))
    assert report.funnel() == [
        ("entered dunning", 4),
        ("reached step 2", 2),
        ("reached step 3", 1),
        ("reached step 4", 1),
        ("recovered", 1),
        ("lost", 2),
        ("still in dunning", 1),
    ]


def test_month_range_crosses_a_year_and_tolerates_gaps_and_repeats() -> None:
    assert month_range(["2027-02", "2026-11", "2027-02"]) == (
        "2026-11",
        "2026-12",
        "2027-01",
        "2027-02",
    )
    assert month_range([]) == ()


def test_summary_rows_and_text_show_every_figure() -> None:
    rows = dict(summary_rows(build_report(FACTS, elapsed_s=3.21)))
    assert rows["paid"] == "3 (43%): 2 without dunning, 1 recovered by dunning"
    assert rows["recovered by dunning"] == "1 of 4 that entered it"
    assert rows["lost"] == "2 (uncollectible or void)"
    assert rows["revenue QAR"] == "100.00 QAR"
    assert rows["revenue KWD"] == "1.250 KWD"
    assert rows["attempts per invoice"].startswith("1.57 on average (11 attempts;")
    assert rows["attempts by outcome"] == "succeeded 3, declined 6, failed 1, pending 1"
    assert rows["time taken"] == "3.2 s"
    text = render_text(build_report(FACTS, elapsed_s=3.21))
    assert all(label in text for label in rows)


def test_as_dict_is_json_with_amounts_as_exact_text() -> None:
    data = json.loads(json.dumps(build_report(FACTS).as_dict()))
    assert data["revenue"]["KWD"] == {
        "total": "1.250",
        "by_month": {"2027-01": "0.000", "2027-02": "0.000", "2027-03": "1.250"},
    }
    assert data["dunning"] == {
        "entered": 4,
        "reached_step": {"1": 4, "2": 2, "3": 1, "4": 1},
        "recovered": 1,
        "lost": 2,
        "open": 1,
    }
    assert data["attempts_per_invoice"] == {"0": 1, "1": 4, "3": 1, "4": 1}


def test_html_is_self_contained_with_one_chart_per_currency_plus_funnel_and_outcomes() -> None:
    page = render_html(build_report(FACTS), title="Report <demo>", note="a & b")
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") == 4  # KWD, QAR, funnel, outcomes
    assert page.count("<svg") == page.count("</svg>")
    for outside in ("http://", "https://", "<script", "src=", "href=", "url(", "@import"):
        assert outside not in page
    assert "Report &lt;demo&gt;" in page and "a &amp; b" in page
    assert "Revenue per month, QAR" in page and "Dunning funnel" in page
    assert "100.00 QAR" in page


def test_column_heights_are_proportional_to_values() -> None:
    svg = column_chart("t", [("a", 10, "10"), ("b", 5, "5"), ("c", 0, "0")], colour="#000")
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert len(heights) == 3
    assert heights[1] == heights[0] / 2
    assert heights[2] == 0


def test_an_empty_database_gives_a_report_without_dividing_by_zero() -> None:
    report = build_report(Facts(invoices=(), attempts=()))
    assert (report.invoices, report.paid, report.mean_attempts) == (0, 0, 0.0)
    assert dict(summary_rows(report))["revenue"] == "none"
    assert "<svg" in render_html(report)
