"""What an answer from Fatora (or from whatever stands in front of it) means for money.

Fatora documents little: the collect-payment response, the error bodies and the status words are
partly unknown, and an edge, a proxy or a wrong base URL can answer in Fatora's place. So every
answer is first put in one of a few classes (``classify``), and one table (``VERDICTS``) says,
for each call and each class, whether money may have moved and what happens next. The rule
behind the table: **only a clear answer is final**.

* A request that never left this process moved no money (``NOT_SENT``).
* Only Fatora's own envelope (a JSON object with a ``status`` word) can say something final:
  a decline with decline words, a rejection of the request before it was processed (400, 406,
  415, 422), an authentication failure, or (on verify) "this payment does not exist".
* Any 2xx ``SUCCESS`` envelope on collect means the gateway took the charge, whatever its
  ``result`` says: verify confirms it, and a later "not found" never undoes it.
* Every 5xx, 408 and 429, every timeout after the request may have been written, every garbled
  2xx and every envelope that fits no clear row is unknown: verify settles it, over time.
* An answer that is not Fatora's envelope and not a server error (an HTML 404, an empty 200, a
  redirect) means the route is broken: collection pauses with an alert, and no card or
  subscription is touched. Authentication words are recognised before decline words ("Merchant
  token expired" is about the merchant's key, not a card).

The module is pure (no I/O): the client tags each error with its class, the collection code
looks the verdict up here, and the tests walk the whole table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "VERDICTS",
    "Answer",
    "Call",
    "Money",
    "Then",
    "Verdict",
    "classify",
    "reads_as_auth",
    "reads_as_not_found",
    "verdict",
]


class Call(StrEnum):
    COLLECT = "collect"  # collect-payment: the call that moves money
    VERIFY = "verify"  # verify: the call that says what happened


class Answer(StrEnum):
    """The class of an answer, from the HTTP status, the body and how the call ended."""

    NOT_SENT = "not_sent"  # the request never left (connect failed, stopped before sending)
    NO_ANSWER = "no_answer"  # the request may have been written; no complete answer came
    SUCCESS = "success"  # 2xx, envelope SUCCESS (verify: a payment report, whatever its word)
    PENDING = "pending"  # 2xx, envelope PENDING
    AUTH = "auth"  # HTTP 401/403: refused before anything was processed
    KEY_WORDS = "key_words"  # an envelope whose words are about the merchant's key or account
    HARD_DECLINE = "hard_decline"  # envelope naming a dead token or a card that cannot recur
    SOFT_DECLINE = "soft_decline"  # envelope naming a decline worth retrying; 402; FAILURE payment
    NOT_FOUND = "not_found"  # envelope saying the payment (or order) does not exist
    REJECTED = "rejected"  # envelope 400/406/415/422: refused before processing
    SERVER_ERROR = "server_error"  # 5xx, 408, 429, whatever the body
    GARBLED = "garbled"  # 2xx that looks like JSON but cannot be read (cut, wrong types)
    UNCLEAR = "unclear"  # an envelope that fits no row above (ERROR, PROCESSING, other 4xx...)
    FOREIGN = "foreign"  # not Fatora's envelope and not a server error: HTML, empty, redirect
    TEST_MODE = "test_mode"  # a result in test mode reached a client running live


class Money(StrEnum):
    """What the answer says about the money of the attempt."""

    NO = "no"  # cannot have moved: the attempt is final
    MAYBE = "maybe"  # unknown: verify settles it; "not found" counts only after the grace
    TAKEN = "taken"  # the gateway accepted the charge: verify confirms; "not found" never counts
    REPORTED = "reported"  # verify reports the payment: its status and amounts decide


class Then(StrEnum):
    """What happens next."""

    CONFIRM = "confirm"  # verify now; paid only once verify confirms id, amount, currency, mode
    VERIFY_LATER = "verify_later"  # unresolved: verify now and on the janitor's schedule
    DUN_SOFT = "dun_soft"  # a dunning step, once verify has not contradicted the decline
    DUN_HARD = "dun_hard"  # the token is dead: another live card, else a dunning step
    PAUSE_AUTH = "pause_auth"  # pause collection and alert; no customer-facing failure
    PAUSE_SYSTEMIC = "pause_systemic"  # pause collection and alert; the attempt stays unresolved
    ALERT_REJECTED = "alert_rejected"  # final failure; the invoice waits for a human
    RETRY = "retry"  # nothing happened: try again with backoff (bounded)
    JUDGE = "judge"  # verify answered with the payment: judge it (paid, pending, declined)
    NOT_FOUND_RULE = "not_found_rule"  # verify: "never charged" only per the grace rule


@dataclass(frozen=True, slots=True)
class Verdict:
    money: Money
    then: Then
    why: str


_V = Verdict
VERDICTS: dict[tuple[Call, Answer], Verdict] = {
    # -- collect-payment ------------------------------------------------------------------
    (Call.COLLECT, Answer.NOT_SENT): _V(Money.NO, Then.RETRY, "the request never left"),
    (Call.COLLECT, Answer.NO_ANSWER): _V(
        Money.MAYBE, Then.VERIFY_LATER, "the request may be inside the gateway"
    ),
    (Call.COLLECT, Answer.SUCCESS): _V(
        Money.TAKEN, Then.CONFIRM, "a SUCCESS envelope: the gateway took the charge"
    ),
    (Call.COLLECT, Answer.PENDING): _V(Money.TAKEN, Then.CONFIRM, "the gateway holds the charge"),
    (Call.COLLECT, Answer.AUTH): _V(
        Money.NO, Then.PAUSE_AUTH, "the merchant's key was refused: nothing was processed"
    ),
    (Call.COLLECT, Answer.KEY_WORDS): _V(
        Money.MAYBE, Then.PAUSE_AUTH, "words about the key, not a 401: verify before believing"
    ),
    (Call.COLLECT, Answer.HARD_DECLINE): _V(
        Money.NO, Then.DUN_HARD, "Fatora declined: the token can never succeed"
    ),
    (Call.COLLECT, Answer.SOFT_DECLINE): _V(
        Money.NO, Then.DUN_SOFT, "Fatora declined: the card may succeed later"
    ),
    (Call.COLLECT, Answer.NOT_FOUND): _V(
        Money.MAYBE, Then.PAUSE_SYSTEMIC, "a 404 on collect is a route, not a card"
    ),
    (Call.COLLECT, Answer.REJECTED): _V(
        Money.NO, Then.ALERT_REJECTED, "Fatora refused the request before processing it"
    ),
    (Call.COLLECT, Answer.SERVER_ERROR): _V(
        Money.MAYBE, Then.VERIFY_LATER, "a server error may come after the charge"
    ),
    (Call.COLLECT, Answer.GARBLED): _V(
        Money.MAYBE, Then.VERIFY_LATER, "an unreadable answer may hide a charge"
    ),
    (Call.COLLECT, Answer.UNCLEAR): _V(
        Money.MAYBE, Then.VERIFY_LATER, "an envelope that says nothing clear"
    ),
    (Call.COLLECT, Answer.FOREIGN): _V(
        Money.MAYBE, Then.PAUSE_SYSTEMIC, "not Fatora's answer: a broken route or base URL"
    ),
    (Call.COLLECT, Answer.TEST_MODE): _V(
        Money.TAKEN, Then.PAUSE_SYSTEMIC, "a test-mode answer in live mode: a wrong key or URL"
    ),
    # -- verify ---------------------------------------------------------------------------
    (Call.VERIFY, Answer.NOT_SENT): _V(Money.MAYBE, Then.VERIFY_LATER, "nothing was asked"),
    (Call.VERIFY, Answer.NO_ANSWER): _V(Money.MAYBE, Then.VERIFY_LATER, "no answer"),
    (Call.VERIFY, Answer.SUCCESS): _V(Money.REPORTED, Then.JUDGE, "verify reports the payment"),
    (Call.VERIFY, Answer.PENDING): _V(
        Money.MAYBE, Then.VERIFY_LATER, "a PENDING envelope without a payment"
    ),
    (Call.VERIFY, Answer.AUTH): _V(
        Money.MAYBE, Then.PAUSE_AUTH, "the merchant's key was refused: nothing is known"
    ),
    (Call.VERIFY, Answer.KEY_WORDS): _V(
        Money.MAYBE, Then.PAUSE_AUTH, "words about the key: nothing is known"
    ),
    (Call.VERIFY, Answer.HARD_DECLINE): _V(
        Money.MAYBE, Then.VERIFY_LATER, "decline words without a payment say nothing on verify"
    ),
    (Call.VERIFY, Answer.SOFT_DECLINE): _V(
        Money.MAYBE, Then.VERIFY_LATER, "decline words without a payment say nothing on verify"
    ),
    (Call.VERIFY, Answer.NOT_FOUND): _V(
        Money.MAYBE, Then.NOT_FOUND_RULE, "Fatora's envelope says no such payment (yet)"
    ),
    (Call.VERIFY, Answer.REJECTED): _V(Money.MAYBE, Then.VERIFY_LATER, "the question was refused"),
    (Call.VERIFY, Answer.SERVER_ERROR): _V(Money.MAYBE, Then.VERIFY_LATER, "a server error"),
    (Call.VERIFY, Answer.GARBLED): _V(Money.MAYBE, Then.VERIFY_LATER, "an unreadable answer"),
    (Call.VERIFY, Answer.UNCLEAR): _V(Money.MAYBE, Then.VERIFY_LATER, "an unclear envelope"),
    (Call.VERIFY, Answer.FOREIGN): _V(
        Money.MAYBE, Then.PAUSE_SYSTEMIC, "not Fatora's answer: verify's route is broken"
    ),
    (Call.VERIFY, Answer.TEST_MODE): _V(
        Money.MAYBE, Then.PAUSE_SYSTEMIC, "a test-mode result in live mode"
    ),
}


def verdict(call: Call, answer: Answer) -> Verdict:
    return VERDICTS[(call, answer)]


# -- reading words -------------------------------------------------------------------------
# Fatora publishes no code catalogue, so the classes below read words. Phrases match normalised
# text (lower case, "_" and "-" as spaces) at word starts.


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


def _pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(phrases) + r")")


# About the merchant's credentials or account. Checked before any decline phrase: in Fatora's
# older API the merchant key is called a "token", so "Merchant token expired", "Invalid token"
# or "Access token expired" must not kill a customer's card. A "token" that is not a card's is
# the merchant's.
_KEY_RE = _pattern(
    (
        r"api ?key",
        r"apikey",
        r"merchant",
        r"access token",
        r"invalid key",
        r"inactive key",
    )
)
_CARD_RE = re.compile(r"\bcard\b")
_TOKEN_RE = re.compile(r"\btokens?\b")
_REFUSED_RE = _pattern((r"unauthori[sz]ed", r"forbidden"))
# A card's end: only when the text names the card ("card", "card token"), or recurring itself.
_CARD_DEAD_RE = _pattern(
    (
        r"expired",
        r"expiry",
        r"deactivated",
        r"inactive",
        r"invalid",
        r"not found",
        r"lost",
        r"stolen",
        r"pick up",
        r"restricted",
        r"closed",
        r"no such",
    )
)
_NO_RECURRING_RE = _pattern(
    (
        r"can ?not recur",
        r"can't recur",
        r"recurring (?:is )?not (?:supported|allowed)",
        r"(?:does )?not support recurring",
        r"debit card",
    )
)
_SOFT_RE = _pattern(
    (
        r"insufficient (?:funds|balance)",
        r"not sufficient funds",
        r"do not hono(?:u)?r",
        r"declined?",
        r"exceeds",
        r"limit exceeded",
        r"issuer unavailable",
        r"(?:cardholder )?authentication failed",
        r"3 ?d ?secure",
        r"3ds",
    )
)
# "Not found" counts only when it is about a payment: "route not found" says nothing of money.
_NOT_FOUND_RE = _pattern((r"not found", r"doesn't found", r"does not exists?", r"not exists?"))
_PAYMENT_RE = _pattern((r"payment", r"order", r"transaction"))


def reads_as_auth(text: str, *, bare_token_is_key: bool = True) -> bool:
    """True when the text is about the merchant's key or account, not a customer's card.

    ``bare_token_is_key``: a "token" the text does not call a card's is the merchant's (on a
    charge; a call about a card token, like deactivate, says "token" for the card's).
    """
    words = normalise(text)
    if _KEY_RE.search(words):
        return True
    if _CARD_RE.search(words) is not None:
        return False
    if _REFUSED_RE.search(words):
        return True
    return bare_token_is_key and _TOKEN_RE.search(words) is not None


def reads_as_not_found(text: str) -> bool:
    words = normalise(text)
    return _NOT_FOUND_RE.search(words) is not None and _PAYMENT_RE.search(words) is not None


def decline_words(text: str) -> Answer | None:
    """HARD_DECLINE or SOFT_DECLINE when the text names a decline, else None. Hard only when it
    names the card (or recurring): "expired" alone may be a merchant's key or a request."""
    words = normalise(text)
    if _NO_RECURRING_RE.search(words) or (_CARD_RE.search(words) and _CARD_DEAD_RE.search(words)):
        return Answer.HARD_DECLINE
    if _SOFT_RE.search(words):
        return Answer.SOFT_DECLINE
    return None


_FINAL_REJECTIONS = frozenset({400, 406, 415, 422})
# Words of an envelope or a payment status that report money taken (or being taken).
_MONEY_WORDS = frozenset({"SUCCESS", "PENDING"})


def classify(
    call: Call,
    status: int,
    *,
    envelope_word: str | None,
    text: str,
    payment_word: str | None = None,
    looks_like_json: bool = False,
) -> Answer:
    """The class of an HTTP answer.

    ``envelope_word`` is the upper-cased ``status`` of Fatora's envelope, None when the body is
    not an envelope (HTML, empty, not JSON, no status). ``text`` is every description and error
    code the body carries. ``payment_word`` is the payment status inside ``result``, if any.
    ``looks_like_json`` tells a cut JSON body (a broken connection) from a foreign page.
    """
    server_error = status in (408, 429) or 500 <= status < 600
    if status in (401, 403):
        return Answer.AUTH  # whatever the body: the key (or a firewall) refused the request
    if server_error:
        return Answer.SERVER_ERROR  # whatever the body: it may come after the charge
    if envelope_word is None:
        if 200 <= status < 300 and looks_like_json:
            return Answer.GARBLED
        return Answer.FOREIGN
    if reads_as_auth(text, bare_token_is_key=call is Call.COLLECT):
        return Answer.KEY_WORDS
    if 200 <= status < 300:
        if envelope_word == "SUCCESS":
            return Answer.SUCCESS
        if call is Call.VERIFY and payment_word is not None:
            return Answer.SUCCESS  # a payment report under another envelope word
        if envelope_word == "PENDING":
            return Answer.PENDING
        if call is Call.COLLECT:
            words = decline_words(text)
            if words is not None:
                return words
            if payment_word == "FAILURE":
                return Answer.SOFT_DECLINE
            return Answer.UNCLEAR
        return Answer.NOT_FOUND if reads_as_not_found(text) else Answer.UNCLEAR
    if 400 <= status < 500:
        if envelope_word in _MONEY_WORDS or payment_word in _MONEY_WORDS:
            return Answer.UNCLEAR  # an error status over a body that reports money: not final
        if call is Call.COLLECT:
            words = decline_words(text)
            if words is not None:
                return words
            if status == 402:
                return Answer.SOFT_DECLINE
            if status == 404:
                return Answer.NOT_FOUND
        elif (status == 404 or status in _FINAL_REJECTIONS) and reads_as_not_found(text):
            return Answer.NOT_FOUND
        if status in _FINAL_REJECTIONS:
            return Answer.REJECTED
    return Answer.UNCLEAR
