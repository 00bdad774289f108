"""The sandbox gateway: an in-memory state machine behind one ``handle`` entry point.

It follows the documented Fatora v1 contract (see docs on the gateway) and fills the documented
gaps with explicit, configurable choices: the decline shape (HTTP 200 ``FAILURE`` or a 4xx error),
the error body (object or string) and the amount type (number or string). Card tokens carry
*behaviours* so that tests can provoke declines, pending payments, timeouts, garbage bodies and
the ambiguous answers a real gateway or its edge proxy gives (a 504 or a timeout for a charge
that lands later, a verify that lags, undocumented success envelopes). ``broken_routes`` makes
whole endpoints answer an edge's HTML 404.

Nothing here does I/O: the ASGI app, the httpx transport and the server wrap it.
"""

from __future__ import annotations

import calendar
import json
import random
import string
import threading
import time
from base64 import b64encode
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

from babel.numbers import get_currency_precision, list_currencies

from billing.config import FATORA_SAMPLE_API_KEY
from billing.fatora.sandbox import pages

DeclineStyle = Literal["http200", "http4xx"]
ErrorStyle = Literal["object", "string"]
AmountStyle = Literal["number", "string"]

TOKEN_LIFETIME_MONTHS = 6

# Token behaviours: what a collect-payment on a token of that behaviour does.
BEHAVIOURS: dict[str, str] = {
    "success": "approved",
    "insufficient_funds": "soft decline: Insufficient Funds",
    "do_not_honor": "soft decline: Do Not Honor",
    "expired_token": "hard decline: Card token expired",
    "card_cannot_recur": "hard decline: Card does not support recurring payments",
    "pending_then_success": (
        "answers PENDING; verify says PENDING `pending_verifies` times, then SUCCESS"
    ),
    "timeout_after_charge": "every collect takes the money, then the response never arrives",
    "server_error_before_charge": "first collect: 503, nothing taken; later ones succeed",
    "rate_limited_before_charge": "first collect: 429, nothing taken; later ones succeed",
    "garbled_after_charge": "takes the money, then answers HTTP 200 with truncated JSON",
    "html_after_charge": "takes the money, then answers HTTP 200 with an HTML page",
    "edge_504_lands_later": (
        "every collect: HTML 504 at once, nothing taken yet; the charge lands `land_delay_s` later"
    ),
    "timeout_lands_later": (
        "every collect: no answer, nothing taken yet; the charge lands `land_delay_s` later"
    ),
    "verify_lags": "takes the money; verify says 404 until `verify_lag_s` after the charge",
    "approved_shape": "takes the money, answers 200 SUCCESS with only result.status APPROVED",
    "processing": 'takes the money, answers HTTP 200 {"status":"PROCESSING"}',
    "error_envelope_after_charge": "takes the money, answers HTTP 200 with an E500 ERROR envelope",
    "server_error_always": "every collect: 503, nothing taken",
    "invalid_api_key_envelope": "HTTP 200 FAILURE with error 'Invalid API Key', nothing taken",
    "merchant_token_expired": "HTTP 200 FAILURE 'Merchant token expired', nothing taken",
}

# Names accepted by ``broken_routes``, with the request paths each one covers.
FAULTABLE_ROUTES: dict[str, tuple[str, ...]] = {
    "checkout": ("/v1/payments/checkout",),
    "collect-payment": ("/v1/payments/collect-payment",),
    "verify": ("/v1/payments/verify",),
    "refund": ("/v1/payments/refund", "/api/v1/payments/refund"),
    "deactivate-token": ("/v1/payments/deactivate-token",),
}
_FAULTABLE_BY_PATH = {path: name for name, paths in FAULTABLE_ROUTES.items() for path in paths}

# The gateway accepts these charges but records them only `land_delay_s` after the call.
_LANDS_LATER = frozenset({"edge_504_lands_later", "timeout_lands_later"})

# Successful charges answered in shapes the documentation never shows.
_UNDOCUMENTED_SUCCESS: dict[str, dict[str, Any]] = {
    "approved_shape": {"status": "SUCCESS", "result": {"status": "APPROVED"}},
    "processing": {"status": "PROCESSING"},
}

# What nginx-style edges in front of the gateway send: HTML, whatever the client asked for.
_EDGE_504_HTML = (
    "<html><head><title>504 Gateway Time-out</title></head>"
    "<body><center><h1>504 Gateway Time-out</h1></center></body></html>"
)
_EDGE_404_HTML = "<html><body><h1>404 Not Found</h1></body></html>"

# Hosted-page test cards. Any other card number that passes the Luhn check behaves like the
# first one; whatever the card, a CVV other than 123 is declined.
TEST_CARDS: dict[str, str] = {
    "4111111111111111": "approved; a saved token behaves `success`",
    "5555555555554444": "declined: Insufficient Funds",
    "378282246310005": "approved; a saved token behaves `card_cannot_recur`",
}

_SUCCESS_CVV = "123"
_DECLINE_CARD = "5555555555554444"
_NO_RECUR_CARD = "378282246310005"

