"""The sandbox's hosted checkout page: the form, the card rules and the redirects."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from billing.config import FATORA_SAMPLE_API_KEY
from billing.fatora.sandbox import ManualClock, Sandbox, SandboxResponse

BASE = "http://gateway.test"
JSON_HEADERS = {"api_key": FATORA_SAMPLE_API_KEY, "Content-Type": "application/json"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def sandbox(clock: ManualClock) -> Sandbox:
    return Sandbox(now=clock, seed=3)


def start(sandbox: Sandbox, **overrides: Any) -> str:
    payload: dict[str, Any] = {
        "amount": "75.5",
        "currency": "QAR",
        "order_id": "CHK-1",
        "client": {"name": "Mona", "email": "mona@example.com"},
        "success_url": "https://shop.test/return?shop=7",
        "failure_url": "https://shop.test/failed",
        "save_token": True,
    }
    payload.update(overrides)
    response = sandbox.handle(
        "POST", "/v1/payments/checkout", "", JSON_HEADERS, json.dumps(payload).encode(), BASE
    )
    assert response.status == 200, response.body
    url = response.json()["result"]["checkout_url"]
    return str(parse_qs(urlsplit(url).query)["paymentID"][0])


def page(sandbox: Sandbox, payment_id: str, method: str = "GET", **form: str) -> SandboxResponse:
    body = urlencode(form).encode() if form else b""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return sandbox.handle(
        method, "/pay/MCPaymentPage", f"paymentID={payment_id}", headers, body, BASE
    )


def redirect_params(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query, keep_blank_values=True)


def verify(sandbox: Sandbox, order_id: str) -> dict[str, Any]:
    body = json.dumps({"order_id": order_id}).encode()
    response = sandbox.handle("POST", "/v1/payments/verify", "", JSON_HEADERS, body, BASE)
    result: dict[str, Any] = response.json()["result"]
    return result


def test_get_shows_the_form_in_english(sandbox: Sandbox) -> None:
    payment_id = start(sandbox)
    response = page(sandbox, payment_id)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    html = response.body.decode()
    for name in ("card_number", "expiry", "cvv", "name"):
        assert f'name="{name}"' in html
    assert 'lang="en"' in html
    assert "75.50 QAR" in html
    assert "CHK-1" in html


def test_get_shows_the_form_in_arabic(sandbox: Sandbox) -> None:
    html = page(sandbox, start(sandbox, language="ar")).body.decode()
    assert 'dir="rtl"' in html
    assert "رقم البطاقة" in html


def test_order_id_is_escaped_on_the_page(sandbox: Sandbox) -> None:
    html = page(sandbox, start(sandbox, order_id="<b>x</b>")).body.decode()
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html


def test_unknown_payment_id_is_404(sandbox: Sandbox) -> None:
    assert page(sandbox, "NOPE").status == 404


def test_successful_form_post_redirects_with_the_token_intact(sandbox: Sandbox) -> None:
    payment_id = start(sandbox)
    response = page(
        sandbox, payment_id, "POST", card_number="4111 1111 1111 1111", expiry="12/28", cvv="123"
    )
    assert response.status == 303
    location = response.headers["Location"]
    assert location.startswith("https://shop.test/return?shop=7&")
    # + / \ | = are percent-encoded, so a form decoder cannot turn + into a space.
    assert "+" not in urlsplit(location).query
    params = redirect_params(location)
    assert params["shop"] == ["7"]
    assert params["order_id"] == ["CHK-1"]
    assert params["mode"] == ["test"]
    token = params["card_token"][0]
    result = verify(sandbox, "CHK-1")
    assert result["payment_status"] == "SUCCESS"
    assert result["transaction_id"] == params["transaction_id"][0]
    assert result["card_token"] == token
    assert result["card_details"] == {"card_type": "VISA", "last_4_digits": "1111"}
    assert result["client"]["name"] == "Mona"
    # The saved token can be charged.
    collect = json.dumps({"card_token": token, "order_id": "REN-1", "amount": 75.5}).encode()
    answer = sandbox.handle("POST", "/v1/payments/collect-payment", "", JSON_HEADERS, collect, BASE)
    assert answer.json()["result"]["payment_status"] == "SUCCESS"


def test_no_token_without_save_token(sandbox: Sandbox) -> None:
    location = sandbox.pay(start(sandbox, save_token=False), "4111111111111111")
    assert "card_token" not in redirect_params(location)
    assert "card_token" not in verify(sandbox, "CHK-1")


def test_declined_card_redirects_to_failure_url(sandbox: Sandbox) -> None:
    location = sandbox.pay(start(sandbox), "5555555555554444")
    assert location.startswith("https://shop.test/failed?")
    params = redirect_params(location)
    assert params["failure_description"] == ["Insufficient Funds"]
    assert params["order_id"] == ["CHK-1"]
    assert "card_token" not in params
    result = verify(sandbox, "CHK-1")
    assert result["payment_status"] == "FAILURE"
    assert result["transaction_id"] == params["transaction_id"][0]


def test_wrong_cvv_is_declined(sandbox: Sandbox) -> None:
    params = redirect_params(sandbox.pay(start(sandbox), "4111111111111111", cvv="999"))
    assert params["failure_description"] == ["Invalid CVV"]


def test_expired_card_is_declined(sandbox: Sandbox) -> None:
    location = sandbox.pay(start(sandbox), "4111111111111111", expiry="02/25")
    assert redirect_params(location)["failure_description"] == ["Expired Card"]


def test_amex_token_cannot_recur(sandbox: Sandbox) -> None:
    params = redirect_params(sandbox.pay(start(sandbox), "378282246310005"))
    token = params["card_token"][0]
    assert verify(sandbox, "CHK-1")["card_details"]["card_type"] == "AMEX"
    collect = json.dumps({"card_token": token, "order_id": "REN-2", "amount": 1}).encode()
    answer = sandbox.handle("POST", "/v1/payments/collect-payment", "", JSON_HEADERS, collect, BASE)
    assert answer.json()["result"]["description"] == "Card does not support recurring payments"


def test_token_dies_with_the_card(sandbox: Sandbox, clock: ManualClock) -> None:
    token = redirect_params(sandbox.pay(start(sandbox), "4111111111111111", expiry="04/25"))[
        "card_token"
    ][0]
    clock.set(datetime(2025, 5, 1, tzinfo=UTC))  # card expired end of April, token not yet
    collect = json.dumps({"card_token": token, "order_id": "REN-3", "amount": 1}).encode()
    answer = sandbox.handle("POST", "/v1/payments/collect-payment", "", JSON_HEADERS, collect, BASE)
    assert answer.json()["result"]["description"] == "Card token expired"


@pytest.mark.parametrize(
    ("form", "message"),
    [
        (
            {"card_number": "5555555555554440", "expiry": "12/28", "cvv": "123"},
            "Invalid card number",
        ),
        (
            {"card_number": "4111111111111111", "expiry": "13/28", "cvv": "123"},
            "Invalid expiry date",
        ),
        ({"card_number": "4111111111111111", "expiry": "12/28", "cvv": "12"}, "Invalid CVV"),
    ],
)
def test_malformed_input_reshows_the_form(
    sandbox: Sandbox, form: dict[str, str], message: str
) -> None:
    payment_id = start(sandbox)
    response = page(sandbox, payment_id, "POST", **form)
    assert response.status == 400
    assert message in response.body.decode()
    assert verify(sandbox, "CHK-1")["payment_status"] == "PENDING"
    with pytest.raises(ValueError, match=message):
        sandbox.pay(payment_id, form["card_number"], form["cvv"], expiry=form["expiry"])


def test_a_processed_payment_cannot_be_paid_again(sandbox: Sandbox) -> None:
    payment_id = start(sandbox)
    sandbox.pay(payment_id, "4111111111111111")
    assert page(sandbox, payment_id).status == 409
    repeat = page(
        sandbox, payment_id, "POST", card_number="4111111111111111", expiry="12/28", cvv="123"
    )
    assert repeat.status == 409
    assert len(sandbox.charges()) == 1


def test_without_urls_the_gateway_result_pages_are_used(sandbox: Sandbox) -> None:
    payment_id = start(sandbox, success_url=None, failure_url=None)
    location = sandbox.pay(payment_id, "4111111111111111")
    assert location.startswith(f"{BASE}/Pay/SuccessPay?")
    answer = sandbox.handle("GET", urlsplit(location).path, "", {}, b"", BASE)
    assert answer.status == 200
    failed = sandbox.pay(start(sandbox, success_url=None, failure_url=None), "5555555555554444")
    assert failed.startswith(f"{BASE}/Pay/CancelCreditCard?")


def test_pay_rejects_an_unknown_payment(sandbox: Sandbox) -> None:
    with pytest.raises(KeyError):
        sandbox.pay("NOPE", "4111111111111111")


def test_paid_checkout_is_listed_as_a_charge(sandbox: Sandbox) -> None:
    sandbox.pay(start(sandbox), "4111111111111111")
    [charge] = sandbox.charges()
    assert charge["source"] == "checkout"
    assert charge["amount"] == "75.50"
    assert charge["status"] == "SUCCESS"
