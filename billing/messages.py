"""What the emails say, as pure functions: the facts of an event in, subject, text and HTML out.

Customers are written to in their language (``customers.language``: ``en`` or ``ar``; Arabic
HTML is right-to-left), with amounts formatted by ``billing.money.format_money`` and dates in
the customer's time zone. Operator alerts are in English. Every value that comes from data (a
name, a plan, a link) is escaped in the HTML; a link is shown only if it is ``https://`` or
``http://``.

The templates are ``string.Template`` texts, one table per language; ``$amount``, ``$plan`` and
the like are filled in from :class:`EmailFacts`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from string import Template
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_time

from billing.money import format_money, from_minor

LANGUAGES = ("en", "ar")


class MissingFacts(ValueError):
    """The event lacks something its email needs (e.g. an ``invoice.paid`` without its invoice)."""


@dataclass(frozen=True)
class EmailFacts:
    """Everything an email about one event may say, read from the database beforehand."""

    event_id: int
    kind: str
    occurred_at: datetime
    language: str = "en"
    timezone: str = "UTC"
    customer_name: str = ""
    merchant: str | None = None  # the display name of BILLING_EMAIL_FROM, if it has one
    plan_name: str | None = None
    invoice_id: int | None = None
    amount_minor: int | None = None
    currency: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    paid_at: datetime | None = None
    next_billing_at: datetime | None = None
    canceled_at: datetime | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmailContent:
    subject: str
    text: str
    html: str
    language: str


EN: dict[str, str] = {
    "greeting": "Hello $name,",
    "paid.subject": "Receipt for $plan: $amount",
    "paid.body": "We received your payment of $amount for $plan, for the period from "
    "$period_start to $period_end.",
    "paid.ref": "Invoice $invoice, paid on $paid_on.",
    "paid.thanks": "Thank you.",
    "failed.subject": "Your payment for $plan did not go through",
    "failed.soft_decline": "Your bank declined the charge of $amount for $plan.",
    "failed.hard_decline": "Your card can no longer be charged: your bank refused the charge of "
    "$amount for $plan.",
    "failed.card_keeps_failing": "We could not charge $amount for $plan to your card, despite "
    "several tries.",
    "failed.no_usable_card": "We have no card on file that we can charge $amount for $plan to.",
    "failed.other": "We could not collect $amount for $plan.",
    "failed.next": "We will try again on $retry_at.",
    "action.link": "To pay now or update your card: $pay_url",
    "action.contact": "Please contact $merchant to update your payment details.",
    "action.contact_us": "Please contact us to update your payment details.",
    "expiring.subject": "Your card for $plan expires soon",
    "expiring.body": "The card we charge for $plan expires on $expires_on, before your next "
    "payment on $next_billing.",
    "expiring.body_no_date": "The card we charge for $plan expires on $expires_on.",
    "exhausted.subject": "Final notice: your payment for $plan",
    "exhausted.body": "We tried to collect $amount for $plan several times without success, and "
    "will not try again.",
    "exhausted.cancel": "Your subscription has been canceled.",
    "exhausted.unpaid": "Your subscription is suspended until this invoice is paid.",
    "exhausted.pause": "Your subscription has been paused.",
    "canceled.subject": "Your $plan subscription has been canceled",
    "canceled.body": "Your subscription to $plan was canceled on $canceled_on. You will not be "
    "charged for it again.",
    "canceled.period_end": "Your subscription to $plan ended on $canceled_on, at the end of its "
    "billing period. You will not be charged for it again.",
    "canceled.contact": "If this is a mistake, please contact $merchant.",
    "canceled.contact_us": "If this is a mistake, please contact us.",
}

AR: dict[str, str] = {
    "greeting": "مرحباً $name،",
    "paid.subject": "إيصال دفع اشتراك $plan: $amount",
    "paid.body": "استلمنا دفعتك بمبلغ $amount لاشتراك $plan عن الفترة من $period_start إلى "
    "$period_end.",
    "paid.ref": "الفاتورة رقم $invoice، دُفعت في $paid_on.",
    "paid.thanks": "شكراً لك.",
    "failed.subject": "لم تتم عملية الدفع لاشتراك $plan",
    "failed.soft_decline": "رفض البنك خصم مبلغ $amount لاشتراك $plan.",
    "failed.hard_decline": "لم يعد بالإمكان الخصم من بطاقتك: رفض البنك خصم مبلغ $amount لاشتراك "
    "$plan.",
    "failed.card_keeps_failing": "لم نتمكن من خصم مبلغ $amount لاشتراك $plan من بطاقتك رغم عدة "
    "محاولات.",
    "failed.no_usable_card": "لا توجد لدينا بطاقة صالحة يمكن خصم مبلغ $amount لاشتراك $plan منها.",
    "failed.other": "لم نتمكن من تحصيل مبلغ $amount لاشتراك $plan.",
    "failed.next": "سنحاول مرة أخرى في $retry_at.",
    "action.link": "للدفع الآن أو تحديث بطاقتك: $pay_url",
    "action.contact": "يرجى التواصل مع $merchant لتحديث بيانات الدفع.",
    "action.contact_us": "يرجى التواصل معنا لتحديث بيانات الدفع.",
    "expiring.subject": "تنتهي صلاحية بطاقتك لاشتراك $plan قريباً",
    "expiring.body": "تنتهي صلاحية البطاقة التي نخصم منها اشتراك $plan في $expires_on، قبل موعد "
    "دفعتك القادمة في $next_billing.",
    "expiring.body_no_date": "تنتهي صلاحية البطاقة التي نخصم منها اشتراك $plan في $expires_on.",
    "exhausted.subject": "إشعار نهائي: دفعة اشتراك $plan",
    "exhausted.body": "حاولنا تحصيل مبلغ $amount لاشتراك $plan عدة مرات دون نجاح، ولن نحاول مرة "
    "أخرى.",
    "exhausted.cancel": "تم إلغاء اشتراكك.",
    "exhausted.unpaid": "تم تعليق اشتراكك إلى أن تُدفع هذه الفاتورة.",
    "exhausted.pause": "تم إيقاف اشتراكك مؤقتاً.",
    "canceled.subject": "تم إلغاء اشتراكك في $plan",
    "canceled.body": "تم إلغاء اشتراكك في $plan بتاريخ $canceled_on. لن يتم الخصم منك مقابله مرة "
    "أخرى.",
    "canceled.period_end": "انتهى اشتراكك في $plan بتاريخ $canceled_on، في نهاية فترة الفوترة. لن "
    "يتم الخصم منك مقابله مرة أخرى.",
    "canceled.contact": "إذا كان هذا خطأً، يرجى التواصل مع $merchant.",
    "canceled.contact_us": "إذا كان هذا خطأً، يرجى التواصل معنا.",
}

TEMPLATES: Mapping[str, Mapping[str, str]] = {"en": EN, "ar": AR}

# Payment failures by the reason ``dunning_flow`` records; any other reason reads "other".
FAILURE_REASONS = ("soft_decline", "hard_decline", "card_keeps_failing", "no_usable_card")
FINAL_ACTIONS = ("cancel", "unpaid", "pause")

# Values already written as HTML (escaped by the code that made them).
_RAW_HTML = frozenset({"pay_url"})


def safe_link(url: object) -> str | None:
    """``url`` if it is an absolute http(s) link without spaces, else ``None``: a
    ``javascript:`` or ``data:`` link from a payload never reaches an email."""
    if not isinstance(url, str) or not url or any(c.isspace() for c in url):
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return None
    return url


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _date(value: datetime, facts: EmailFacts) -> str:
    return str(format_date(value.astimezone(_zone(facts.timezone)).date(), "long", facts.language))


def _moment(value: datetime, facts: EmailFacts) -> str:
    local = value.astimezone(_zone(facts.timezone))
    day = format_date(local.date(), "long", facts.language)
    hour = format_time(local.time(), "short", locale=facts.language)
    comma = "،" if facts.language == "ar" else ","
    return f"{day}{comma} {hour} ({facts.timezone})"


def _instant(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _need(value: Any, what: str, facts: EmailFacts) -> Any:
    if value is None:
        raise MissingFacts(f"{facts.kind} event {facts.event_id} has no {what}")
    return value


def _amount(facts: EmailFacts) -> str:
    minor = _need(facts.amount_minor, "invoice amount", facts)
    currency = _need(facts.currency, "currency", facts)
    return format_money(from_minor(minor, currency), currency, facts.language)


def _action(facts: EmailFacts, values: dict[str, str]) -> str:
    """The pay-and-update link if the payload has one, else a sentence to contact the merchant."""
    link = safe_link(facts.payload.get("pay_url"))
    if link is not None:
        values["pay_url"] = link
        return "action.link"
    return "action.contact" if facts.merchant else "action.contact_us"


def compose(facts: EmailFacts) -> EmailContent:
    """The customer's email about an event of one of ``notify.CUSTOMER_EMAIL_KINDS``."""
    if facts.language not in TEMPLATES:
        facts = replace(facts, language="en")
    values: dict[str, str] = {
        "name": facts.customer_name,
        "plan": _need(facts.plan_name, "plan", facts),
        "merchant": facts.merchant or "",
    }
    keys: list[str]
    if facts.kind == "invoice.paid":
        values["amount"] = _amount(facts)
        values["period_start"] = _date(_need(facts.period_start, "period", facts), facts)
        values["period_end"] = _date(_need(facts.period_end, "period", facts), facts)
        values["invoice"] = str(_need(facts.invoice_id, "invoice", facts))
        values["paid_on"] = _date(facts.paid_at or facts.occurred_at, facts)
        subject, keys = "paid.subject", ["paid.body", "paid.ref", "paid.thanks"]
    elif facts.kind == "invoice.payment_failed":
        values["amount"] = _amount(facts)
        reason = str(facts.payload.get("reason"))
        keys = [f"failed.{reason}" if reason in FAILURE_REASONS else "failed.other"]
        retry_at = _instant(facts.payload.get("retry_at"))
        if retry_at is not None:
            values["retry_at"] = _moment(retry_at, facts)
            keys.append("failed.next")
        keys.append(_action(facts, values))
        subject = "failed.subject"
    elif facts.kind == "card.expiring":
        expires = _need(_instant(facts.payload.get("expires_at")), "card expiry", facts)
        values["expires_on"] = _date(expires, facts)
        if facts.next_billing_at is not None:
            values["next_billing"] = _date(facts.next_billing_at, facts)
            keys = ["expiring.body"]
        else:
            keys = ["expiring.body_no_date"]
        keys.append(_action(facts, values))
        subject = "expiring.subject"
    elif facts.kind == "invoice.dunning_exhausted":
        values["amount"] = _amount(facts)
        action = str(facts.payload.get("final_action"))
        keys = ["exhausted.body"]
        if action in FINAL_ACTIONS:
            keys.append(f"exhausted.{action}")
        keys.append(_action(facts, values))
        subject = "exhausted.subject"
    elif facts.kind == "subscription.canceled":
        values["canceled_on"] = _date(facts.canceled_at or facts.occurred_at, facts)
        at_end = bool(facts.payload.get("at_period_end"))
        keys = ["canceled.period_end" if at_end else "canceled.body"]
        keys.append("canceled.contact" if facts.merchant else "canceled.contact_us")
        subject = "canceled.subject"
    else:
        raise MissingFacts(f"no customer email for {facts.kind} events")
    table = TEMPLATES[facts.language]
    paragraphs = ["greeting" if facts.customer_name else "", *keys]
    return _render(
        facts.language,
        Template(table[subject]).substitute(values),
        [table[key] for key in paragraphs if key],
        values,
    )


