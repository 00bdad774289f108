"""format_amount: exactly the currency's decimals, never rounded, never through float."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.fatora import currency_precision, format_amount

PRECISION = {
    "QAR": 2,
    "SAR": 2,
    "USD": 2,
    "EGP": 2,
    "KWD": 3,
    "BHD": 3,
    "JOD": 3,
    "OMR": 3,
    "TND": 3,
    "IQD": 3,
    "LYD": 3,
    "JPY": 0,
}

currencies = st.sampled_from(sorted(PRECISION))


def minor_units_amount(currency: str, units: int) -> Decimal:
    return Decimal(units).scaleb(-PRECISION[currency])


@pytest.mark.parametrize(("currency", "places"), sorted(PRECISION.items()))
def test_currency_precision(currency: str, places: int) -> None:
    assert currency_precision(currency) == places
    assert currency_precision(currency.lower()) == places


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (Decimal("50"), "QAR", "50.00"),
        (Decimal("50.0"), "QAR", "50.00"),
        (Decimal("123.45"), "QAR", "123.45"),
        (Decimal("0.01"), "USD", "0.01"),
        (Decimal("1.25"), "KWD", "1.250"),
        (Decimal("123.100"), "BHD", "123.100"),
        (Decimal("1.2500"), "KWD", "1.250"),  # trailing zeros are not extra precision
        (Decimal("1E+3"), "QAR", "1000.00"),
        (Decimal("500"), "JPY", "500"),
        (Decimal("500.000"), "JPY", "500"),
        (7, "QAR", "7.00"),
    ],
)
def test_examples(amount: Decimal, currency: str, expected: str) -> None:
    assert format_amount(amount, currency) == expected


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        (Decimal("0.001"), "QAR"),
        (Decimal("10.005"), "USD"),
        (Decimal("1.2345"), "KWD"),
        (Decimal("0.5"), "JPY"),
        (Decimal("0"), "QAR"),
        (Decimal("-1.00"), "QAR"),
        (Decimal("-0"), "QAR"),
        (Decimal("NaN"), "QAR"),
        (Decimal("Infinity"), "QAR"),
        (Decimal("1" * 40), "QAR"),
    ],
)
def test_rejects_over_precise_or_non_positive(amount: Decimal, currency: str) -> None:
    with pytest.raises(ValueError):
        format_amount(amount, currency)


@pytest.mark.parametrize("currency", ["", "QA", "QARR", "Q1R", "ZZZ", "123"])
def test_rejects_unknown_currency(currency: str) -> None:
    with pytest.raises(ValueError):
        format_amount(Decimal("1.00"), currency)


@pytest.mark.parametrize("amount", [50.0, 0.1, True, "50.00", None])
def test_rejects_non_decimal_types(amount: object) -> None:
    with pytest.raises(TypeError):
        format_amount(amount, "QAR")  # type: ignore[arg-type]


@given(currency=currencies, units=st.integers(min_value=1, max_value=10**15))
def test_round_trip_and_exact_decimals(currency: str, units: int) -> None:
    amount = minor_units_amount(currency, units)
    text = format_amount(amount, currency)
    assert Decimal(text) == amount
    places = PRECISION[currency]
    whole, _, fraction = text.partition(".")
    assert len(fraction) == places
    assert whole.isdigit() and (fraction.isdigit() or places == 0)
    assert "e" not in text.lower()
    # The literal is built from integers: it equals the exact minor-unit count.
    assert int(text.replace(".", "")) == units


@given(
    currency=currencies,
    units=st.integers(min_value=1, max_value=10**12),
    extra_digits=st.integers(min_value=1, max_value=6),
    tail=st.integers(min_value=1, max_value=9),
)
def test_over_precise_amounts_are_rejected(
    currency: str, units: int, extra_digits: int, tail: int
) -> None:
    amount = minor_units_amount(currency, units) + Decimal(tail).scaleb(
        -(PRECISION[currency] + extra_digits)
    )
    with pytest.raises(ValueError):
        format_amount(amount, currency)


@given(currency=currencies, amount=st.decimals(min_value=-(10**12), max_value=10**12, places=6))
def test_never_rounds(currency: str, amount: Decimal) -> None:
    try:
        text = format_amount(amount, currency)
    except ValueError:
        quantum = Decimal(1).scaleb(-PRECISION[currency])
        assert amount <= 0 or amount != amount.quantize(quantum)
    else:
        assert Decimal(text) == amount
