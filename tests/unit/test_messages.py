"""What the customer's emails say, in English and Arabic, and what they never let through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from billing.messages import EmailFacts, MissingFacts, compose, compose_alert, safe_link
from billing.money import format_money

AT = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)


def facts(kind: str, language: str = "en", **overrides: Any) -> EmailFacts:
    values: dict[str, Any] = {
        "event_id": 9,
        "kind": kind,
        "occurred_at": AT,
        "language": language,
        "timezone": "Asia/Qatar",
        "customer_name": "Amal",
        "merchant": "Fatora Shop",
        "plan_name": "Monthly",
        "invoice_id": 31,
        "amount_minor": 1250,
        "currency": "KWD",
        "period_start": AT,
        "period_end": AT + timedelta(days=31),
        "paid_at": AT,
        "next_billing_at": AT + timedelta(days=31),
        "payload": {},
    }
    values.update(overrides)
    return EmailFacts(**values)


KINDS = [
    "invoice.paid",
    "invoice.payment_failed",
    "card.expiring",
    "invoice.dunning_exhausted",
    "subscription.canceled",
]
PAYLOADS: dict[str, dict[str, Any]] = {
    "invoice.payment_failed": {"reason": "hard_decline", "retry_at": "2026-03-04T06:00:00Z"},
    "card.expiring": {"expires_at": "2026-03-20T00:00:00+00:00"},
    "invoice.dunning_exhausted": {"final_action": "unpaid"},
}


@pytest.mark.parametrize("language", ["en", "ar"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_subject_text_and_html_in_both_languages(kind: str, language: str) -> None:
    """No kind falls back to another language; Arabic HTML reads right to left; the amount is
    formatted for the language with the currency's own decimals (1.250 KWD)."""
    content = compose(facts(kind, language, payload=PAYLOADS.get(kind, {})))
    assert content.language == language and content.subject and content.text
    direction = "rtl" if language == "ar" else "ltr"
    assert f'<html lang="{language}" dir="{direction}">' in content.html
    if kind.startswith("invoice."):
        assert format_money(Decimal("1.250"), "KWD", language) in content.text
    latin = sum(c.isascii() and c.isalpha() for c in content.text.replace("Monthly", ""))
    arabic = sum("\u0600" <= c <= "\u06ff" for c in content.text)
    assert (arabic > latin) if language == "ar" else (arabic == 0)


def test_the_receipt_says_amount_period_and_invoice() -> None:
    content = compose(facts("invoice.paid"))
    assert content.subject == "Receipt for Monthly: KWD1.250"
    assert "for the period from March 1, 2026 to April 1, 2026" in content.text
    assert "Invoice 31, paid on March 1, 2026." in content.text


def test_a_payment_failure_says_what_happened_when_next_and_what_to_do() -> None:
    """The reason in words, the next try in the customer's zone, and the pay link when the
    payload has one, else a sentence to contact the merchant."""
    payload = {"reason": "soft_decline", "retry_at": "2026-03-04T06:00:00Z"}
    plain = compose(facts("invoice.payment_failed", payload=payload))
    assert "Your bank declined the charge of KWD1.250 for Monthly." in plain.text
    # (CLDR puts a narrow no-break space before AM)
    assert "try again on March 4, 2026, 9:00 AM (Asia/Qatar)." in plain.text.replace("\u202f", " ")
    assert "Please contact Fatora Shop to update your payment details." in plain.text
    linked = compose(
        facts("invoice.payment_failed", payload={**payload, "pay_url": "https://p.example/x"})
    )
    assert "To pay now or update your card: https://p.example/x" in linked.text
    assert '<a href="https://p.example/x">https://p.example/x</a>' in linked.html
    anonymous = compose(facts("invoice.payment_failed", merchant=None, payload=payload))
    assert "Please contact us to update" in anonymous.text


@pytest.mark.parametrize(
    ("action", "words"),
    [
        ("cancel", "has been canceled"),
        ("unpaid", "suspended until this invoice is paid"),
        ("pause", "has been paused"),
    ],
)
def test_the_final_notice_says_the_final_action(action: str, words: str) -> None:
    content = compose(facts("invoice.dunning_exhausted", payload={"final_action": action}))
    assert content.subject.startswith("Final notice") and words in content.text


def test_data_is_escaped_in_html_and_dangerous_links_are_dropped() -> None:
    """A name or plan with markup is shown as text; a javascript: or data: pay_url is never a
    link (the contact sentence is used instead)."""
    content = compose(
        facts(
            "invoice.payment_failed",
            customer_name='<img src=x onerror="alert(1)">',
            plan_name="Gold & <b>Co</b>",
            payload={"reason": "soft_decline", "pay_url": "javascript:alert(1)"},
        )
    )
    assert "<img" not in content.html and "&lt;img" in content.html
    assert "Gold &amp; &lt;b&gt;Co&lt;/b&gt;" in content.html
    assert "javascript" not in content.html and "javascript" not in content.text
    assert [safe_link(u) for u in ("https://a.example/p", "data:text/html,x", "http:/x", 5)] == [
        "https://a.example/p",
        None,
        None,
        None,
    ]


def test_missing_facts_are_named() -> None:
    with pytest.raises(MissingFacts, match="invoice amount"):
        compose(facts("invoice.paid", amount_minor=None))
    with pytest.raises(MissingFacts, match="no customer email"):
        compose(facts("invoice.created"))


def test_an_unknown_language_or_zone_falls_back_instead_of_failing() -> None:
    content = compose(facts("subscription.canceled", language="fr", timezone="US/Pacific-New"))
    assert content.language == "en" and "canceled on March 1, 2026" in content.text


def test_the_operator_alert_shows_kind_ids_and_payload() -> None:
    content = compose_alert(
        event_id=4,
        kind="alert.payment_mismatch",
        occurred_at=AT,
        customer_id=None,
        subscription_id=None,
        invoice_id=12,
        payload={"order_id": "o-9"},
    )
    assert content.subject == "[billing alert] alert.payment_mismatch (event 4)"
    assert "invoice: 12" in content.text and '"order_id": "o-9"' in content.text
    assert "customer:" not in content.text
