"""The answer table: every call and answer class has a verdict, and only clear answers are final.

These tests protect the rule that keeps an invoice from being charged twice: an answer that is
not clearly final (a server error, a foreign page, a garbled or unclear body, no answer) is never
read as "no money moved".
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.fatora.answers import VERDICTS, Answer, Call, Money, Then, classify, verdict
from billing.fatora.errors import error_from_response

# The only collect answers that may be read as "no money moved": each is Fatora's own envelope
# saying so, or a request that never left.
CLEAR_NO_MONEY = {
    Answer.NOT_SENT,
    Answer.AUTH,
    Answer.HARD_DECLINE,
    Answer.SOFT_DECLINE,
    Answer.REJECTED,
}


def test_every_call_and_answer_has_a_verdict() -> None:
    assert set(VERDICTS) == {(call, answer) for call in Call for answer in Answer}


@pytest.mark.parametrize("answer", list(Answer))
def test_collect_is_final_only_on_a_clear_answer(answer: Answer) -> None:
    judged = verdict(Call.COLLECT, answer)
    assert (judged.money is Money.NO) == (answer in CLEAR_NO_MONEY)
    assert judged.why


def test_a_success_or_pending_collect_means_the_money_was_taken() -> None:
    for answer in (Answer.SUCCESS, Answer.PENDING, Answer.TEST_MODE):
        assert verdict(Call.COLLECT, answer).money is Money.TAKEN


@pytest.mark.parametrize("answer", list(Answer))
def test_verify_settles_only_with_a_payment_or_fatoras_not_found(answer: Answer) -> None:
    then = verdict(Call.VERIFY, answer).then
    if answer is Answer.SUCCESS:
        assert then is Then.JUDGE
    elif answer is Answer.NOT_FOUND:
        assert then is Then.NOT_FOUND_RULE
    else:
        assert then in (Then.VERIFY_LATER, Then.PAUSE_AUTH, Then.PAUSE_SYSTEMIC)
        assert verdict(Call.VERIFY, answer).money is Money.MAYBE


def test_a_systemic_failure_never_touches_a_card() -> None:
    """A broken route or key pauses collection; it is never a decline of the customer's card."""
    for call in Call:
        for answer in (Answer.FOREIGN, Answer.AUTH, Answer.KEY_WORDS):
            assert verdict(call, answer).then in (Then.PAUSE_SYSTEMIC, Then.PAUSE_AUTH)
    assert verdict(Call.COLLECT, Answer.NOT_FOUND).then is Then.PAUSE_SYSTEMIC


def _classify(call: Call, status: int, body: bytes) -> Answer:
    return error_from_response(status, body, charge=call is Call.COLLECT).answer


def _env(payload: object) -> bytes:
    return json.dumps(payload).encode()


EDGE_504 = b"<html><head><title>504 Gateway Time-out</title></head></html>"

