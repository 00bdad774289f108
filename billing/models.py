"""SQLAlchemy 2.x models: the schema every flow stands on.

Amounts are integers in the currency's minor unit (no floats on any backend); timestamps are
aware UTC. Constraints carry names so that migrations stay stable.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from billing.attempts import UNRESOLVED_VALUES, AttemptKind, AttemptStatus, CallEnding
from billing.db import UTCDateTime
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.notify import DeliveryStatus
from billing.plans import PriceChange

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


def _in(column: str, enum: type[StrEnum]) -> str:
    values = ", ".join(f"'{member.value}'" for member in enum)
    return f"{column} IN ({values})"


class CardStatus(StrEnum):
    ACTIVE = "active"
    DEAD = "dead"  # hard-declined: expired early, card cannot recur, unknown to the gateway
    DEACTIVATED = "deactivated"  # we asked the gateway to deactivate it


class PausedBy(StrEnum):
    """Who paused a subscription: a payment lifts the dunning ladder's pause, never the
    merchant's (only a resume does)."""

    MERCHANT = "merchant"
    DUNNING = "dunning"


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(120), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(40))
    language: Mapped[str] = mapped_column(String(2), server_default="en")
    timezone: Mapped[str] = mapped_column(String(64), server_default="Asia/Qatar")
    fcm_token: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]

    __table_args__ = (CheckConstraint("language IN ('en', 'ar')", name="language"),)


class CardToken(Base):
    """A Fatora card token, encrypted at rest; looked up by a keyed fingerprint."""

    __tablename__ = "card_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), server_default=CardStatus.ACTIVE.value)
    status_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    deactivated_at: Mapped[datetime | None]

    __table_args__ = (CheckConstraint(_in("status", CardStatus), name="status"),)


class DunningPolicyRow(Base):
    __tablename__ = "dunning_policies"

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    retry_after_days: Mapped[list[int]] = mapped_column(JSON)
    final_action: Mapped[str] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint("final_action IN ('cancel', 'unpaid', 'pause')", name="final_action"),
    )


class Plan(Base):
    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(String(3))
    interval: Mapped[str | None] = mapped_column(String(8))
    interval_count: Mapped[int] = mapped_column(Integer, server_default="1")
    cron: Mapped[str | None] = mapped_column(String(120))
    trial_days: Mapped[int] = mapped_column(Integer, server_default="0")
    dunning_code: Mapped[str] = mapped_column(ForeignKey("dunning_policies.code"))
    retired_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    prices: Mapped[list[PlanPrice]] = relationship(
        back_populates="plan", order_by="PlanPrice.effective_from"
    )

    __table_args__ = (
        CheckConstraint("(interval IS NULL) <> (cron IS NULL)", name="interval_xor_cron"),
        CheckConstraint("interval_count >= 1", name="interval_count"),
        CheckConstraint("trial_days >= 0", name="trial_days"),
    )


