"""Defensive parsers for Fatora responses and redirects.

Pure functions from bytes (or a query string) to the typed values in ``types.py``. The gateway's
JSON is loosely specified, so:

* keys are matched without regard to case, ``_`` or ``-`` (``transactionID``, ``transaction_id``
  and ``transid``-style v3 habits all work); unknown extra keys are ignored;
* numbers are parsed as Decimal (``parse_float=Decimal``), never through float;
* a body that cannot be understood raises MalformedResponse: it never reads as a success.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, unquote_plus

from billing.fatora.errors import MalformedResponse
from billing.fatora.types import (
    CheckoutSession,
    CollectResult,
    Payment,
    PaymentStatus,
    RedirectParams,
    RefundResult,
)

__all__ = [
    "Envelope",
    "ErrorInfo",
    "carries_payment",
    "parse_checkout",
    "parse_collect",
    "parse_envelope",
    "parse_error_body",
    "parse_payment",
    "parse_payment_date",
    "parse_redirect_params",
    "parse_refund",
    "parse_retry_after",
]

Obj = Mapping[str, Any]


class _Conflict(ValueError):
    """Two spellings of one key with different values: the body is ambiguous."""


@lru_cache(maxsize=1024)
def _norm(key: str) -> str:
    """A key as looked up: without ``_`` and ``-``, lower case (an answer's keys come from a
    small set: each is worked out once)."""
    return key.replace("_", "").replace("-", "").lower()


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Store keys normalised once, so every lookup below is a plain dict access.
    out: dict[str, Any] = {}
    for key, value in pairs:
        k = _norm(key)
        if k in out and out[k] != value:
            raise _Conflict(key)
        out[k] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _load(body: bytes) -> Any:
    if not body or not body.strip():
        raise MalformedResponse("empty response body")
    try:
        return json.loads(
            body,
            parse_float=Decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_object_hook,
        )
    except _Conflict:
        raise MalformedResponse("response has conflicting spellings of one key") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        # Never echo the body: an HTML error page could quote our request.
        raise MalformedResponse("response body is not valid JSON") from None


def _status_word(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip().upper()
    return None


def _text(obj: Obj, *keys: str, field: str, ints: bool = False) -> str | None:
    """A text field under any of ``keys``; with ``ints``, integers become text (ids)."""
    for key in keys:
        if key not in obj or obj[key] is None:
            continue
        value = obj[key]
        if isinstance(value, bool):
            raise MalformedResponse(f"{field} has the wrong type")
        if isinstance(value, str):
            return value if value != "" else None
        if ints and isinstance(value, int):
            return str(value)
        raise MalformedResponse(f"{field} has the wrong type")
    return None


def _nested(obj: Obj, key: str) -> Obj:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedResponse(f"{key} is not an object")
    return value


def _amount(obj: Obj, *keys: str) -> Decimal | None:
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            raise MalformedResponse("amount has the wrong type")
        if isinstance(value, int | Decimal):
            result = Decimal(value)
        elif isinstance(value, str):
            try:
                result = Decimal(value.strip())
            except InvalidOperation:
                raise MalformedResponse("amount is not a number") from None
        else:
            raise MalformedResponse("amount has the wrong type")
        if not result.is_finite():
            raise MalformedResponse("amount is not a finite number")
        return result
    return None


def _payment_status(value: Any, *, field: str) -> PaymentStatus:
    word = _status_word(value)
    try:
        return PaymentStatus(word or "")
    except ValueError:
        raise MalformedResponse(f"{field} is missing or unknown") from None


def _order_id(obj: Obj, expected: str | None) -> str:
    found = _text(obj, "orderid", field="order_id", ints=True)
    if expected is not None and found is not None and found != expected:
        # Settling one invoice with another order's payment would be worse than failing.
        raise MalformedResponse("response is about a different order_id")
    order_id = found if found is not None else expected
    if order_id is None:
        raise MalformedResponse("order_id is missing")
    return order_id


# ---------------------------------------------------------------- envelope and errors


@dataclass(frozen=True, slots=True)
class Envelope:
    """The common ``{"status": ..., "result": ...}`` wrapper, with the error part if any."""

    status_word: str
    result: Any
    error_code: str | None
    description: str | None

    @property
    def ok(self) -> bool:
        return self.status_word == "SUCCESS"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What an error body said; ``understood`` is False for HTML, garbage or no envelope."""

    understood: bool
    status_word: str | None = None
    error_code: str | None = None
    description: str | None = None
    payment_word: str | None = None  # the payment status inside ``result``, if any
    looks_like_json: bool = False  # a JSON-looking body, cut or garbled (not a foreign page)


