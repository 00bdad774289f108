"""Money amounts as Fatora expects them: major units, exactly the currency's decimals.

Amounts are Decimal end to end. A float never touches them, because 0.1 + 0.2 style errors in a
charge are real money.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import cache

from babel.numbers import get_currency_precision, list_currencies

__all__ = ["currency_precision", "format_amount"]

# CLDR (Babel's source) gives IQD 0 digits for display, while ISO 4217, which card networks
# follow, gives it 3. A charge must allow what the gateway allows, so ISO wins here.
_ISO_MINOR_UNITS_OVERRIDES = {"IQD": 3}

_CURRENCY_RE = re.compile(r"[A-Za-z]{3}")


@cache
def _known_currencies() -> frozenset[str]:
    return frozenset(str(c) for c in list_currencies())


def currency_precision(currency: str) -> int:
    """Number of decimals of an ISO 4217 currency code; ValueError for an unknown code."""
    if not _CURRENCY_RE.fullmatch(currency):
        raise ValueError(f"not an ISO 4217 currency code: {currency!r}")
    code = currency.upper()
    if code not in _known_currencies():
        raise ValueError(f"unknown currency: {code}")
    if code in _ISO_MINOR_UNITS_OVERRIDES:
        return _ISO_MINOR_UNITS_OVERRIDES[code]
    return int(get_currency_precision(code))


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
