"""Money amounts as Fatora expects them: major units, exactly the currency's decimals.

Amounts are Decimal end to end. A float never touches them, because 0.1 + 0.2 style errors in a
charge are real money.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from billing.money import currency_exponent

__all__ = ["currency_precision", "format_amount"]


def currency_precision(currency: str) -> int:
    """Number of decimals of an ISO 4217 currency code; ValueError for an unknown code.

    Not a table of its own: the domain's :func:`billing.money.currency_exponent` decides (ISO 4217
    minor units, so IQD has 3), so an amount means the same in a plan, in storage and on the wire.
    """
    return currency_exponent(currency)


def format_amount(amount: Decimal, currency: str) -> str:
    """The amount as a plain decimal literal with exactly the currency's decimals.

    ``Decimal("50")`` in QAR gives ``"50.00"``, ``Decimal("1.25")`` in KWD gives ``"1.250"``.
    Raises ValueError when the amount is not positive or has more significant decimals than the
    currency allows: rounding a charge silently would bill the wrong sum.
    """
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"amount must be a Decimal, not {type(amount).__name__}")
    value = Decimal(amount)
    if not value.is_finite():
        raise ValueError("amount must be finite")
    if value <= 0:
        raise ValueError("amount must be positive")
    places = currency_precision(currency)
    quantum = Decimal(1).scaleb(-places)
    try:
        exact = value.quantize(quantum)
    except InvalidOperation:
        raise ValueError("amount has too many digits") from None
    if exact != value:
        raise ValueError(
            f"amount {value} has more than {places} decimals allowed for {currency.upper()}"
        )
    return format(exact, "f")