# (call, HTTP status, body, class): the defects seen from outside, and their neighbours.
CASES = [
    # An edge's HTML 504 whose charge lands later: unknown, never final.
    (Call.COLLECT, 504, EDGE_504, Answer.SERVER_ERROR),
    (Call.VERIFY, 504, EDGE_504, Answer.SERVER_ERROR),
    # An HTML 404 is a route, not a payment and not a card.
    (Call.VERIFY, 404, b"<html><h1>404 Not Found</h1></html>", Answer.FOREIGN),
    (Call.COLLECT, 404, b"<html><h1>404 Not Found</h1></html>", Answer.FOREIGN),
    (Call.VERIFY, 404, _env({"status": "ERROR", "error": "Route not found"}), Answer.UNCLEAR),
    (
        Call.VERIFY,
        404,
        _env({"status": "ERROR", "error": "Specified payment does not exists"}),
        Answer.NOT_FOUND,
    ),
    (
        Call.VERIFY,
        200,
        _env({"status": "ERROR", "error": "the requested payment doesn't found"}),
        Answer.NOT_FOUND,
    ),
    (
        Call.COLLECT,
        404,
        _env({"status": "ERROR", "error": "Specified payment does not exists"}),
        Answer.NOT_FOUND,
    ),
    # Money taken behind an unclear envelope.
    (Call.COLLECT, 200, _env({"status": "PROCESSING"}), Answer.UNCLEAR),
    (Call.COLLECT, 200, _env({"status": "ERROR", "error": {"error_code": "E1"}}), Answer.UNCLEAR),
    (Call.COLLECT, 200, b'{"status":"SUCC', Answer.GARBLED),
    (Call.COLLECT, 200, b"", Answer.FOREIGN),
    (Call.COLLECT, 302, b"", Answer.FOREIGN),
    # Words about the merchant's key come before decline words.
    (Call.COLLECT, 200, _env({"status": "FAILURE", "error": "Invalid API Key"}), Answer.KEY_WORDS),
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "result": {"description": "Merchant token expired"}}),
        Answer.KEY_WORDS,
    ),
    # A bare "token" on a charge is the merchant's (the old API's name for the key).
    (Call.COLLECT, 400, _env({"status": "ERROR", "error": "Invalid token"}), Answer.KEY_WORDS),
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "error": "Access token expired"}),
        Answer.KEY_WORDS,
    ),
    (Call.COLLECT, 200, _env({"status": "ERROR", "error": "authentication error"}), Answer.UNCLEAR),
    (Call.COLLECT, 200, _env({"status": "FAILURE", "error": "Request expired"}), Answer.UNCLEAR),
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "error": "Merchant daily limit exceeded"}),
        Answer.KEY_WORDS,
    ),
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "error": "Cardholder authentication failed"}),
        Answer.SOFT_DECLINE,
    ),
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "error": "Card token expired"}),
        Answer.HARD_DECLINE,
    ),
    (Call.COLLECT, 200, _env({"status": "FAILURE", "error": "Expired"}), Answer.UNCLEAR),
    (Call.COLLECT, 403, b"<html>Forbidden</html>", Answer.AUTH),
    (Call.COLLECT, 503, _env({"status": "ERROR", "error": "Invalid API Key"}), Answer.SERVER_ERROR),
    # Clear declines and rejections in Fatora's envelope.
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "error": "Card token expired"}),
        Answer.HARD_DECLINE,
    ),
    (
        Call.COLLECT,
        200,
        _env({"status": "FAILURE", "result": {"payment_status": "FAILURE"}}),
        Answer.SOFT_DECLINE,
    ),
    (Call.COLLECT, 402, _env({"status": "ERROR", "error": "whatever"}), Answer.SOFT_DECLINE),
    (Call.COLLECT, 400, _env({"status": "ERROR", "error": "amount is required"}), Answer.REJECTED),
    (Call.COLLECT, 409, _env({"status": "ERROR", "error": "conflict"}), Answer.UNCLEAR),
    (Call.COLLECT, 408, b"", Answer.SERVER_ERROR),
    (Call.COLLECT, 429, _env({"status": "ERROR", "error": "slow down"}), Answer.SERVER_ERROR),
]


@pytest.mark.parametrize(("call", "status", "body", "answer"), CASES)
def test_answers_are_classified(call: Call, status: int, body: bytes, answer: Answer) -> None:
    assert _classify(call, status, body) is answer


@given(
    status=st.one_of(st.sampled_from([408, 429]), st.integers(500, 599)),
    body=st.one_of(st.binary(max_size=200), st.just(_env({"status": "SUCCESS", "result": {}}))),
    call=st.sampled_from(list(Call)),
)
def test_a_server_error_is_never_final_whatever_its_body(
    status: int, body: bytes, call: Call
) -> None:
    assert verdict(call, _classify(call, status, body)).money is not Money.NO


@given(
    status=st.integers(100, 599).filter(lambda s: s not in (401, 403)),
    body=st.binary(max_size=300),
)
def test_no_body_that_is_not_an_envelope_is_read_as_no_money(status: int, body: bytes) -> None:
    """Whatever bytes come back, only Fatora's envelope can say that no money moved."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("status"), str):
        return  # an envelope: covered by the cases above
    answer = _classify(Call.COLLECT, status, body)
    assert verdict(Call.COLLECT, answer).money is not Money.NO


def test_classify_reads_words_only_inside_an_envelope() -> None:
    text = "Card token expired"
    assert classify(Call.COLLECT, 200, envelope_word=None, text=text) is Answer.FOREIGN
    assert classify(Call.COLLECT, 400, envelope_word="ERROR", text=text) is Answer.HARD_DECLINE