def _error_parts(obj: Obj) -> tuple[str | None, str | None]:
    error = obj.get("error")
    code: str | None = None
    desc: str | None = None
    if isinstance(error, str):
        desc = error or None
    elif isinstance(error, dict):
        raw_code = error.get("errorcode", error.get("code"))
        if isinstance(raw_code, str | int) and not isinstance(raw_code, bool):
            code = str(raw_code)
        elif isinstance(raw_code, Decimal):
            code = format(raw_code, "f")
        d = error.get("description", error.get("message"))
        desc = d if isinstance(d, str) and d else None
    if desc is None:
        for key in ("description", "message", "failerdescription"):
            value = obj.get(key)
            if isinstance(value, str) and value:
                desc = value
                break
            result = obj.get("result")
            if isinstance(result, dict):
                value = result.get(key)
                if isinstance(value, str) and value:
                    desc = value
                    break
    return code, desc


def parse_envelope(body: bytes) -> Envelope:
    """The envelope of a 2xx response; MalformedResponse if it is not one."""
    data = _load(body)
    if not isinstance(data, dict):
        raise MalformedResponse("response is not a JSON object")
    word = _status_word(data.get("status"))
    if word is None:
        raise MalformedResponse("response has no status")
    code, desc = _error_parts(data) if word != "SUCCESS" else (None, None)
    return Envelope(status_word=word, result=data.get("result"), error_code=code, description=desc)


def parse_error_body(body: bytes) -> ErrorInfo:
    """Best-effort reading of an error body; never raises (error pages may be HTML)."""
    stripped = body.lstrip()[:1]
    looks_like_json = stripped in (b"{", b"[")
    try:
        data = _load(body)
    except MalformedResponse:
        return ErrorInfo(understood=False, looks_like_json=looks_like_json)
    if not isinstance(data, dict):
        return ErrorInfo(understood=False, looks_like_json=looks_like_json)
    word = _status_word(data.get("status"))
    code, desc = _error_parts(data)
    result = data.get("result")
    payment_word = None
    if isinstance(result, dict):
        payment_word = next(
            (w for k in _PAYMENT_STATUS_KEYS if (w := _status_word(result.get(k))) is not None),
            None,
        )
    return ErrorInfo(
        understood=word is not None,
        status_word=word,
        error_code=code,
        description=desc,
        payment_word=payment_word,
        looks_like_json=True,
    )


def _envelope(body: bytes | Envelope) -> Envelope:
    return body if isinstance(body, Envelope) else parse_envelope(body)


def _result_object(envelope: Envelope, *, required: bool = True) -> Obj:
    if not envelope.ok:
        # Callers route non-SUCCESS envelopes to error_from_response first; reaching here
        # means the answer is not the success it should be.
        raise MalformedResponse(f"status is {envelope.status_word}, not SUCCESS")
    result = envelope.result
    if result is None and not required:
        return {}
    if not isinstance(result, dict):
        raise MalformedResponse("result is not an object")
    return result


_PAYMENT_STATUS_KEYS = ("paymentstatus", "paymentstate")


def carries_payment(envelope: Envelope) -> bool:
    """True when the result holds a payment status, even under a non-SUCCESS envelope.

    Some gateways mirror a failed payment in the envelope status; verify then still answers
    with the payment, which must be read rather than treated as a request error.
    """
    result = envelope.result
    return isinstance(result, dict) and any(result.get(k) is not None for k in _PAYMENT_STATUS_KEYS)


# ---------------------------------------------------------------- results


