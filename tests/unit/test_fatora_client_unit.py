"""FatoraClient against httpx.MockTransport: exact requests, error mapping, no leaked secrets."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from billing.config import FatoraSettings, GatewayMode
from billing.fatora import (
    AuthenticationFailed,
    CheckoutSession,
    CollectResult,
    FatoraClient,
    FatoraError,
    ForeignAnswer,
    GatewayConnectionError,
    GatewayServerError,
    GatewayTimeout,
    HardDecline,
    MalformedResponse,
    ModeMismatch,
    OutcomeUnknown,
    PaymentNotFound,
    PaymentStatus,
    RateLimited,
    RefundResult,
    RequestRejected,
    SoftDecline,
    UnclearAnswer,
)
from billing.fatora.errors import MAX_DESCRIPTION

API_KEY = "K3Y-5ecret-0000-1111-2222"
TOKEN = "Ab+/Cd|Ef\\12"
BASE = "https://api.fatora.io/v1"

Handler = Callable[[httpx.Request], httpx.Response]


class Gateway:
    """Records requests and answers them with a handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handler(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def reply(status: int = 200, payload: Any = None, raw: bytes | None = None, **kw: Any) -> Handler:
    content = raw if raw is not None else json.dumps(payload).encode()
    return lambda request: httpx.Response(status, content=content, **kw)


def ok(result: Any) -> Handler:
    return reply(200, {"status": "SUCCESS", "result": result})


def raising(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=request)

    return handler


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[FatoraClient, Gateway]]]:
    clients: list[FatoraClient] = []

    def factory(handler: Handler, **kw: Any) -> tuple[FatoraClient, Gateway]:
        gateway = Gateway(handler)
        kw.setdefault("mode", "live")
        client = FatoraClient(BASE, API_KEY, transport=httpx.MockTransport(gateway), **kw)
        clients.append(client)
        return client, gateway

    yield factory
    for client in clients:
        client.close()


Make = Callable[..., tuple[FatoraClient, Gateway]]

PAYMENT = {
    "order_id": "O-1",
    "transaction_id": "T-1",
    "amount": 50.00,
    "currency": "QAR",
    "payment_status": "SUCCESS",
    "mode": "live",
    "card_token": TOKEN,
}


# ------------------------------------------------------------------ requests on the wire


def test_headers_and_timeouts(make: Make) -> None:
    client, gw = make(ok(PAYMENT), timeout_s=45, connect_timeout_s=7)
    client.verify("O-1")
    request = gw.last
    assert request.method == "POST"
    assert request.headers["api_key"] == API_KEY
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert request.extensions["timeout"] == {"connect": 7, "read": 45, "write": 45, "pool": 45}


def test_checkout_request_bytes(make: Make) -> None:
    url = "https://maktapp.credit/pay/MCPaymentPage?paymentID=AB12"
    client, gw = make(ok({"checkout_url": url}))
    session = client.checkout(
        amount=Decimal("50"),
        currency="qar",
        order_id="INV-1",
        client_name="Client Name",
        client_email="client@example.com",
        client_phone="+97450000000",
        success_url="https://shop.example/ok",
        failure_url="https://shop.example/ko",
        save_token=True,
        note="May",
    )
    assert session == CheckoutSession(checkout_url=url)
    assert str(gw.last.url) == f"{BASE}/payments/checkout"
    assert gw.last.content == (
        b'{"amount":50.00,"currency":"QAR","order_id":"INV-1",'
        b'"client":{"name":"Client Name","email":"client@example.com","phone":"+97450000000"},'
        b'"language":"en","success_url":"https://shop.example/ok",'
        b'"failure_url":"https://shop.example/ko","save_token":true,"note":"May"}'
    )


def test_checkout_omits_unset_optionals_and_escapes_unicode(make: Make) -> None:
    client, gw = make(ok({"checkout_url": "https://x.example/p"}))
    client.checkout(
        amount=Decimal("1.250"),
        currency="KWD",
        order_id="O",
        client_name="سارة",
        client_email="s@example.com",
        language="ar",
    )
    body = gw.last.content
    assert body.startswith(b'{"amount":1.250,"currency":"KWD",')
    assert b"phone" not in body and b"note" not in body and b"fcm_token" not in body
    assert json.loads(body)["client"]["name"] == "سارة"
    assert json.loads(body, parse_float=Decimal)["amount"] == Decimal("1.250")


