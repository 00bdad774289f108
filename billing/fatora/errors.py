"""Errors raised by the Fatora client.

Each class answers one question for the caller: may the call have taken effect, and is it worth
trying again? The tree:

* FatoraError
  + OutcomeUnknown - the call may or may not have taken effect: verify before anything else.
    - GatewayTimeout
    - GatewayConnectionError
    - GatewayServerError - HTTP 5xx.
    - MalformedResponse - a body that cannot be understood (garbled, truncated, wrong types).
      - ForeignAnswer - not Fatora's envelope at all (HTML 404, empty 200): a broken route.
    - UnclearAnswer - Fatora's envelope saying nothing clear (ERROR, PROCESSING, other 4xx).
    - RateLimited - HTTP 429.
  + Declined - the card was refused; ``kind`` says whether the token is worth trying again.
    - HardDecline - token expired/deactivated/invalid, card cannot recur: never retry this token.
    - SoftDecline - insufficient funds, do not honor, generic decline: retry later.
  + RequestRejected - 400/406/415 in Fatora's envelope: our request is wrong; not processed.
  + AuthenticationFailed - 401/403, or words about the merchant's key: stop and alert a human.
  + PaymentNotFound - Fatora's envelope saying the payment does not exist.
  + Unprocessable - 422 in Fatora's envelope (deactivating a token twice, for instance).
  + ModeMismatch - the gateway answered in test mode while the client runs live.

Each error carries ``answer``, its class in ``billing.fatora.answers``, whose table says what it
means for money. ``error_from_response`` is the one place that maps an HTTP status and an error
body to an error. An error carries only its HTTP status, the gateway's error code and
description: never the request body, the API key or a card token.
"""

from __future__ import annotations

from typing import ClassVar

from billing.fatora.answers import Answer, Call, classify, decline_words
from billing.fatora.types import DeclineKind

__all__ = [
    "AuthenticationFailed",
    "Declined",
    "FatoraError",
    "ForeignAnswer",
    "GatewayConnectionError",
    "GatewayServerError",
    "GatewayTimeout",
    "HardDecline",
    "MalformedResponse",
    "ModeMismatch",
    "OutcomeUnknown",
    "PaymentNotFound",
    "RateLimited",
    "RequestRejected",
    "SoftDecline",
    "UnclearAnswer",
    "Unprocessable",
    "classify_decline",
    "clip",
    "declined",
    "error_from_response",
    "reads_as_decline",
]

# Gateway text can be a whole HTML page; an error message only needs its start. The client clips
# it after removing secrets, so a clipped secret can never leave its prefix behind.
MAX_DESCRIPTION = 300


class FatoraError(Exception):
    """Base of every Fatora client error. ``answer`` is its class in ``answers.VERDICTS``."""

    answer: Answer = Answer.UNCLEAR

    def __init__(
        self,
        description: str | None = None,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        answer: Answer | None = None,
    ) -> None:
        self.http_status = http_status
        self.error_code = error_code
        self.description = _squeeze(description)
        if answer is not None:
            self.answer = answer
        super().__init__(self.description)

    def _fields(self) -> str:
        return (
            f"http_status={self.http_status!r}, error_code={self.error_code!r}, "
            f"description={self.description!r}"
        )

    def __str__(self) -> str:
        return f"{type(self).__name__}: {self._fields()}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields()})"


class OutcomeUnknown(FatoraError):
    """The call may or may not have taken effect; for a charge, verify before retrying."""

    answer = Answer.NO_ANSWER

    def __init__(
        self,
        description: str | None = None,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        retry_after_s: float | None = None,
        answer: Answer | None = None,
    ) -> None:
        super().__init__(description, http_status=http_status, error_code=error_code, answer=answer)
        self.retry_after_s = retry_after_s


class GatewayTimeout(OutcomeUnknown):
    """No answer in time (connect, write or read timeout, or HTTP 408)."""


class GatewayConnectionError(OutcomeUnknown):
    """The connection failed or broke before a full answer arrived."""


class GatewayServerError(OutcomeUnknown):
    """HTTP 5xx: Fatora failed, maybe after acting on the request."""

    answer = Answer.SERVER_ERROR


class MalformedResponse(OutcomeUnknown):
    """A body that cannot be understood; it never counts as a success."""

    answer = Answer.GARBLED


class ForeignAnswer(MalformedResponse):
    """Not Fatora's envelope and not a server error (an HTML 404, an empty 200): the route or
    the base URL is wrong, or something else answers in Fatora's place."""

    answer = Answer.FOREIGN


class UnclearAnswer(OutcomeUnknown):
    """Fatora's envelope, saying nothing clear (ERROR without known words, PROCESSING...)."""

    answer = Answer.UNCLEAR


class RateLimited(OutcomeUnknown):
    """HTTP 429. For a charge the request might still have been processed, so verify first."""

    answer = Answer.SERVER_ERROR


class Declined(FatoraError):
    """The card was refused. ``kind`` tells whether the token may be tried again."""

    kind: ClassVar[DeclineKind] = DeclineKind.SOFT
    answer = Answer.SOFT_DECLINE


