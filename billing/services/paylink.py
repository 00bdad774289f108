"""The pay-and-update link: a customer pays an open invoice on Fatora's hosted page, and the same
payment gives a new card, which the subscription is charged with from then on.

``link_for`` makes the link (signed: nobody can guess another customer's). Opening it
(``open_checkout``) writes a ``checkout`` attempt first, like any charge (the fence: while the
customer is on the page, no worker charges the invoice), then asks Fatora for a hosted page with
``save_token`` and sends the customer there; the page is made on demand, so a link never
expires before it is clicked. Fatora's redirect back (``settle_return``) is trusted for nothing:
the invoice's unresolved attempts are settled through verify exactly as a worker would
(``collect_invoices(..., settle_only=True)``: order id, amount, currency and mode checked), and
the card comes from verify's answer (from the redirect only when verify gives none, and only for
a payment verify confirmed). The redirect may come several times, forged or replayed: it only
ever triggers that settling, which is idempotent.

A page left unpaid stays open for ``BILLING_UNKNOWN_GRACE_S`` (a payment on it may still land);
then the worker's schedule resumes, and the link makes a new page when the customer comes back.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.attempts import (
    UNRESOLVED_VALUES,
    AttemptKind,
    AttemptStatus,
    CallEnding,
    next_verify_delay,
)
from billing.config import get_settings
from billing.crypto import TokenVault
from billing.fatora.errors import FatoraError
from billing.fatora.parsing import parse_redirect_params
from billing.lifecycle import (
    InvoiceStatus,
    SubscriptionEvent,
    SubscriptionState,
    SubscriptionStatus,
    apply,
)
from billing.models import ChargeAttempt, Customer, Invoice, Subscription
from billing.money import from_minor
from billing.runtime import Runtime
from billing.services import control
from billing.services.dunning_flow import ahead_payable, unresolved_attempt
from billing.services.events import record_event

log = logging.getLogger("billing.paylink")


# An invoice the link can still be paid for: open, or written off at the end of the dunning
# ladder (paying it brings an unpaid subscription back).
PAYABLE = frozenset({InvoiceStatus.OPEN.value, InvoiceStatus.UNCOLLECTIBLE.value})


@dataclass(frozen=True)
class Page:
    """What the customer is shown (``word``) or where they are sent (``url``)."""

    # redirect, paid, pending, failed, closed, nothing_due, busy, unavailable, invalid
    word: str
    language: str = "en"
    url: str | None = None
    link: str | None = None  # the pay link again, to try once more


def _signature(vault: TokenVault, purpose: str, number: int) -> list[str]:
    # The vault's keyed fingerprint, kept apart from token fingerprints (and the pay link from
    # the renew link) by its prefix; every configured key is accepted, so links survive a key
    # rotation.
    return [mac[:24] for mac in vault.fingerprints(f"{purpose}:{number}")]


def _reference(vault: TokenVault, purpose: str, number: int) -> str:
    return f"{number}-{_signature(vault, purpose, number)[0]}"


def _number_of(vault: TokenVault, purpose: str, ref: str) -> int | None:
    number, _, signature = ref.partition("-")
    if not (number.isascii() and number.isdigit()) or len(number) > 18:
        return None
    value = int(number)
    if not any(hmac.compare_digest(signature, good) for good in _signature(vault, purpose, value)):
        return None
    return value


def reference(vault: TokenVault, invoice_id: int) -> str:
    return _reference(vault, "pay-link", invoice_id)


def link_for(vault: TokenVault, invoice_id: int) -> str:
    """The customer's link to pay this invoice (and replace the card)."""
    return f"{get_settings().public_url.rstrip('/')}/pay/{reference(vault, invoice_id)}"


def invoice_of_reference(vault: TokenVault, ref: str) -> int | None:
    """The invoice a reference names, or None for a forged or damaged one."""
    return _number_of(vault, "pay-link", ref)


def renew_link_for(vault: TokenVault, subscription_id: int, renewal: datetime) -> str:
    """The link that pays the subscription's renewal of ``renewal`` (its next billing time)
    ahead, with a new card: sent before a renewal that falls after the card's token dies
    (``card.expiring``). It names that one renewal: once it is paid, or has happened, the link
    has nothing more to pay."""
    at = int(renewal.timestamp())
    mac = _signature(vault, "renew-link", _renewal_key(subscription_id, at))[0]
    ref = f"{subscription_id}.{at}-{mac}"
    return f"{get_settings().public_url.rstrip('/')}/renew/{ref}"


def _renewal_key(subscription_id: int, at: int) -> int:
    # One number for the MAC's message: the subscription and the renewal's second, apart.
    return subscription_id * 10**12 + at