def test_collect_request_bytes_keep_the_token_byte_for_byte(make: Make) -> None:
    client, gw = make(ok({"order_id": "O-1", "payment_status": "SUCCESS"}))
    client.collect_payment(TOKEN, "O-1", Decimal("1.25"), "KWD")
    assert str(gw.last.url) == f"{BASE}/payments/collect-payment"
    assert gw.last.content == (
        b'{"card_token":"Ab+/Cd|Ef\\\\12","order_id":"O-1","amount":1.250,"currency":"KWD"}'
    )
    assert json.loads(gw.last.content)["card_token"] == TOKEN


def test_invalid_input_sends_nothing(make: Make) -> None:
    client, gw = make(ok({}))
    with pytest.raises(ValueError):
        client.collect_payment(TOKEN, "O-1", Decimal("1.001"), "QAR")
    with pytest.raises(ValueError):
        client.collect_payment(TOKEN, "O-1", Decimal("0"), "QAR")
    with pytest.raises(ValueError):
        client.collect_payment("", "O-1", Decimal("1"), "QAR")
    with pytest.raises(ValueError):
        client.verify("")
    with pytest.raises(TypeError):
        client.collect_payment(TOKEN, "O-1", 1.5, "QAR")  # type: ignore[arg-type]
    assert gw.requests == []


def test_verify_request_bytes(make: Make) -> None:
    client, gw = make(ok(PAYMENT))
    client.verify("O-1")
    assert str(gw.last.url) == f"{BASE}/payments/verify"
    assert gw.last.content == b'{"order_id":"O-1"}'
    client.verify("O-1", "T-1")
    assert gw.last.content == b'{"order_id":"O-1","transaction_id":"T-1"}'


# ------------------------------------------------------------------ collect outcomes


def test_collect_success_and_pending(make: Make) -> None:
    client, _ = make(ok({"order_id": "O-1", "transaction_id": "T-9", "payment_status": "SUCCESS"}))
    assert client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR") == CollectResult(
        status=PaymentStatus.SUCCESS, order_id="O-1", transaction_id="T-9"
    )
    client, _ = make(ok({"payment_status": "pending"}))
    result = client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    assert result.status is PaymentStatus.PENDING
    client, _ = make(ok(None))
    assert client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR").status is None


def test_a_collect_past_its_send_by_is_never_sent_and_the_send_moment_is_noted(
    make: Make,
) -> None:
    """Protects the bound a later 'not found' relies on: a request whose moment to be sent is
    over (a wait for a slot under the gateway cap ran past it) never leaves; one that leaves
    notes when it did, after any such wait."""
    from datetime import UTC, datetime, timedelta

    from billing.fatora.answers import Answer

    client, gateway = make(ok({"order_id": "O-1", "payment_status": "SUCCESS"}))
    late = datetime.now(UTC) - timedelta(seconds=1)
    with pytest.raises(FatoraError) as refused:
        client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR", send_by=late)
    assert refused.value.answer is Answer.NOT_SENT
    assert gateway.requests == [] and client.last_sent_at() is None
    before = datetime.now(UTC)
    client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR", send_by=before + timedelta(minutes=1))
    sent = client.last_sent_at()
    assert len(gateway.requests) == 1 and sent is not None and sent >= before


