"""Customers and their card tokens."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.relativedelta import relativedelta
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.crypto import TokenVault
from billing.models import CardStatus, CardToken, Customer
from billing.services.errors import BillingError, Conflict, NotFound

# Fatora tokens die six months after issue (or earlier, when the card expires).
TOKEN_LIFETIME = relativedelta(months=6)


def add_customer(
    session: Session,
    *,
    external_id: str,
    name: str,
    email: str,
    now: datetime,
    phone: str | None = None,
    language: str = "en",
    timezone: str = "Asia/Qatar",
    fcm_token: str | None = None,
) -> Customer:
    if not external_id.strip():
        raise BillingError("--external-id must not be empty")
    _check_contact(email, language, timezone)
    customer = Customer(
        external_id=external_id.strip(),
        name=name,
        email=email,
        phone=phone,
        language=language,
        timezone=timezone,
        fcm_token=fcm_token,
        created_at=now,
    )
    session.add(customer)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a customer with external id {external_id!r} exists already") from None
    return customer


def _check_contact(email: str | None, language: str | None, timezone: str | None) -> None:
    if email is not None and "@" not in email:
        raise BillingError(f"--email {email!r} is not an email address")
    if language is not None and language not in ("en", "ar"):
        raise BillingError(f"--language must be en or ar, not {language!r}")
    if timezone is not None:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise BillingError(f"--timezone {timezone!r} is not a known time zone") from None


def update_customer(
    session: Session,
    customer: Customer,
    *,
    name: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    language: str | None = None,
    timezone: str | None = None,
    fcm_token: str | None = None,
) -> list[str]:
    """Change what is given; returns the names of the fields changed. An empty phone or device
    token clears it. Messages not yet sent go to the new address and language."""
    _check_contact(email, language, timezone)
    if name is not None and not name.strip():
        raise BillingError("--name must not be empty")
    session.refresh(customer, with_for_update=True)
    wanted: dict[str, str | None] = {
        "name": name,
        "email": email,
        "phone": phone,
        "language": language,
        "timezone": timezone,
        "fcm_token": fcm_token,
    }
    changed = []
    for field, value in wanted.items():
        if value is None:
            continue
        stored = value.strip() or None if field in ("phone", "fcm_token") else value
        if getattr(customer, field) != stored:
            setattr(customer, field, stored)
            changed.append(field)
    return changed


def customer_by_external_id(session: Session, external_id: str) -> Customer:
    customer = session.execute(
        select(Customer).where(Customer.external_id == external_id)
    ).scalar_one_or_none()
    if customer is None:
        raise NotFound(f"no customer with external id {external_id!r}")
    return customer


def add_card(
    session: Session,
    vault: TokenVault,
    *,
    customer: Customer,
    token: str,
    now: datetime,
    issued_at: datetime | None = None,
) -> CardToken:
    """Store a card token encrypted; the same token twice is refused (by its fingerprint)."""
    if not token or token != token.strip() or any(ch in token for ch in "\r\n\t "):
        raise BillingError("the card token is empty or has white space (tokens are stored as is)")
    existing = session.execute(
        select(CardToken.id).where(CardToken.fingerprint.in_(vault.fingerprints(token)))
    ).first()
    if existing is not None:
        raise Conflict(f"this card token is stored already (card {existing[0]})")
    issued = issued_at or now
    card = CardToken(
        customer_id=customer.id,
        ciphertext=vault.encrypt(token),
        fingerprint=vault.fingerprint(token),
        issued_at=issued,
        expires_at=issued + TOKEN_LIFETIME,
        status=CardStatus.ACTIVE.value,
        created_at=now,
    )
    session.add(card)
    session.flush()
    return card


def card_of(session: Session, card_id: int) -> CardToken:
    card = session.get(CardToken, card_id)
    if card is None:
        raise NotFound(f"no card {card_id}")
    return card
