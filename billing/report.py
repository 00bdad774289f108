"""The billing report: what was paid, recovered by dunning and lost, revenue per currency and per
month, attempts per invoice and by outcome, read from the database and rendered as text rows,
JSON and a self-contained HTML page.

``load_facts`` is the only function that reads the database (invoices and their charge attempts,
in one transaction); ``build_report`` turns those facts into figures and the renderers turn the
figures into text or HTML. Both are pure. The HTML carries its charts as inline SVG drawn here,
with inline styles and no script, font or image from anywhere: it opens in a browser with no
network.

Definitions (per invoice, as stored):

- *paid*: status ``paid``; *recovered by dunning* the paid ones declined at least once before
  (``failure_count > 0``: they went through a dunning step); quick retries of transient faults
  are not dunning steps;
- *lost*: ``uncollectible`` (the dunning ladder ran out) or ``void`` (never to be paid);
- *open*: still awaiting payment, dunning included;
- *revenue*: the amounts of paid invoices, per currency, by the month of their payment on the
  billing clock (the test clock in test mode);
- *attempts*: every charge attempt (a collect on a stored card or a payment on the hosted page),
  by its status.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from html import escape
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.lifecycle import InvoiceStatus
from billing.models import ChargeAttempt, Customer, Invoice, Subscription
from billing.money import from_minor

LOST = frozenset({InvoiceStatus.UNCOLLECTIBLE.value, InvoiceStatus.VOID.value})

# Attempt statuses in the order the report lists them (any other status comes after, by name).
OUTCOME_ORDER = ("succeeded", "declined", "failed", "pending", "unknown", "in_flight", "anomaly")
OUTCOME_COLOURS = {
    "succeeded": "#2e7d32",
    "declined": "#c62828",
    "failed": "#ef6c00",
    "pending": "#f9a825",
    "unknown": "#6d4c41",
    "in_flight": "#546e7a",
    "anomaly": "#6a1b9a",
}
CURRENCY_COLOURS = ("#1565c0", "#00897b", "#8e24aa", "#f4511e", "#3949ab", "#7cb342")


# -- facts: what the database holds ------------------------------------------------------------


@dataclass(frozen=True)
class InvoiceFacts:
    invoice_id: int
    customer: str  # the customer's external id
    currency: str
    amount_minor: int
    status: str
    failure_count: int  # dunning steps taken (declines, no usable card), not quick retries
    paid_at: datetime | None


@dataclass(frozen=True)
class AttemptFacts:
    attempt_id: int
    invoice_id: int
    status: str
    kind: str


@dataclass(frozen=True)
class Facts:
    invoices: tuple[InvoiceFacts, ...]
    attempts: tuple[AttemptFacts, ...]


def load_facts(session: Session) -> Facts:
    """Every invoice (with its customer) and every charge attempt, read in one transaction."""
    with session.begin():
        invoices = tuple(
            InvoiceFacts(
                invoice_id=invoice.id,
                customer=external_id,
                currency=invoice.currency,
                amount_minor=invoice.amount_minor,
                status=invoice.status,
                failure_count=invoice.failure_count,
                paid_at=invoice.paid_at,
            )
            for invoice, external_id in session.execute(
                select(Invoice, Customer.external_id)
                .join(Subscription, Subscription.id == Invoice.subscription_id)
                .join(Customer, Customer.id == Subscription.customer_id)
                .order_by(Invoice.id)
            )
        )
        attempts = tuple(
            AttemptFacts(
                attempt_id=row.id, invoice_id=row.invoice_id, status=row.status, kind=row.kind
            )
            for row in session.execute(
                select(
                    ChargeAttempt.id,
                    ChargeAttempt.invoice_id,
                    ChargeAttempt.status,
                    ChargeAttempt.kind,
                ).order_by(ChargeAttempt.id)
            )
        )
    return Facts(invoices=invoices, attempts=attempts)


# -- figures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revenue:
    """Paid invoices of one currency: their total and, month by month (``YYYY-MM``), the part
    paid that month (in minor units)."""

    currency: str
    total_minor: int
    by_month: tuple[tuple[str, int], ...]

    @property
    def total(self) -> Decimal:
        return from_minor(self.total_minor, self.currency)


@dataclass(frozen=True)
class Report:
    invoices: int
    paid: int
    recovered: int  # paid after at least one dunning step
    lost: int
    still_open: int
    revenue: tuple[Revenue, ...]
    attempts: int
    attempts_by_outcome: tuple[tuple[str, int], ...]
    # (number of attempts, how many invoices had that many), fewest attempts first
    attempts_per_invoice: tuple[tuple[int, int], ...]
    entered_dunning: int  # invoices declined at least once (or left without a usable card)
    # (k, how many invoices reached the k-th dunning step), from k = 1 (entered dunning) on
    dunning_steps: tuple[tuple[int, int], ...]
    lost_in_dunning: int
    open_in_dunning: int
    months: tuple[str, ...]  # every month from the first payment to the last
    elapsed_s: float

    @property
    def paid_without_dunning(self) -> int:
        return self.paid - self.recovered

    @property
    def mean_attempts(self) -> float:
        return self.attempts / self.invoices if self.invoices else 0.0

    def funnel(self) -> list[tuple[str, int]]:
        """The dunning funnel: the invoices that entered dunning, how many reached each later
        step, and where they all ended."""
        steps = [
            ("entered dunning" if k == 1 else f"reached step {k}", count)
            for k, count in self.dunning_steps
        ]
        return [
            *steps,
            ("recovered", self.recovered),
            ("lost", self.lost_in_dunning),
            ("still in dunning", self.open_in_dunning),
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "invoices": self.invoices,
            "paid": self.paid,
            "paid_without_dunning": self.paid_without_dunning,
            "recovered_by_dunning": self.recovered,
            "lost": self.lost,
            "open": self.still_open,
            "revenue": {
                r.currency: {
                    "total": str(r.total),
                    "by_month": {m: str(from_minor(v, r.currency)) for m, v in r.by_month},
                }
                for r in self.revenue
            },
            "attempts": self.attempts,
            "attempts_by_outcome": dict(self.attempts_by_outcome),
            "attempts_per_invoice": {str(n): count for n, count in self.attempts_per_invoice},
            "mean_attempts_per_invoice": round(self.mean_attempts, 2),
            "dunning": {
                "entered": self.entered_dunning,
                "reached_step": {str(k): count for k, count in self.dunning_steps},
                "recovered": self.recovered,
                "lost": self.lost_in_dunning,
                "open": self.open_in_dunning,
            },
            "elapsed_s": round(self.elapsed_s, 1),
        }


def build_report(facts: Facts, *, elapsed_s: float = 0.0) -> Report:
    """The report's figures from the facts alone."""
    invoices = facts.invoices
    paid = [i for i in invoices if i.status == InvoiceStatus.PAID.value]
    dunned = [i for i in invoices if i.failure_count > 0]

    by_currency: dict[str, Counter[str]] = defaultdict(Counter)
    for invoice in paid:
        month = f"{invoice.paid_at:%Y-%m}" if invoice.paid_at is not None else "unknown"
        by_currency[invoice.currency][month] += invoice.amount_minor
    months = month_range(m for counts in by_currency.values() for m in counts if m != "unknown")
    revenue = tuple(
        Revenue(
            currency=currency,
            total_minor=sum(counts.values()),
            by_month=tuple((m, counts[m]) for m in months)
            + ((("unknown", counts["unknown"]),) if "unknown" in counts else ()),
        )
        for currency, counts in sorted(by_currency.items())
    )

    per_invoice = Counter(a.invoice_id for a in facts.attempts)
    distribution = Counter(per_invoice[i.invoice_id] for i in invoices)
    outcomes = Counter(a.status for a in facts.attempts)
    return Report(
        invoices=len(invoices),
        paid=len(paid),
        recovered=sum(1 for i in paid if i.failure_count > 0),
        lost=sum(1 for i in invoices if i.status in LOST),
        still_open=sum(1 for i in invoices if i.status == InvoiceStatus.OPEN.value),
        revenue=revenue,
        attempts=len(facts.attempts),
        attempts_by_outcome=tuple(
            (status, outcomes[status]) for status in _outcome_order(outcomes)
        ),
        attempts_per_invoice=tuple(sorted(distribution.items())),
        entered_dunning=len(dunned),
        dunning_steps=tuple(
            (k, sum(1 for i in dunned if i.failure_count >= k))
            for k in range(1, max((i.failure_count for i in dunned), default=0) + 1)
        ),
        lost_in_dunning=sum(1 for i in dunned if i.status in LOST),
        open_in_dunning=sum(1 for i in dunned if i.status == InvoiceStatus.OPEN.value),
        months=months,
        elapsed_s=elapsed_s,
    )