# (error_code, description, hard?) for each decline the sandbox can produce. The codes borrow
# ISO 8583 response codes; Fatora publishes no catalogue, so clients must not rely on them.
_DECLINES: dict[str, tuple[str, str, bool]] = {
    "insufficient_funds": ("51", "Insufficient Funds", False),
    "do_not_honor": ("05", "Do Not Honor", False),
    "expired_token": ("54", "Card token expired", True),
    "card_cannot_recur": ("57", "Card does not support recurring payments", True),
    "deactivated": ("62", "Card token deactivated", True),
    "unknown_token": ("14", "Invalid card token", True),
}

_APPROVED = "Transaction Successful - Approved"

# CLDR (Babel's source) gives IQD 0 display digits; ISO 4217, which card networks follow, says 3.
_ISO_MINOR_UNITS = {"IQD": 3}


def currency_precision(currency: str) -> int:
    """Decimals allowed for an amount in ``currency`` (ISO 4217 minor units)."""
    code = currency.upper()
    return _ISO_MINOR_UNITS.get(code) or int(get_currency_precision(code))


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` plus whole calendar months, clamping the day (31 Aug + 6 months = 28/29 Feb)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _system_now() -> datetime:
    return datetime.now(UTC)


class ManualClock:
    """A clock for tests: call it for the time, ``advance`` to move it."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2025, 1, 15, 9, 0, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | None = None, *, months: int = 0) -> datetime:
        """Move forward by ``delta`` and/or calendar ``months``; returns the new time."""
        if months:
            self._now = add_months(self._now, months)
        if delta is not None:
            self._now += delta
        return self._now

    def set(self, moment: datetime) -> None:
        """Jump to ``moment`` (aware)."""
        if moment.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = moment


@dataclass(frozen=True)
class SandboxResponse:
    """What the gateway answers. ``hang`` means the effect happened but no answer arrives."""

    status: int
    headers: dict[str, str]
    body: bytes
    hang: bool = False

    def json(self) -> Any:
        """The body decoded as JSON (tests)."""
        return json.loads(self.body)


@dataclass
class _Token:
    value: str
    behaviour: str
    issued_at: datetime
    expires_at: datetime
    currency: str
    card_type: str
    last4: str
    client: dict[str, Any]
    deactivated: bool = False
    collects: int = 0


@dataclass
class _Payment:
    seq: int
    payment_id: str
    source: Literal["checkout", "collect"]
    order_id: str
    amount: Decimal
    currency: str
    created_at: datetime
    status: str = "PENDING"
    transaction_id: str | None = None
    paid_at: datetime | None = None
    auth_code: str | None = None
    description: str = "Awaiting payment"
    client: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    language: str = "en"
    success_url: str | None = None
    failure_url: str | None = None
    save_token: bool = False
    fcm_token: str | None = None
    links_base: str = ""
    card_token: str | None = None
    card_type: str | None = None
    last4: str | None = None
    behaviour: str | None = None
    pending_left: int = 0
    refund: dict[str, Any] | None = None
    # Monotonic time before which verify cannot find the payment (``verify_lags``).
    visible_at: float | None = None


@dataclass
class _Landing:
    """A collect the gateway has accepted but not yet recorded."""

    due: float
    token: _Token
    card_token: str
    order_id: str
    amount: Decimal
    currency: str
    base: str


class _RequestError(Exception):
    """Raised inside a handler to answer with an error body."""

    def __init__(self, status: int, description: str, code: str | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.code = code or str(status)


class _Request:
    def __init__(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> None:
        self.method = method.upper()
        self.path = path
        self.query = parse_qs(query, keep_blank_values=True)
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body

    def query_value(self, name: str) -> str | None:
        for key, values in self.query.items():
            if key.lower() == name.lower() and values:
                return values[0]
        return None


def _encode_json(value: object) -> str:
    """JSON text in which a ``Decimal`` is written as an exact number (``150.00``, not a float)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}:{_encode_json(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _luhn_ok(number: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(number)):
        digit = int(char)
        if index % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _card_type(number: str) -> str:
    if number.startswith("4"):
        return "VISA"
    if number[:2] in {"34", "37"}:
        return "AMEX"
    if number[:2] in {"51", "52", "53", "54", "55"} or 2221 <= int(number[:4]) <= 2720:
        return "MASTERCARD"
    return "CARD"


def _format_payment_date(moment: datetime | None) -> str:
    # Fatora's documented shape: milliseconds after a colon, no zone (we emit UTC).
    if moment is None:
        return ""
    return f"{moment:%Y-%m-%dT%H:%M:%S}:{moment.microsecond // 1000:03d}"


def _append_query(url: str, params: dict[str, str]) -> str:
    """``url`` with ``params`` added, keeping its own query; ``+`` etc. stay percent-encoded."""
    parts = urlsplit(url)
    extra = urlencode(params, quote_via=quote)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class Sandbox:
    """The in-memory Fatora gateway. Thread-safe: one lock guards all state."""

    def __init__(
        self,
        *,
        api_key: str = FATORA_SAMPLE_API_KEY,
        inactive_api_keys: Iterable[str] = (),
        mode: str = "test",
        decline_style: DeclineStyle = "http200",
        error_style: ErrorStyle = "object",
        amount_style: AmountStyle = "number",
        pending_verifies: int = 2,
        land_delay_s: float = 1.0,
        verify_lag_s: float = 1.0,
        broken_routes: Iterable[str] = (),
        currencies: Iterable[str] | None = None,
        now: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
        seed: int | None = None,
    ) -> None:
        if decline_style not in ("http200", "http4xx"):
            raise ValueError(f"unknown decline_style {decline_style!r}")
        if error_style not in ("object", "string"):
            raise ValueError(f"unknown error_style {error_style!r}")
        if amount_style not in ("number", "string"):
            raise ValueError(f"unknown amount_style {amount_style!r}")
        if pending_verifies < 0:
            raise ValueError("pending_verifies must be >= 0")
        if land_delay_s < 0 or verify_lag_s < 0:
            raise ValueError("land_delay_s and verify_lag_s must be >= 0")
        self.api_key = api_key
        self.inactive_api_keys = frozenset(inactive_api_keys)
        self.mode = mode
        self.decline_style: DeclineStyle = decline_style
        self.error_style: ErrorStyle = error_style
        self.amount_style: AmountStyle = amount_style
        self.pending_verifies = pending_verifies
        # Real (monotonic) seconds, not the injectable ``now``: a late landing models the
        # gateway catching up while the caller waits, which a frozen test clock would never see.
        self.land_delay_s = land_delay_s
        self.verify_lag_s = verify_lag_s
        self.broken_routes: set[str] = _route_names(broken_routes)
        # None: any ISO 4217 code Babel knows (real merchants must ask for each currency).
        self.currencies = (
            frozenset(c.upper() for c in currencies) if currencies is not None else None
        )
        self._known_currencies = frozenset(list_currencies())
        self._now = now or _system_now
        self._monotonic = monotonic or time.monotonic
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._payments: list[_Payment] = []
        self._by_payment_id: dict[str, _Payment] = {}
        # Verify and refund find payments by order id without scanning every payment.
        self._by_order_id: dict[str, list[_Payment]] = {}
        self._tokens: dict[str, _Token] = {}
        self._transaction_ids: set[str] = set()
        self._seq = 0
        self._landings: list[_Landing] = []

    # ----------------------------------------------------------------------------- public API

    def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        base_url_for_links: str,
    ) -> SandboxResponse:
        """Answer one HTTP request. ``base_url_for_links`` is ``scheme://host[:port]``."""
        request = _Request(method, path, query, headers, body)
        base = base_url_for_links.rstrip("/")
        route = "/" + path.strip("/").lower()
        with self._lock:
            self._land_due()
            try:
                return self._dispatch(route, request, base)
            except _RequestError as exc:
                return self._error(exc.status, exc.code, exc.description)

    def pay(
        self,
        payment_id: str,
        card_number: str,
        cvv: str = _SUCCESS_CVV,
        *,
        expiry: str | None = None,
        name: str = "Test Payer",
    ) -> str:
        """Act as the payer on the hosted page; returns the redirect URL (success or failure)."""
        with self._lock:
            payment = self._by_payment_id.get(payment_id)
            if payment is None:
                raise KeyError(f"unknown paymentID {payment_id!r}")
            if expiry is None:
                later = add_months(self._now(), 36)
                expiry = f"{later:%m/%y}"
            outcome = self._submit_card(payment, card_number, expiry, cvv, name)
            if isinstance(outcome, _RequestError):
                raise ValueError(outcome.description)
            return outcome

    def issue_token(
        self,
        behaviour: str = "success",
        *,
        issued_at: datetime | None = None,
        currency: str = "QAR",
    ) -> str:
        """Create a card token with ``behaviour`` (see ``BEHAVIOURS``) and return it."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        with self._lock:
            return self._new_token(behaviour, issued_at or self._now(), currency).value

    def issued_tokens(self) -> list[str]:
        """Every card token issued here (by issue_token or a saved checkout): what a test scans
        logs, queues and tables for."""
        with self._lock:
            return list(self._tokens)

    def token_deactivated(self, token: str) -> bool:
        """Whether a token issued here has been deactivated (a test's view of the gateway)."""
        with self._lock:
            found = self._tokens.get(token)
            if found is None:
                raise KeyError("unknown card token")
            return found.deactivated

    def deactivate(self, token: str) -> None:
        """Deactivate a token as if through another channel (the API then answers 422)."""
        with self._lock:
            self._tokens[token].deactivated = True

    def charges(self) -> list[dict[str, Any]]:
        """Every payment with a transaction (collect attempts and paid checkouts), oldest first."""
        with self._lock:
            self._land_due()
            return [self._charge_view(p) for p in self._payments if p.transaction_id is not None]

    def reset(self) -> None:
        """Forget every payment, token and charge still to land (``broken_routes`` stays)."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._payments.clear()
        self._by_payment_id.clear()
        self._by_order_id.clear()
        self._tokens.clear()
        self._landings.clear()

    def _land_due(self) -> None:
        """Record the deferred charges whose time has come, in the order they were due."""
        if not self._landings:
            return
        now = self._monotonic()
        due = [landing for landing in self._landings if landing.due <= now]
        if not due:
            return
        self._landings = [landing for landing in self._landings if landing.due > now]
        for landing in sorted(due, key=lambda item: item.due):
            payment = self._record_collect(
                landing.token,
                landing.card_token,
                landing.order_id,
                landing.amount,
                landing.currency,
                landing.base,
            )
            self._approve(payment)

    # ------------------------------------------------------------------------------- routing

    def _dispatch(self, route: str, request: _Request, base: str) -> SandboxResponse:
        # An edge with a broken upstream answers before the gateway sees the request.
        if _FAULTABLE_BY_PATH.get(route) in self.broken_routes:
            return self._html(404, _EDGE_404_HTML)
        api_routes: dict[str, Callable[[dict[str, Any], str], SandboxResponse]] = {
            "/v1/payments/checkout": self._checkout,
            "/v1/payments/collect-payment": self._collect,
            "/v1/payments/verify": self._verify,
            # The refund page's heading and its code samples disagree; accept both.
            "/v1/payments/refund": self._refund,
            "/api/v1/payments/refund": self._refund,
            "/v1/payments/deactivate-token": self._deactivate,
        }
        if route in api_routes:
            if request.method != "POST":
                raise _RequestError(405, "Method Not Allowed")
            payload = self._api_prelude(request)
            return api_routes[route](payload, base)
        if route == "/pay/mcpaymentpage":
            return self._payment_page(request, base)
        if route in ("/pay/successpay", "/pay/cancelcreditcard"):
            language = request.query_value("lang") or "en"
            key = "success" if route.endswith("successpay") else "failure"
            return self._html(200, pages.message(language, key))
        if route.startswith("/__sandbox/"):
            return self._helper(route, request)
        raise _RequestError(404, "Not Found")

    def _api_prelude(self, request: _Request) -> dict[str, Any]:
        """Checks shared by the payment endpoints: key, Accept, Content-Type, JSON body."""
        key = request.headers.get("api_key")
        if key is None:
            # Some HTTP stacks turn underscores into dashes; Fatora's header has an underscore.
            key = request.headers.get("api-key")
        if key is not None and key in self.inactive_api_keys:
            raise _RequestError(403, "Merchant API key is inactive")
        if key != self.api_key:
            raise _RequestError(401, "Invalid API Key")
        accept = request.headers.get("accept")
        if accept is not None and accept.strip() and not _accepts_json(accept):
            raise _RequestError(406, "Not Acceptable: only application/json is produced")
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _RequestError(415, "Unsupported Media Type: send application/json")
        try:
            payload = json.loads(request.body, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            raise _RequestError(415, "Unsupported Media Type: the body is not JSON") from None
        if not isinstance(payload, dict):
            raise _RequestError(400, "The body must be a JSON object")
        return payload

    # ----------------------------------------------------------------------------- endpoints

    def _checkout(self, payload: dict[str, Any], base: str) -> SandboxResponse:
        order_id = _required_text(payload, "order_id")
        currency = self._currency(_required_text(payload, "currency"))
        amount = self._amount(payload.get("amount"), currency)
        client = payload.get("client")
        if not isinstance(client, dict):
            raise _RequestError(400, "client is required")
        name = _required_text(client, "name", label="client.name")
        email = _required_text(client, "email", label="client.email")
        if "@" not in email:
            raise _RequestError(400, "client.email is not a valid email")
        phone = _optional_text(client, "phone", label="client.phone")
        language = _optional_text(payload, "language") or "en"
        if language not in ("en", "ar"):
            raise _RequestError(400, "language must be en or ar")
        success_url = _optional_url(payload, "success_url")
        failure_url = _optional_url(payload, "failure_url")
        save_token = payload.get("save_token", False)
        if not isinstance(save_token, bool):
            raise _RequestError(400, "save_token must be a boolean")
        note = _optional_text(payload, "note")
        fcm_token = _optional_text(payload, "fcm_token")

        payment = self._new_payment("checkout", order_id, amount, currency)
        payment.client = {"name": name, "email": email, "phone": phone}
        payment.note = note
        payment.language = language
        payment.success_url = success_url
        payment.failure_url = failure_url
        payment.save_token = save_token
        payment.fcm_token = fcm_token
        payment.links_base = base
        url = f"{base}/pay/MCPaymentPage?paymentID={payment.payment_id}"
        return self._ok({"checkout_url": url})

    def _collect(self, payload: dict[str, Any], base: str) -> SandboxResponse:
        card_token = _required_text(payload, "card_token")
        order_id = _required_text(payload, "order_id")
        if "amount" not in payload or payload["amount"] is None:
            raise _RequestError(400, "amount is required")
        token = self._tokens.get(card_token)
        # Currency is not in the documented example: default to the token's own currency.
        raw_currency = _optional_text(payload, "currency")
        currency = self._currency(raw_currency or (token.currency if token else "QAR"))
        amount = self._amount(payload["amount"], currency)

        if token is not None:
            token.collects += 1
            refusal = self._refusal_before_charge(token)
            if refusal is not None:
                return refusal
            # A dead token is declined at once, like any other; only a live one is deferred.
            if token.behaviour in _LANDS_LATER and self._token_live(token):
                self._landings.append(
                    _Landing(
                        due=self._monotonic() + self.land_delay_s,
                        token=token,
                        card_token=card_token,
                        order_id=order_id,
                        amount=amount,
                        currency=currency,
                        base=base,
                    )
                )
                edge_timeout = self._html(504, _EDGE_504_HTML)
                if token.behaviour == "timeout_lands_later":
                    # Should a served client wait out the hang, the edge gives up with the 504.
                    return SandboxResponse(
                        edge_timeout.status, edge_timeout.headers, edge_timeout.body, hang=True
                    )
                return edge_timeout

        payment = self._record_collect(token, card_token, order_id, amount, currency, base)
        if token is None:
            return self._decline(payment, "unknown_token")
        if token.deactivated:
            return self._decline(payment, "deactivated")
        if self._now() >= token.expires_at:
            return self._decline(payment, "expired_token")
        if token.behaviour in _DECLINES:
            return self._decline(payment, token.behaviour)

        if token.behaviour == "pending_then_success":
            payment.status = "PENDING"
            payment.description = "Transaction Pending"
            payment.pending_left = self.pending_verifies
            return self._ok(self._collect_result(payment))

        self._approve(payment)
        response = self._ok(self._collect_result(payment))
        if token.behaviour == "timeout_after_charge":
            return SandboxResponse(response.status, response.headers, response.body, hang=True)
        if token.behaviour == "garbled_after_charge":
            # Cut mid-object: the money is taken but the body cannot be parsed.
            return SandboxResponse(200, response.headers, response.body[: len(response.body) // 2])
        if token.behaviour == "html_after_charge":
            return self._html(200, "<html><body><h1>Service Temporarily Unavailable</h1>")
        if token.behaviour == "verify_lags":
            payment.visible_at = self._monotonic() + self.verify_lag_s
        if token.behaviour in _UNDOCUMENTED_SUCCESS:
            return self._json(200, _UNDOCUMENTED_SUCCESS[token.behaviour])
        if token.behaviour == "error_envelope_after_charge":
            # No decline words on purpose: a client must not read this as "not charged".
            return self._error(200, "E500", "Unexpected error, please contact support")
        return response

    def _refusal_before_charge(self, token: _Token) -> SandboxResponse | None:
        """The answer to a collect the gateway turns away before touching the card, if any."""
        behaviour = token.behaviour
        first = token.collects == 1
        if behaviour == "server_error_always" or (
            first and behaviour == "server_error_before_charge"
        ):
            return self._error(503, "503", "Service Unavailable")
        if first and behaviour == "rate_limited_before_charge":
            response = self._error(429, "429", "Too Many Requests")
            response.headers["Retry-After"] = "1"
            return response
        if behaviour == "invalid_api_key_envelope":
            # The Authorize endpoint's string error, but under FAILURE and with HTTP 200.
            return self._json(200, {"status": "FAILURE", "error": "Invalid API Key"})
        if behaviour == "merchant_token_expired":
            # A merchant-side failure: no payment exists, so verify keeps answering 404.
            result = {"payment_status": "FAILURE", "description": "Merchant token expired"}
            return self._json(200, {"status": "FAILURE", "result": result})
        return None

    def _token_live(self, token: _Token) -> bool:
        return not token.deactivated and self._now() < token.expires_at

    def _verify(self, payload: dict[str, Any], base: str) -> SandboxResponse:
        order_id = _required_text(payload, "order_id")
        transaction_id = _optional_text(payload, "transaction_id")
        now = self._monotonic()
        matches = [
            p
            for p in self._by_order_id.get(order_id, [])
            if p.visible_at is None or p.visible_at <= now
        ]
        if transaction_id:
            matches = [p for p in matches if p.transaction_id == transaction_id]
        if not matches:
            raise _RequestError(404, "Specified payment does not exists")
        # Duplicate order ids are accepted, so "the" payment for an order is the latest one.
        payment = max(matches, key=lambda p: p.seq)
        if payment.status == "PENDING" and payment.behaviour == "pending_then_success":
            if payment.pending_left > 0:
                payment.pending_left -= 1
            else:
                self._approve(payment)
        return self._ok(self._verify_result(payment))

    def _refund(self, payload: dict[str, Any], base: str) -> SandboxResponse:
        transaction_id = _required_text(payload, "transaction_id")
        order_id = _required_text(payload, "order_id")
        payment = next(
            (p for p in self._by_order_id.get(order_id, []) if p.transaction_id == transaction_id),
            None,
        )
        if payment is None:
            raise _RequestError(404, "Specified payment does not exists")
        if payment.refund is not None:
            raise _RequestError(422, "Payment already refunded")
        if payment.status != "SUCCESS":
            raise _RequestError(422, "Only a successful payment can be refunded")
        now = self._now()
        paid_at = payment.paid_at or payment.created_at
        # Before midnight GMT on the payment's own day the bank reverses it; later it is
        # forwarded as a refund that takes weeks. Both are reported as completed.
        same_day = paid_at.astimezone(UTC).date() == now.astimezone(UTC).date()
        payment.refund = {
            "refund_transaction_id": self._transaction_id(),
            "refund_status": "completed",
            "refund_type": "reversal" if same_day else "refund",
            "refund_date": _format_payment_date(now),
            "amount": self._money(payment.amount, payment.currency),
        }
        return self._ok({"refund_status": "completed"})

    def _deactivate(self, payload: dict[str, Any], base: str) -> SandboxResponse:
        value = _required_text(payload, "card_token")
        token = self._tokens.get(value)
        if token is None:
            raise _RequestError(404, "Card token not found")
        if token.deactivated:
            raise _RequestError(422, "Card token is already deactivated")
        token.deactivated = True
        return self._ok({"card_token": value, "status": "deactivated"})

    # ----------------------------------------------------------------- hosted checkout page

    def _payment_page(self, request: _Request, base: str) -> SandboxResponse:
        form: dict[str, list[str]] = {}
        if request.method == "POST":
            form = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        elif request.method != "GET":
            return self._html(405, pages.message("en", "not_found"))

        def field_value(name: str) -> str:
            return form.get(name, [""])[0].strip()

        payment_id = request.query_value("paymentID") or field_value("paymentID")
        payment = self._by_payment_id.get(payment_id)
        if payment is None:
            return self._html(404, pages.message("en", "not_found"))
        if payment.status != "PENDING":
            return self._html(409, pages.message(payment.language, "done"))
        if request.method == "GET":
            return self._html(200, self._form(payment))
        outcome = self._submit_card(
            payment,
            field_value("card_number"),
            field_value("expiry"),
            field_value("cvv"),
            field_value("name"),
        )
        if isinstance(outcome, _RequestError):
            return self._html(outcome.status, self._form(payment, error=outcome.description))
        return SandboxResponse(
            303, {"Location": outcome, "Content-Type": "text/html; charset=utf-8"}, b""
        )

    def _form(self, payment: _Payment, error: str | None = None) -> str:
        return pages.checkout_form(
            language=payment.language,
            action=f"/pay/MCPaymentPage?paymentID={payment.payment_id}",
            payment_id=payment.payment_id,
            order_id=payment.order_id,
            amount=str(self._money(payment.amount, payment.currency)),
            currency=payment.currency,
            error=error,
        )

    def _submit_card(
        self, payment: _Payment, card_number: str, expiry: str, cvv: str, name: str
    ) -> str | _RequestError:
        """Take the payer's card. Returns the redirect URL, or an error to show on the form."""
        if payment.status != "PENDING":
            return _RequestError(409, "This payment has already been processed")
        number = card_number.replace(" ", "").replace("-", "")
        if not (number.isdigit() and 12 <= len(number) <= 19 and _luhn_ok(number)):
            return _RequestError(400, "Invalid card number")
        card_end = _card_expiry_end(expiry)
        if card_end is None:
            return _RequestError(400, "Invalid expiry date")
        if not (cvv.isdigit() and len(cvv) in (3, 4)):
            return _RequestError(400, "Invalid CVV")

        now = self._now()
        payment.transaction_id = self._transaction_id()
        payment.card_type, payment.last4 = _card_type(number), number[-4:]
        decline: str | None = None
        if card_end <= now:
            decline = "Expired Card"
        elif cvv != _SUCCESS_CVV:
            decline = "Invalid CVV"
        elif number == _DECLINE_CARD:
            decline = "Insufficient Funds"
        params: dict[str, str] = {
            "order_id": payment.order_id,
            "transaction_id": payment.transaction_id,
        }
        if decline is not None:
            payment.status, payment.description = "FAILURE", decline
            payment.paid_at = now
            params["failure_description"] = decline
            target = payment.failure_url or f"{payment.links_base}/Pay/CancelCreditCard"
            return _append_query(target, params)

        self._approve(payment)
        params["mode"] = self.mode
        if payment.save_token:
            behaviour = "card_cannot_recur" if number == _NO_RECUR_CARD else "success"
            token = self._new_token(behaviour, now, payment.currency, card_end=card_end)
            token.card_type, token.last4 = payment.card_type, payment.last4
            token.client = dict(payment.client)
            payment.card_token = token.value
            params["card_token"] = token.value
        target = payment.success_url or f"{payment.links_base}/Pay/SuccessPay"
        return _append_query(target, params)

    # ------------------------------------------------------------------------ test helpers

    def _helper(self, route: str, request: _Request) -> SandboxResponse:
        if route == "/__sandbox/health" and request.method == "GET":
            return self._json(200, {"status": "ok", "mode": self.mode})
        if route == "/__sandbox/charges" and request.method == "GET":
            charges = [self._charge_view(p) for p in self._payments if p.transaction_id]
            wanted = request.query_value("order_id")
            if wanted is not None:
                charges = [c for c in charges if c["order_id"] == wanted]
            return self._json(200, {"charges": charges})
        if route == "/__sandbox/reset" and request.method == "POST":
            self._reset_locked()
            return self._json(200, {"status": "ok"})
        if route == "/__sandbox/faults" and request.method == "GET":
            return self._faults_view()
        if route == "/__sandbox/faults" and request.method == "POST":
            names = _helper_payload(request).get("broken_routes")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _RequestError(400, "broken_routes must be a list of route names")
            try:
                routes = _route_names(names)
            except ValueError as exc:
                raise _RequestError(400, str(exc)) from None
            # In place: whoever holds ``sandbox.broken_routes`` sees the change.
            self.broken_routes.clear()
            self.broken_routes.update(routes)
            return self._faults_view()
        if route == "/__sandbox/tokens" and request.method == "POST":
            payload = _helper_payload(request)
            behaviour = payload.get("behaviour", "success")
            if behaviour not in BEHAVIOURS:
                raise _RequestError(400, f"Unknown behaviour; known: {', '.join(BEHAVIOURS)}")
            issued_at = self._now()
            if payload.get("issued_at") is not None:
                try:
                    issued_at = datetime.fromisoformat(str(payload["issued_at"]))
                except ValueError:
                    raise _RequestError(400, "issued_at must be an ISO 8601 datetime") from None
                if issued_at.tzinfo is None:
                    issued_at = issued_at.replace(tzinfo=UTC)
            currency = self._currency(str(payload.get("currency") or "QAR"))
            token = self._new_token(behaviour, issued_at, currency)
            return self._json(
                201,
                {
                    "card_token": token.value,
                    "behaviour": token.behaviour,
                    "issued_at": token.issued_at.isoformat(),
                    "expires_at": token.expires_at.isoformat(),
                },
            )
        raise _RequestError(404, "Not Found")

    def _faults_view(self) -> SandboxResponse:
        return self._json(200, {"status": "ok", "broken_routes": sorted(self.broken_routes)})

    # ------------------------------------------------------------------------------ records

    def _new_payment(
        self, source: Literal["checkout", "collect"], order_id: str, amount: Decimal, currency: str
    ) -> _Payment:
        self._seq += 1
        payment_id = "".join(self._rng.choices(string.ascii_uppercase + string.digits, k=12))
        payment = _Payment(
            seq=self._seq,
            payment_id=payment_id,
            source=source,
            order_id=order_id,
            amount=amount,
            currency=currency,
            created_at=self._now(),
        )
        self._payments.append(payment)
        self._by_payment_id[payment_id] = payment
        self._by_order_id.setdefault(order_id, []).append(payment)
        return payment

    def _record_collect(
        self,
        token: _Token | None,
        card_token: str,
        order_id: str,
        amount: Decimal,
        currency: str,
        base: str,
    ) -> _Payment:
        """A collect payment with a transaction id, still PENDING: the caller settles it."""
        payment = self._new_payment("collect", order_id, amount, currency)
        payment.transaction_id = self._transaction_id()
        payment.card_token = card_token
        payment.links_base = base
        if token is not None:
            payment.behaviour = token.behaviour
            payment.client = dict(token.client)
            payment.card_type, payment.last4 = token.card_type, token.last4
        return payment

    def _new_token(
        self,
        behaviour: str,
        issued_at: datetime,
        currency: str,
        *,
        card_end: datetime | None = None,
    ) -> _Token:
        # Real tokens contain + / \ | (the FAQ warns about them); ours always contain all four,
        # plus base64-style padding, so any encoding slip in a client shows up at once.
        parts = [
            b64encode(self._rng.randbytes(n)).decode("ascii").rstrip("=") for n in (9, 6, 6, 6, 3)
        ]
        value = f"{parts[0]}+{parts[1]}/{parts[2]}|{parts[3]}\\{parts[4]}=="
        expires_at = add_months(issued_at, TOKEN_LIFETIME_MONTHS)
        if card_end is not None:
            # A token also dies with its card.
            expires_at = min(expires_at, card_end)
        token = _Token(
            value=value,
            behaviour=behaviour,
            issued_at=issued_at,
            expires_at=expires_at,
            currency=currency,
            card_type="VISA",
            last4="1111",
            client={"name": "Sandbox Payer", "email": "payer@example.com", "phone": None},
        )
        self._tokens[value] = token
        return token

    def _transaction_id(self) -> str:
        # Unique for the sandbox's lifetime: refund and verify look payments up by it.
        while True:
            candidate = "7" + "".join(self._rng.choices(string.digits, k=11))
            if candidate not in self._transaction_ids:
                self._transaction_ids.add(candidate)
                return candidate

    def _approve(self, payment: _Payment) -> None:
        payment.status = "SUCCESS"
        payment.description = _APPROVED
        payment.paid_at = self._now()
        payment.auth_code = "".join(self._rng.choices(string.digits, k=6))
        if payment.transaction_id is None:
            payment.transaction_id = self._transaction_id()

    def _decline(self, payment: _Payment, reason: str) -> SandboxResponse:
        code, description, _hard = _DECLINES[reason]
        payment.status = "FAILURE"
        payment.description = description
        payment.paid_at = self._now()
        if self.decline_style == "http4xx":
            return self._error(400, code, description)
        body = {
            "status": "FAILURE",
            "result": {
                "payment_status": "FAILURE",
                "order_id": payment.order_id,
                "transaction_id": payment.transaction_id,
                "description": description,
            },
        }
        return self._json(200, body)

    # ------------------------------------------------------------------------------- views

    def _money(self, amount: Decimal, currency: str) -> Decimal:
        exponent = Decimal(1).scaleb(-currency_precision(currency))
        return amount.quantize(exponent)

    def _amount_out(self, amount: Decimal, currency: str) -> Decimal | str:
        money = self._money(amount, currency)
        return str(money) if self.amount_style == "string" else money

    def _collect_result(self, payment: _Payment) -> dict[str, Any]:
        return {
            "order_id": payment.order_id,
            "transaction_id": payment.transaction_id,
            "payment_status": payment.status,
            "amount": self._amount_out(payment.amount, payment.currency),
            "currency": payment.currency,
            "auth_code": payment.auth_code,
            "description": payment.description,
        }

    def _verify_result(self, payment: _Payment) -> dict[str, Any]:
        amount = self._amount_out(payment.amount, payment.currency)
        result: dict[str, Any] = {
            "order_id": payment.order_id,
            "transaction_id": payment.transaction_id,
            "amount": amount,
            "currency": payment.currency,
            "client": dict(payment.client),
            "note": payment.note,
            "payment_date": _format_payment_date(payment.paid_at),
            "payment_status": payment.status,
            "mode": self.mode,
            "auth_code": payment.auth_code,
            "exchange_details": {"exchange_rate": 1, "amount": amount},
            "transfer_details": None,
            "description": payment.description,
        }
        if payment.card_token is not None:
            result["card_token"] = payment.card_token
        refund = payment.refund
        if refund is not None and self.amount_style == "string":
            refund = {**refund, "amount": str(refund["amount"])}
        result["refund_details"] = refund
        result["card_details"] = (
            {"card_type": payment.card_type, "last_4_digits": payment.last4}
            if payment.last4
            else None
        )
        return result

    def _charge_view(self, payment: _Payment) -> dict[str, Any]:
        return {
            "order_id": payment.order_id,
            "transaction_id": payment.transaction_id,
            "amount": str(self._money(payment.amount, payment.currency)),
            "currency": payment.currency,
            "status": payment.status,
            "behaviour": payment.behaviour,
            "source": payment.source,
            "card_token": payment.card_token,
            "refunded": payment.refund is not None,
            "created_at": payment.created_at.isoformat(),
        }

    # ---------------------------------------------------------------------------- validation

    def _currency(self, raw: str) -> str:
        code = raw.strip().upper()
        if len(code) != 3 or code not in self._known_currencies:
            raise _RequestError(400, f"Invalid currency {raw!r}")
        if self.currencies is not None and code not in self.currencies:
            raise _RequestError(422, f"Currency {code} is not enabled for this merchant")
        return code

    def _amount(self, raw: object, currency: str) -> Decimal:
        if raw is None:
            raise _RequestError(400, "amount is required")
        # A JSON number arrives as Decimal (or int); a numeric string is tolerated too.
        if isinstance(raw, bool) or not isinstance(raw, Decimal | int | str):
            raise _RequestError(400, "amount must be a number")
        try:
            amount = Decimal(str(raw).strip())
        except InvalidOperation:
            raise _RequestError(400, "amount must be a number") from None
        if not amount.is_finite() or amount <= 0:
            raise _RequestError(400, "amount must be positive")
        if amount != self._money(amount, currency):
            places = currency_precision(currency)
            raise _RequestError(400, f"amount has more than {places} decimals for {currency}")
        return amount

    # ------------------------------------------------------------------------------ bodies

    def _json(self, status: int, payload: object) -> SandboxResponse:
        body = _encode_json(payload).encode("utf-8")
        return SandboxResponse(status, {"Content-Type": "application/json; charset=utf-8"}, body)

    def _ok(self, result: dict[str, Any]) -> SandboxResponse:
        return self._json(200, {"status": "SUCCESS", "result": result})

    def _error(self, status: int, code: str, description: str) -> SandboxResponse:
        error: object = description
        if self.error_style == "object":
            error = {"error_code": code, "description": description}
        return self._json(status, {"status": "ERROR", "error": error})

    @staticmethod
    def _html(status: int, text: str) -> SandboxResponse:
        return SandboxResponse(
            status, {"Content-Type": "text/html; charset=utf-8"}, text.encode("utf-8")
        )


def _route_names(names: Iterable[str]) -> set[str]:
    wanted = set(names)
    unknown = sorted(wanted - FAULTABLE_ROUTES.keys())
    if unknown:
        known = ", ".join(FAULTABLE_ROUTES)
        raise ValueError(f"unknown route {', '.join(unknown)}; known: {known}")
    return wanted


def _helper_payload(request: _Request) -> dict[str, Any]:
    try:
        payload = json.loads(request.body or b"{}")
    except ValueError:
        raise _RequestError(415, "The body is not JSON") from None
    if not isinstance(payload, dict):
        raise _RequestError(400, "The body must be a JSON object")
    return payload


def _accepts_json(accept: str) -> bool:
    for item in accept.split(","):
        media, *params = (piece.strip() for piece in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0 and media.lower() in ("*/*", "application/*", "application/json"):
            return True
    return False


def _card_expiry_end(expiry: str) -> datetime | None:
    """The first instant after a card's ``MM/YY`` (or ``MM/YYYY``) expiry month, in UTC."""
    month_text, _, year_text = expiry.replace(" ", "").partition("/")
    if not (month_text.isdigit() and year_text.isdigit() and len(year_text) in (2, 4)):
        return None
    month, year = int(month_text), int(year_text)
    if len(year_text) == 2:
        year += 2000
    if not 1 <= month <= 12:
        return None
    return add_months(datetime(year, month, 1, tzinfo=UTC), 1)


def _required_text(payload: Mapping[str, Any], name: str, *, label: str | None = None) -> str:
    value = payload.get(name)
    # The FAQ says the gateway only checks that order_id has a value; numbers are accepted.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _RequestError(400, f"{label or name} is required")
    return value


def _optional_text(
    payload: Mapping[str, Any], name: str, *, label: str | None = None
) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RequestError(400, f"{label or name} must be a string")
    return value


def _optional_url(payload: Mapping[str, Any], name: str) -> str | None:
    value = _optional_text(payload, name)
    if value is None or value == "":
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _RequestError(400, f"{name} must be an http(s) URL")
    return value