def _render(
    language: str, subject: str, paragraphs: list[str], values: Mapping[str, str]
) -> EmailContent:
    text = "\n\n".join(Template(p).substitute(values) for p in paragraphs) + "\n"
    escaped = {k: html.escape(v) for k, v in values.items()}
    if "pay_url" in values:
        link = html.escape(values["pay_url"], quote=True)
        escaped["pay_url"] = f'<a href="{link}">{link}</a>'
    body = "\n".join(
        f"<p>{Template(html.escape(p, quote=False)).substitute(escaped)}</p>" for p in paragraphs
    )
    direction = "rtl" if language == "ar" else "ltr"
    page = (
        "<!DOCTYPE html>\n"
        f'<html lang="{language}" dir="{direction}">\n'
        f'<head><meta charset="utf-8"><title>{html.escape(subject)}</title></head>\n'
        f'<body dir="{direction}" style="font-family: sans-serif; line-height: 1.5">\n'
        f"{body}\n</body>\n</html>\n"
    )
    return EmailContent(subject=subject, text=text, html=page, language=language)


def compose_alert(
    *,
    event_id: int,
    kind: str,
    occurred_at: datetime,
    customer_id: int | None,
    subscription_id: int | None,
    invoice_id: int | None,
    payload: Mapping[str, Any],
) -> EmailContent:
    """The operator's email about an ``alert.*`` event (English; the runbook explains each)."""
    stamp = occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    lines = [
        f"Alert {kind} (event {event_id}) at {stamp}.",
        "",
        *(
            f"{label}: {value}"
            for label, value in (
                ("customer", customer_id),
                ("subscription", subscription_id),
                ("invoice", invoice_id),
            )
            if value is not None
        ),
        "details:",
        json.dumps(dict(payload), indent=2, sort_keys=True, ensure_ascii=False, default=str),
        "",
        "What to do: docs/OPERATIONS.md, section Alerts. `billing events list --json` shows it.",
    ]
    text = "\n".join(lines) + "\n"
    subject = f"[billing alert] {kind} (event {event_id})"
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en" dir="ltr">\n'
        f'<head><meta charset="utf-8"><title>{html.escape(subject)}</title></head>\n'
        f"<body><pre>{html.escape(text)}</pre></body>\n</html>\n"
    )
    return EmailContent(subject=subject, text=text, html=page, language="en")