class PlanPrice(Base):
    """A plan's amount from a moment on, for subscriptions created from then on and, when
    ``price_change`` is 'next_period', for existing ones from their next period (see
    ``billing.plans.subscriber_price``). Ordered by (effective_from, id): rows of one moment
    apply in the order written."""

    __tablename__ = "plan_prices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    effective_from: Mapped[datetime]
    # A row written without saying moves everyone, as every price did before 0010_price_terms.
    price_change: Mapped[str] = mapped_column(
        String(16), server_default=PriceChange.NEXT_PERIOD.value
    )

    plan: Mapped[Plan] = relationship(back_populates="prices")

    __table_args__ = (
        Index("ix_plan_prices_plan_id_effective_from", "plan_id", "effective_from"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint(_in("price_change", PriceChange), name="price_change"),
    )


# The predicates of the partial indexes for renewal and quarantine (the migrations repeat them).
_DUE_SQL = "next_billing_at IS NOT NULL AND quarantined_at IS NULL"
_QUARANTINED_SQL = "quarantined_at IS NOT NULL"


class Subscription(Base):
    __tablename__ = "subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"), index=True)
    card_token_id: Mapped[int | None] = mapped_column(ForeignKey("card_tokens.id"))
    # The price it signed up at (billing.plans.subscriber_price): kept until a 'next_period'
    # change moves it. NULL (a row written by hand, or its price deleted): the plan's price
    # for new subscriptions at created_at.
    price_id: Mapped[int | None] = mapped_column(
        ForeignKey("plan_prices.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(16))
    # Interval plans count periods from this moment (wall clock in the customer's zone).
    anchor_at: Mapped[datetime]
    trial_end: Mapped[datetime | None]
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    # When the next period must be invoiced; NULL when nothing is to be billed (paused...).
    next_billing_at: Mapped[datetime | None]
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    canceled_at: Mapped[datetime | None]
    paused_at: Mapped[datetime | None]
    paused_by: Mapped[str | None] = mapped_column(String(16))
    # Set aside after renewing it raised (billing/services/quarantine.py): since when, why (the
    # exception's class and a short message), and when it is tried again.
    quarantined_at: Mapped[datetime | None]
    quarantine_reason: Mapped[str | None] = mapped_column(String(200))
    quarantine_retry_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        CheckConstraint(_in("status", SubscriptionStatus), name="status"),
        CheckConstraint("paused_by IS NULL OR " + _in("paused_by", PausedBy), name="paused_by"),
        # The due finder's index: only rows with something to bill, and not in quarantine, are
        # in it, so the due scan never wades through quarantined rows (see 0004_quarantine).
        Index(
            "ix_subscriptions_due",
            "next_billing_at",
            postgresql_where=text(_DUE_SQL),
            sqlite_where=text(_DUE_SQL),
        ),
        # Quarantined rows by their retry time: the renewal's retries and `quarantine list`.
        Index(
            "ix_subscriptions_quarantined",
            "quarantine_retry_at",
            postgresql_where=text(_QUARANTINED_SQL),
            sqlite_where=text(_QUARANTINED_SQL),
        ),
    )


class Invoice(Base):
    """One per subscription period: the unique constraint is how a renewal is claimed."""

    __tablename__ = "invoices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"))
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    # When collection should next be tried; NULL when nothing is to be tried.
    next_attempt_at: Mapped[datetime | None]
    attempt_count: Mapped[int] = mapped_column(Integer, server_default="0")
    # Declines count for the dunning ladder; quick retries of transient faults do not.
    failure_count: Mapped[int] = mapped_column(Integer, server_default="0")
    transient_count: Mapped[int] = mapped_column(Integer, server_default="0")
    first_failed_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]
    # The attempt that paid it (no foreign key: attempts already point at their invoice).
    paid_attempt_id: Mapped[int | None] = mapped_column(Integer)
    # Paid only through the customer's link (a first period started on the hosted page, or a
    # renewal paid ahead before a token dies): no worker charges it, whatever its schedule.
    link_only: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Set aside after its write-ahead raised (billing/services/quarantine.py); while it is,
    # next_attempt_at is no earlier than quarantine_retry_at.
    quarantined_at: Mapped[datetime | None]
    quarantine_reason: Mapped[str | None] = mapped_column(String(200))
    quarantine_retry_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("subscription_id", "period_start"),
        CheckConstraint(_in("status", InvoiceStatus), name="status"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        Index(
            "ix_invoices_collectable",
            "next_attempt_at",
            postgresql_where=text("next_attempt_at IS NOT NULL"),
            sqlite_where=text("next_attempt_at IS NOT NULL"),
        ),
        Index(
            "ix_invoices_quarantined",
            "quarantine_retry_at",
            postgresql_where=text(_QUARANTINED_SQL),
            sqlite_where=text(_QUARANTINED_SQL),
        ),
    )


_UNRESOLVED_SQL = "status IN (" + ", ".join(f"'{v}'" for v in UNRESOLVED_VALUES) + ")"


class ChargeAttempt(Base):
    """One call to collect-payment, written and committed before the call is made."""

    __tablename__ = "charge_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id"), index=True)
    # A collect charges a stored card; a checkout is paid by the customer on Fatora's hosted page
    # (no card until it is paid: the payment gives one).
    kind: Mapped[str] = mapped_column(String(16), server_default=AttemptKind.COLLECT.value)
    card_token_id: Mapped[int | None] = mapped_column(ForeignKey("card_tokens.id"))
    checkout_url: Mapped[str | None] = mapped_column(String(500))
    order_id: Mapped[str] = mapped_column(String(64), unique=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    call_ending: Mapped[str | None] = mapped_column(String(16))
    transaction_id: Mapped[str | None] = mapped_column(String(120))
    auth_code: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(500))
    classification: Mapped[str | None] = mapped_column(String(32))
    gateway_mode: Mapped[str | None] = mapped_column(String(8))
    verify_count: Mapped[int] = mapped_column(Integer, server_default="0")
    next_verify_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    # System time when the row was written, even under a test clock: how long a request may
    # still be inside the gateway is a matter of real seconds.
    created_wall_at: Mapped[datetime]
    # System time when the collect request left, recorded with the outcome: a 'not found' is
    # read as 'never charged' only a grace period after it (see attempts.not_found_is_final).
    sent_wall_at: Mapped[datetime | None]
    settled_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    __table_args__ = (
        CheckConstraint(_in("status", AttemptStatus), name="status"),
        CheckConstraint(
            "call_ending IS NULL OR " + _in("call_ending", CallEnding), name="call_ending"
        ),
        CheckConstraint(_in("kind", AttemptKind), name="kind"),
        # The fence: at most one attempt per invoice whose outcome is not known. A second worker
        # (a lost lock, a redelivered task) cannot start a charge while the first may have landed.
        Index(
            "uq_charge_attempts_one_unresolved",
            "invoice_id",
            unique=True,
            postgresql_where=text(_UNRESOLVED_SQL),
            sqlite_where=text(_UNRESOLVED_SQL),
        ),
        Index(
            "ix_charge_attempts_unresolved",
            "next_verify_at",
            postgresql_where=text("next_verify_at IS NOT NULL"),
            sqlite_where=text("next_verify_at IS NOT NULL"),
        ),
    )


