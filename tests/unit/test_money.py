"""Money: exact decimals, per-currency precision, one rounding rule."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.money import (
    UnknownCurrency,
    currency_exponent,
    format_money,
    from_minor,
    parse_amount,
    parse_decimal,
    quantize,
    to_minor,
)


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        ("QAR", 2),
        ("SAR", 2),
        ("KWD", 3),
        ("BHD", 3),
        ("JOD", 3),
        ("OMR", 3),
        ("IQD", 3),
        ("JPY", 0),
    ],
)
def test_currency_exponent_is_the_iso_4217_minor_unit(code: str, exponent: int) -> None:
    """Each currency has its own number of decimals (DESIGN invariant 5): ISO 4217's minor unit,
    which card networks follow, even where Babel's CLDR display digits differ (IQD: 0 there)."""
    assert currency_exponent(code) == exponent


def test_iqd_has_three_decimals_everywhere_in_the_domain() -> None:
    """One IQD amount means the same when parsed, stored in minor units and shown: 1.250 IQD is
    1250 fils, never 1 dinar (rounded) nor refused as having too many decimals."""
    amount = parse_amount("1.250", "IQD")
    assert str(amount) == "1.250"
    assert to_minor(amount, "IQD") == 1250
    assert from_minor(1250, "IQD") == amount
    assert format_money(amount, "IQD") == "IQD1.250"
    with pytest.raises(ValueError, match="has 4 decimals but IQD allows 3"):
        parse_amount("1.2500", "IQD")


def test_the_gateway_layer_and_the_sandbox_use_the_domain_decimals() -> None:
    """One source of truth for the number of decimals: for every currency Babel knows, the amounts
    sent to Fatora (``billing.fatora.amounts``) and the amounts the sandbox accepts have exactly
    the domain's decimals, so what a plan says is what storage holds and what is charged."""
    from babel.numbers import list_currencies

    from billing.fatora import amounts
    from billing.fatora.sandbox import core

    disagreements = {
        code: (currency_exponent(code), amounts.currency_precision(code))
        for code in sorted(list_currencies())
        if currency_exponent(code) != amounts.currency_precision(code)
        or currency_exponent(code) != core.currency_precision(code)
    }
    assert disagreements == {}
    assert amounts.format_amount(from_minor(1250, "IQD"), "IQD") == "1.250"


def test_currency_code_is_case_insensitive() -> None:
    """Codes are normalized to upper case rather than rejected for their case."""
    assert currency_exponent("kwd") == 3


@pytest.mark.parametrize("code", ["ZZZ", "QA", "QARR", "", "Q1R", "usd "])
def test_unknown_currency_is_rejected(code: str) -> None:
    """Only ISO codes known to Babel are accepted, never a silent default precision."""
    with pytest.raises(UnknownCurrency):
        currency_exponent(code)


def test_unknown_currency_is_a_value_error() -> None:
    """Callers that catch ValueError also catch an unknown currency."""
    assert issubclass(UnknownCurrency, ValueError)


@pytest.mark.parametrize(
    ("text", "currency", "expected"),
    [
        ("50.00", "QAR", "50.00"),
        ("50", "QAR", "50.00"),
        ("50.5", "QAR", "50.50"),
        ("0.01", "QAR", "0.01"),
        ("1.250", "KWD", "1.250"),
        ("1.25", "kwd", "1.250"),
        ("0.001", "BHD", "0.001"),
        ("1000", "JPY", "1000"),
    ],
)
def test_parse_amount_quantizes_to_the_exponent(text: str, currency: str, expected: str) -> None:
    """A parsed amount always carries exactly the currency's number of decimals."""
    amount = parse_amount(text, currency)
    assert str(amount) == expected
    assert amount.as_tuple().exponent == -currency_exponent(currency)


def test_parse_amount_message_names_the_decimals() -> None:
    """The error says how many decimals were written and how many the currency allows."""
    with pytest.raises(ValueError, match=r'^amount "50.001" has 3 decimals but QAR allows 2$'):
        parse_amount("50.001", "QAR")
    with pytest.raises(ValueError, match=r'amount "100\.5" has 1 decimal but JPY allows none'):
        parse_amount("100.5", "JPY")
    with pytest.raises(ValueError, match="has 4 decimals but KWD allows 3"):
        parse_amount("1.2500", "KWD")


@pytest.mark.parametrize(
    "text",
    ["", " 5", "5 ", "+5", "5.", ".5", "1e3", "1E3", "1_000", "1,000", "NaN", "Infinity",
     "٥٠", "05", "0x10", "5.0.0"],
)  # fmt: skip
def test_parse_amount_rejects_anything_but_a_plain_decimal(text: str) -> None:
    """Strict syntax: what Decimal() would tolerate (exponents, spaces, other digits) is refused."""
    with pytest.raises(ValueError, match="not a decimal string"):
        parse_amount(text, "QAR")


@pytest.mark.parametrize("text", ["0", "0.00", "-5", "-0.01"])
def test_parse_amount_requires_positive(text: str) -> None:
    """A price is never zero or negative."""
    with pytest.raises(ValueError, match="must be positive"):
        parse_amount(text, "QAR")


