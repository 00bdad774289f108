"""Client for the Fatora payment gateway (Qatar): typed calls, typed results, typed errors.

* ``client.FatoraClient``: checkout, collect_payment, verify, refund, deactivate_token.
* ``errors``: the exception tree and the one HTTP-status-to-error mapping.
* ``parsing``: defensive parsers for responses and redirect query strings.
* ``amounts``: amounts with exactly the currency's decimals.
* ``retry.retry_decision``: whether and when to try a call again.
"""

from billing.fatora.amounts import currency_precision, format_amount
from billing.fatora.client import DEFAULT_DEACTIVATE_PATH, FatoraClient
from billing.fatora.errors import (
    AuthenticationFailed,
    Declined,
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
    RateLimited,
    RequestRejected,
    SoftDecline,
    UnclearAnswer,
    Unprocessable,
    classify_decline,
    error_from_response,
)
from billing.fatora.parsing import parse_payment_date, parse_redirect_params
from billing.fatora.retry import RetryDecision, full_jitter, retry_decision
from billing.fatora.types import (
    CheckoutSession,
    CollectResult,
    DeclineKind,
    Payment,
    PaymentStatus,
    RedirectParams,
    RefundResult,
)

__all__ = [
    "DEFAULT_DEACTIVATE_PATH",
    "AuthenticationFailed",
    "CheckoutSession",
    "CollectResult",
    "DeclineKind",
    "Declined",
    "FatoraClient",
    "FatoraError",
    "ForeignAnswer",
    "GatewayConnectionError",
    "GatewayServerError",
    "GatewayTimeout",
    "HardDecline",
    "MalformedResponse",
    "ModeMismatch",
    "OutcomeUnknown",
    "Payment",
    "PaymentNotFound",
    "PaymentStatus",
    "RateLimited",
    "RedirectParams",
    "RefundResult",
    "RequestRejected",
    "RetryDecision",
    "SoftDecline",
    "UnclearAnswer",
    "Unprocessable",
    "classify_decline",
    "currency_precision",
    "error_from_response",
    "format_amount",
    "full_jitter",
    "parse_payment_date",
    "parse_redirect_params",
    "retry_decision",
]