@pytest.mark.parametrize(
    ("handler", "cls"),
    [
        (reply(200, {"status": "FAILURE", "error": "Insufficient funds"}), SoftDecline),
        (
            reply(
                200,
                {"status": "FAILURE", "error": {"error_code": 54, "description": "Card expired"}},
            ),
            HardDecline,
        ),
        (
            reply(
                200, {"status": "FAILURE", "error": {"error_code": 54, "description": "Expired"}}
            ),
            UnclearAnswer,
        ),
        (
            reply(200, {"status": "FAILURE", "result": {"payment_status": "FAILURE"}}),
            SoftDecline,
        ),
        (reply(400, {"status": "ERROR", "error": "Invalid card token"}), HardDecline),
        (reply(400, {"status": "ERROR", "error": "Invalid token"}), AuthenticationFailed),
        (
            reply(422, {"status": "ERROR", "error": {"description": "Qatar debit card"}}),
            HardDecline,
        ),
        (reply(402, {"status": "ERROR", "error": "declined"}), SoftDecline),
        (reply(400, {"status": "ERROR", "error": "amount is required"}), RequestRejected),
        (reply(401, {"status": "ERROR", "error": "Invalid API Key"}), AuthenticationFailed),
        (reply(403, raw=b""), AuthenticationFailed),
        (reply(500, raw=b"<html>oops</html>"), GatewayServerError),
        (reply(502, raw=b""), GatewayServerError),
        (reply(429, raw=b""), RateLimited),
        (reply(200, raw=b"<html>maintenance</html>"), ForeignAnswer),
        (reply(200, raw=b""), ForeignAnswer),
        (reply(404, raw=b"<html>Not Found</html>"), ForeignAnswer),
        (reply(504, raw=b"<html>504 Gateway Time-out</html>"), GatewayServerError),
        (reply(200, {"status": "PROCESSING"}), UnclearAnswer),
        (reply(200, {"status": "ERROR", "error": "Unexpected error"}), UnclearAnswer),
        (
            reply(200, raw=b'{"status":"SUCCESS","result":{"payment_status":"SUCC'),
            MalformedResponse,
        ),
        (reply(302, raw=b"", headers={"location": "https://elsewhere"}), ForeignAnswer),
        (raising(httpx.ReadTimeout), GatewayTimeout),
        (raising(httpx.ConnectTimeout), GatewayTimeout),
        (raising(httpx.WriteTimeout), GatewayTimeout),
        (raising(httpx.PoolTimeout), GatewayTimeout),
        (raising(httpx.ConnectError), GatewayConnectionError),
        (raising(httpx.ReadError), GatewayConnectionError),
        (raising(httpx.RemoteProtocolError), GatewayConnectionError),
    ],
)
def test_collect_error_mapping(make: Make, handler: Handler, cls: type[FatoraError]) -> None:
    client, _ = make(handler)
    with pytest.raises(cls) as info:
        client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    assert type(info.value) is cls


@pytest.mark.parametrize(
    "result",
    [
        {"payment_status": "FAILURE", "description": "Do not honor"},
        {"status": "APPROVED"},
        [{"payment_status": "SUCCESS"}],
        {"payment_status": "WHATEVER"},
        {"order_id": "SOMEONE-ELSE"},
        None,
    ],
)
def test_a_success_envelope_on_collect_is_accepted_whatever_its_result_says(
    make: Make, result: object
) -> None:
    """Money safety: a SUCCESS envelope means the gateway took the charge. Reading it as 'no
    answer' once let a lagging verify's 'not found' charge the invoice again."""
    client, _ = make(reply(200, {"status": "SUCCESS", "result": result}))
    collected = client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    assert collected.order_id == "O-1"


def test_collect_pending_envelope_is_returned(make: Make) -> None:
    client, _ = make(reply(200, {"status": "PENDING", "result": {"transaction_id": "T"}}))
    result = client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    assert (result.status, result.transaction_id) == (PaymentStatus.PENDING, "T")


def test_malformed_2xx_keeps_its_http_status(make: Make) -> None:
    client, _ = make(reply(200, raw=b"<html></html>"))
    with pytest.raises(MalformedResponse) as info:
        client.verify("O-1")
    assert info.value.http_status == 200


def test_transport_errors_chain_their_cause(make: Make) -> None:
    client, _ = make(raising(httpx.ReadTimeout))
    with pytest.raises(GatewayTimeout) as info:
        client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    assert isinstance(info.value, OutcomeUnknown)
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