class Refund(Base):
    """The full refund of a paid invoice: written before Fatora is asked (``requested``), so an
    answer that is lost is followed through verify instead of asking twice (billing/refunds.py).
    One per invoice: the unique constraint is the fence against two refunds at once."""

    __tablename__ = "refunds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id"), unique=True)
    attempt_id: Mapped[int] = mapped_column(ForeignKey("charge_attempts.id"))
    order_id: Mapped[str] = mapped_column(String(64))
    transaction_id: Mapped[str] = mapped_column(String(120))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    refund_transaction_id: Mapped[str | None] = mapped_column(String(120))
    description: Mapped[str | None] = mapped_column(String(500))
    tries: Mapped[int] = mapped_column(Integer, server_default="1")
    requested_at: Mapped[datetime]
    # System time when the refund request last left (committed before it is sent): Fatora is
    # asked again only once verify has shown no refund for BILLING_UNKNOWN_GRACE_S after it.
    sent_wall_at: Mapped[datetime | None]
    settled_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    __table_args__ = (
        CheckConstraint(
            "status IN ('requested', 'pending', 'completed', 'rejected')", name="status"
        ),
    )


# The predicate of the index of the events still to deliver (0005_event_delivery repeats it).
_UNDELIVERED_SQL = f"delivery_status = '{DeliveryStatus.PENDING.value}'"
# The predicate of the index of the alerts not acknowledged yet (0008_alert_ack repeats it; the
# alerts service queries with it, so that the index serves the query).
OPEN_ALERTS_SQL = "kind LIKE 'alert.%' AND acked_at IS NULL"


class Event(Base):
    """The outbox: written in the same transaction as the state change it reports.

    Delivered by ``billing/services/notifications.py``: ``delivery_status`` says where it
    stands, ``delivery_channels`` how each channel (email, alert_email, webhook) went,
    ``next_delivery_at`` when a failed delivery is tried again (NULL: at once), ``last_error``
    why the latest try failed (never a secret), ``failed_at`` when it was given up.
    """

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    subscription_id: Mapped[int | None] = mapped_column(ForeignKey("subscriptions.id"))
    invoice_id: Mapped[int | None] = mapped_column(ForeignKey("invoices.id"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    delivery_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    delivery_status: Mapped[str] = mapped_column(String(16), server_default="pending")
    delivery_channels: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    next_delivery_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    failed_at: Mapped[datetime | None]
    # An alert.* event is open until an operator acknowledges it (billing/services/alerts.py):
    # when, by whom, and the note they gave.
    acked_at: Mapped[datetime | None]
    acked_by: Mapped[str | None] = mapped_column(String(120))
    ack_note: Mapped[str | None] = mapped_column(String(500))

    __table_args__ = (
        CheckConstraint(_in("delivery_status", DeliveryStatus), name="delivery_status"),
        # The deliverer's index: only events still to deliver are in it, so delivered, skipped
        # and failed ones (the bulk of the table) cost the claim nothing.
        Index(
            "ix_events_undelivered",
            "id",
            postgresql_where=text(_UNDELIVERED_SQL),
            sqlite_where=text(_UNDELIVERED_SQL),
        ),
        # Open alerts (billing alerts list, billing status): a handful among all the events.
        Index(
            "ix_events_open_alerts",
            "id",
            postgresql_where=text(OPEN_ALERTS_SQL),
            sqlite_where=text(OPEN_ALERTS_SQL),
        ),
    )


class ControlFlag(Base):
    """Switches the system sets for itself, e.g. collection paused after a 401 from Fatora."""

    __tablename__ = "control_flags"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime]


class ClockRow(Base):
    """The test clock: one row; refused in live mode."""

    __tablename__ = "clock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    now: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)
