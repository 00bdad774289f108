"""The real FatoraClient against the sandbox: every endpoint, every token behaviour, every
documented ambiguity (decline shape, error body type, amount type)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from billing.config import FATORA_SAMPLE_API_KEY
from billing.fatora.client import FatoraClient
from billing.fatora.errors import (
    AuthenticationFailed,
    GatewayServerError,
    GatewayTimeout,
    HardDecline,
    MalformedResponse,
    ModeMismatch,
    OutcomeUnknown,
    PaymentNotFound,
    RateLimited,
    SoftDecline,
    Unprocessable,
)
from billing.fatora.parsing import parse_redirect_params
from billing.fatora.sandbox import ManualClock, Sandbox, SandboxTransport, start_server_in_thread
from billing.fatora.types import PaymentStatus

BASE_URL = "https://api.fatora.test/v1"
KEY = FATORA_SAMPLE_API_KEY
STYLES = list(itertools.product(("http200", "http4xx"), ("object", "string"), ("number", "string")))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2025, 2, 10, 8, 30, tzinfo=UTC))


@pytest.fixture(params=STYLES, ids=["-".join(s) for s in STYLES])
def sandbox(request: pytest.FixtureRequest, clock: ManualClock) -> Sandbox:
    decline_style, error_style, amount_style = request.param
    return Sandbox(
        now=clock,
        decline_style=decline_style,
        error_style=error_style,
        amount_style=amount_style,
        inactive_api_keys=["INACTIVE-KEY"],
        seed=11,
    )


def make_client(sandbox: Sandbox, *, key: str = KEY, mode: str = "test") -> FatoraClient:
    return FatoraClient(BASE_URL, key, mode=mode, transport=SandboxTransport(sandbox))


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[FatoraClient]:
    with make_client(sandbox) as fatora:
        yield fatora


def successes(sandbox: Sandbox, order_id: str) -> list[dict[str, Any]]:
    return [c for c in sandbox.charges() if c["order_id"] == order_id and c["status"] == "SUCCESS"]


# ------------------------------------------------------------------------------- checkout


def test_checkout_pay_verify_then_collect_the_saved_token(
    client: FatoraClient, sandbox: Sandbox
) -> None:
    session = client.checkout(
        amount=Decimal("120.50"),
        currency="QAR",
        order_id="CHK-1",
        client_name="Noor",
        client_email="noor@example.com",
        client_phone="+97455555555",
        success_url="https://merchant.test/return?sub=9",
        failure_url="https://merchant.test/failed",
        save_token=True,
        note="first month",
    )
    assert session.checkout_url.startswith("https://api.fatora.test/pay/MCPaymentPage?")
    payment_id = parse_qs(urlsplit(session.checkout_url).query)["paymentID"][0]
    redirect = parse_redirect_params(sandbox.pay(payment_id, "4111111111111111"))
    assert redirect.order_id == "CHK-1"
    assert redirect.mode == "test"
    assert redirect.card_token is not None
    assert all(char in redirect.card_token for char in "+/\\|")

    payment = client.verify("CHK-1", redirect.transaction_id)
    assert payment.status is PaymentStatus.SUCCESS
    assert payment.amount == Decimal("120.50")
    assert payment.currency == "QAR"
    assert payment.mode == "test"
    assert payment.card_token == redirect.card_token
    assert payment.card_last4 == "1111"
    assert payment.note == "first month"
    assert payment.payment_date == datetime(2025, 2, 10, 8, 30, tzinfo=UTC)

    result = client.collect_payment(redirect.card_token, "REN-1", Decimal("120.50"), "QAR")
    assert result.status is PaymentStatus.SUCCESS


def test_checkout_declined_card_gives_a_failure_payment(
    client: FatoraClient, sandbox: Sandbox
) -> None:
    session = client.checkout(
        amount=Decimal("5"),
        currency="QAR",
        order_id="CHK-2",
        client_name="Noor",
        client_email="noor@example.com",
        failure_url="https://merchant.test/failed",
    )
    payment_id = parse_qs(urlsplit(session.checkout_url).query)["paymentID"][0]
    redirect = parse_redirect_params(sandbox.pay(payment_id, "5555555555554444"))
    assert redirect.failure_description == "Insufficient Funds"
    payment = client.verify("CHK-2")
    assert payment.status is PaymentStatus.FAILURE
    assert payment.card_token is None


def test_amex_card_gives_a_token_that_cannot_recur(client: FatoraClient, sandbox: Sandbox) -> None:
    session = client.checkout(
        amount=Decimal("5"),
        currency="QAR",
        order_id="CHK-3",
        client_name="Noor",
        client_email="noor@example.com",
        save_token=True,
    )
    payment_id = parse_qs(urlsplit(session.checkout_url).query)["paymentID"][0]
    token = parse_redirect_params(sandbox.pay(payment_id, "378282246310005")).card_token
    assert token is not None
    with pytest.raises(HardDecline):
        client.collect_payment(token, "REN-3", Decimal("5"), "QAR")


# -------------------------------------------------------------------------------- collect


def test_collect_success_then_verify(client: FatoraClient, sandbox: Sandbox) -> None:
    token = sandbox.issue_token("success")
    result = client.collect_payment(token, "SUB-1", Decimal("99.90"), "QAR")
    assert result.status is PaymentStatus.SUCCESS
    assert result.order_id == "SUB-1"
    assert result.transaction_id
    payment = client.verify("SUB-1", result.transaction_id)
    assert payment.status is PaymentStatus.SUCCESS
    assert payment.amount == Decimal("99.90")
    assert payment.currency == "QAR"
    assert payment.transaction_id == result.transaction_id
    assert payment.card_token == token
    assert len(successes(sandbox, "SUB-1")) == 1


def test_three_decimal_currency(client: FatoraClient, sandbox: Sandbox) -> None:
    token = sandbox.issue_token("success", currency="KWD")
    client.collect_payment(token, "KW-1", Decimal("1.125"), "KWD")
    payment = client.verify("KW-1")
    assert payment.amount == Decimal("1.125")
    assert payment.currency == "KWD"


@pytest.mark.parametrize("behaviour", ["insufficient_funds", "do_not_honor"])
def test_soft_declines(client: FatoraClient, sandbox: Sandbox, behaviour: str) -> None:
    with pytest.raises(SoftDecline):
        client.collect_payment(sandbox.issue_token(behaviour), "SD-1", Decimal("10"), "QAR")
    assert client.verify("SD-1").status is PaymentStatus.FAILURE
    assert successes(sandbox, "SD-1") == []


@pytest.mark.parametrize("behaviour", ["expired_token", "card_cannot_recur"])
def test_hard_declines(client: FatoraClient, sandbox: Sandbox, behaviour: str) -> None:
    with pytest.raises(HardDecline):
        client.collect_payment(sandbox.issue_token(behaviour), "HD-1", Decimal("10"), "QAR")
    assert client.verify("HD-1").status is PaymentStatus.FAILURE


def test_unknown_token_is_a_hard_decline(client: FatoraClient) -> None:
    with pytest.raises(HardDecline):
        client.collect_payment("not+a/real|token\\", "HD-2", Decimal("10"), "QAR")


def test_token_expires_after_six_months(
    client: FatoraClient, sandbox: Sandbox, clock: ManualClock
) -> None:
    token = sandbox.issue_token("success")
    clock.advance(timedelta(days=180))
    assert client.collect_payment(token, "EX-1", Decimal("10"), "QAR").status is (
        PaymentStatus.SUCCESS
    )
    clock.advance(months=1)
    with pytest.raises(HardDecline):
        client.collect_payment(token, "EX-2", Decimal("10"), "QAR")


def test_timeout_after_charge_is_unknown_then_verify_finds_one_charge(
    client: FatoraClient, sandbox: Sandbox
) -> None:
    token = sandbox.issue_token("timeout_after_charge")
    with pytest.raises(GatewayTimeout) as caught:
        client.collect_payment(token, "TO-1", Decimal("49.00"), "QAR")
    assert isinstance(caught.value, OutcomeUnknown)
    payment = client.verify("TO-1")
    assert payment.status is PaymentStatus.SUCCESS
    assert payment.amount == Decimal("49.00")
    assert len(successes(sandbox, "TO-1")) == 1


def test_server_error_before_charge(client: FatoraClient, sandbox: Sandbox) -> None:
    token = sandbox.issue_token("server_error_before_charge")
    with pytest.raises(GatewayServerError):
        client.collect_payment(token, "SE-1", Decimal("20"), "QAR")
    with pytest.raises(PaymentNotFound):
        client.verify("SE-1")
    result = client.collect_payment(token, "SE-2", Decimal("20"), "QAR")
    assert result.status is PaymentStatus.SUCCESS
    assert successes(sandbox, "SE-1") == []
    assert len(successes(sandbox, "SE-2")) == 1


def test_rate_limited_before_charge(client: FatoraClient, sandbox: Sandbox) -> None:
    token = sandbox.issue_token("rate_limited_before_charge")
    with pytest.raises(RateLimited) as caught:
        client.collect_payment(token, "RL-1", Decimal("20"), "QAR")
    assert caught.value.retry_after_s == 1
    with pytest.raises(PaymentNotFound):
        client.verify("RL-1")


@pytest.mark.parametrize("behaviour", ["garbled_after_charge", "html_after_charge"])
def test_garbage_after_charge(client: FatoraClient, sandbox: Sandbox, behaviour: str) -> None:
    with pytest.raises(MalformedResponse):
        client.collect_payment(sandbox.issue_token(behaviour), "GB-1", Decimal("15"), "QAR")
    payment = client.verify("GB-1")
    assert payment.status is PaymentStatus.SUCCESS
    assert payment.amount == Decimal("15")
    assert len(successes(sandbox, "GB-1")) == 1


def test_pending_then_success(client: FatoraClient, sandbox: Sandbox) -> None:
    token = sandbox.issue_token("pending_then_success")
    result = client.collect_payment(token, "PD-1", Decimal("30"), "QAR")
    assert result.status is PaymentStatus.PENDING
    statuses = [client.verify("PD-1", result.transaction_id).status for _ in range(3)]
    assert statuses == [PaymentStatus.PENDING, PaymentStatus.PENDING, PaymentStatus.SUCCESS]


# --------------------------------------------------------------------------------- verify


def test_verify_unknown_order(client: FatoraClient) -> None:
    with pytest.raises(PaymentNotFound):
        client.verify("NEVER-SEEN")


def test_duplicate_order_ids_verify_by_transaction(client: FatoraClient, sandbox: Sandbox) -> None:
    first = client.collect_payment(sandbox.issue_token(), "DUP-1", Decimal("10"), "QAR")
    with pytest.raises(SoftDecline):
        client.collect_payment(
            sandbox.issue_token("insufficient_funds"), "DUP-1", Decimal("10"), "QAR"
        )
    assert client.verify("DUP-1").status is PaymentStatus.FAILURE
    exact = client.verify("DUP-1", first.transaction_id)
    assert exact.status is PaymentStatus.SUCCESS
    assert exact.transaction_id == first.transaction_id


# ------------------------------------------------------------------------ refund and token


def test_refund_once(client: FatoraClient, sandbox: Sandbox) -> None:
    paid = client.collect_payment(sandbox.issue_token(), "RF-1", Decimal("60"), "QAR")
    assert paid.transaction_id is not None
    assert client.refund("RF-1", paid.transaction_id).refund_status == "completed"
    payment = client.verify("RF-1", paid.transaction_id)
    assert payment.refund_status == "completed"
    assert payment.refund_transaction_id
    with pytest.raises(Unprocessable):
        client.refund("RF-1", paid.transaction_id)


def test_refund_unknown_payment(client: FatoraClient) -> None:
    with pytest.raises(PaymentNotFound):
        client.refund("RF-404", "700000000001")


def test_deactivate_is_idempotent_and_kills_the_token(
    client: FatoraClient, sandbox: Sandbox
) -> None:
    token = sandbox.issue_token()
    client.deactivate_token(token)
    client.deactivate_token(token)  # 422 "already deactivated" counts as done
    with pytest.raises(HardDecline):
        client.collect_payment(token, "DA-1", Decimal("10"), "QAR")


# ---------------------------------------------------------------------------- auth, mode


def test_bad_and_inactive_keys(sandbox: Sandbox) -> None:
    for key in ("WRONG-KEY", "INACTIVE-KEY"):
        with make_client(sandbox, key=key) as fatora, pytest.raises(AuthenticationFailed):
            fatora.verify("ANY")


def test_live_client_refuses_test_mode_results(sandbox: Sandbox) -> None:
    token = sandbox.issue_token()
    with make_client(sandbox) as fatora:
        fatora.collect_payment(token, "MODE-1", Decimal("10"), "QAR")
    with make_client(sandbox, mode="live") as live, pytest.raises(ModeMismatch):
        live.verify("MODE-1")


# ----------------------------------------------------------- real server, plain HTTP calls


def test_real_server_with_plain_http_calls() -> None:
    """Written from the public docs only: header api_key, JSON bodies, the SUCCESS envelope."""
    sandbox = Sandbox()
    with start_server_in_thread(sandbox, port=0) as server:
        headers = {
            "api_key": KEY,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            checkout = http.post(
                "/v1/payments/checkout",
                json={
                    "amount": 123.100,
                    "currency": "QAR",
                    "order_id": "HTTP-1",
                    "client": {"name": "Client Name", "email": "client@example.com"},
                    "language": "ar",
                    "success_url": "https://www.example.com/product",
                    "failure_url": "http://255.255.255.255",
                    "save_token": True,
                },
            )
            assert checkout.status_code == 200
            body = checkout.json()
            assert body["status"] == "SUCCESS"
            checkout_url = body["result"]["checkout_url"]
            assert checkout_url.startswith(f"{server.url}/pay/MCPaymentPage?paymentID=")
            assert http.get(checkout_url).status_code == 200

            missing = http.post("/v1/payments/verify", json={"order_id": "HTTP-NONE"})
            assert missing.status_code == 404
            assert missing.json()["error"]["description"] == "Specified payment does not exists"

            token = http.post("/__sandbox/tokens", json={"behaviour": "success"}).json()[
                "card_token"
            ]
            collect = http.post(
                "/v1/payments/collect-payment",
                json={"card_token": token, "order_id": "HTTP-2", "amount": 123.45},
            )
            assert collect.status_code == 200
            transaction_id = collect.json()["result"]["transaction_id"]
            verify = http.post(
                "/v1/payments/verify",
                json={"order_id": "HTTP-2", "transaction_id": transaction_id},
            )
            result = verify.json()["result"]
            assert result["payment_status"] == "SUCCESS"
            assert Decimal(str(result["amount"])) == Decimal("123.45")
            assert result["card_token"] == token
