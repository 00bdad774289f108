"""Configuration from the environment, in one place (pydantic-settings).

Every knob is an environment variable; ``get_settings()`` reads them once per process.
Secrets are ``SecretStr`` so that a repr or a log line never shows them.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
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

    # A value never appears in an error: it may be a key or a URL with a password in it.
    model_config = SettingsConfigDict(
        env_prefix="FATORA_", extra="ignore", hide_input_in_errors=True
    )

    base_url: str = "https://api.fatora.io/v1"
    api_key: SecretStr = SecretStr(FATORA_SAMPLE_API_KEY)
    timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    mode: GatewayMode = GatewayMode.LIVE
    # Path (under base_url) or full URL of the Deactivate Card Token call: not publicly documented.
    deactivate_path: str = "/payments/deactivate-token"


class BillingSettings(BaseSettings):
    """The worker's own settings."""

    model_config = SettingsConfigDict(
        env_prefix="BILLING_", extra="ignore", hide_input_in_errors=True
    )

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

    # Prometheus metrics (billing/metrics.py): every worker serves /metrics on this port, and so
    # does `billing metrics`; 0 serves nothing from the worker. Scraped from other hosts, so
    # every interface by default.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"  # noqa: S104
    # At most this many Fatora calls in flight across every worker sharing the broker's Redis
    # (billing/gateway_cap.py); 0: no cap. A call that gets no slot within gateway_cap_wait_s
    # (or cannot reach Redis) is not sent, and fails as a request that never left.
    gateway_max_in_flight: int = Field(default=0, ge=0, le=100_000)
    gateway_cap_wait_s: float = Field(default=10.0, gt=0, le=60)
    # How the worker, beat, `billing web` and `billing sandbox` write their log lines
    # (billing/logs.py): text, or one JSON object per line.
    log_format: Literal["text", "json"] = "text"

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, url: str) -> str:
        return check_database_url(url)

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        return check_broker_url(url)


# The databases this code runs on: PostgreSQL (psycopg 3) and SQLite (the embedded default).
SUPPORTED_DATABASES = ("postgresql", "postgres", "sqlite")
DATABASE_URL_FORMS = "postgresql://USER:PASSWORD@HOST:5432/NAME or sqlite:///PATH"


def check_database_url(url: str) -> str:
    """``url`` if it names a supported database; the error never repeats the URL (it may hold a
    password), only its scheme."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ValueError(f"not a database URL; use {DATABASE_URL_FORMS}") from None
    if backend not in SUPPORTED_DATABASES:
        raise ValueError(
            f"{backend} is not supported: only PostgreSQL and SQLite are; use {DATABASE_URL_FORMS}"
        )
    return url


def check_broker_url(url: str) -> str:
    """``url`` if Celery knows its transport (``redis://``, ``memory://``...); the error names
    the scheme only."""
    from kombu.transport import TRANSPORT_ALIASES

    scheme, separator, _rest = url.partition("://")
    if not separator:
        raise ValueError("not a broker URL; use redis://HOST:6379/0 (or memory:// for one process)")
    if scheme.split("+", 1)[0] not in TRANSPORT_ALIASES:
        raise ValueError(f"{scheme}:// is not a broker Celery knows; use redis://HOST:6379/0")
    return url


class SettingsError(ValueError):
    """A setting in the environment is missing or wrong: one line naming the variable and what
    is wrong with its value, never the value itself."""


_Settings = TypeVar("_Settings", bound=BaseSettings)


def load_settings(kind: type[_Settings]) -> _Settings:
    """``kind()`` read from the environment, its validation errors as one ``SettingsError``."""
    try:
        return kind()
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(kind, exc)) from None


def describe_settings_error(kind: type[BaseSettings], exc: ValidationError) -> str:
    """``BILLING_MODE: input should be 'live' or 'test'``: the variable of each error and what is
    wrong, on one line (pydantic's own text spans lines and may quote the value)."""
    prefix = str(kind.model_config.get("env_prefix") or "")
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        field = "_".join(str(part) for part in error["loc"]) or "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{(prefix + field).upper()}: {message[:1].lower()}{message[1:]}")
    listed = "; ".join(problems)
    return f"setting {listed} (fix it in the environment)"


@lru_cache(maxsize=1)
def get_settings() -> BillingSettings:
    return load_settings(BillingSettings)


@lru_cache(maxsize=1)
def get_fatora_settings() -> FatoraSettings:
    return load_settings(FatoraSettings)


def reset_settings_cache() -> None:
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()
    get_fatora_settings.cache_clear()