def month_range(months: Iterable[str]) -> tuple[str, ...]:
    """Every ``YYYY-MM`` from the earliest to the latest given, none missing."""
    given = sorted(set(months))
    if not given:
        return ()
    year, month = (int(part) for part in given[0].split("-"))
    last = given[-1]
    out: list[str] = []
    while True:
        key = f"{year:04d}-{month:02d}"
        out.append(key)
        if key >= last:
            return tuple(out)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


def _outcome_order(outcomes: Counter[str]) -> list[str]:
    known = [s for s in OUTCOME_ORDER if outcomes[s]]
    return known + sorted(s for s in outcomes if s not in OUTCOME_ORDER)


# -- text --------------------------------------------------------------------------------------


def money(minor: int, currency: str) -> str:
    return f"{from_minor(minor, currency):,} {currency}"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def summary_rows(report: Report) -> list[tuple[str, str]]:
    """The report as (label, value) rows: what the terminal shows and the HTML's summary."""
    rows = [
        ("invoices", str(report.invoices)),
        (
            "paid",
            f"{report.paid} ({_share(report.paid, report.invoices)}): "
            f"{report.paid_without_dunning} without dunning, {report.recovered} recovered by "
            "dunning",
        ),
        ("recovered by dunning", f"{report.recovered} of {report.entered_dunning} that entered it"),
        ("lost", f"{report.lost} (uncollectible or void)"),
        ("still open", str(report.still_open)),
    ]
    for revenue in report.revenue:
        rows.append((f"revenue {revenue.currency}", money(revenue.total_minor, revenue.currency)))
    if not report.revenue:
        rows.append(("revenue", "none"))
    spread = ", ".join(f"{count} with {n}" for n, count in report.attempts_per_invoice)
    rows.append(
        (
            "attempts per invoice",
            f"{report.mean_attempts:.2f} on average ({report.attempts} attempts; invoices: "
            f"{spread or 'none'})",
        )
    )
    rows.append(
        (
            "attempts by outcome",
            ", ".join(f"{status} {count}" for status, count in report.attempts_by_outcome)
            or "none",
        )
    )
    rows.append(("time taken", f"{report.elapsed_s:.1f} s"))
    return rows