def parse_checkout(body: bytes | Envelope) -> CheckoutSession:
    """The checkout URL out of a SUCCESS envelope."""
    result = _result_object(_envelope(body))
    url = _text(result, "checkouturl", "url", field="checkout_url")
    if url is None or not url.lower().startswith(("https://", "http://")):
        raise MalformedResponse("checkout_url is missing or not a URL")
    return CheckoutSession(checkout_url=url)


def parse_payment(body: bytes | Envelope, *, order_id: str | None = None) -> Payment:
    """A verify answer as a Payment.

    ``order_id`` is the order we asked about: it fills a missing one and must match a present
    one. A missing or unknown payment status raises: an unclear answer is never a success.
    """
    envelope = _envelope(body)
    if not envelope.ok and carries_payment(envelope):
        result: Obj = envelope.result
    else:
        result = _result_object(envelope)
    status_key = next((k for k in _PAYMENT_STATUS_KEYS if result.get(k) is not None), None)
    if status_key is None:
        raise MalformedResponse("payment_status is missing")
    status = _payment_status(result[status_key], field="payment_status")
    card = _nested(result, "carddetails")
    refund = _nested(result, "refunddetails")
    last4 = _text(card, "last4digits", "last4", field="last_4_digits", ints=True) or _text(
        result, "last4digits", "cardlast4", "last4", field="last_4_digits", ints=True
    )
    if last4 is not None and last4.isdigit() and len(last4) < 4:
        # A JSON number drops leading zeros ("0123" sent as 123).
        last4 = last4.zfill(4)
    mode = _text(result, "mode", field="mode")
    currency = _text(result, "currency", "currencycode", field="currency")
    raw_date = result.get("paymentdate")
    return Payment(
        status=status,
        order_id=_order_id(result, order_id),
        order_named=_text(result, "orderid", field="order_id", ints=True) is not None,
        transaction_id=_text(result, "transactionid", "transid", field="transaction_id", ints=True),
        amount=_amount(result, "amount", "paymentamount"),
        currency=currency.strip().upper() if currency else None,
        mode=mode.strip().lower() if mode else None,
        auth_code=_text(result, "authcode", "auth", field="auth_code", ints=True),
        description=_text(result, "description", field="description"),
        payment_date=parse_payment_date(raw_date) if isinstance(raw_date, str) else None,
        card_token=_text(result, "cardtoken", "token", field="card_token"),
        card_last4=last4,
        card_type=_text(card, "cardtype", "type", field="card_type")
        or _text(result, "cardtype", field="card_type"),
        refund_status=_text(refund, "refundstatus", "status", field="refund_status")
        or _text(result, "refundstatus", field="refund_status"),
        refund_transaction_id=_text(
            refund, "refundtransactionid", "transactionid", field="refund_transaction_id", ints=True
        )
        or _text(result, "refundtransactionid", field="refund_transaction_id", ints=True),
        note=_text(result, "note", field="note"),
    )


def parse_collect(body: bytes | Envelope, *, order_id: str) -> CollectResult:
    """A collect-payment answer. Its shape is undocumented, so little is required.

    A SUCCESS envelope is read as is; a PENDING envelope means the charge is pending.
    """
    envelope = _envelope(body)
    if envelope.status_word == "PENDING":
        pending = envelope.result if isinstance(envelope.result, dict) else {}
        stated = [_status_word(pending.get(k)) for k in (*_PAYMENT_STATUS_KEYS, "status")]
        if any(word not in (None, "PENDING") for word in stated):
            raise MalformedResponse("envelope says PENDING but the result disagrees")
        result: Obj = {**pending, "paymentstatus": "PENDING"}
    else:
        result = _result_object(envelope, required=False)
    status_key = next(
        (k for k in (*_PAYMENT_STATUS_KEYS, "status") if result.get(k) is not None), None
    )
    status = None if status_key is None else _payment_status(result[status_key], field=status_key)
    mode = _text(result, "mode", field="mode")
    return CollectResult(
        status=status,
        order_id=_order_id(result, order_id),
        transaction_id=_text(result, "transactionid", "transid", field="transaction_id", ints=True),
        description=_text(result, "description", field="description"),
        auth_code=_text(result, "authcode", "auth", field="auth_code", ints=True),
        mode=mode.strip().lower() if mode else None,
    )


