"""The gateway answers of ``tests/corpus/gateway``, and the ones too large or too many to keep
as files.

A corpus file is an HTTP response as it comes off the wire, after comment lines (``# why``)::

    # a success for another amount
    HTTP/1.1 200
    Content-Type: application/json

    {"status": "SUCCESS", "result": {"order_id": "${order_id}", "amount": "${other_amount}"}}

``${name}`` placeholders are filled in when the answer is served (``Answer.response``), so that
an answer differs from the right one in exactly the way its file says: ``order_id``,
``transaction_id``, ``amount`` and ``currency`` are the charge's own, ``other_amount`` is one
minor unit more and ``minor_amount`` the amount in minor units.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx

from billing.money import currency_exponent, to_minor

GATEWAY = Path(__file__).resolve().parent / "gateway"
MB = 1024 * 1024


@dataclass(frozen=True)
class Answer:
    name: str
    why: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def filled(self, values: Mapping[str, str]) -> bytes:
        """The body with its placeholders filled in."""
        body = self.body
        for key, value in values.items():
            body = body.replace(b"${" + key.encode() + b"}", value.encode())
        return body

    def response(self, values: Mapping[str, str]) -> httpx.Response:
        return httpx.Response(self.status, headers=list(self.headers), content=self.filled(values))


def values_for(
    order_id: str, transaction_id: str, amount: Decimal, currency: str
) -> dict[str, str]:
    """What the placeholders stand for, for one charge."""
    step = Decimal(1).scaleb(-currency_exponent(currency))
    return {
        "order_id": order_id,
        "transaction_id": transaction_id,
        "amount": str(amount),
        "currency": currency,
        "other_amount": str(amount + step),
        "minor_amount": str(to_minor(amount, currency)),
    }


def _parse(path: Path) -> Answer:
    data = path.read_bytes()
    why: list[str] = []
    while data.startswith(b"#"):
        line, _, data = data.partition(b"\n")
        why.append(line[1:].decode().strip())
    head, _, body = data.partition(b"\n\n")
    status_line, *header_lines = head.decode("ascii").split("\n")
    status = int(status_line.split()[1])
    headers = tuple(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in header_lines if line)
    )
    return Answer(path.stem, " ".join(why), status, headers, body)


def from_files() -> list[Answer]:
    return [_parse(path) for path in sorted(GATEWAY.glob("*.http"))]


_JSON = (("Content-Type", "application/json"),)
_HTML = (("Content-Type", "text/html"),)
_PAYMENT = (
    '{"status":"SUCCESS","result":{"order_id":"${order_id}","transaction_id":'
    '"${transaction_id}","payment_status":"SUCCESS","amount":${amount},'
    '"currency":"${currency}","mode":"live"}}'
)

# One of each class and the odd codes around them, each carrying a paid payment: the body of a
# success under a status that is not one must not count, except as a 2xx that verify confirms.
STATUSES = (
    100, 103, 199, 201, 202, 203, 204, 206, 226, 299, 300, 301, 302, 303, 304, 307, 308,
    399, 402, 404, 405, 409, 410, 418, 422, 425, 451, 499, 500, 501, 502, 503, 504, 507,
    511, 599, 600, 999,
)  # fmt: skip


def large() -> list[Answer]:
    """Bodies of several megabytes."""
    page = b"<html><body>" + b"<p>Service Temporarily Unavailable</p>" * (5 * MB // 38) + b"</body>"
    note = "x" * (5 * MB)
    paid_with_note = _PAYMENT.replace('"mode":"live"', f'"mode":"live","note":"{note}"')
    words = "Insufficient funds. " * (5 * MB // 20)
    return [
        Answer("large-html-5mb", "a 5 MB HTML page", 200, _HTML, page),
        Answer("large-html-503-5mb", "a 5 MB HTML 503", 503, _HTML, page),
        Answer(
            "large-note-5mb", "a paid payment with a 5 MB note", 200, _JSON, paid_with_note.encode()
        ),
        Answer(
            "large-whitespace-5mb",
            "5 MB of blanks before a paid payment",
            200,
            _JSON,
            b" " * (5 * MB) + _PAYMENT.encode(),
        ),
        Answer(
            "large-decline-5mb",
            "a decline whose description is 5 MB",
            200,
            _JSON,
            json.dumps({"status": "FAILURE", "error": words}).encode(),
        ),
        Answer(
            "large-nesting-1mb", "arrays nested a million deep", 200, _JSON, b"[" * MB + b"]" * MB
        ),
    ]


def statuses() -> list[Answer]:
    return [
        Answer(
            f"status-{code}", f"HTTP {code} carrying a paid payment", code, _JSON, _PAYMENT.encode()
        )
        for code in STATUSES
    ]


def everything() -> list[Answer]:
    return from_files() + large() + statuses()


def _norm(value: Any) -> Any:
    if isinstance(value, dict):
        return {k.replace("_", "").replace("-", "").lower(): _norm(v) for k, v in value.items()}
    return value


def confirms(body: bytes, *, order_id: str, amount: Decimal, currency: str) -> bool:
    """Does this verify answer, read on its own, confirm a live payment of ``amount`` in
    ``currency`` for ``order_id``? Written apart from the client's parser on purpose."""
    try:
        data = _norm(json.loads(body, parse_float=Decimal))
    except (ValueError, RecursionError):
        return False
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, dict):
        return False
    status = result.get("paymentstatus") or result.get("paymentstate")
    paid = result.get("amount", result.get("paymentamount"))
    try:
        same_amount = not isinstance(paid, bool) and Decimal(str(paid)) == amount
    except InvalidOperation:
        return False
    return (
        isinstance(status, str)
        and status.strip().upper() == "SUCCESS"
        and same_amount
        and str(result.get("currency", "")).strip().upper() == currency
        and str(result.get("mode", "")).strip().lower() == "live"
        and result.get("orderid") == order_id
    )
