"""Errors raised by the Fatora client.

Each class answers one question for the caller: may the call have taken effect, and is it worth
trying again? The tree:

* FatoraError
  + OutcomeUnknown - the call may or may not have taken effect: verify before anything else.
    - GatewayTimeout
    - GatewayConnectionError
    - GatewayServerError - HTTP 5xx.
    - MalformedResponse - a body that cannot be understood (garbled, HTML, truncated, wrong types).
    - RateLimited - HTTP 429.
  + Declined - the card was refused; ``kind`` says whether the token is worth trying again.
    - HardDecline - token expired/deactivated/invalid, card cannot recur: never retry this token.
    - SoftDecline - insufficient funds, do not honor, generic decline: retry later.
  + RequestRejected - HTTP 400/406/415 and other 4xx: our request is wrong; do not resend it as is.
  + AuthenticationFailed - HTTP 401/403: the API key is bad or inactive; stop and alert a human.
  + PaymentNotFound - HTTP 404: the gateway knows no such payment.
  + Unprocessable - HTTP 422 (deactivating a token twice, for instance).
  + ModeMismatch - the gateway answered in test mode while the client runs live.

``error_from_response`` is the one place that maps an HTTP status and an error body to a class.
An error carries only its HTTP status, the gateway's error code and description: never the request
body, the API key or a card token.
"""

from __future__ import annotations

import re
from typing import ClassVar

from billing.fatora.types import DeclineKind

__all__ = [
    "AuthenticationFailed",
    "Declined",
    "FatoraError",
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
    "Unprocessable",
    "classify_decline",
    "declined",
    "error_from_response",
    "reads_as_decline",
]

# Gateway text can be a whole HTML page; an error message only needs its start.
_MAX_DESCRIPTION = 300


class FatoraError(Exception):
    """Base of every Fatora client error."""

    def __init__(
        self,
        description: str | None = None,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
    ) -> None:
        self.http_status = http_status
        self.error_code = error_code
        self.description = _clip(description)
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

    def __init__(
        self,
        description: str | None = None,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(description, http_status=http_status, error_code=error_code)
        self.retry_after_s = retry_after_s


class GatewayTimeout(OutcomeUnknown):
    """No answer in time (connect, write or read timeout, or HTTP 408)."""


class GatewayConnectionError(OutcomeUnknown):
    """The connection failed or broke before a full answer arrived."""


class GatewayServerError(OutcomeUnknown):
    """HTTP 5xx: Fatora failed, maybe after acting on the request."""


class MalformedResponse(OutcomeUnknown):
    """A body that cannot be understood; it never counts as a success."""


class RateLimited(OutcomeUnknown):
    """HTTP 429. For a charge the request might still have been processed, so verify first."""


class Declined(FatoraError):
    """The card was refused. ``kind`` tells whether the token may be tried again."""

    kind: ClassVar[DeclineKind] = DeclineKind.SOFT


class HardDecline(Declined):
    """The token or card can never succeed: deactivate it and ask for a new checkout."""

    kind: ClassVar[DeclineKind] = DeclineKind.HARD


class SoftDecline(Declined):
    """The same token may succeed later: leave it to the dunning schedule."""

    kind: ClassVar[DeclineKind] = DeclineKind.SOFT


class RequestRejected(FatoraError):
    """The gateway refused our request as wrong (400, 406, 415...): a bug or bad data."""


class AuthenticationFailed(FatoraError):
    """The API key is invalid (401) or inactive (403): this will not fix itself."""


class PaymentNotFound(FatoraError):
    """The gateway knows no payment for this order or transaction (404)."""


class Unprocessable(FatoraError):
    """HTTP 422: well formed but not processable (e.g. a token already deactivated)."""


class ModeMismatch(FatoraError):
    """A test-mode result reached a client running live: never count it as money."""


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    if len(text) > _MAX_DESCRIPTION:
        return text[: _MAX_DESCRIPTION - 1] + "…"
    return text or None


# Phrases are matched on normalised text (lower case, "_" and "-" as spaces) at word starts.
# Hard phrases are checked first: a text naming both kinds ("declined: expired card") must not
# lead to retrying a dead token.
_HARD_PHRASES = (
    "expired",
    "expiry",
    "deactivated",
    "inactive token",
    "invalid token",
    "invalid card token",
    "token not found",
    "token is invalid",
    "cannot recur",
    "can not recur",
    "can't recur",
    "recurring not supported",
    "recurring is not supported",
    "not support recurring",
    "does not support recurring",
    "recurring not allowed",
    "debit card",
    "lost card",
    "stolen card",
    "pick up card",
    "restricted card",
    "invalid card number",
    "no such card",
)
_SOFT_PHRASES = (
    "insufficient funds",
    "insufficient balance",
    "not sufficient funds",
    "do not honor",
    "do not honour",
    "declined",
    "decline",
    "exceeds",
    "limit exceeded",
    "issuer unavailable",
    "try again",
)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


def _pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")")