def test_rate_limit_reads_retry_after(make: Make) -> None:
    client, _ = make(reply(429, raw=b"", headers={"Retry-After": "17"}))
    with pytest.raises(RateLimited) as info:
        client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    assert info.value.retry_after_s == 17.0
    assert info.value.http_status == 429


def test_collect_test_mode_in_live_is_refused(make: Make) -> None:
    client, _ = make(ok({"payment_status": "SUCCESS", "mode": "Test"}))
    with pytest.raises(ModeMismatch):
        client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")


# ------------------------------------------------------------------ verify


def test_verify_success(make: Make) -> None:
    client, _ = make(ok(PAYMENT))
    payment = client.verify("O-1", "T-1")
    assert payment.status is PaymentStatus.SUCCESS
    assert payment.amount == Decimal("50.0")
    assert payment.card_token == TOKEN


def test_verify_failure_is_returned_not_raised(make: Make) -> None:
    client, _ = make(ok({**PAYMENT, "payment_status": "FAILURE", "description": "Expired card"}))
    payment = client.verify("O-1")
    assert payment.status is PaymentStatus.FAILURE
    assert payment.decline_kind == "hard"


def test_verify_not_found(make: Make) -> None:
    error = {
        "status": "ERROR",
        "error": {"error_code": "404", "description": "Specified payment does not exists"},
    }
    client, _ = make(reply(404, error))
    with pytest.raises(PaymentNotFound) as info:
        client.verify("O-404")
    assert info.value.http_status == 404


@pytest.mark.parametrize("mode", ["test", "TEST", "Test"])
def test_verify_test_result_on_live_client(make: Make, mode: str) -> None:
    client, _ = make(ok({**PAYMENT, "mode": mode}))
    with pytest.raises(ModeMismatch):
        client.verify("O-1")


def test_verify_test_result_on_test_client(make: Make) -> None:
    client, _ = make(ok({**PAYMENT, "mode": "test"}), mode="test")
    assert client.verify("O-1").mode == "test"


@pytest.mark.parametrize(
    "payload",
    [
        {**PAYMENT, "transaction_id": "T-OTHER"},
        {**PAYMENT, "order_id": "O-OTHER"},
        {k: v for k, v in PAYMENT.items() if k != "payment_status"},
    ],
)
def test_verify_unclear_answers(make: Make, payload: dict[str, Any]) -> None:
    client, _ = make(ok(payload))
    with pytest.raises(MalformedResponse):
        client.verify("O-1", "T-1")


def test_verify_error_envelope_on_200(make: Make) -> None:
    client, _ = make(reply(200, {"status": "ERROR", "error": "payment doesn't found"}))
    with pytest.raises(PaymentNotFound):
        client.verify("O-1")


# ------------------------------------------------------------------ refund


def test_refund_primary_url(make: Make) -> None:
    client, gw = make(ok({"refund_status": "completed"}))
    assert client.refund("O-1", "T-1") == RefundResult(refund_status="completed")
    assert [str(r.url) for r in gw.requests] == [f"{BASE}/payments/refund"]
    assert gw.last.content == b'{"transaction_id":"T-1","order_id":"O-1"}'


def test_refund_falls_back_on_404(make: Make) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/payments/refund":
            return httpx.Response(404, content=b"<html>Not Found</html>")
        return httpx.Response(200, json={"status": "SUCCESS", "result": {"refund_status": "co"}})

    client, gw = make(handler)
    assert client.refund("O-1", "T-1").refund_status == "co"
    assert [str(r.url) for r in gw.requests] == [
        f"{BASE}/payments/refund",
        "https://api.fatora.io/api/v1/payments/refund",
    ]
    assert gw.requests[0].content == gw.requests[1].content


def test_refund_404_on_both_urls(make: Make) -> None:
    client, gw = make(reply(404, {"status": "ERROR", "error": "payment not found"}))
    with pytest.raises(PaymentNotFound):
        client.refund("O-1", "T-1")
    assert len(gw.requests) == 2