def parse_refund(body: bytes | Envelope) -> RefundResult:
    """A refund SUCCESS answer; values of refund_status beyond "completed" are unknown."""
    result = _result_object(_envelope(body), required=False)
    refund = _nested(result, "refunddetails")
    status = _text(result, "refundstatus", "status", field="refund_status") or _text(
        refund, "refundstatus", "status", field="refund_status"
    )
    return RefundResult(
        refund_status=status,
        refund_transaction_id=_text(
            result, "refundtransactionid", field="refund_transaction_id", ints=True
        )
        or _text(
            refund, "refundtransactionid", "transactionid", field="refund_transaction_id", ints=True
        ),
    )


# ---------------------------------------------------------------- dates and headers

# Fatora's "YYYY-MM-DDThh:mm:ss:ms" puts milliseconds after a colon; ISO puts a fraction after
# a dot. Both, with an optional zone.
_DATE_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2}))?"
    r"(?:(:)(\d{1,3})|\.(\d{1,9}))?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?",
    re.IGNORECASE,
)


def _zone(text: str | None) -> timezone:
    if text is None or text.upper() == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:] or 0)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def parse_payment_date(text: str | None) -> datetime | None:
    """A timezone-aware datetime (UTC when the text has no zone), or None if unparseable.

    The colon form carries a count of milliseconds (``:5`` is 5 ms); the dot form a fraction.
    """
    if not text or not text.strip():
        return None
    text = text.strip()
    match = _DATE_RE.fullmatch(text)
    try:
        if match:
            year, month, day, hour, minute, second = (int(g or 0) for g in match.groups()[:6])
            if match.group(7):
                micro = int(match.group(8)) * 1000
            elif match.group(9):
                micro = int(match.group(9)[:6].ljust(6, "0"))
            else:
                micro = 0
            return datetime(
                year, month, day, hour, minute, second, micro, tzinfo=_zone(match.group(10))
            )
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), else None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# ---------------------------------------------------------------- redirects

_ORDER_KEYS = frozenset({"orderid"})
_TRANSACTION_KEYS = frozenset({"transactionid", "transid"})
_TOKEN_KEYS = frozenset({"cardtoken", "token"})
_FAILURE_KEYS = frozenset(
    {"failerdescription", "failuredescription", "failurereason", "description", "error"}
)
_MODE_KEYS = frozenset({"mode"})


def parse_redirect_params(query: str) -> RedirectParams:
    """Read a success/failure redirect's query string, accepting every known spelling.

    Each value is URL-decoded exactly once. ``parse_qsl`` is not used because it always turns a
    raw ``+`` into a space. A card token never contains a space but may contain ``+``, so for
    token parameters a raw ``+`` stays ``+`` and ``%2B`` becomes ``+``. For every other
    parameter ``+`` means a space, as in form encoding ("Card+declined").

    A full URL is accepted too (its query part is used). Two spellings carrying different
    values raise ValueError: a redirect is untrusted, and ambiguity should not be guessed at.
    """
    head, mark, rest = query.partition("?")
    if mark and "=" not in head and "&" not in head:
        query = rest  # a URL (or a query with its "?"): a "?" after that is part of a value
    query = query.split("#", 1)[0]
    found: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        raw_key, _, raw_value = part.partition("=")
        key = _norm(unquote_plus(raw_key).strip())
        if key in _TOKEN_KEYS:
            value = unquote(raw_value, errors="strict")
            slot = "token"
        else:
            value = unquote_plus(raw_value, errors="replace")
            slot = next(
                (
                    name
                    for name, keys in (
                        ("order", _ORDER_KEYS),
                        ("transaction", _TRANSACTION_KEYS),
                        ("failure", _FAILURE_KEYS),
                        ("mode", _MODE_KEYS),
                    )
                    if key in keys
                ),
                "",
            )
        if not slot or value == "":
            continue
        if slot in found and found[slot] != value:
            raise ValueError(f"redirect carries conflicting values for {slot}")
        found[slot] = value
    mode = found.get("mode")
    return RedirectParams(
        order_id=found.get("order"),
        transaction_id=found.get("transaction"),
        card_token=found.get("token"),
        failure_description=found.get("failure"),
        mode=mode.strip().lower() if mode else None,
    )