def _renewal_of(vault: TokenVault, ref: str) -> tuple[int, datetime] | None:
    head, _, signature = ref.partition("-")
    sub_text, _, at_text = head.partition(".")
    if not (sub_text.isascii() and sub_text.isdigit() and at_text.isascii() and at_text.isdigit()):
        return None
    if len(sub_text) > 9 or len(at_text) > 11:
        return None
    sub_id, at = int(sub_text), int(at_text)
    good = _signature(vault, "renew-link", _renewal_key(sub_id, at))
    if not any(hmac.compare_digest(signature, mac) for mac in good):
        return None
    return sub_id, datetime.fromtimestamp(at, UTC)


def renew_ahead(rt: Runtime, ref: str) -> Page:
    """Open the hosted page for the renewal the link was sent for.

    An older invoice of the subscription still to be paid is paid first (its own page). Else,
    while that renewal is still to come (the subscription renews, is not set to cancel at its
    period's end, and the renewal is within the expiry notice), the coming period's invoice is
    made for the link only (``renewal.invoice_ahead``): the subscription is not renewed early,
    no worker charges that invoice, and on the renewal's date the usual renewal charges it
    unless it was paid. Anything else has nothing to pay yet.
    """
    from billing.services.cards import notice_period
    from schedules.renewal import RENEWING, invoice_ahead

    found = _renewal_of(rt.vault, ref)
    if found is None:
        return Page("invalid")
    sub_id, renewal = found
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        sub = session.get(Subscription, sub_id, with_for_update=True)
        if sub is None:
            return Page("invalid")
        customer = session.get(Customer, sub.customer_id)
        language = customer.language if customer is not None else "en"
        owed = session.execute(
            select(Invoice.id)
            .where(
                Invoice.subscription_id == sub.id,
                Invoice.status.in_(PAYABLE),
                Invoice.period_start <= renewal,
                Invoice.link_only.is_(False),
            )
            .order_by(Invoice.period_start)
            .limit(1)
        ).scalar_one_or_none()
        if owed is None:
            if (
                sub.next_billing_at is None
                or int(sub.next_billing_at.timestamp()) != int(renewal.timestamp())
                or sub.status not in RENEWING
                or sub.cancel_at_period_end
                or renewal > now + notice_period() + timedelta(days=1)
            ):
                return Page("nothing_due", language)
            owed = invoice_ahead(session, sub, now)
            invoice = session.get(Invoice, owed)
            assert invoice is not None
            if invoice.status not in PAYABLE:
                return Page("nothing_due", language)
    return open_checkout(rt, reference(rt.vault, owed))


def open_checkout(rt: Runtime, ref: str) -> Page:
    invoice_id = invoice_of_reference(rt.vault, ref)
    if invoice_id is None:
        return Page("invalid")
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        invoice = session.get(Invoice, invoice_id)
        if invoice is None:
            return Page("invalid")
        sub = session.get(Subscription, invoice.subscription_id, with_for_update=True)
        session.refresh(invoice, with_for_update=True)
        assert sub is not None
        customer = session.get(Customer, sub.customer_id)
        assert customer is not None
        language = customer.language
        if invoice.status == InvoiceStatus.PAID.value:
            return Page("paid", language)
        if invoice.status not in PAYABLE:
            return Page("closed", language)
        if _first_payment_expired(session, sub, invoice, now):
            return Page("expired", language)
        if (
            invoice.link_only
            and sub.status != SubscriptionStatus.UNPAID.value
            and not ahead_payable(sub, invoice)
        ):
            return Page("nothing_due", language)  # made ahead for a renewal that will not come
        open_attempt = unresolved_attempt(session, invoice.id)
        if open_attempt is not None:
            if open_attempt.kind == AttemptKind.CHECKOUT.value and open_attempt.checkout_url:
                return Page("redirect", language, url=open_attempt.checkout_url)
            return Page("busy", language)  # a charge is under way: its outcome comes first
        if control.collection_paused(session) is not None:
            return Page("unavailable", language)
        from billing.services.charging import new_order_id

        attempt = ChargeAttempt(
            invoice_id=invoice.id,
            kind=AttemptKind.CHECKOUT.value,
            card_token_id=None,
            order_id=new_order_id(invoice),
            amount_minor=invoice.amount_minor,
            currency=invoice.currency,
            status=AttemptStatus.PENDING.value,
            call_ending=CallEnding.NO_ANSWER.value,
            classification="checkout",
            next_verify_at=now + next_verify_delay(0),
            created_at=now,
            created_wall_at=datetime.now(UTC),
            sent_wall_at=datetime.now(UTC),
            updated_at=now,
        )
        session.add(attempt)
        invoice.attempt_count += 1
        invoice.updated_at = now
        session.flush()
        attempt_id, order_id = attempt.id, attempt.order_id
        amount = from_minor(invoice.amount_minor, invoice.currency)
        currency = invoice.currency
        client = (customer.name, customer.email, customer.phone)
    back = f"{get_settings().public_url.rstrip('/')}/return/{ref}"
    try:
        hosted = rt.gateway.checkout(
            amount=amount,
            currency=currency,
            order_id=order_id,
            client_name=client[0],
            client_email=client[1],
            client_phone=client[2],
            language=language,
            success_url=back,
            failure_url=back,
            save_token=True,
        )
    except FatoraError as exc:
        # Making a hosted page moves no money: the attempt ends here, nothing to verify.
        log.warning("checkout for invoice %s could not be made: %s", invoice_id, exc.answer)
        _close(rt, attempt_id, f"checkout not made: {type(exc).__name__}")
        return Page("unavailable", language)
    with rt.sessions() as session, session.begin():
        row = session.get(ChargeAttempt, attempt_id, with_for_update=True)
        if row is not None:
            row.checkout_url = hosted.checkout_url[:500]
    return Page("redirect", language, url=hosted.checkout_url)


