"""Configuration from the environment, in one place (pydantic-settings).

Every knob is an environment variable; ``get_settings()`` reads them once per process.
Secrets are ``SecretStr`` so that a repr or a log line never shows them.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The public sample key from Fatora's documentation: shared by everyone, test merchants only.
FATORA_SAMPLE_API_KEY = "E4B73FEE-F492-4607-A38D-852B0EBC91C9"


class GatewayMode(StrEnum):
    LIVE = "live"
    TEST = "test"


class BillingMode(StrEnum):
    LIVE = "live"
    TEST = "test"


class FatoraSettings(BaseSettings):
    """How to reach the Fatora gateway."""

    model_config = SettingsConfigDict(env_prefix="FATORA_", extra="ignore")

    base_url: str = "https://api.fatora.io/v1"
    api_key: SecretStr = SecretStr(FATORA_SAMPLE_API_KEY)
    timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    mode: GatewayMode = GatewayMode.LIVE
    # Path (under base_url) or full URL of the Deactivate Card Token call: not publicly documented.
    deactivate_path: str = "/payments/deactivate-token"


class BillingSettings(BaseSettings):
    """The worker's own settings."""

    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore")

    mode: BillingMode = BillingMode.LIVE
    database_url: str = "sqlite:///billing.sqlite3"
    broker_url: str = "redis://localhost:6379/0"
    token_key: SecretStr | None = None
    # A charge task processes at most this many invoices, this many gateway calls at a time.
    charge_batch_size: int = Field(default=100, ge=1, le=1000)
    charge_concurrency: int = Field(default=25, ge=1, le=256)
    # A scheduler pass claims at most this many due subscriptions per transaction.
    renewal_batch_size: int = Field(default=500, ge=1, le=100_000)
    # After a collect without a clear answer, a verify 'not found' means 'never charged' only
    # once this much real time has passed since the request left (for a worker that died
    # without saying when: since the attempt was written plus attempts.SEND_WINDOW, 10
    # minutes). A request held by a proxy or an edge can land long after it was sent; lowering
    # this retries sooner at the risk of charging twice. See docs/OPERATIONS.md.
    unknown_grace_s: float = Field(default=21600.0, ge=0)
    # Where charge results are kept for `billing tick --wait` and Flower (defaults to the broker).
    result_backend: str | None = None
    # Base URL of the return endpoint that Fatora redirects payers to after a checkout.
    public_url: str = "http://localhost:8000"
    # How many days before a renewal that falls after a card token's expiry the customer is
    # sent the link to pay it now with a new card (billing/services/cards.py).
    card_expiry_notice_days: int = Field(default=14, ge=1, le=180)

    # Notifications (billing/services/notifications.py): a channel whose URL is unset is skipped.
    # smtp://user:pass@host:587 (STARTTLS, required before a password is sent), smtps://host:465
    # (implicit TLS), smtp://host:25 (plain, without a password: local relays and tests).
    smtp_url: SecretStr | None = None
    email_from: str = "billing@localhost"  # "Shop <billing@shop.example>": the name is signed
    alert_email: str | None = None  # the operator: every alert.* event is emailed here
    # The merchant's endpoint (it may carry a token) and its Standard Webhooks secret whsec_...
    webhook_url: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Push messages through Firebase Cloud Messaging (HTTP v1): the service account's JSON key
    # file, and the API's base URL (tests point it at a local receiver).
    fcm_credentials_file: str | None = None
    fcm_endpoint: str = "https://fcm.googleapis.com"
    # Events claimed (and locked) per delivery transaction.
    notification_batch_size: int = Field(default=50, ge=1, le=1000)


@lru_cache(maxsize=1)
def get_settings() -> BillingSettings:
    return BillingSettings()


@lru_cache(maxsize=1)
def get_fatora_settings() -> FatoraSettings:
    return FatoraSettings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()
    get_fatora_settings.cache_clear()