def test_refund_no_fallback_on_other_errors(make: Make) -> None:
    client, gw = make(reply(500, raw=b""))
    with pytest.raises(GatewayServerError):
        client.refund("O-1", "T-1")
    assert len(gw.requests) == 1


def test_refund_fallback_keeps_a_mount_prefix() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(404, content=b"")

    with (
        FatoraClient(
            "http://sandbox.local/fatora/v1/", API_KEY, transport=httpx.MockTransport(handler)
        ) as client,
        pytest.raises(ForeignAnswer),  # an empty 404 is not Fatora's answer
    ):
        client.refund("O", "T")
    assert seen == [
        "http://sandbox.local/fatora/v1/payments/refund",
        "http://sandbox.local/fatora/api/v1/payments/refund",
    ]


# ------------------------------------------------------------------ deactivate


def test_deactivate_ok_and_already_deactivated(make: Make) -> None:
    client, gw = make(ok(None))
    client.deactivate_token(TOKEN)  # no exception: done
    assert str(gw.last.url) == f"{BASE}/payments/deactivate-token"
    assert gw.last.content == b'{"card_token":"Ab+/Cd|Ef\\\\12"}'
    client, _ = make(reply(422, {"status": "ERROR", "error": "Token already deactivated"}))
    client.deactivate_token(TOKEN)  # already deactivated counts as done


def test_deactivate_custom_path_and_errors(make: Make) -> None:
    client, gw = make(ok({}), deactivate_path="/payments/tokens/deactivate")
    client.deactivate_token(TOKEN)
    assert gw.last.url.path == "/v1/payments/tokens/deactivate"
    client, _ = make(reply(401, {"status": "ERROR", "error": "Invalid API Key"}))
    with pytest.raises(AuthenticationFailed):
        client.deactivate_token(TOKEN)
    client, _ = make(reply(503, raw=b""))
    with pytest.raises(GatewayServerError):
        client.deactivate_token(TOKEN)
    client, _ = make(reply(400, {"status": "ERROR", "error": "token is required"}))
    with pytest.raises(RequestRejected):
        client.deactivate_token(TOKEN)


# ------------------------------------------------------------------ secrets and logs


def test_no_secret_in_logs_errors_or_reprs(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"status": "FAILURE", "error": f"Expired token {TOKEN} for key {API_KEY}"}
    errors: list[FatoraError] = []
    handlers: list[Handler] = [
        ok({"payment_status": "SUCCESS"}),
        reply(200, echo),
        reply(400, {"status": "ERROR", "error": {"error_code": API_KEY, "description": TOKEN}}),
        reply(500, raw=f"<html>{API_KEY} {TOKEN}</html>".encode()),
        raising(httpx.ReadTimeout),
        reply(200, raw=TOKEN.encode()),
    ]
    for handler in handlers:
        client, _ = make(handler)
        assert API_KEY not in repr(client) and API_KEY not in str(client)
        try:
            client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
        except FatoraError as exc:
            errors.append(exc)
        try:
            client.deactivate_token(TOKEN)
        except FatoraError as exc:
            errors.append(exc)
    # verify never sees a token, so only the API key can be recognised in what it echoes.
    for handler in (
        reply(200, {"status": "ERROR", "error": f"bad key {API_KEY}"}),
        reply(404, {"status": "ERROR", "error": {"error_code": API_KEY}}),
    ):
        client, _ = make(handler)
        with pytest.raises(FatoraError) as info:
            client.verify("O-1")
        errors.append(info.value)
    assert len(errors) >= 10
    client, _ = make(ok(PAYMENT))
    payment = client.verify("O-1")
    texts = [repr(payment), str(payment)]
    for err in errors:
        texts += [str(err), repr(err), *map(str, err.args)]
    for record in caplog.records:
        texts += [record.getMessage(), str(record.__dict__)]
    assert caplog.records
    for text in texts:
        assert API_KEY not in text
        assert TOKEN not in text
        assert "Ab+/Cd" not in text
    assert any("[redacted]" in str(exc) for exc in errors)


