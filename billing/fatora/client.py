"""The Fatora HTTP client: one method per gateway call, typed results, typed errors.

Built on httpx's synchronous transport layer, one transport per calling thread: each thread
keeps its own kept-alive connection, so a worker's many call threads never queue on one shared
connection pool, and a call pays for no client machinery it does not use (cookies, auth flows,
redirects, which a payment API must not send anyway). The transport is
``billing.fatora.transport.DirectTransport`` (the standard library's HTTP client, at about half
httpcore's CPU per request), or ``httpx.HTTPTransport`` when a proxy is set: proxies come from the
usual environment variables, as with ``httpx.Client``. On ``DirectTransport`` a request goes out
as bytes laid out once per URL, the very bytes an ``httpx.Request`` would carry, and its answer
is read without building httpx objects (two calls per charge make this the hottest path); every
other transport gets an ``httpx.Request``. One instance serves a whole thread pool. Tests swap
the network for an ``httpx.MockTransport`` through the ``transport`` argument; an injected
transport is shared by every thread.

Every request passes through ``_post``: it holds a slot under the gateway cap shared by every
worker (``billing.gateway_cap``, when ``BILLING_GATEWAY_MAX_IN_FLIGHT`` sets one) and counts the
request's latency and result (``billing.metrics``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

import httpx

from billing import metrics
from billing.fatora.amounts import format_amount
from billing.fatora.answers import Answer
from billing.fatora.errors import (
    FatoraError,
    GatewayConnectionError,
    GatewayTimeout,
    MalformedResponse,
    ModeMismatch,
    RequestRejected,
    clip,
    error_from_response,
)
from billing.fatora.parsing import (
    Envelope,
    carries_payment,
    parse_checkout,
    parse_collect,
    parse_envelope,
    parse_payment,
    parse_refund,
    parse_retry_after,
)
from billing.fatora.transport import DirectTransport, request_head
from billing.fatora.types import (
    CheckoutSession,
    CollectResult,
    Payment,
    PaymentStatus,
    RefundResult,
)

if TYPE_CHECKING:
    from billing.config import FatoraSettings
    from billing.gateway_cap import InFlightCap

__all__ = ["DEFAULT_DEACTIVATE_PATH", "FatoraClient"]

logger = logging.getLogger("billing.fatora")

# The public docs name a "Deactivate Card Token" API without its URL; this is our best guess.
DEFAULT_DEACTIVATE_PATH = "/payments/deactivate-token"
# The refund page's heading and its code samples disagree; the samples' form is the fallback.
_REFUND_PATH = "/payments/refund"
_REFUND_FALLBACK_PATH = "/api/v1/payments/refund"
_REDACTED = "[redacted]"
_MODES = ("live", "test")


@dataclass(frozen=True, slots=True)
class _Number:
    """A JSON number literal spliced into a body as is (money must not pass through float)."""

    literal: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"-?\d+(?:\.\d+)?", self.literal):
            raise ValueError("not a plain decimal literal")


_Json = str | int | bool | None | _Number | Mapping[str, "_Json"]


# What json.dumps makes of a str (ASCII, escaped), without its per-call machinery.
_quote = json.encoder.encode_basestring_ascii


def _encode(value: _Json) -> str:
    """Compact JSON; ``_Number`` values go in verbatim, everything else as json.dumps has it."""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, _Number):
        return value.literal
    if isinstance(value, Mapping):
        items = (f"{_quote(k)}:{_encode(v)}" for k, v in value.items() if v is not None)
        return "{" + ",".join(items) + "}"
    return json.dumps(value)


def encode_body(fields: Mapping[str, _Json]) -> bytes:
    """The request body bytes. Keys whose value is None are left out."""
    return _encode(fields).encode("ascii")


def _is_pending(envelope: Envelope) -> bool:
    # A charge may report PENDING in the envelope itself: that is not an error.
    return envelope.status_word == "PENDING"


def _required(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value


@dataclass(frozen=True, slots=True)
class Reply:
    """What the client reads of an answer: its status, its (decoded) body and Retry-After."""

    status_code: int
    content: bytes
    retry_after: str | None


class FatoraClient:
    """Calls Fatora's v1 payment API with the merchant's API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        mode: str = "live",
        timeout_s: float = 30,
        connect_timeout_s: float = 10,
        transport: httpx.BaseTransport | None = None,
        deactivate_path: str = DEFAULT_DEACTIVATE_PATH,
        cap: InFlightCap | Literal["settings"] | None = "settings",
    ) -> None:
        """``cap``: the gateway cap every request holds a slot of; by default the one the
        settings ask for (none unless ``BILLING_GATEWAY_MAX_IN_FLIGHT`` is set); None: no cap."""
        mode = mode.strip().lower()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}")
        if not api_key:
            raise ValueError("api_key is required")
        self._base_url = httpx.URL(base_url.rstrip("/"))
        self._mode = mode
        self._api_key = api_key
        self._deactivate_path = deactivate_path
        # Built once: every request copies them as they are, with no per-call normalising.
        self._headers = httpx.Headers(
            {
                "api_key": api_key,
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "fatora-billing",
            }
        )
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s).as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self._heads: dict[httpx.URL, bytes] = {}
        self._injected = transport
        # Read and checked now: a malformed proxy setting fails here, at startup, not per call.
        self._proxy = _environment_proxy(self._base_url)
        self._pid = os.getpid()
        self._local = threading.local()
        self._transports: list[httpx.BaseTransport] = []
        self._transports_lock = threading.Lock()
        self._closed = False
        if cap == "settings":
            from billing.gateway_cap import cap_from_settings

            cap = cap_from_settings()
        self._cap: InFlightCap | None = cap

    def _transport(self) -> httpx.BaseTransport:
        """The calling thread's transport (or the injected one, shared)."""
        if self._closed:
            raise RuntimeError("the Fatora client has been closed")
        if self._injected is not None:
            return self._injected
        if self._pid != os.getpid():
            # A forked child never shares its parent's connections.
            self._local = threading.local()
            self._transports = []
            self._pid = os.getpid()
        transport: httpx.BaseTransport | None = getattr(self._local, "transport", None)
        if transport is None:
            transport = (
                DirectTransport() if self._proxy is None else httpx.HTTPTransport(proxy=self._proxy)
            )
            self._local.transport = transport
            with self._transports_lock:
                self._transports.append(transport)
        return transport

    @classmethod
    def from_settings(
        cls,
        settings: FatoraSettings | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> Self:
        """A client configured from FATORA_* environment settings."""
        from billing.config import get_fatora_settings

        s = settings if settings is not None else get_fatora_settings()
        return cls(
            s.base_url,
            s.api_key.get_secret_value(),
            mode=str(s.mode),
            timeout_s=s.timeout_s,
            connect_timeout_s=s.connect_timeout_s,
            transport=transport,
            deactivate_path=s.deactivate_path,
        )

    @property
    def mode(self) -> str:
        return self._mode

    def __repr__(self) -> str:
        return f"FatoraClient(base_url={str(self._base_url)!r}, mode={self._mode!r})"

    def close(self) -> None:
        self._closed = True
        with self._transports_lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            transport.close()
        if self._injected is not None:
            self._injected.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def checkout(
        self,
        *,
        amount: Decimal,
        currency: str,
        order_id: str,
        client_name: str,
        client_email: str,
        client_phone: str | None = None,
        language: str = "en",
        success_url: str | None = None,
        failure_url: str | None = None,
        save_token: bool = False,
        note: str | None = None,
        fcm_token: str | None = None,
    ) -> CheckoutSession:
        """Create a hosted checkout session (with ``save_token`` to obtain a card token)."""
        fields: dict[str, _Json] = {
            "amount": _Number(format_amount(amount, currency)),
            "currency": currency.upper(),
            "order_id": _required(order_id, "order_id"),
            "client": {"name": client_name, "email": client_email, "phone": client_phone},
            "language": language,
            "success_url": success_url,
            "failure_url": failure_url,
            "save_token": save_token,
            "note": note,
            "fcm_token": fcm_token,
        }
        with self._redacting():
            envelope = self._envelope(
                self._post("/payments/checkout", fields, call="checkout", order_id=order_id)
            )
            return parse_checkout(envelope)

    def collect_payment(
        self,
        card_token: str,
        order_id: str,
        amount: Decimal,
        currency: str,
        *,
        send_by: datetime | None = None,
    ) -> CollectResult:
        """Charge a stored card token. Settle only after ``verify`` confirms SUCCESS.

        Any SUCCESS or PENDING envelope is returned (the gateway took the charge, whatever its
        result says). Every other answer raises the error ``error_from_response`` maps it to;
        its ``answer`` says what it means for money (``billing.fatora.answers``).

        ``send_by`` (system time): a request that could only leave later (its wait for a slot
        under the gateway cap ran past it) is not sent; ``last_sent_at`` says when it left.
        """
        fields: dict[str, _Json] = {
            "card_token": _required(card_token, "card_token"),
            "order_id": _required(order_id, "order_id"),
            "amount": _Number(format_amount(amount, currency)),
            "currency": currency.upper(),
        }
        with self._redacting(card_token):
            response = self._post(
                "/payments/collect-payment",
                fields,
                call="collect",
                order_id=order_id,
                send_by=send_by,
            )
            envelope = self._envelope(response, charge=True, accept=_is_pending)
            try:
                result = parse_collect(envelope, order_id=order_id)
            except MalformedResponse:
                # A SUCCESS (or PENDING) envelope means the gateway took the charge, whatever
                # its undocumented result says: verify tells the rest.
                pending = envelope.status_word == "PENDING"
                result = CollectResult(
                    status=PaymentStatus.PENDING if pending else None, order_id=order_id
                )
            self._check_mode(result.mode)
            return result

    def verify(self, order_id: str, transaction_id: str | None = None) -> Payment:
        """The authoritative state of a payment. A FAILURE payment is returned, not raised."""
        fields: dict[str, _Json] = {
            "order_id": _required(order_id, "order_id"),
            "transaction_id": transaction_id,
        }
        with self._redacting():
            response = self._post("/payments/verify", fields, call="verify", order_id=order_id)
            envelope = self._envelope(response, accept=carries_payment)
            payment = parse_payment(envelope, order_id=order_id)
            if (
                transaction_id is not None
                and payment.transaction_id is not None
                and payment.transaction_id != transaction_id
            ):
                raise MalformedResponse("verify answered for a different transaction_id")
            self._check_mode(payment.mode)
            return payment

    def refund(self, order_id: str, transaction_id: str) -> RefundResult:
        """Ask for a full refund (no amount field is documented)."""
        fields: dict[str, _Json] = {
            "transaction_id": _required(transaction_id, "transaction_id"),
            "order_id": _required(order_id, "order_id"),
        }
        with self._redacting():
            response = self._post(_REFUND_PATH, fields, call="refund", order_id=order_id)
            if response.status_code == 404:
                # The heading URL may simply not exist; a 404 there changed nothing, so trying
                # the code samples' URL cannot refund twice.
                fallback = self._refund_fallback_url()
                response = self._post(fallback, fields, call="refund", order_id=order_id)
            return parse_refund(self._envelope(response))

    def deactivate_token(self, card_token: str) -> None:
        """Deactivate a stored card token. Already deactivated (HTTP 422) counts as done."""
        fields: dict[str, _Json] = {"card_token": _required(card_token, "card_token")}
        with self._redacting(card_token):
            response = self._post(self._deactivate_path, fields, call="deactivate", order_id=None)
            if response.status_code == 422:
                return
            self._envelope(response)

    # ------------------------------------------------------------ plumbing

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            if path.startswith(("http://", "https://")):
                url = httpx.URL(path)
            else:
                url = self._base_url.copy_with(path=self._base_url.path.rstrip("/") + path)
            self._urls[path] = url
        return url

    def _refund_fallback_url(self) -> str:
        # "https://api.fatora.io/v1" -> "https://api.fatora.io/api/v1/payments/refund"; a base
        # mounted under a prefix keeps it ("http://h/fatora/v1" -> "http://h/fatora/api/v1/...").
        prefix = self._base_url.path.rstrip("/")
        prefix = prefix.removesuffix("/v1")
        return str(self._base_url.copy_with(path=prefix + _REFUND_FALLBACK_PATH))

    def _post(
        self,
        path: str,
        fields: Mapping[str, _Json],
        *,
        call: str,
        order_id: str | None,
        send_by: datetime | None = None,
    ) -> Reply:
        """Send one request; every gateway call passes here. Under a gateway cap, the request
        is sent only once it holds a slot: else ``GatewayBusy``, a request that never left."""
        url = self._url(path)
        body = encode_body(fields)
        if self._cap is None:
            return self._send(url, body, call=call, order_id=order_id, send_by=send_by)
        with self._cap.slot(call):
            return self._send(url, body, call=call, order_id=order_id, send_by=send_by)

    def last_sent_at(self) -> datetime | None:
        """When this thread's latest request left (system time), after any wait for a slot."""
        sent: datetime | None = getattr(self._local, "sent_at", None)
        return sent

    def _send(
        self,
        url: httpx.URL,
        body: bytes,
        *,
        call: str,
        order_id: str | None,
        send_by: datetime | None = None,
    ) -> Reply:
        now = datetime.now(UTC)
        if send_by is not None and now > send_by:
            raise RequestRejected(
                "request not sent: its time to be sent is over", answer=Answer.NOT_SENT
            )
        self._local.sent_at = now
        started = time.perf_counter()
        outcome: str = "error"
        result = "error"
        try:
            reply = self._exchange(url, body)
            outcome = str(reply.status_code)
            result = metrics.http_result(reply.status_code)
            return reply
        except httpx.TimeoutException as exc:
            outcome = type(exc).__name__
            result = "timeout"
            raise GatewayTimeout(
                f"no answer in time ({outcome})", answer=_transport_answer(exc)
            ) from exc
        except httpx.DecodingError as exc:
            outcome, result = type(exc).__name__, "decode_error"
            raise MalformedResponse("response could not be decoded") from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            # Raised before anything reaches the gateway: our configuration is wrong.
            outcome, result = type(exc).__name__, "not_sent"
            raise RequestRejected(f"request not sent ({outcome})", answer=Answer.NOT_SENT) from exc
        except httpx.TransportError as exc:
            outcome = type(exc).__name__
            not_sent = _transport_answer(exc) is Answer.NOT_SENT
            result = "connect_error" if not_sent else "connection_error"
            raise GatewayConnectionError(
                f"connection failed ({outcome})", answer=_transport_answer(exc)
            ) from exc
        finally:
            elapsed_s = time.perf_counter() - started
            metrics.gateway_request(call, result, elapsed_s)
            elapsed_ms = elapsed_s * 1000
            level = logging.INFO if outcome.startswith("2") else logging.WARNING
            logger.log(
                level,
                "fatora POST %s -> %s order_id=%s elapsed_ms=%.0f",
                url.path,
                outcome,
                order_id or "-",
                elapsed_ms,
                extra={
                    "fatora_path": url.path,
                    "fatora_status": outcome,
                    "order_id": order_id,
                    "elapsed_ms": round(elapsed_ms),
                },
            )

    def _exchange(self, url: httpx.URL, body: bytes) -> Reply:
        """One request and its whole answer. On ``DirectTransport`` the request goes out as
        bytes laid out once per URL (no ``httpx.Request`` or ``httpx.Response`` per call); any
        other transport (a proxy's, a test's) gets an ``httpx.Request``."""
        transport = self._transport()
        if isinstance(transport, DirectTransport):
            head = self._head(url) + b"Content-Length: %d\r\n\r\n" % len(body)
            answer = transport.send(url, head, body, self._timeout)
            content = answer.content
            if (answer.msg.get("content-encoding") or "identity").strip().lower() != "identity":
                content = answer.as_response().read()  # decoded by httpx, or DecodingError
            return Reply(answer.status, content, answer.msg.get("retry-after"))
        request = httpx.Request(
            "POST", url, headers=self._headers, content=body, extensions={"timeout": self._timeout}
        )
        response = transport.handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        return Reply(response.status_code, response.content, response.headers.get("retry-after"))

    def _head(self, url: httpx.URL) -> bytes:
        """The request line and header lines of a POST to ``url`` (kept once laid out)."""
        head = self._heads.get(url)
        if head is None:
            fields = [(b"Host", url.netloc), *self._headers.raw]
            head = request_head("POST", url, fields)  # LocalProtocolError: never sent
            self._heads[url] = head
        return head

    def _envelope(
        self,
        response: Reply,
        *,
        charge: bool = False,
        accept: Callable[[Envelope], bool] | None = None,
    ) -> Envelope:
        """The SUCCESS envelope of a response (or one ``accept`` takes), else the mapped error
        is raised."""
        status = response.status_code
        if 200 <= status < 300:
            try:
                envelope = parse_envelope(response.content)
            except MalformedResponse:
                pass  # error_from_response tells a cut body from a foreign page
            else:
                if envelope.ok or (accept is not None and accept(envelope)):
                    return envelope
        raise error_from_response(
            status,
            response.content,
            charge=charge,
            retry_after_s=parse_retry_after(response.retry_after),
        )

    def _check_mode(self, mode: str | None) -> None:
        if self._mode == "live" and mode == "test":
            raise ModeMismatch("gateway answered in test mode while the client runs live")

    @contextmanager
    def _redacting(self, *secrets: str) -> Iterator[None]:
        """Strip the API key and card tokens from gateway text carried by a raised error."""
        try:
            yield
        except FatoraError as err:
            hidden = [s for s in (self._api_key, *secrets) if s]
            for attr in ("description", "error_code"):
                text = getattr(err, attr)
                if text:
                    for secret in hidden:
                        text = text.replace(secret, _REDACTED)
                    # Clipped only now: a secret cut in two would leave its start behind.
                    setattr(err, attr, clip(text))
            err.args = (err.description,)
            raise


# The request cannot have reached the gateway: the connection (or the proxy's tunnel) was never
# made, or no pooled connection was free. Any later failure may come after the request was written.
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)


def _transport_answer(exc: httpx.TransportError) -> Answer:
    return Answer.NOT_SENT if isinstance(exc, _NOT_SENT_ERRORS) else Answer.NO_ANSWER


def _environment_proxy(url: httpx.URL) -> httpx.Proxy | None:
    """The proxy that HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY set for ``url``, as
    httpx.Client reads them (a proxy given without a scheme is an http:// one)."""
    host = url.host
    if host and proxy_bypass_environment(host):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    try:
        return httpx.Proxy(proxy)
    except ValueError:
        # The setting may carry a proxy password: it is not repeated here.
        raise ValueError(f"unusable proxy setting for {url.scheme} URLs (see *_PROXY)") from None
