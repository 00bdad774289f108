"""Every answer of the gateway corpus through the real client, on collect and on verify.

The corpus (``tests/corpus``) holds what a gateway, an edge or a wrong URL can send back. Each
answer, on each call, must end in a result or in a ``FatoraError`` whose class the answer
table knows: never another exception. A verify result counts as paid only when the answer,
read on its own, confirms the order id, the amount, the currency and the live mode. A collect
answer is read as "no money moved" only when Fatora's own envelope says so (or the key was
refused): never when its body reports a success.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing.attempts import Expected, payment_mismatch
from billing.fatora.answers import Call, Money, verdict
from billing.fatora.client import FatoraClient
from billing.fatora.errors import MAX_DESCRIPTION, FatoraError
from billing.fatora.types import PaymentStatus
from tests.corpus.answers import Answer, confirms, everything, values_for

KEY = "K3Y-5ecret-0000-1111-2222"
TOKEN = "Ab+/Cd|Ef\\12"
ORDER = "S7-20260131090000-1"
AMOUNT = Decimal("50.00")
VALUES = values_for(ORDER, "T-7", AMOUNT, "QAR")
ANSWERS = everything()


def _client(answer: Answer) -> FatoraClient:
    transport = httpx.MockTransport(lambda request: answer.response(VALUES))
    return FatoraClient("https://api.fatora.io/v1", KEY, mode="live", transport=transport, cap=None)


def _ask(answer: Answer, call: Call) -> Any:
    with _client(answer) as client:
        if call is Call.COLLECT:
            return client.collect_payment(TOKEN, ORDER, AMOUNT, "QAR")
        return client.verify(ORDER)


def _params() -> list[Any]:
    return [pytest.param(answer, id=answer.name) for answer in ANSWERS]


def _calls() -> list[Any]:
    return [
        pytest.param(
            answer,
            call,
            id=f"{answer.name}/{call.value}",
        )
        for answer in ANSWERS
        for call in Call
    ]


@pytest.mark.parametrize(("answer", "call"), _calls())
def test_every_answer_ends_in_a_result_or_a_classed_error(answer: Answer, call: Call) -> None:
    try:
        _ask(answer, call)
    except FatoraError as exc:
        assert verdict(call, exc.answer) is not None
        assert exc.description is None or len(exc.description) <= MAX_DESCRIPTION
        assert KEY not in repr(exc) and TOKEN not in repr(exc)


@pytest.mark.parametrize("answer", _params())
def test_a_verify_answer_is_paid_only_when_it_confirms_the_charge(answer: Answer) -> None:
    """As the charge path judges it (charging._judge): a SUCCESS that names no order, or whose
    order, amount, currency or mode differ, is not paid."""
    try:
        payment = _ask(answer, Call.VERIFY)
    except FatoraError:
        return
    paid = (
        payment.status is PaymentStatus.SUCCESS
        and payment.order_named
        and payment_mismatch(Expected(ORDER, AMOUNT, "QAR", True), payment) is None
    )
    if paid:
        body = answer.filled(VALUES)
        assert confirms(body, order_id=ORDER, amount=AMOUNT, currency="QAR"), body[:300]


def _reports_a_success(answer: Answer) -> bool:
    """Does the body, read on its own, say the payment succeeded (or is under way)?"""
    try:
        data = json.loads(answer.filled(VALUES))
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    words = [data.get("status")]
    if isinstance(data.get("result"), dict):
        words.append(data["result"].get("payment_status"))
    return any(isinstance(w, str) and w.strip().upper() in ("SUCCESS", "PENDING") for w in words)


@pytest.mark.parametrize(
    "answer",
    _params(),
)
def test_a_collect_answer_reporting_a_success_is_never_read_as_no_money(answer: Answer) -> None:
    try:
        _ask(answer, Call.COLLECT)
    except FatoraError as exc:
        if verdict(Call.COLLECT, exc.answer).money is Money.NO and answer.status not in (401, 403):
            assert not _reports_a_success(answer), exc.answer