def render_text(report: Report) -> str:
    rows = summary_rows(report)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


# -- SVG charts --------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def column_chart(title: str, columns: Sequence[tuple[str, int, str]], *, colour: str) -> str:
    """Vertical bars: (label under the bar, value, text over the bar) each, in the given order."""
    width, height = 80 + 72 * max(len(columns), 1), 250
    top, bottom, left = 48, 40, 16
    plot = height - top - bottom
    peak = max((value for _, value, _ in columns), default=0) or 1
    parts = [_svg_open(title, width, height), _svg_title(title, left)]
    parts.append(
        f'<line x1="{left}" y1="{top + plot}" x2="{width - left}" y2="{top + plot}" '
        'stroke="#9e9e9e" stroke-width="1"/>'
    )
    step = (width - 2 * left) / max(len(columns), 1)
    bar = min(48.0, step * 0.7)
    for index, (label, value, text) in enumerate(columns):
        h = plot * value / peak
        x = left + step * index + (step - bar) / 2
        y = top + plot - h
        centre = x + bar / 2
        parts.append(
            f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(bar)}" height="{_num(h)}" '
            f'fill="{colour}"><title>{escape(label)}: {escape(text)}</title></rect>'
        )
        parts.append(
            f'<text x="{_num(centre)}" y="{_num(y - 5)}" text-anchor="middle" '
            f'font-size="11">{escape(text)}</text>'
        )
        parts.append(
            f'<text x="{_num(centre)}" y="{top + plot + 16}" text-anchor="middle" '
            f'font-size="12">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, bars: Sequence[tuple[str, int, str, str]]) -> str:
    """Horizontal bars: (label, value, text after the bar, colour) each, top to bottom."""
    label_w, bar_w, text_w, row = 170, 360, 120, 30
    width = label_w + bar_w + text_w
    top = 36
    height = top + row * max(len(bars), 1) + 10
    peak = max((value for _, value, _, _ in bars), default=0) or 1
    parts = [_svg_open(title, width, height), _svg_title(title, 16)]
    for index, (label, value, text, colour) in enumerate(bars):
        y = top + row * index
        w = bar_w * value / peak
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end" font-size="12">'
            f"{escape(label)}</text>"
        )
        parts.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{_num(w)}" height="{row - 8}" '
            f'fill="{colour}"><title>{escape(label)}: {escape(text)}</title></rect>'
        )
        parts.append(
            f'<text x="{_num(label_w + w + 6)}" y="{y + 18}" font-size="12">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_open(title: str, width: int, height: int) -> str:
    # Inline SVG in HTML needs no xmlns: the page names no namespace URL, or any URL at all.
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title, quote=True)}" font-family="sans-serif">'
    )


