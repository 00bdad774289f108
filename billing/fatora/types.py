"""Typed results of Fatora calls.

The gateway's JSON is loose (key case, nesting and number types vary), so the parsers turn it
into these small frozen values once; the rest of the code never sees raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum


class PaymentStatus(StrEnum):
    """The gateway's payment state. Only SUCCESS means paid."""

    SUCCESS = "SUCCESS"
    PENDING = "PENDING"
    FAILURE = "FAILURE"


class DeclineKind(StrEnum):
    """Whether a declined card may be tried again later."""

    HARD = "hard"  # the token or card can never be charged again: ask for a new checkout
    SOFT = "soft"  # the same token may succeed later (funds, issuer mood)


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    """A hosted checkout page to send the payer to."""

    checkout_url: str


@dataclass(frozen=True, slots=True)
class Payment:
    """The authoritative state of one payment, as answered by verify."""

    status: PaymentStatus
    order_id: str
    # False when the answer did not name its order (order_id is then the one asked about): such
    # a SUCCESS confirms nothing.
    order_named: bool = True
    transaction_id: str | None = None
    amount: Decimal | None = None
    currency: str | None = None
    mode: str | None = None  # lower-cased: "live" or "test"
    auth_code: str | None = None
    description: str | None = None
    payment_date: datetime | None = None  # always timezone-aware (UTC when the gateway omits it)
    # A stored card token is a credential: keep it out of reprs, logs and tracebacks.
    card_token: str | None = field(default=None, repr=False)
    card_last4: str | None = None
    card_type: str | None = None
    refund_status: str | None = None
    refund_transaction_id: str | None = None
    note: str | None = None

    @property
    def is_paid(self) -> bool:
        """True only for SUCCESS: PENDING is not paid and must not be charged again either."""
        return self.status is PaymentStatus.SUCCESS

    @property
    def decline_kind(self) -> DeclineKind | None:
        """How to treat a FAILURE payment (None for any other status)."""
        if self.status is not PaymentStatus.FAILURE:
            return None
        # Imported here because errors.py imports this module for DeclineKind.
        from billing.fatora.errors import classify_decline

        return classify_decline(self.description, None)


@dataclass(frozen=True, slots=True)
class CollectResult:
    """What collect-payment answered; settle only after verify confirms it."""

    status: PaymentStatus | None  # None when the body did not say
    order_id: str
    transaction_id: str | None = None
    description: str | None = None
    auth_code: str | None = None
    mode: str | None = None


@dataclass(frozen=True, slots=True)
class RefundResult:
    """What refund answered; follow the refund through verify's refund details."""

    refund_status: str | None
    refund_transaction_id: str | None = None


@dataclass(frozen=True, slots=True)
class RedirectParams:
    """Query parameters of a success/failure redirect. Untrusted: confirm with verify."""

    order_id: str | None
    transaction_id: str | None
    card_token: str | None = field(repr=False)
    failure_description: str | None
    mode: str | None  # lower-cased
