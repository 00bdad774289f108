"""Parsers and the error mapping: garbage never reads as success, loose shapes still parse."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from billing.fatora import (
    AuthenticationFailed,
    DeclineKind,
    FatoraError,
    ForeignAnswer,
    GatewayServerError,
    GatewayTimeout,
    HardDecline,
    MalformedResponse,
    OutcomeUnknown,
    Payment,
    PaymentNotFound,
    PaymentStatus,
    RateLimited,
    RequestRejected,
    SoftDecline,
    UnclearAnswer,
    Unprocessable,
    classify_decline,
    error_from_response,
    parse_payment_date,
    parse_redirect_params,
)
from billing.fatora.parsing import (
    parse_checkout,
    parse_collect,
    parse_envelope,
    parse_error_body,
    parse_payment,
    parse_refund,
    parse_retry_after,
)

TOKEN = "Ab+/Cd|Ef\\12"

VERIFY_EXAMPLE = b"""{
  "status": "SUCCESS",
  "result": {
    "order_id": "INV-2024-0001-A1",
    "transaction_id": "700123456789",
    "amount": 150.000,
    "currency": "QAR",
    "client": { "name": "Client Name", "email": "client@example.com", "phone": "+97450000000" },
    "note": "May subscription",
    "payment_date": "2024-05-01T10:15:30:123",
    "payment_status": "SUCCESS",
    "mode": "live",
    "auth_code": "123456",
    "exchange_details": { "exchange_rate": 1, "amount": 150.000 },
    "transfer_details": { "interchange_fees": 2.5, "rate": 0, "transfer_number": "TRX-1" },
    "description": "Transaction Successful - Approved",
    "card_token": "Ab+/Cd|Ef\\\\12",
    "refund_details": null,
    "card_details": { "card_type": "VISA", "last_4_digits": "1111" }
  }
}"""


def body(result: Any, status: Any = "SUCCESS", **extra: Any) -> bytes:
    data: dict[str, Any] = {"status": status, "result": result, **extra}
    return json.dumps(data).encode()


def verify_body(**fields: Any) -> bytes:
    result = {"order_id": "O-1", "payment_status": "SUCCESS", **fields}
    return body(result)


# ------------------------------------------------------------------ envelope


GARBAGE = [
    pytest.param(b"", id="empty"),
    pytest.param(b"   \n", id="whitespace"),
    pytest.param(b"<html><body>502 Bad Gateway</body></html>", id="html"),
    pytest.param(b'{"status": "SUCCESS", "result": {"order_id": "O-1"', id="truncated"),
    pytest.param(b"\xff\xfe\x00garbage", id="binary"),
    pytest.param(b"[1, 2, 3]", id="list"),
    pytest.param(b'"SUCCESS"', id="bare-string"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"result": {"payment_status": "SUCCESS"}}', id="status-missing"),
    pytest.param(b'{"status": 1, "result": {}}', id="status-number"),
    pytest.param(b'{"status": "", "result": {}}', id="status-empty"),
    pytest.param(b'{"status": "SUCCESS", "result": {"amount": NaN}}', id="nan"),
    pytest.param(b'{"status": "SUCCESS", "Status": "FAILURE"}', id="conflicting-keys"),
]


@pytest.mark.parametrize("raw", GARBAGE)
def test_garbage_envelope_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_envelope(raw)


@pytest.mark.parametrize("raw", GARBAGE)
def test_garbage_never_becomes_a_payment(raw: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_payment(raw, order_id="O-1")


def test_malformed_description_never_echoes_the_body() -> None:
    secret_page = b"<html>api_key=E4B73FEE card_token=" + TOKEN.encode() + b"</html>"
    with pytest.raises(MalformedResponse) as info:
        parse_envelope(secret_page)
    assert "E4B73FEE" not in str(info.value)
    assert TOKEN not in repr(info.value)


def test_utf8_bom_is_accepted() -> None:
    assert parse_envelope(b"\xef\xbb\xbf" + verify_body()).ok


@pytest.mark.parametrize("word", ["SUCCESS", "success", "Success", "sUcCeSs", " success "])
def test_envelope_status_any_case(word: str) -> None:
    assert parse_envelope(body({}, status=word)).ok


# ------------------------------------------------------------------ verify


def test_documented_verify_example() -> None:
    p = parse_payment(VERIFY_EXAMPLE, order_id="INV-2024-0001-A1")
    assert p.status is PaymentStatus.SUCCESS
    assert p.is_paid
    assert p.order_id == "INV-2024-0001-A1"
    assert p.transaction_id == "700123456789"
    assert p.amount == Decimal("150.000")
    assert str(p.amount) == "150.000"  # through Decimal, not float
    assert p.currency == "QAR"
    assert p.mode == "live"
    assert p.auth_code == "123456"
    assert p.description == "Transaction Successful - Approved"
    assert p.payment_date == datetime(2024, 5, 1, 10, 15, 30, 123000, tzinfo=UTC)
    assert p.card_token == TOKEN
    assert p.card_last4 == "1111"
    assert p.card_type == "VISA"
    assert p.refund_status is None
    assert p.note == "May subscription"
    assert p.decline_kind is None


def test_payment_repr_hides_card_token() -> None:
    p = parse_payment(VERIFY_EXAMPLE)
    assert TOKEN not in repr(p)
    assert "Ab+/Cd" not in repr(p)


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("SUCCESS", PaymentStatus.SUCCESS),
        ("success", PaymentStatus.SUCCESS),
        ("Success", PaymentStatus.SUCCESS),
        ("PENDING", PaymentStatus.PENDING),
        ("pending", PaymentStatus.PENDING),
        ("Pending", PaymentStatus.PENDING),
        ("FAILURE", PaymentStatus.FAILURE),
        ("failure", PaymentStatus.FAILURE),
        ("Failure", PaymentStatus.FAILURE),
    ],
)
def test_payment_status_any_case(word: str, expected: PaymentStatus) -> None:
    assert parse_payment(verify_body(payment_status=word)).status is expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(body({"order_id": "O-1"}), id="payment-status-missing"),
        pytest.param(verify_body(payment_status="PAID"), id="unknown-word"),
        pytest.param(verify_body(payment_status="APPROVED"), id="unknown-word-2"),
        pytest.param(verify_body(payment_status=""), id="empty-word"),
        pytest.param(verify_body(payment_status=1), id="number"),
        pytest.param(verify_body(payment_status=True), id="bool"),
        pytest.param(verify_body(payment_status={"value": "SUCCESS"}), id="object"),
        pytest.param(body([{"order_id": "O-1", "payment_status": "SUCCESS"}]), id="result-list"),
        pytest.param(body("SUCCESS"), id="result-string"),
        pytest.param(body(None), id="result-null"),
        pytest.param(verify_body(amount={"value": 1}), id="amount-object"),
        pytest.param(verify_body(amount=[150]), id="amount-list"),
        pytest.param(verify_body(amount=True), id="amount-bool"),
        pytest.param(verify_body(amount="abc"), id="amount-text"),
        pytest.param(verify_body(amount="Infinity"), id="amount-infinite"),
        pytest.param(verify_body(transaction_id=["7"]), id="transaction-list"),
        pytest.param(verify_body(transaction_id=1.5), id="transaction-float"),
        pytest.param(verify_body(card_token=123), id="token-number"),
        pytest.param(verify_body(card_details="VISA 1111"), id="card-details-string"),
        pytest.param(verify_body(order_id="SOMEONE-ELSE"), id="other-order"),
        pytest.param(
            json.dumps(
                {"status": "SUCCESS", "result": {"order_id": "O-1", "payment_status": "SUCCESS"}}
            ).encode()[:-1],
            id="truncated",
        ),
    ],
)
def test_unclear_verify_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_payment(raw, order_id="O-1")


def test_non_success_envelope_without_payment_is_not_a_payment() -> None:
    raw = b'{"status": "ERROR", "error": {"error_code": 404, "description": "not found"}}'
    with pytest.raises(MalformedResponse):
        parse_payment(raw)


def test_failure_envelope_carrying_a_payment_is_read() -> None:
    raw = body(
        {"order_id": "O-1", "payment_status": "FAILURE", "description": "Insufficient Funds"}
    )
    raw = raw.replace(b'"SUCCESS"', b'"FAILURE"', 1)
    p = parse_payment(raw, order_id="O-1")
    assert p.status is PaymentStatus.FAILURE
    assert p.decline_kind is DeclineKind.SOFT


def test_amount_as_string_and_integer() -> None:
    assert parse_payment(verify_body(amount="123.100")).amount == Decimal("123.100")
    assert parse_payment(verify_body(amount=" 5 ")).amount == Decimal(5)
    assert parse_payment(verify_body(amount=150)).amount == Decimal(150)
    assert parse_payment(verify_body(amount=None)).amount is None


def test_amount_keeps_every_digit() -> None:
    raw = b'{"status":"SUCCESS","result":{"order_id":"O","payment_status":"SUCCESS",'
    raw += b'"amount":0.1000000000000000055511151231257827}}'
    assert parse_payment(raw).amount == Decimal("0.1000000000000000055511151231257827")


def test_v3_key_habits() -> None:
    raw = body(
        {
            "orderId": "O-9",
            "transactionID": 700123,
            "PaymentAmount": "150.0",
            "CurrencyCode": "qar",
            "paymentDate": "2020-03-01T10:15:30",
            "Paymentstate": "SUCCESS",
            "auth": "A1",
            "Mode": "Live",
            "token": TOKEN,
            "refundstatus": "completed",
            "ExchangeRate": 0,
        }
    )
    p = parse_payment(raw, order_id="O-9")
    assert p.order_id == "O-9"
    assert p.transaction_id == "700123"
    assert p.amount == Decimal("150.0")
    assert p.currency == "QAR"
    assert p.mode == "live"
    assert p.auth_code == "A1"
    assert p.card_token == TOKEN
    assert p.refund_status == "completed"
    assert p.payment_date == datetime(2020, 3, 1, 10, 15, 30, tzinfo=UTC)


@pytest.mark.parametrize("key", ["transId", "TRANSID", "transaction_id", "TransactionId"])
def test_transaction_id_spellings(key: str) -> None:
    assert parse_payment(verify_body(**{key: "T1"})).transaction_id == "T1"


@pytest.mark.parametrize("key", ["card_token", "cardToken", "CARDTOKEN", "token"])
def test_card_token_spellings(key: str) -> None:
    assert parse_payment(verify_body(**{key: TOKEN})).card_token == TOKEN


def test_flattened_card_and_refund_details() -> None:
    p = parse_payment(
        verify_body(
            card_type="MASTERCARD",
            last_4_digits="4242",
            refund_status="completed",
            refund_transaction_id="R-1",
        )
    )
    assert (p.card_type, p.card_last4) == ("MASTERCARD", "4242")
    assert (p.refund_status, p.refund_transaction_id) == ("completed", "R-1")


def test_nested_refund_details() -> None:
    p = parse_payment(
        verify_body(refund_details={"refund_status": "pending", "refund_transaction_id": "R-2"})
    )
    assert (p.refund_status, p.refund_transaction_id) == ("pending", "R-2")


def test_last4_sent_as_number_keeps_leading_zero() -> None:
    p = parse_payment(verify_body(card_details={"last_4_digits": 123}))
    assert p.card_last4 == "0123"


def test_unknown_fields_are_ignored() -> None:
    p = parse_payment(verify_body(invoice_url="https://x", brand_new={"a": [1, 2]}, amount=1))
    assert p.amount == Decimal(1)


def test_missing_order_id_is_filled_from_the_request() -> None:
    assert parse_payment(body({"payment_status": "PENDING"}), order_id="O-7").order_id == "O-7"
    with pytest.raises(MalformedResponse):
        parse_payment(body({"payment_status": "PENDING"}))


def test_unparseable_date_is_none_not_a_crash() -> None:
    assert parse_payment(verify_body(payment_date="yesterday")).payment_date is None
    assert parse_payment(verify_body(payment_date=12345)).payment_date is None
    assert parse_payment(verify_body(payment_date="")).payment_date is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:15:30:123", datetime(2024, 5, 1, 10, 15, 30, 123000, tzinfo=UTC)),
        ("2024-05-01T10:15:30:5", datetime(2024, 5, 1, 10, 15, 30, 5000, tzinfo=UTC)),
        ("2024-05-01T10:15:30.123456", datetime(2024, 5, 1, 10, 15, 30, 123456, tzinfo=UTC)),
        ("2024-05-01T10:15:30.5", datetime(2024, 5, 1, 10, 15, 30, 500000, tzinfo=UTC)),
        ("2024-05-01T10:15:30.1234567Z", datetime(2024, 5, 1, 10, 15, 30, 123456, tzinfo=UTC)),
        ("2024-05-01T10:15:30Z", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
        ("2024-05-01 10:15:30", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
        ("2024-05-01T10:15", datetime(2024, 5, 1, 10, 15, tzinfo=UTC)),
        (
            "2024-05-01T10:15:30+03:00",
            datetime(2024, 5, 1, 10, 15, 30, tzinfo=timezone(timedelta(hours=3))),
        ),
        (
            "2024-05-01T10:15:30:123+0300",
            datetime(2024, 5, 1, 10, 15, 30, 123000, tzinfo=timezone(timedelta(hours=3))),
        ),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("", None),
        ("   ", None),
        (None, None),
        ("not a date", None),
        ("2024-13-01T10:15:30", None),
        ("2024-02-30T10:15:30:000", None),
        ("2024-05-01T25:00:00", None),
    ],
)
def test_payment_date_forms(text: str | None, expected: datetime | None) -> None:
    assert parse_payment_date(text) == expected
    if expected is not None:
        assert parse_payment_date(text).tzinfo is not None  # type: ignore[union-attr]


def test_decline_kind_of_failure_payments() -> None:
    hard = parse_payment(verify_body(payment_status="FAILURE", description="Card expired"))
    soft = parse_payment(verify_body(payment_status="FAILURE", description="Do Not Honor"))
    assert hard.decline_kind is DeclineKind.HARD
    assert soft.decline_kind is DeclineKind.SOFT


# ------------------------------------------------------------------ collect, checkout, refund


def test_collect_shapes() -> None:
    guess = body({"order_id": "O-2", "transaction_id": "T-2", "payment_status": "SUCCESS"})
    r = parse_collect(guess, order_id="O-2")
    assert (r.status, r.order_id, r.transaction_id) == (PaymentStatus.SUCCESS, "O-2", "T-2")
    assert parse_collect(body(None), order_id="O-2").status is None
    assert parse_collect(body({"transId": 7}), order_id="O-2").transaction_id == "7"
    assert (
        parse_collect(body({"status": "pending"}), order_id="O-2").status is PaymentStatus.PENDING
    )


def test_collect_pending_envelope() -> None:
    r = parse_collect(body({"transaction_id": "T"}, status="Pending"), order_id="O")
    assert (r.status, r.transaction_id) == (PaymentStatus.PENDING, "T")
    assert parse_collect(body(None, status="PENDING"), order_id="O").status is PaymentStatus.PENDING
    with pytest.raises(MalformedResponse):
        parse_collect(body({"payment_status": "SUCCESS"}, status="PENDING"), order_id="O")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(body({"payment_status": "MAYBE"}), id="unknown-word"),
        pytest.param(body({"payment_status": "SUCCESS"}, status="ERROR"), id="error-envelope"),
        pytest.param(body([1]), id="result-list"),
        pytest.param(body({"order_id": "O-other"}), id="other-order"),
        pytest.param(body({"auth_code": {"x": 1}}), id="auth-object"),
    ],
)
def test_collect_unclear_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_collect(raw, order_id="O-2")


def test_checkout_parse() -> None:
    url = "https://maktapp.credit/pay/MCPaymentPage?paymentID=AB12"
    assert parse_checkout(body({"checkout_url": url})).checkout_url == url
    assert parse_checkout(body({"CheckoutUrl": url})).checkout_url == url
    for bad in (body({}), body({"checkout_url": "javascript:alert(1)"}), body({"checkout_url": 5})):
        with pytest.raises(MalformedResponse):
            parse_checkout(bad)


def test_refund_parse() -> None:
    assert parse_refund(body({"refund_status": "completed"})).refund_status == "completed"
    assert parse_refund(body({"refundStatus": "Pending"})).refund_status == "Pending"
    nested = body({"refund_details": {"status": "completed", "transaction_id": "R"}})
    assert parse_refund(nested).refund_status == "completed"
    assert parse_refund(nested).refund_transaction_id == "R"
    assert parse_refund(body(None)).refund_status is None
    with pytest.raises(MalformedResponse):
        parse_refund(body("completed"))


# ------------------------------------------------------------------ error bodies


def test_error_as_string_and_as_object() -> None:
    s = parse_error_body(b'{"status":"ERROR","error":"Invalid API Key"}')
    assert (s.understood, s.status_word, s.error_code, s.description) == (
        True,
        "ERROR",
        None,
        "Invalid API Key",
    )
    o = parse_error_body(
        b'{"status":"FAILURE","error":{"error_code":51,"description":"Insufficient funds"}}'
    )
    assert (o.status_word, o.error_code, o.description) == ("FAILURE", "51", "Insufficient funds")
    t = parse_error_body(b'{"status":"error","Error":{"ErrorCode":"E_TOKEN","Description":"x"}}')
    assert (t.status_word, t.error_code, t.description) == ("ERROR", "E_TOKEN", "x")
    assert not parse_error_body(b"<html>oops</html>").understood
    assert not parse_error_body(b"").understood


CHARGE_CASES = [
    # Decline as HTTP 200
    (200, b'{"status":"FAILURE","error":"Insufficient funds"}', SoftDecline),
    (
        200,
        b'{"status":"FAILURE","error":{"error_code":"54","description":"Expired Card"}}',
        HardDecline,
    ),
    (200, b'{"status":"failure"}', UnclearAnswer),  # no words, no payment: unclear
    (200, b'{"status":"ERROR","error":"Do not honor"}', SoftDecline),
    (200, b'{"status":"ERROR","error":"order_id is required"}', UnclearAnswer),
    (200, b'{"status":"ERROR","error":"Invalid API Key"}', AuthenticationFailed),
    (200, b"<html>hello</html>", ForeignAnswer),
    (200, b'{"status":"FAILURE","result":{"payment_status":"FAILURE"}}', SoftDecline),
    (200, b'{"status":"PROCESSING"}', UnclearAnswer),
    (200, b'{"status":"FAILURE","error":"Merchant token expired"}', AuthenticationFailed),
    (200, b'{"status":"FAILURE","error":"Invalid API key: card declined"}', AuthenticationFailed),
    (200, b'{"status":"SUCC', MalformedResponse),
    # Decline as 4xx
    (
        400,
        b'{"status":"ERROR","error":{"error_code":1,"description":"Card token is deactivated"}}',
        HardDecline,
    ),
    (
        400,  # a bare "token" on a charge may be the merchant's key (the old API's name for it)
        b'{"status":"ERROR","error":{"error_code":1,"description":"Token is deactivated"}}',
        AuthenticationFailed,
    ),
    (400, b'{"status":"ERROR","error":"Qatar debit card cannot recur"}', HardDecline),
    (402, b'{"status":"ERROR","error":"whatever"}', SoftDecline),
    (402, b"", ForeignAnswer),
    (404, b"<html>Not Found</html>", ForeignAnswer),
    (404, b'{"status":"ERROR","error":"Route not found"}', PaymentNotFound),
    (409, b'{"status":"ERROR","error":"conflict"}', UnclearAnswer),
    (504, b"<html>504 Gateway Time-out</html>", GatewayServerError),
    (404, b'{"status":"ERROR","error":"card token not found"}', HardDecline),
    (422, b'{"status":"ERROR","error":"do_not_honor"}', SoftDecline),
    (400, b'{"status":"ERROR","error":"card_token is required"}', RequestRejected),
    (401, b'{"status":"ERROR","error":"card expired"}', AuthenticationFailed),
    (404, b'{"status":"ERROR","error":"Specified payment does not exists"}', PaymentNotFound),
    (429, b"", RateLimited),
    (500, b'{"status":"ERROR","error":"Insufficient funds"}', GatewayServerError),
]

PLAIN_CASES = [
    (200, b'{"status":"ERROR","error":"the requested payment doesn\'t found"}', PaymentNotFound),
    (200, b'{"status":"FAILURE","error":"Insufficient funds"}', UnclearAnswer),
    (404, b'{"status":"ERROR","error":"Route not found"}', UnclearAnswer),
    (404, b'{"status":"ERROR","error":{"error_code":"404"}}', UnclearAnswer),
    (200, b"{}", MalformedResponse),
    (301, b"", ForeignAnswer),
    (400, b'{"status":"ERROR","error":"Insufficient funds"}', RequestRejected),
    (400, b"<html>bad</html>", ForeignAnswer),
    (401, b'{"status":"ERROR","error":"Invalid API Key"}', AuthenticationFailed),
    (403, b"", AuthenticationFailed),
    (404, b"<html>Not Found</html>", ForeignAnswer),  # a route, not a payment
    (405, b"", ForeignAnswer),
    (406, b"", ForeignAnswer),
    (406, b'{"status":"ERROR","error":"Not Acceptable"}', RequestRejected),
    (408, b"", GatewayTimeout),
    (409, b"", ForeignAnswer),
    (415, b"", ForeignAnswer),
    (415, b'{"status":"ERROR","error":"Unsupported Media Type"}', RequestRejected),
    (422, b'{"status":"ERROR","error":"token already deactivated"}', Unprocessable),
    (429, b"", RateLimited),
    (500, b"", GatewayServerError),
    (502, b"<html>Bad Gateway</html>", GatewayServerError),
    (503, b'{"status":"ERROR"}', GatewayServerError),
    (599, b"", GatewayServerError),
]


@pytest.mark.parametrize(("status", "raw", "cls"), CHARGE_CASES)
def test_error_mapping_for_charges(status: int, raw: bytes, cls: type[FatoraError]) -> None:
    assert type(error_from_response(status, raw, charge=True)) is cls


@pytest.mark.parametrize(("status", "raw", "cls"), PLAIN_CASES)
def test_error_mapping_for_other_calls(status: int, raw: bytes, cls: type[FatoraError]) -> None:
    err = error_from_response(status, raw, charge=False)
    assert type(err) is cls
    assert err.http_status == status


def test_error_fields_and_retry_after() -> None:
    err = error_from_response(
        503,
        b'{"status":"ERROR","error":{"error_code":7,"description":"busy"}}',
        charge=True,
        retry_after_s=12.0,
    )
    assert isinstance(err, OutcomeUnknown)
    assert (err.http_status, err.error_code, err.description, err.retry_after_s) == (
        503,
        "7",
        "busy",
        12.0,
    )
    limited = error_from_response(429, b"", charge=False, retry_after_s=3.0)
    assert isinstance(limited, RateLimited)
    assert limited.retry_after_s == 3.0


def test_declined_errors_carry_their_kind() -> None:
    hard = error_from_response(400, b'{"status":"ERROR","error":"expired card token"}', charge=True)
    assert isinstance(hard, HardDecline)
    assert hard.kind is DeclineKind.HARD
    soft = error_from_response(
        200, b'{"status":"FAILURE","error":"Insufficient Funds"}', charge=True
    )
    assert isinstance(soft, SoftDecline)
    assert soft.kind is DeclineKind.SOFT


def test_error_str_and_repr_hold_only_the_four_fields() -> None:
    err = error_from_response(
        400,
        b'{"status":"ERROR","error":{"error_code":"E1","description":"Bad  \\n thing"}}',
        charge=False,
    )
    assert str(err) == "RequestRejected: http_status=400, error_code='E1', description='Bad thing'"
    assert repr(err) == "RequestRejected(http_status=400, error_code='E1', description='Bad thing')"


@pytest.mark.parametrize(
    ("description", "code", "kind"),
    [
        ("Insufficient funds", None, DeclineKind.SOFT),
        ("INSUFFICIENT FUNDS", None, DeclineKind.SOFT),
        ("Do not honor", None, DeclineKind.SOFT),
        (None, "do_not_honor", DeclineKind.SOFT),
        (None, "DO-NOT-HONOR", DeclineKind.SOFT),
        ("Transaction declined", None, DeclineKind.SOFT),
        ("Generic decline", None, DeclineKind.SOFT),
        ("Card expired", None, DeclineKind.HARD),
        (None, "expired_card", DeclineKind.HARD),
        ("Card token deactivated", None, DeclineKind.HARD),
        ("Invalid card token", None, DeclineKind.HARD),
        # A bare "token" or "expired" may be the merchant's key or the request: never a dead card.
        ("Token Expired", None, DeclineKind.SOFT),
        ("token deactivated", None, DeclineKind.SOFT),
        ("Invalid Token", None, DeclineKind.SOFT),
        (None, "INVALID_TOKEN", DeclineKind.SOFT),
        ("Request expired", None, DeclineKind.SOFT),
        ("Cardholder authentication failed", None, DeclineKind.SOFT),
        ("This card cannot recur", None, DeclineKind.HARD),
        ("Recurring not supported for this card", None, DeclineKind.HARD),
        ("Qatar Debit Card", None, DeclineKind.HARD),
        ("Declined: expired card", None, DeclineKind.HARD),
        ("Something odd happened", None, DeclineKind.SOFT),
        ("", None, DeclineKind.SOFT),
        (None, None, DeclineKind.SOFT),
        (None, "51", DeclineKind.SOFT),
    ],
)
def test_classify_decline(description: str | None, code: str | None, kind: DeclineKind) -> None:
    assert classify_decline(description, code) is kind


def test_payment_decline_kind_only_for_failures() -> None:
    p = Payment(status=PaymentStatus.PENDING, order_id="O", description="Card expired")
    assert p.decline_kind is None


# ------------------------------------------------------------------ headers


def test_retry_after() -> None:
    now = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after("Wed, 01 May 2024 10:00:45 GMT", now=now) == 45.0
    assert parse_retry_after("Wed, 01 May 2024 09:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None


# ------------------------------------------------------------------ redirects


@pytest.mark.parametrize(
    "query",
    [
        "order_id=O-1&transaction_id=T-1&card_token=TOK&mode=live",
        "orderId=O-1&transId=T-1&token=TOK&mode=Live",
        "orderid=O-1&transid=T-1&cardToken=TOK&mode=LIVE",
        "ORDERID=O-1&TRANSID=T-1&CARDTOKEN=TOK&MODE=live",
        "?OrderId=O-1&TransactionId=T-1&Token=TOK&Mode=live",
        "https://shop.example/ok?orderId=O-1&transId=T-1&token=TOK&mode=live#top",
    ],
)
def test_redirect_spellings(query: str) -> None:
    r = parse_redirect_params(query)
    assert (r.order_id, r.transaction_id, r.card_token, r.mode) == ("O-1", "T-1", "TOK", "live")
    assert r.failure_description is None


def test_redirect_failure_description() -> None:
    r = parse_redirect_params("transId=T&orderId=O&Failerdescription=Card+declined%21")
    assert r.failure_description == "Card declined!"
    assert parse_redirect_params("failure_description=x").failure_description == "x"


def test_redirect_token_is_decoded_exactly_once() -> None:
    encoded = "Ab%2B%2FCd%7CEf%5C12"
    assert parse_redirect_params(f"token={encoded}").card_token == TOKEN
    # Double-encoded stays encoded once: decoding twice could corrupt a token containing "%".
    assert parse_redirect_params("token=Ab%252B").card_token == "Ab%2B"


def test_redirect_raw_plus_in_token_stays_plus() -> None:
    assert parse_redirect_params("token=Ab+/Cd|Ef\\12").card_token == TOKEN
    assert parse_redirect_params("cardToken=a+b").card_token == "a+b"
    # ...while "+" in free text is a space, as form encoding means it.
    assert parse_redirect_params("Failerdescription=a+b").failure_description == "a b"


def test_redirect_token_hidden_from_repr() -> None:
    assert "SECRET" not in repr(parse_redirect_params("token=SECRET"))


def test_redirect_conflicts_and_garbage() -> None:
    with pytest.raises(ValueError):
        parse_redirect_params("order_id=1&orderId=2")
    same = parse_redirect_params("order_id=1&orderId=1&&junk&=x&unknown=y")
    assert same.order_id == "1"
    empty = parse_redirect_params("")
    assert (empty.order_id, empty.card_token, empty.mode) == (None, None, None)
    with pytest.raises(ValueError):
        parse_redirect_params("token=%FF%FE")  # not UTF-8: a token cannot be guessed at