class HardDecline(Declined):
    """The token or card can never succeed: deactivate it and ask for a new checkout."""

    kind: ClassVar[DeclineKind] = DeclineKind.HARD
    answer = Answer.HARD_DECLINE


class SoftDecline(Declined):
    """The same token may succeed later: leave it to the dunning schedule."""

    kind: ClassVar[DeclineKind] = DeclineKind.SOFT


class RequestRejected(FatoraError):
    """The gateway refused our request as wrong (400, 406, 415...): a bug or bad data."""

    answer = Answer.REJECTED


class AuthenticationFailed(FatoraError):
    """The API key is invalid (401) or inactive (403): this will not fix itself."""

    answer = Answer.AUTH


class PaymentNotFound(FatoraError):
    """The gateway knows no payment for this order or transaction (404)."""

    answer = Answer.NOT_FOUND


class Unprocessable(FatoraError):
    """HTTP 422: well formed but not processable (e.g. a token already deactivated)."""

    answer = Answer.REJECTED


class ModeMismatch(FatoraError):
    """A test-mode result reached a client running live: never count it as money."""

    answer = Answer.TEST_MODE


def _squeeze(text: str | None) -> str | None:
    if text is None:
        return None
    return " ".join(text.split()) or None


def clip(text: str | None, limit: int = MAX_DESCRIPTION) -> str | None:
    """``text`` cut to ``limit`` characters. Only after secrets are removed from it."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def classify_decline(description: str | None, error_code: str | None) -> DeclineKind:
    """Hard or soft, from the gateway's decline text; unknown reasons count as SOFT.

    Unknown means soft because a soft decline only costs a few scheduled retries, while a wrong
    hard decline throws away a good token.
    """
    text = " ".join(t for t in (description, error_code) if t)
    return DeclineKind.HARD if decline_words(text) is Answer.HARD_DECLINE else DeclineKind.SOFT


def reads_as_decline(description: str | None, error_code: str | None) -> bool:
    """True when the gateway's text names a card decline (as opposed to a request error)."""
    return decline_words(" ".join(t for t in (description, error_code) if t)) is not None


def declined(
    description: str | None,
    error_code: str | None,
    *,
    http_status: int | None,
) -> Declined:
    """The HardDecline or SoftDecline for this decline text."""
    cls = (
        HardDecline
        if classify_decline(description, error_code) is DeclineKind.HARD
        else SoftDecline
    )
    return cls(description, http_status=http_status, error_code=error_code)


def error_from_response(
    status_code: int,
    body_bytes: bytes,
    *,
    charge: bool,
    retry_after_s: float | None = None,
) -> FatoraError:
    """The error for an answer that is not the success the caller wanted; the only place that
    maps an HTTP status and a body to an error. Its class comes from ``answers.classify``.

    ``charge`` marks collect-payment. ``retry_after_s`` comes from a Retry-After header.
    """
    from billing.fatora.parsing import parse_error_body

    info = parse_error_body(body_bytes)
    code, desc = info.error_code, info.description
    call = Call.COLLECT if charge else Call.VERIFY
    answer = classify(
        call,
        status_code,
        envelope_word=info.status_word if info.understood else None,
        text=" ".join(t for t in (desc, code) if t),
        payment_word=info.payment_word,
        looks_like_json=info.looks_like_json,
    )
    status = status_code
    if answer is Answer.SERVER_ERROR:
        if status == 408:
            return GatewayTimeout(desc, http_status=status, error_code=code, answer=answer)
        cls: type[OutcomeUnknown] = RateLimited if status == 429 else GatewayServerError
        return cls(desc, http_status=status, error_code=code, retry_after_s=retry_after_s)
    if answer is Answer.FOREIGN:
        return ForeignAnswer(f"not a Fatora answer (HTTP {status})", http_status=status)
    if answer is Answer.GARBLED:
        return MalformedResponse("response body is not a Fatora JSON envelope", http_status=status)
    if answer is Answer.UNCLEAR:
        text = desc or f"unclear answer (HTTP {status})"
        return UnclearAnswer(text, http_status=status, error_code=code)
    if answer is Answer.KEY_WORDS:
        return AuthenticationFailed(desc, http_status=status, error_code=code, answer=answer)
    error_class: dict[Answer, type[FatoraError]] = {
        Answer.AUTH: AuthenticationFailed,
        Answer.HARD_DECLINE: HardDecline,
        Answer.SOFT_DECLINE: SoftDecline,
        Answer.NOT_FOUND: PaymentNotFound,
        Answer.REJECTED: Unprocessable if status == 422 else RequestRejected,
    }
    final = error_class.get(answer)
    if final is None:
        # An answer the caller did not expect here (a PENDING or SUCCESS envelope with no
        # payment in it): its outcome is not known, whatever the answer table says of it.
        text = desc or f"unexpected {answer.value} answer (HTTP {status})"
        return UnclearAnswer(text, http_status=status, error_code=code, answer=answer)
    return final(desc, http_status=status, error_code=code)