def test_one_log_line_per_call(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="billing.fatora")
    client, _ = make(ok(PAYMENT))
    client.verify("O-1")
    records = [r for r in caplog.records if r.name == "billing.fatora"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "POST" in message and "/v1/payments/verify" in message
    assert "200" in message and "order_id=O-1" in message and "elapsed_ms=" in message
    assert '{"order_id"' not in message


# ------------------------------------------------------------------ construction


def test_from_settings() -> None:
    settings = FatoraSettings(
        base_url="https://gw.example/v1",
        api_key=SecretStr(API_KEY),
        mode=GatewayMode.TEST,
        timeout_s=12,
        connect_timeout_s=3,
    )
    gw = Gateway(ok({**PAYMENT, "mode": "test"}))
    with FatoraClient.from_settings(settings, transport=httpx.MockTransport(gw)) as client:
        assert client.mode == "test"
        assert client.verify("O-1").mode == "test"
    assert str(gw.last.url) == "https://gw.example/v1/payments/verify"
    assert gw.last.headers["api_key"] == API_KEY
    assert gw.last.extensions["timeout"]["connect"] == 3
    assert API_KEY not in repr(client)


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        FatoraClient(BASE, API_KEY, mode="sandbox")
    with pytest.raises(ValueError):
        FatoraClient(BASE, "")


def test_close_and_context_manager(make: Make) -> None:
    client, _ = make(ok(PAYMENT))
    with client as same:
        assert same is client
    with pytest.raises(RuntimeError):
        client.verify("O-1")


def test_usable_from_a_thread_pool(make: Make) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        order = json.loads(request.content)["order_id"]
        result = {**PAYMENT, "order_id": order, "transaction_id": None}
        return httpx.Response(200, json={"status": "SUCCESS", "result": result})

    client, _ = make(handler)
    orders = [f"O-{i}" for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(client.verify, orders))
    assert [p.order_id for p in results] == orders


_PROXY_VARS = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)


def test_proxies_come_from_the_environment_as_with_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merchants behind an egress proxy set HTTPS_PROXY; NO_PROXY exempts hosts from it."""
    from billing.fatora.client import _environment_proxy

    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    url = httpx.URL("https://api.fatora.io/v1")
    assert _environment_proxy(url) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    proxy = _environment_proxy(url)
    assert proxy is not None and str(proxy.url) == "http://proxy.internal:3128"
    assert _environment_proxy(httpx.URL("http://sandbox.local/v1")) is None
    monkeypatch.setenv("NO_PROXY", "fatora.io")
    assert _environment_proxy(url) is None


def test_a_proxy_without_a_scheme_is_an_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HTTPS_PROXY=proxy.corp:3128`` is common; httpx.Client reads it as http://."""
    from billing.fatora.client import _environment_proxy

    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    proxy = _environment_proxy(httpx.URL("https://api.fatora.io/v1"))
    assert proxy is not None and str(proxy.url) == "http://proxy.corp:3128"


def test_an_unusable_proxy_setting_fails_at_startup_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad proxy must stop the worker from starting, not make every charge 'unknown' for
    days; the message names the variable, never the value (it may hold a password)."""
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "gopher://user:s3cret@proxy.corp:70")
    with pytest.raises(ValueError, match="_PROXY") as raised:
        FatoraClient("https://api.fatora.io/v1", API_KEY)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("cut", [3, 6, 9])
def test_a_token_cut_by_the_clip_leaves_no_prefix_in_the_message(make: Make, cut: int) -> None:
    """Secrets never leak: the gateway's text is clipped only after the card token and the API
    key are removed from it, so a clip through the middle of a token cannot leave its start."""
    filler = "x" * (MAX_DESCRIPTION - 1 - cut)
    client, _ = make(reply(400, {"status": "ERROR", "error": f"{filler}{TOKEN} rejected"}))
    with pytest.raises(FatoraError) as info:
        client.collect_payment(TOKEN, "O-1", Decimal("5"), "QAR")
    text = f"{info.value} {info.value!r} {info.value.description}"
    assert TOKEN[:cut] not in text.replace(filler, "")
    assert len(info.value.description or "") <= MAX_DESCRIPTION