# A subscription started on the hosted page waits this long for its first payment (like an
# "incomplete" subscription elsewhere): then its link expires and it is canceled, so that a
# payment weeks later does not buy a period that is long over.
FIRST_PAYMENT_WINDOW = timedelta(hours=24)


def _first_payment_expired(
    session: Session, sub: Subscription, invoice: Invoice, now: datetime
) -> bool:
    """A first period's link opened after the window: the invoice is voided and the
    subscription canceled (both locked by the caller). Nothing unresolved is voided."""
    if not (invoice.link_only and sub.status == SubscriptionStatus.UNPAID.value):
        return False
    if now <= invoice.created_at + FIRST_PAYMENT_WINDOW:
        return False
    if unresolved_attempt(session, invoice.id) is not None:
        return False
    watched = session.execute(
        select(ChargeAttempt.id).where(
            ChargeAttempt.invoice_id == invoice.id, ChargeAttempt.next_verify_at.is_not(None)
        )
    ).first()
    if watched is not None:
        return False  # a closed page is still verified: a payment on it may yet come
    invoice.status = InvoiceStatus.VOID.value
    invoice.updated_at = now
    sub.status = apply(
        SubscriptionState(SubscriptionStatus(sub.status), sub.cancel_at_period_end),
        SubscriptionEvent.CANCEL,
    ).status.value
    sub.canceled_at = now
    sub.next_billing_at = None
    sub.updated_at = now
    record_event(
        session,
        "subscription.canceled",
        subscription=sub,
        now=now,
        payload={"reason": "first_payment_expired", "invoice_id": invoice.id},
    )
    return True


def _close(rt: Runtime, attempt_id: int, why: str) -> None:
    with rt.sessions() as session, session.begin():
        row = session.get(ChargeAttempt, attempt_id, with_for_update=True)
        if row is not None and row.status in UNRESOLVED_VALUES:
            now = rt.clock.now()
            row.status = AttemptStatus.FAILED.value
            row.description = why[:500]
            row.next_verify_at = None
            row.settled_at = now
            row.updated_at = now


def settle_return(rt: Runtime, ref: str, query: str) -> Page:
    """Fatora sent the customer back: settle through verify, never through the redirect."""
    from billing.services.charging import collect_invoices

    invoice_id = invoice_of_reference(rt.vault, ref)
    if invoice_id is None:
        return Page("invalid")
    collect_invoices(rt, [invoice_id], settle_only=True)
    try:
        redirect = parse_redirect_params(query)
    except ValueError:
        redirect = None
    with rt.sessions() as session, session.begin():
        invoice = session.get(Invoice, invoice_id)
        if invoice is None:
            return Page("invalid")
        sub = session.get(Subscription, invoice.subscription_id)
        customer = session.get(Customer, sub.customer_id) if sub is not None else None
        language = customer.language if customer is not None else "en"
        latest = session.execute(
            select(ChargeAttempt)
            .where(
                ChargeAttempt.invoice_id == invoice.id,
                ChargeAttempt.kind == AttemptKind.CHECKOUT.value,
            )
            .order_by(ChargeAttempt.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        if invoice.status == InvoiceStatus.PAID.value:
            if (
                latest is not None
                and latest.status == AttemptStatus.SUCCEEDED.value
                and latest.card_token_id is None
                and redirect is not None
                and redirect.card_token
                and redirect.order_id == latest.order_id
            ):
                # Verify confirmed this payment but did not report its card: the redirect's
                # token is the only one there is (a forged one would only fail when charged).
                from billing.services.charging import adopt_card

                adopt_card(rt, session, invoice, latest, redirect.card_token, rt.clock.now())
            return Page("paid", language)
        if invoice.status not in PAYABLE:
            return Page("closed", language)
        if latest is not None and latest.status in UNRESOLVED_VALUES:
            return Page("pending", language)
    return Page("failed", language, link=link_for(rt.vault, invoice_id))
