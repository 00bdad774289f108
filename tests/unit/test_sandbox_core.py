"""The sandbox gateway's state machine, endpoint by endpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from billing.config import FATORA_SAMPLE_API_KEY
from billing.fatora.sandbox import BEHAVIOURS, ManualClock, Sandbox, SandboxResponse, add_months

BASE = "http://gateway.test"
KEY = FATORA_SAMPLE_API_KEY


def call(
    sandbox: Sandbox,
    path: str,
    payload: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    query: str = "",
) -> SandboxResponse:
    sent = {"api_key": KEY, "Content-Type": "application/json", "Accept": "application/json"}
    if headers is not None:
        sent = headers
    raw = body if body is not None else json.dumps(payload).encode() if payload is not None else b""
    return sandbox.handle(method, path, query, sent, raw, BASE)


def checkout(sandbox: Sandbox, **overrides: Any) -> SandboxResponse:
    payload: dict[str, Any] = {
        "amount": 150.0,
        "currency": "QAR",
        "order_id": "ORD-1",
        "client": {"name": "Ali", "email": "ali@example.com", "phone": "+97450000000"},
        "language": "en",
        "success_url": "https://shop.test/ok",
        "failure_url": "https://shop.test/fail",
        "save_token": True,
        "note": "May",
    }
    payload.update(overrides)
    return call(sandbox, "/v1/payments/checkout", payload)


def collect(
    sandbox: Sandbox, token: str, order_id: str, amount: str = "100.00", **extra: Any
) -> SandboxResponse:
    body = f'{{"card_token": {json.dumps(token)}, "order_id": "{order_id}", "amount": {amount}'
    for key, value in extra.items():
        body += f", {json.dumps(key)}: {json.dumps(value)}"
    return call(sandbox, "/v1/payments/collect-payment", body=(body + "}").encode())


def verify(sandbox: Sandbox, order_id: str, transaction_id: str | None = None) -> SandboxResponse:
    payload = {"order_id": order_id}
    if transaction_id is not None:
        payload["transaction_id"] = transaction_id
    return call(sandbox, "/v1/payments/verify", payload)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2025, 1, 31, 10, 0, tzinfo=UTC))


@pytest.fixture
def sandbox(clock: ManualClock) -> Sandbox:
    return Sandbox(now=clock, seed=7)


# --------------------------------------------------------------------------- common rules


def test_missing_or_wrong_key_is_401_with_object_error(sandbox: Sandbox) -> None:
    for headers in (
        {"Content-Type": "application/json"},
        {"api_key": "nope", "Content-Type": "application/json"},
    ):
        response = call(sandbox, "/v1/payments/verify", {"order_id": "x"}, headers=headers)
        assert response.status == 401
        assert response.json() == {
            "status": "ERROR",
            "error": {"error_code": "401", "description": "Invalid API Key"},
        }


def test_error_style_string(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, error_style="string")
    response = call(sandbox, "/v1/payments/verify", {"order_id": "x"}, headers={})
    assert response.status == 401
    assert response.json() == {"status": "ERROR", "error": "Invalid API Key"}
    missing = call(sandbox, "/v1/payments/verify", {"order_id": "nope"})
    assert missing.json() == {"status": "ERROR", "error": "Specified payment does not exists"}


def test_inactive_key_is_403(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, inactive_api_keys=["OLD-KEY"])
    headers = {"api_key": "OLD-KEY", "Content-Type": "application/json"}
    response = call(sandbox, "/v1/payments/verify", {"order_id": "x"}, headers=headers)
    assert response.status == 403


def test_header_names_are_case_insensitive(sandbox: Sandbox) -> None:
    headers = {"API_KEY": KEY, "content-type": "application/json; charset=utf-8"}
    assert call(sandbox, "/v1/payments/verify", {"order_id": "x"}, headers=headers).status == 404


def test_accept_excluding_json_is_406(sandbox: Sandbox) -> None:
    base = {"api_key": KEY, "Content-Type": "application/json"}
    for accept in ("text/html", "application/xml, text/*", "application/json;q=0"):
        response = call(
            sandbox, "/v1/payments/verify", {"order_id": "x"}, headers={**base, "Accept": accept}
        )
        assert response.status == 406, accept
    for accept in ("*/*", "application/*", "text/html, application/json;q=0.5", ""):
        response = call(
            sandbox, "/v1/payments/verify", {"order_id": "x"}, headers={**base, "Accept": accept}
        )
        assert response.status == 404, accept


def test_non_json_content_type_or_body_is_415(sandbox: Sandbox) -> None:
    form = {"api_key": KEY, "Content-Type": "application/x-www-form-urlencoded"}
    assert call(sandbox, "/v1/payments/verify", body=b"order_id=x", headers=form).status == 415
    assert call(sandbox, "/v1/payments/verify", body=b"{not json").status == 415
    assert call(sandbox, "/v1/payments/verify", body=b"").status == 415


def test_json_that_is_not_an_object_is_400(sandbox: Sandbox) -> None:
    assert call(sandbox, "/v1/payments/verify", [1, 2]).status == 400


def test_wrong_method_and_unknown_path(sandbox: Sandbox) -> None:
    assert call(sandbox, "/v1/payments/verify", method="GET").status == 405
    assert call(sandbox, "/v1/payments/nothing", {}).status == 404
    # Only the documented /v1 prefix is served.
    assert call(sandbox, "/payments/verify", {"order_id": "x"}).status == 404


# ------------------------------------------------------------------------------- checkout


def test_checkout_returns_hosted_page_url(sandbox: Sandbox) -> None:
    response = checkout(sandbox)
    assert response.status == 200
    body = response.json()
    assert body["status"] == "SUCCESS"
    assert body["result"]["checkout_url"].startswith(f"{BASE}/pay/MCPaymentPage?paymentID=")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"order_id": None}, "order_id is required"),
        ({"order_id": "  "}, "order_id is required"),
        ({"amount": None}, "amount is required"),
        ({"currency": None}, "currency is required"),
        ({"client": None}, "client is required"),
        ({"client": {"email": "a@b.c"}}, "client.name is required"),
        ({"client": {"name": "A"}}, "client.email is required"),
        ({"language": "fr"}, "language must be en or ar"),
        ({"success_url": "javascript:alert(1)"}, "success_url must be an http(s) URL"),
        ({"save_token": "yes"}, "save_token must be a boolean"),
        ({"currency": "XYZ"}, "Invalid currency 'XYZ'"),
    ],
)
def test_checkout_validation_is_400(
    sandbox: Sandbox, overrides: dict[str, Any], message: str
) -> None:
    response = checkout(sandbox, **overrides)
    assert response.status == 400
    assert response.json()["error"] == {"error_code": "400", "description": message}


@pytest.mark.parametrize(
    ("amount", "currency", "ok"),
    [
        ("123.100", "QAR", True),  # the docs' sample: trailing zeros are fine
        ("123.45", "USD", True),
        ("123.456", "QAR", False),
        ("1.234", "KWD", True),
        ("1.5", "JPY", False),
        ("0", "QAR", False),
        ("-5", "QAR", False),
        ('"99.50"', "QAR", True),  # a numeric string is tolerated
        ('"abc"', "QAR", False),
        ("true", "QAR", False),
    ],
)
def test_amount_precision_follows_the_currency(
    sandbox: Sandbox, amount: str, currency: str, ok: bool
) -> None:
    token = sandbox.issue_token("success", currency=currency)
    response = collect(sandbox, token, "A-1", amount, currency=currency)
    assert (response.status == 200) is ok, response.body


def test_amounts_are_never_floats(sandbox: Sandbox) -> None:
    token = sandbox.issue_token()
    assert collect(sandbox, token, "A-1", "0.10").status == 200
    assert collect(sandbox, token, "A-2", "0.20").status == 200
    body = verify(sandbox, "A-2").body
    assert b'"amount":0.20' in body
    total = sum(Decimal(c["amount"]) for c in sandbox.charges())
    assert total == Decimal("0.30")


def test_restricted_currencies_are_422(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, currencies=["QAR"])
    assert checkout(sandbox, currency="USD").status == 422
    assert checkout(sandbox, currency="qar").status == 200


# -------------------------------------------------------------------------------- collect


def test_collect_success_then_verify(sandbox: Sandbox) -> None:
    token = sandbox.issue_token("success")
    response = collect(sandbox, token, "SUB-1", "99.5")
    assert response.status == 200
    result = response.json()["result"]
    assert result["payment_status"] == "SUCCESS"
    assert result["order_id"] == "SUB-1"
    assert b'"amount":99.50' in response.body
    verified = verify(sandbox, "SUB-1", result["transaction_id"]).json()["result"]
    assert verified["payment_status"] == "SUCCESS"
    assert verified["transaction_id"] == result["transaction_id"]
    assert verified["mode"] == "test"
    assert verified["card_token"] == token
    assert verified["currency"] == "QAR"
    assert verified["auth_code"] and len(verified["auth_code"]) == 6
    assert verified["refund_details"] is None
    assert verified["card_details"] == {"card_type": "VISA", "last_4_digits": "1111"}
    assert verified["payment_date"] == "2025-01-31T10:00:00:000"


def test_collect_missing_fields_is_400(sandbox: Sandbox) -> None:
    for payload in (
        {"order_id": "x", "amount": 1},
        {"card_token": "t", "amount": 1},
        {"card_token": "t", "order_id": "x"},
    ):
        assert call(sandbox, "/v1/payments/collect-payment", payload).status == 400


def test_amount_style_string(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, amount_style="string")
    token = sandbox.issue_token()
    response = collect(sandbox, token, "S-1", "10")
    assert response.json()["result"]["amount"] == "10.00"
    assert verify(sandbox, "S-1").json()["result"]["amount"] == "10.00"


@pytest.mark.parametrize(
    ("behaviour", "description", "code"),
    [
        ("insufficient_funds", "Insufficient Funds", "51"),
        ("do_not_honor", "Do Not Honor", "05"),
        ("expired_token", "Card token expired", "54"),
        ("card_cannot_recur", "Card does not support recurring payments", "57"),
    ],
)
def test_declines_in_both_styles(
    clock: ManualClock, behaviour: str, description: str, code: str
) -> None:
    http200 = Sandbox(now=clock)
    response = collect(http200, http200.issue_token(behaviour), "D-1")
    assert response.status == 200
    body = response.json()
    assert body["status"] == "FAILURE"
    assert body["result"]["payment_status"] == "FAILURE"
    assert body["result"]["description"] == description
    assert body["result"]["order_id"] == "D-1"
    assert verify(http200, "D-1").json()["result"]["payment_status"] == "FAILURE"

    http4xx = Sandbox(now=clock, decline_style="http4xx")
    response = collect(http4xx, http4xx.issue_token(behaviour), "D-1")
    assert response.status == 400
    assert response.json() == {
        "status": "ERROR",
        "error": {"error_code": code, "description": description},
    }
    assert verify(http4xx, "D-1").json()["result"]["payment_status"] == "FAILURE"


def test_unknown_token_is_a_hard_decline(sandbox: Sandbox) -> None:
    body = collect(sandbox, "no-such-token", "U-1").json()
    assert body["result"]["description"] == "Invalid card token"


def test_token_expires_six_months_after_issue(sandbox: Sandbox, clock: ManualClock) -> None:
    token = sandbox.issue_token("success")  # issued 31 Jan: expires 31 Jul
    clock.advance(months=6, delta=-timedelta(seconds=1))
    assert collect(sandbox, token, "E-1").json()["result"]["payment_status"] == "SUCCESS"
    clock.advance(timedelta(seconds=1))
    body = collect(sandbox, token, "E-2").json()
    assert body["status"] == "FAILURE"
    assert body["result"]["description"] == "Card token expired"


def test_token_issued_in_the_past_via_helper(sandbox: Sandbox) -> None:
    response = call(
        sandbox,
        "/__sandbox/tokens",
        {"behaviour": "success", "issued_at": "2024-07-01T00:00:00+00:00"},
    )
    assert response.status == 201
    body = response.json()
    assert body["expires_at"] == "2025-01-01T00:00:00+00:00"
    assert collect(sandbox, body["card_token"], "P-1").json()["status"] == "FAILURE"


def test_helper_rejects_unknown_behaviour(sandbox: Sandbox) -> None:
    assert call(sandbox, "/__sandbox/tokens", {"behaviour": "lucky"}).status == 400
    with pytest.raises(ValueError, match="unknown behaviour"):
        sandbox.issue_token("lucky")


def test_add_months_clamps_the_day() -> None:
    assert add_months(datetime(2025, 8, 31, tzinfo=UTC), 6) == datetime(2026, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2023, 8, 31, tzinfo=UTC), 6) == datetime(2024, 2, 29, tzinfo=UTC)
    assert add_months(datetime(2025, 11, 5, tzinfo=UTC), 3) == datetime(2026, 2, 5, tzinfo=UTC)


def test_tokens_contain_the_awkward_characters(sandbox: Sandbox) -> None:
    for behaviour in BEHAVIOURS:
        token = sandbox.issue_token(behaviour)
        assert all(char in token for char in "+/\\|="), token


def test_token_survives_a_json_round_trip(sandbox: Sandbox) -> None:
    token = sandbox.issue_token()
    response = call(
        sandbox,
        "/v1/payments/collect-payment",
        {"card_token": token, "order_id": "J-1", "amount": 5},
    )
    assert response.json()["result"]["payment_status"] == "SUCCESS"
    # A token mangled the classic way (+ read as a space) is unknown to the gateway.
    mangled = collect(sandbox, token.replace("+", " "), "J-2").json()
    assert mangled["result"]["description"] == "Invalid card token"


def test_pending_then_success(sandbox: Sandbox) -> None:
    token = sandbox.issue_token("pending_then_success")
    result = collect(sandbox, token, "PN-1").json()["result"]
    assert result["payment_status"] == "PENDING"
    statuses = [verify(sandbox, "PN-1").json()["result"]["payment_status"] for _ in range(4)]
    assert statuses == ["PENDING", "PENDING", "SUCCESS", "SUCCESS"]


def test_pending_verifies_is_configurable(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, pending_verifies=0)
    collect(sandbox, sandbox.issue_token("pending_then_success"), "PN-0")
    assert verify(sandbox, "PN-0").json()["result"]["payment_status"] == "SUCCESS"


def test_timeout_after_charge_charges_every_time(sandbox: Sandbox) -> None:
    token = sandbox.issue_token("timeout_after_charge")
    first = collect(sandbox, token, "T-1")
    assert first.hang
    second = collect(sandbox, token, "T-1")
    assert second.hang
    charges = [c for c in sandbox.charges() if c["order_id"] == "T-1"]
    assert [c["status"] for c in charges] == ["SUCCESS", "SUCCESS"]
    assert verify(sandbox, "T-1").json()["result"]["payment_status"] == "SUCCESS"


def test_server_error_before_charge_takes_nothing(sandbox: Sandbox) -> None:
    token = sandbox.issue_token("server_error_before_charge")
    response = collect(sandbox, token, "SE-1")
    assert response.status == 503
    assert response.json()["status"] == "ERROR"
    assert sandbox.charges() == []
    assert verify(sandbox, "SE-1").status == 404
    assert collect(sandbox, token, "SE-2").json()["result"]["payment_status"] == "SUCCESS"


def test_rate_limited_before_charge(sandbox: Sandbox) -> None:
    token = sandbox.issue_token("rate_limited_before_charge")
    response = collect(sandbox, token, "RL-1")
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    assert sandbox.charges() == []
    assert collect(sandbox, token, "RL-1").status == 200


@pytest.mark.parametrize("behaviour", ["garbled_after_charge", "html_after_charge"])
def test_garbage_after_charge(sandbox: Sandbox, behaviour: str) -> None:
    response = collect(sandbox, sandbox.issue_token(behaviour), "G-1")
    assert response.status == 200
    with pytest.raises(ValueError):
        json.loads(response.body)
    assert verify(sandbox, "G-1").json()["result"]["payment_status"] == "SUCCESS"


def test_collect_defaults_to_the_token_currency(sandbox: Sandbox) -> None:
    token = sandbox.issue_token(currency="USD")
    assert collect(sandbox, token, "C-1", "1.5").json()["result"]["currency"] == "USD"
    assert (
        collect(sandbox, token, "C-2", "1.5", currency="QAR").json()["result"]["currency"] == "QAR"
    )


# --------------------------------------------------------------------------------- verify


def test_verify_unknown_order_is_404(sandbox: Sandbox) -> None:
    response = verify(sandbox, "nope")
    assert response.status == 404
    assert response.json() == {
        "status": "ERROR",
        "error": {"error_code": "404", "description": "Specified payment does not exists"},
    }


def test_verify_requires_order_id(sandbox: Sandbox) -> None:
    assert call(sandbox, "/v1/payments/verify", {"transaction_id": "1"}).status == 400


def test_duplicate_order_ids_are_accepted(sandbox: Sandbox) -> None:
    ok = sandbox.issue_token("success")
    poor = sandbox.issue_token("insufficient_funds")
    first = collect(sandbox, ok, "DUP", "10").json()["result"]["transaction_id"]
    second = collect(sandbox, poor, "DUP", "20").json()["result"]["transaction_id"]
    assert first != second
    latest = verify(sandbox, "DUP").json()["result"]
    assert latest["transaction_id"] == second
    assert latest["payment_status"] == "FAILURE"
    exact = verify(sandbox, "DUP", first).json()["result"]
    assert exact["payment_status"] == "SUCCESS"
    assert exact["amount"] == 10
    assert verify(sandbox, "DUP", "700000000000").status == 404
    assert verify(sandbox, "OTHER", first).status == 404


def test_verify_of_an_unpaid_checkout_is_pending(sandbox: Sandbox) -> None:
    checkout(sandbox, order_id="CO-1")
    result = verify(sandbox, "CO-1").json()["result"]
    assert result["payment_status"] == "PENDING"
    assert result["transaction_id"] is None
    assert result["payment_date"] == ""
    assert "card_token" not in result


# --------------------------------------------------------------------------------- refund


@pytest.mark.parametrize("path", ["/v1/payments/refund", "/api/v1/payments/refund"])
def test_refund_once(sandbox: Sandbox, path: str) -> None:
    token = sandbox.issue_token()
    txn = collect(sandbox, token, "R-1", "40").json()["result"]["transaction_id"]
    response = call(sandbox, path, {"transaction_id": txn, "order_id": "R-1"})
    assert response.status == 200
    assert response.json() == {"status": "SUCCESS", "result": {"refund_status": "completed"}}
    details = verify(sandbox, "R-1", txn).json()["result"]["refund_details"]
    assert details["refund_status"] == "completed"
    assert details["refund_type"] == "reversal"
    assert details["amount"] == 40
    again = call(sandbox, path, {"transaction_id": txn, "order_id": "R-1"})
    assert again.status == 422


def test_refund_after_midnight_gmt_is_a_refund(sandbox: Sandbox, clock: ManualClock) -> None:
    txn = collect(sandbox, sandbox.issue_token(), "R-2").json()["result"]["transaction_id"]
    clock.advance(timedelta(days=1))
    call(sandbox, "/v1/payments/refund", {"transaction_id": txn, "order_id": "R-2"})
    details = verify(sandbox, "R-2").json()["result"]["refund_details"]
    assert details["refund_type"] == "refund"


def test_refund_errors(sandbox: Sandbox) -> None:
    refund = "/v1/payments/refund"
    assert call(sandbox, refund, {"order_id": "x"}).status == 400
    assert call(sandbox, refund, {"transaction_id": "1", "order_id": "x"}).status == 404
    txn = collect(sandbox, sandbox.issue_token("do_not_honor"), "R-3").json()["result"][
        "transaction_id"
    ]
    assert call(sandbox, refund, {"transaction_id": txn, "order_id": "R-3"}).status == 422
    good = collect(sandbox, sandbox.issue_token(), "R-4").json()["result"]["transaction_id"]
    assert call(sandbox, refund, {"transaction_id": good, "order_id": "R-3"}).status == 404


# ----------------------------------------------------------------------------- deactivate


def test_deactivate_token(sandbox: Sandbox) -> None:
    token = sandbox.issue_token()
    path = "/v1/payments/deactivate-token"
    first = call(sandbox, path, {"card_token": token})
    assert first.status == 200
    assert first.json()["status"] == "SUCCESS"
    assert call(sandbox, path, {"card_token": token}).status == 422
    assert call(sandbox, path, {"card_token": "unknown"}).status == 404
    assert call(sandbox, path, {}).status == 400
    body = collect(sandbox, token, "DA-1").json()
    assert body["result"]["description"] == "Card token deactivated"


# -------------------------------------------------------------------------------- helpers


def test_charges_listing_and_reset(sandbox: Sandbox) -> None:
    collect(sandbox, sandbox.issue_token(), "L-1", "12.5")
    collect(sandbox, sandbox.issue_token("insufficient_funds"), "L-2", "3")
    response = call(sandbox, "/__sandbox/charges", method="GET", headers={})
    charges = response.json()["charges"]
    assert [(c["order_id"], c["amount"], c["status"]) for c in charges] == [
        ("L-1", "12.50", "SUCCESS"),
        ("L-2", "3.00", "FAILURE"),
    ]
    assert charges[1]["behaviour"] == "insufficient_funds"
    assert set(charges[0]) >= {
        "order_id",
        "transaction_id",
        "amount",
        "currency",
        "status",
        "behaviour",
        "created_at",
    }
    only = call(sandbox, "/__sandbox/charges", method="GET", headers={}, query="order_id=L-2")
    assert len(only.json()["charges"]) == 1
    assert call(sandbox, "/__sandbox/reset", headers={}).status == 200
    assert sandbox.charges() == []
    health = call(sandbox, "/__sandbox/health", method="GET", headers={})
    assert health.json()["status"] == "ok"


def test_constructor_rejects_unknown_styles() -> None:
    with pytest.raises(ValueError):
        Sandbox(decline_style="http500")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Sandbox(pending_verifies=-1)


def test_constructor_rejects_negative_delays_and_unknown_routes() -> None:
    with pytest.raises(ValueError):
        Sandbox(land_delay_s=-1)
    with pytest.raises(ValueError):
        Sandbox(verify_lag_s=-0.5)
    with pytest.raises(ValueError, match="unknown route"):
        Sandbox(broken_routes=["collect"])


# ------------------------------------------------------------------ ambiguous answers


class FakeMonotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


@pytest.fixture
def ticks() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
def lagging(clock: ManualClock, ticks: FakeMonotonic) -> Sandbox:
    return Sandbox(now=clock, monotonic=ticks, land_delay_s=2.0, verify_lag_s=3.0, seed=7)


def successes(sandbox: Sandbox, order_id: str) -> list[dict[str, Any]]:
    return [c for c in sandbox.charges() if c["order_id"] == order_id and c["status"] == "SUCCESS"]


def assert_landed(sandbox: Sandbox, order_id: str, token: str) -> None:
    [charge] = sandbox.charges()
    assert (charge["order_id"], charge["amount"], charge["currency"]) == (order_id, "25.00", "QAR")
    assert charge["status"] == "SUCCESS"
    assert charge["source"] == "collect"
    assert charge["card_token"] == token
    result = verify(sandbox, order_id).json()["result"]
    assert result["payment_status"] == "SUCCESS"
    assert result["transaction_id"] == charge["transaction_id"]
    assert result["amount"] == 25
    assert result["card_token"] == token
    assert result["auth_code"] and len(result["auth_code"]) == 6
    # The sandbox's own clock, not the monotonic one, dates the approval.
    assert result["payment_date"] == "2025-01-31T10:00:00:000"


def test_edge_504_then_the_charge_lands(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    token = lagging.issue_token("edge_504_lands_later")
    response = collect(lagging, token, "E5-1", "25")
    assert response.status == 504
    assert response.headers["Content-Type"].startswith("text/html")
    assert b"<h1>504 Gateway Time-out</h1>" in response.body
    assert not response.hang
    assert lagging.charges() == []
    assert verify(lagging, "E5-1").status == 404
    ticks.advance(1.999)
    assert verify(lagging, "E5-1").status == 404
    assert lagging.charges() == []
    ticks.advance(0.001)
    assert_landed(lagging, "E5-1", token)


def test_edge_504_every_collect_lands_once(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    token = lagging.issue_token("edge_504_lands_later")
    assert collect(lagging, token, "E5-2", "25").status == 504
    ticks.advance(1)
    assert collect(lagging, token, "E5-3", "25").status == 504
    ticks.advance(1)
    assert [c["order_id"] for c in lagging.charges()] == ["E5-2"]
    ticks.advance(1)
    assert [c["order_id"] for c in lagging.charges()] == ["E5-2", "E5-3"]
    ticks.advance(60)
    assert len(lagging.charges()) == 2


def test_timeout_then_the_charge_lands(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    token = lagging.issue_token("timeout_lands_later")
    response = collect(lagging, token, "TL-1", "25")
    assert response.hang
    # What a served client gets if it outwaits the hang: the edge's own timeout page.
    assert response.status == 504
    assert response.headers["Content-Type"].startswith("text/html")
    assert lagging.charges() == []
    assert verify(lagging, "TL-1").status == 404
    ticks.advance(2)
    assert_landed(lagging, "TL-1", token)


def test_landing_is_applied_by_any_request(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    token = lagging.issue_token("timeout_lands_later")
    collect(lagging, token, "TL-2", "25")
    ticks.advance(5)
    health = call(lagging, "/__sandbox/health", method="GET", headers={})
    assert health.status == 200
    listed = call(lagging, "/__sandbox/charges", method="GET", headers={}, query="order_id=TL-2")
    assert [c["status"] for c in listed.json()["charges"]] == ["SUCCESS"]


def test_a_dead_token_is_declined_at_once_not_deferred(lagging: Sandbox) -> None:
    token = lagging.issue_token("edge_504_lands_later")
    call(lagging, "/v1/payments/deactivate-token", {"card_token": token})
    body = collect(lagging, token, "DT-1").json()
    assert body["result"]["description"] == "Card token deactivated"
    assert [c["status"] for c in lagging.charges()] == ["FAILURE"]


def test_reset_drops_charges_still_to_land(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    collect(lagging, lagging.issue_token("edge_504_lands_later"), "RS-1")
    lagging.reset()
    ticks.advance(10)
    assert lagging.charges() == []
    assert verify(lagging, "RS-1").status == 404


def test_land_delay_defaults_to_one_second(clock: ManualClock, ticks: FakeMonotonic) -> None:
    sandbox = Sandbox(now=clock, monotonic=ticks)
    collect(sandbox, sandbox.issue_token("edge_504_lands_later"), "D-1")
    ticks.advance(0.9)
    assert sandbox.charges() == []
    ticks.advance(0.1)
    assert len(successes(sandbox, "D-1")) == 1


def test_verify_lags_behind_the_charge(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    token = lagging.issue_token("verify_lags")
    response = collect(lagging, token, "VL-1", "25")
    assert response.status == 200
    result = response.json()["result"]
    assert result["payment_status"] == "SUCCESS"
    # The money is taken at once; only verify is behind.
    assert len(successes(lagging, "VL-1")) == 1
    missing = verify(lagging, "VL-1")
    assert missing.status == 404
    assert missing.json() == {
        "status": "ERROR",
        "error": {"error_code": "404", "description": "Specified payment does not exists"},
    }
    assert verify(lagging, "VL-1", result["transaction_id"]).status == 404
    ticks.advance(2.999)
    assert verify(lagging, "VL-1").status == 404
    ticks.advance(0.001)
    assert_landed(lagging, "VL-1", token)


@pytest.mark.parametrize(
    ("behaviour", "body"),
    [
        ("approved_shape", {"status": "SUCCESS", "result": {"status": "APPROVED"}}),
        ("processing", {"status": "PROCESSING"}),
        (
            "error_envelope_after_charge",
            {
                "status": "ERROR",
                "error": {
                    "error_code": "E500",
                    "description": "Unexpected error, please contact support",
                },
            },
        ),
    ],
)
def test_odd_envelopes_after_charge(lagging: Sandbox, behaviour: str, body: dict[str, Any]) -> None:
    token = lagging.issue_token(behaviour)
    response = collect(lagging, token, "OE-1", "25")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == body
    assert_landed(lagging, "OE-1", token)


def test_error_envelope_after_charge_follows_error_style(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, error_style="string")
    response = collect(sandbox, sandbox.issue_token("error_envelope_after_charge"), "OE-2")
    assert response.status == 200
    assert response.json() == {
        "status": "ERROR",
        "error": "Unexpected error, please contact support",
    }


def test_server_error_always_takes_nothing(lagging: Sandbox, ticks: FakeMonotonic) -> None:
    token = lagging.issue_token("server_error_always")
    for _ in range(3):
        response = collect(lagging, token, "SA-1")
        assert response.status == 503
        assert response.json() == {
            "status": "ERROR",
            "error": {"error_code": "503", "description": "Service Unavailable"},
        }
        ticks.advance(10)
    assert lagging.charges() == []
    assert verify(lagging, "SA-1").status == 404


@pytest.mark.parametrize(
    ("behaviour", "body"),
    [
        ("invalid_api_key_envelope", {"status": "FAILURE", "error": "Invalid API Key"}),
        (
            "merchant_token_expired",
            {
                "status": "FAILURE",
                "result": {"payment_status": "FAILURE", "description": "Merchant token expired"},
            },
        ),
    ],
)
def test_merchant_failures_in_a_200_take_nothing(
    lagging: Sandbox, ticks: FakeMonotonic, behaviour: str, body: dict[str, Any]
) -> None:
    token = lagging.issue_token(behaviour)
    response = collect(lagging, token, "MF-1", "25")
    assert response.status == 200
    assert response.json() == body
    ticks.advance(60)
    assert lagging.charges() == []
    assert verify(lagging, "MF-1").status == 404


# ------------------------------------------------------------------------- broken routes


def assert_edge_404(response: SandboxResponse) -> None:
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.body == b"<html><body><h1>404 Not Found</h1></body></html>"


def test_broken_routes_answer_html_404_and_change_nothing(clock: ManualClock) -> None:
    sandbox = Sandbox(now=clock, broken_routes=["collect-payment", "checkout"])
    assert sandbox.broken_routes == {"collect-payment", "checkout"}
    token = sandbox.issue_token("success")
    assert_edge_404(collect(sandbox, token, "BR-1"))
    assert_edge_404(checkout(sandbox, order_id="BR-2"))
    assert sandbox.charges() == []
    assert verify(sandbox, "BR-1").status == 404
    assert verify(sandbox, "BR-2").status == 404
    # The token was never seen: a later collect is its first.
    sandbox.broken_routes.clear()
    assert collect(sandbox, token, "BR-1").json()["result"]["payment_status"] == "SUCCESS"


def test_a_broken_route_answers_before_the_key_and_method_checks(sandbox: Sandbox) -> None:
    sandbox.broken_routes.add("verify")
    assert_edge_404(call(sandbox, "/v1/payments/verify", {"order_id": "x"}, headers={}))
    assert_edge_404(call(sandbox, "/v1/payments/verify", method="GET"))
    # Other routes are untouched.
    assert call(sandbox, "/v1/payments/checkout", {}, headers={}).status == 401


@pytest.mark.parametrize("path", ["/v1/payments/refund", "/api/v1/payments/refund"])
def test_broken_refund_covers_both_paths(sandbox: Sandbox, path: str) -> None:
    txn = collect(sandbox, sandbox.issue_token(), "BF-1").json()["result"]["transaction_id"]
    sandbox.broken_routes.add("refund")
    assert_edge_404(call(sandbox, path, {"transaction_id": txn, "order_id": "BF-1"}))
    assert verify(sandbox, "BF-1").json()["result"]["refund_details"] is None
    sandbox.broken_routes.discard("refund")
    assert call(sandbox, path, {"transaction_id": txn, "order_id": "BF-1"}).status == 200


def test_faults_endpoint_replaces_the_broken_routes(sandbox: Sandbox) -> None:
    faults = "/__sandbox/faults"
    response = call(sandbox, faults, {"broken_routes": ["verify", "refund"]}, headers={})
    assert response.status == 200
    assert response.json() == {"status": "ok", "broken_routes": ["refund", "verify"]}
    assert sandbox.broken_routes == {"verify", "refund"}
    assert_edge_404(verify(sandbox, "x"))
    replaced = call(sandbox, faults, {"broken_routes": ["checkout"]}, headers={})
    assert replaced.json()["broken_routes"] == ["checkout"]
    assert verify(sandbox, "x").status == 404
    assert verify(sandbox, "x").headers["Content-Type"].startswith("application/json")
    current = call(sandbox, faults, method="GET", headers={})
    assert current.json() == {"status": "ok", "broken_routes": ["checkout"]}
    cleared = call(sandbox, faults, {"broken_routes": []}, headers={})
    assert cleared.json()["broken_routes"] == []
    assert sandbox.broken_routes == set()


@pytest.mark.parametrize(
    "payload",
    [{"broken_routes": ["verify", "collect"]}, {"broken_routes": "verify"}, {}, {"x": [1]}],
)
def test_faults_endpoint_rejects_bad_input(sandbox: Sandbox, payload: dict[str, Any]) -> None:
    sandbox.broken_routes.add("checkout")
    response = call(sandbox, "/__sandbox/faults", payload, headers={})
    assert response.status == 400
    assert sandbox.broken_routes == {"checkout"}


def test_reset_keeps_broken_routes(sandbox: Sandbox) -> None:
    sandbox.broken_routes.add("verify")
    assert call(sandbox, "/__sandbox/reset", headers={}).status == 200
    assert sandbox.broken_routes == {"verify"}