def _svg_title(title: str, x: int) -> str:
    return f'<text x="{x}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>'


def revenue_charts(report: Report) -> list[str]:
    """One column chart per currency (amounts in different currencies share no axis)."""
    charts = []
    for index, revenue in enumerate(report.revenue):
        columns = [
            (month, minor, money(minor, revenue.currency) if minor else "0")
            for month, minor in revenue.by_month
        ]
        charts.append(
            column_chart(
                f"Revenue per month, {revenue.currency}",
                columns,
                colour=CURRENCY_COLOURS[index % len(CURRENCY_COLOURS)],
            )
        )
    return charts


FUNNEL_COLOURS = {"recovered": "#2e7d32", "lost": "#c62828", "still in dunning": "#757575"}


def funnel_chart(report: Report) -> str:
    entered = report.entered_dunning
    bars = [
        (label, value, f"{value} ({_share(value, entered)})", FUNNEL_COLOURS.get(label, "#f9a825"))
        for label, value in report.funnel()
    ]
    title = f"Dunning funnel: {entered} of {report.invoices} invoices entered dunning"
    return bar_chart(title, bars)


def outcomes_chart(report: Report) -> str:
    bars = [
        (status, count, f"{count} ({_share(count, report.attempts)})", _outcome_colour(status))
        for status, count in report.attempts_by_outcome
    ]
    return bar_chart("Charge attempts by outcome", bars)


def _outcome_colour(status: str) -> str:
    return OUTCOME_COLOURS.get(status, "#9e9e9e")


# -- HTML --------------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#212121}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{padding:.3em .8em;border-bottom:1px solid #e0e0e0;text-align:left;vertical-align:top}"
    "th{font-weight:600}figure{margin:1.5em 0}svg{max-width:100%;height:auto}"
    ".note{color:#616161;font-size:.9em}"
)


def render_html(report: Report, *, title: str = "Billing report", note: str = "") -> str:
    """A whole HTML page: the summary, the charts as inline SVG, attempts per invoice."""
    rows = "".join(
        f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>"
        for label, value in summary_rows(report)
    )
    spread = "".join(
        f"<tr><td>{n}</td><td>{count}</td></tr>" for n, count in report.attempts_per_invoice
    )
    charts = [*revenue_charts(report), funnel_chart(report), outcomes_chart(report)]
    figures = "".join(f"<figure>{chart}</figure>" for chart in charts)
    note_html = f'<p class="note">{escape(note)}</p>' if note else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{note_html}"
        f"<h2>Summary</h2><table>{rows}</table>"
        f"<h2>Charts</h2>{figures}"
        "<h2>Attempts per invoice</h2>"
        f"<table><tr><th>attempts</th><th>invoices</th></tr>{spread}</table>"
        "</body></html>\n"
    )