_HARD_RE = _pattern(_HARD_PHRASES)
_SOFT_RE = _pattern(_SOFT_PHRASES)
_NOT_FOUND_RE = re.compile(r"\b(?:not found|doesn't found|does not exist|not exist|no payment)")
_AUTH_RE = re.compile(r"\b(?:api key|unauthori[sz]ed|forbidden)")


def _match_decline(description: str | None, error_code: str | None) -> DeclineKind | None:
    text = _normalise(" ".join(t for t in (description, error_code) if t))
    if _HARD_RE.search(text):
        return DeclineKind.HARD
    if _SOFT_RE.search(text):
        return DeclineKind.SOFT
    return None


def reads_as_decline(description: str | None, error_code: str | None) -> bool:
    """True when the gateway's text names a card decline (as opposed to a request error)."""
    return _match_decline(description, error_code) is not None


def classify_decline(description: str | None, error_code: str | None) -> DeclineKind:
    """Hard or soft, from the gateway's decline text; unknown reasons count as SOFT.

    Fatora publishes no decline-code catalogue, so this reads words, not numbers. Unknown means
    soft because a soft decline only costs a few scheduled retries, while a wrong hard decline
    throws away a good token.
    """
    return _match_decline(description, error_code) or DeclineKind.SOFT


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
    """Map an HTTP status and error body to the error class; the only place that does so.

    ``charge`` marks collect-payment: only there can error text turn a 4xx (or a 2xx whose
    envelope is not SUCCESS) into a card decline. ``retry_after_s`` comes from a Retry-After header.
    """
    from billing.fatora.parsing import parse_error_body

    info = parse_error_body(body_bytes)
    code, desc = info.error_code, info.description

    if 200 <= status_code < 300:
        if not info.understood:
            return MalformedResponse(
                "response body is not a Fatora JSON envelope", http_status=status_code
            )
        if charge and (info.status_word == "FAILURE" or reads_as_decline(desc, code)):
            return declined(desc, code, http_status=status_code)
        if _AUTH_RE.search(_normalise(f"{desc or ''} {code or ''}")):
            return AuthenticationFailed(desc, http_status=status_code, error_code=code)
        if not charge and _NOT_FOUND_RE.search(_normalise(desc or "")):
            return PaymentNotFound(desc, http_status=status_code, error_code=code)
        return RequestRejected(desc, http_status=status_code, error_code=code)

    if status_code == 408:
        return GatewayTimeout(desc, http_status=status_code, error_code=code)
    if status_code == 429:
        return RateLimited(
            desc, http_status=status_code, error_code=code, retry_after_s=retry_after_s
        )
    if 500 <= status_code < 600:
        return GatewayServerError(
            desc, http_status=status_code, error_code=code, retry_after_s=retry_after_s
        )
    if status_code in (401, 403):
        # Even if the text mentions a card: a key problem stops the worker for a human to see,
        # which is safer than marking a customer's card as dead.
        return AuthenticationFailed(desc, http_status=status_code, error_code=code)
    if charge and 400 <= status_code < 500 and (status_code == 402 or reads_as_decline(desc, code)):
        return declined(desc, code, http_status=status_code)
    if status_code == 404:
        return PaymentNotFound(desc, http_status=status_code, error_code=code)
    if status_code == 422:
        return Unprocessable(desc, http_status=status_code, error_code=code)
    if 400 <= status_code < 500:
        return RequestRejected(desc, http_status=status_code, error_code=code)
    # 1xx/3xx: nothing a JSON API should send; the outcome is unknown.
    return MalformedResponse(f"unexpected HTTP status {status_code}", http_status=status_code)
