"""Money: ``Decimal`` amounts with per-currency precision.

Every amount in the system is a ``Decimal`` in the currency's major unit (``Decimal("50.00")``
QAR, ``Decimal("1.250")`` KWD). Floats are refused with ``TypeError`` wherever they could enter,
because a binary float cannot represent most decimal amounts exactly.

The number of decimals per currency (the *exponent*) is ISO 4217's minor unit, which card networks
and the gateway follow: QAR and SAR have 2, KWD, BHD, JOD, OMR and IQD have 3, and JPY has 0.
:func:`currency_exponent` is the one place that says so; everything else (storage in minor units,
parsing plans, the amounts sent to Fatora) asks it. It takes Babel's CLDR data, except where CLDR's
display digits differ from ISO 4217 (:data:`ISO_4217_MINOR_UNITS`).

There is exactly one rounding rule, :data:`ROUNDING` (half up), applied by :func:`quantize`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from functools import cache
from types import MappingProxyType

from babel import Locale
from babel.numbers import get_currency_precision, list_currencies

__all__ = [
    "ISO_4217_MINOR_UNITS",
    "ROUNDING",
    "UnknownCurrency",
    "currency_exponent",
    "format_money",
    "from_minor",
    "normalize_currency",
    "parse_amount",
    "parse_decimal",
    "quantize",
    "to_minor",
]

# Half up, not banker's rounding: each invoice amount is rounded once and then charged, so the
# statistical unbiasedness of half-even buys nothing here, while half up is the result a customer
# or a merchant's accountant gets when redoing the arithmetic by hand or in a spreadsheet.
ROUNDING = ROUND_HALF_UP

# ASCII digits only: Decimal() itself would accept "1e3", "  5 ", "1_000" and Arabic-Indic digits,
# none of which belong in a plans file or an API payload.
_AMOUNT_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.([0-9]+))?")
_CODE_RE = re.compile(r"[A-Z]{3}")

# ISO 4217 minor units where CLDR (Babel's source) gives other display digits: CLDR says 0 for
# IQD, ISO 4217 says 3, and card networks and the gateway follow ISO. A charge must allow what the
# gateway allows, and an amount must mean the same in a plan, in storage and on the wire.
ISO_4217_MINOR_UNITS: Mapping[str, int] = MappingProxyType({"IQD": 3})

# Enough digits for any real amount; quantize() turns anything larger into a ValueError.
_PRECISION = 34


class UnknownCurrency(ValueError):
    """The code is not an ISO 4217 currency known to Babel."""

    def __init__(self, code: object) -> None:
        super().__init__(f"unknown currency {code!r}: not an ISO 4217 code known to Babel")
        self.code = code


@cache
def _known_currencies() -> frozenset[str]:
    return frozenset(list_currencies())


def normalize_currency(code: str) -> str:
    """Return the upper-cased ISO 4217 code, or raise :class:`UnknownCurrency`."""
    if not isinstance(code, str):
        raise TypeError(f"currency code must be a str, not {type(code).__name__}")
    upper = code.upper()
    if not _CODE_RE.fullmatch(upper) or upper not in _known_currencies():
        raise UnknownCurrency(code)
    return upper


def currency_exponent(code: str) -> int:
    """Number of decimals in the currency's ISO 4217 minor unit (QAR 2, KWD 3, IQD 3, JPY 0).

    The one source of the number of decimals: ``billing.fatora.amounts`` uses it too.
    """
    upper = normalize_currency(code)
    if upper in ISO_4217_MINOR_UNITS:
        return ISO_4217_MINOR_UNITS[upper]
    return int(get_currency_precision(upper))


def _reject_non_decimal(amount: object) -> Decimal:
    # bool is an int subclass; True as an amount is always a bug.
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(
            f"amount must be a Decimal, not {type(amount).__name__}"
            + (" (floats cannot hold money exactly)" if isinstance(amount, float) else "")
        )
    value = Decimal(amount)
    if not value.is_finite():
        raise ValueError(f"amount must be a finite number, got {value}")
    return value


def quantize(amount: Decimal | int, currency: str) -> Decimal:
    """Round ``amount`` to the currency's exponent with :data:`ROUNDING`; the one rounding rule."""
    value = _reject_non_decimal(amount)
    exponent = currency_exponent(currency)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        try:
            return value.quantize(Decimal(1).scaleb(-exponent), rounding=ROUNDING)
        except InvalidOperation:
            raise ValueError(f"amount {value} is too large") from None


def _decimals_phrase(count: int) -> str:
    if count == 0:
        return "no decimals"
    return f"{count} decimal" + ("" if count == 1 else "s")


def parse_decimal(text: str) -> Decimal:
    """Parse a strictly written positive decimal string, without regard to any currency."""
    return _parse(text)[0]


def _parse(text: str) -> tuple[Decimal, int]:
    """The value of ``text`` and the number of decimals written in it."""
    if not isinstance(text, str):
        raise TypeError(
            f"amount must be given as a decimal string like '50.00', not {type(text).__name__}"
        )
    match = _AMOUNT_RE.fullmatch(text)
    if match is None:
        if text.startswith("-") and _AMOUNT_RE.fullmatch(text[1:]):
            raise ValueError(f'amount "{text}" must be positive')
        raise ValueError(f'amount "{text}" is not a decimal string like "50.00"')
    value = Decimal(text)
    if value <= 0:
        raise ValueError(f'amount "{text}" must be positive')
    return value, len(match.group(1) or "")


def parse_amount(text: str, currency: str) -> Decimal:
    """Parse a positive decimal string such as ``"50.00"`` into an exact amount.

    Strict on purpose: only ASCII digits with an optional fractional part, no sign, exponent,
    separators or spaces, and no more decimals than the currency has (``"50.001"`` QAR is an
    error, never silently rounded). The result is quantized to exactly the currency's exponent.
    """
    code = normalize_currency(currency)
    exponent = currency_exponent(code)
    value, decimals = _parse(text)
    if decimals > exponent:
        allowed = str(exponent) if exponent else "none"
        raise ValueError(
            f'amount "{text}" has {_decimals_phrase(decimals)} but {code} allows {allowed}'
        )
    return quantize(value, code)


def format_money(amount: Decimal | int, currency: str, locale: str = "en") -> str:
    """Human-readable amount for emails and dashboards, e.g. ``QAR50.00`` in ``en``."""
    code = normalize_currency(currency)
    exponent = currency_exponent(code)
    # Quantize with our rule first so the text never disagrees with the amount charged, and show
    # exactly our decimals: Babel's own would be CLDR's, which for IQD hide the fils.
    pattern = copy.copy(Locale.parse(locale).currency_formats["standard"])
    pattern.frac_prec = (exponent, exponent)
    return str(pattern.apply(quantize(amount, code), locale, currency=code, currency_digits=False))


def to_minor(amount: Decimal, currency: str) -> int:
    """The amount in the currency's minor unit (fils, dirham...), exactly: storage form."""
    exact = _reject_non_decimal(amount)
    exponent = currency_exponent(currency)
    scaled = exact.scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} has more decimals than {normalize_currency(currency)} allows")
    return int(scaled)


def from_minor(minor: int, currency: str) -> Decimal:
    """The inverse of :func:`to_minor`: a Decimal with exactly the currency's decimals."""
    exponent = currency_exponent(currency)
    return Decimal(minor).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))