def test_parse_amount_unknown_currency() -> None:
    """The currency is validated even when the text is fine."""
    with pytest.raises(UnknownCurrency):
        parse_amount("1.00", "ZZZ")


@pytest.mark.parametrize("bad", [50.0, 50, Decimal("50"), None])
def test_parse_amount_takes_only_strings(bad: object) -> None:
    """parse_amount is for text; a float in particular is a TypeError, never converted."""
    with pytest.raises(TypeError):
        parse_amount(bad, "QAR")  # type: ignore[arg-type]


def test_parse_decimal_ignores_currency_precision() -> None:
    """parse_decimal checks syntax and sign only, keeping every written digit."""
    assert parse_decimal("1.23456") == Decimal("1.23456")
    with pytest.raises(ValueError, match="must be positive"):
        parse_decimal("0")


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("2.345", "QAR", "2.35"),  # half up, not half even (which gives 2.34)
        ("2.335", "QAR", "2.34"),
        ("2.344", "QAR", "2.34"),
        ("-2.345", "QAR", "-2.35"),  # away from zero, symmetric for credits
        ("1.2345", "KWD", "1.235"),
        ("0.5", "JPY", "1"),
        ("1.5", "JPY", "2"),
        ("7", "KWD", "7.000"),
    ],
)
def test_quantize_rounds_half_up(amount: str, currency: str, expected: str) -> None:
    """There is one rounding rule, half up, and it is applied to the currency's exponent."""
    assert str(quantize(Decimal(amount), currency)) == expected


def test_quantize_accepts_int() -> None:
    """An int is exact, so it is a valid amount."""
    assert str(quantize(3, "KWD")) == "3.000"


@pytest.mark.parametrize("bad", [1.1, True, "1.10", None])
def test_quantize_rejects_non_decimals(bad: object) -> None:
    """Floats (and other non-exact values) never enter money arithmetic."""
    with pytest.raises(TypeError):
        quantize(bad, "QAR")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), Decimal("1e40")])
def test_quantize_rejects_non_finite_and_huge(bad: Decimal) -> None:
    """NaN, infinities and absurd magnitudes are errors, not amounts."""
    with pytest.raises(ValueError):
        quantize(bad, "QAR")


@given(
    st.decimals(min_value=Decimal("-1e12"), max_value=Decimal("1e12"), places=6),
    st.sampled_from(["QAR", "KWD", "JPY", "BHD"]),
)
def test_quantize_is_idempotent_and_close(amount: Decimal, currency: str) -> None:
    """Rounding twice changes nothing, and moves the amount by at most half a minor unit."""
    once = quantize(amount, currency)
    assert quantize(once, currency) == once
    assert abs(once - amount) <= Decimal(1).scaleb(-currency_exponent(currency)) / 2


@given(
    st.integers(min_value=1, max_value=10**12),
    st.sampled_from(["QAR", "KWD", "JPY", "OMR"]),
)
def test_parse_amount_round_trips(minor_units: int, currency: str) -> None:
    """Any amount written with the currency's exact decimals parses to itself."""
    exponent = currency_exponent(currency)
    amount = Decimal(minor_units).scaleb(-exponent)
    assert parse_amount(str(amount), currency) == amount


def test_format_money_is_for_humans() -> None:
    """Formatting uses the locale and always shows the currency's decimals."""
    assert format_money(Decimal("1234.5"), "QAR") == "QAR1,234.50"
    assert format_money(Decimal("1.25"), "KWD").endswith("1.250")
    assert format_money(Decimal("2.345"), "QAR") == "QAR2.35"  # the same rounding as charging
    assert format_money(Decimal("1000"), "JPY") == "¥1,000"


def test_format_money_rejects_float() -> None:
    """Even display code never accepts a float."""
    with pytest.raises(TypeError):
        format_money(1.5, "QAR")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [("50.00", "QAR", 5000), ("1.250", "KWD", 1250), ("1000", "JPY", 1000), ("0.5", "QAR", 50)],
)
def test_minor_units(amount: str, currency: str, minor: int) -> None:
    """Storage in minor units is exact both ways, with the currency's decimals restored."""
    assert to_minor(Decimal(amount), currency) == minor
    assert from_minor(minor, currency) == quantize(Decimal(amount), currency)
    assert str(from_minor(minor, currency)) == str(quantize(Decimal(amount), currency))


def test_to_minor_refuses_to_round() -> None:
    """An amount with more decimals than the currency is an error, never rounded on storage."""
    with pytest.raises(ValueError, match="more decimals"):
        to_minor(Decimal("1.005"), "QAR")
    with pytest.raises(TypeError):
        to_minor(1.5, "QAR")  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**15), max_value=10**15), st.sampled_from(["QAR", "KWD", "JPY"]))
def test_minor_units_round_trip(minor: int, currency: str) -> None:
    """from_minor then to_minor gives back the same integer."""
    assert to_minor(from_minor(minor, currency), currency) == minor
