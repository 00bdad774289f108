"""Card tokens over their life: which card a subscription is charged with, the warning before a
token dies, and the deactivation of tokens nobody needs any more.

A Fatora token dies six months after issue (or with the card). A dead token is never charged:
``dunning_flow.pick_card`` only picks live cards, so at the renewal that falls after the expiry
the subscription's newest other live card is charged, or the customer is asked for a new one
through the link. Before that, ``sweep_expiring_tokens`` raises one ``card.expiring`` event per
card and subscription when the renewal after the expiry is at most
``BILLING_CARD_EXPIRY_NOTICE_DAYS`` away; its email carries the renew-ahead link
(``paylink.renew_link_for``), which invoices the coming period at once and lets the customer
pay it on Fatora's hosted page, which gives a fresh token.

A token is *needed* while its customer has a subscription that is not canceled: the
subscription's own card is charged, and the customer's other live cards are its fallbacks.
``deactivate_unneeded_tokens`` deactivates the live tokens of customers whose subscriptions
have all ended a week ago or more (never the card of a customer who has no subscription
yet); ``remove_card`` is the operator's way to deactivate one card now. Fatora
answers HTTP 422 to a token already deactivated, which the client reports as done.

Locks: deactivation locks the customer row, then (``remove_card``) the customer's
subscriptions in id order, then the card (``FOR UPDATE``), and keeps them while Fatora is asked:
the charge path locks subscriptions before it chooses a card, and creating a subscription or an
attempt that references the customer or the card takes a key-share lock on it, so nothing starts
using the card while it is being deactivated; the need is read again under the locks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.orm import Session

from billing.crypto import TokenUnreadable
from billing.fatora.answers import Answer
from billing.fatora.errors import FatoraError
from billing.lifecycle import SubscriptionStatus
from billing.models import CardStatus, CardToken, Customer, Event, Subscription
from billing.runtime import Runtime
from billing.services.dunning_flow import customer_cards, pick_card
from billing.services.errors import BillingError, NotFound
from billing.services.events import record_event

log = logging.getLogger("billing.cards")


def notice_period() -> timedelta:
    from billing.config import get_settings

    return timedelta(days=get_settings().card_expiry_notice_days)


# -- the warning before a token dies ---------------------------------------------------------


def sweep_expiring_tokens(rt: Runtime, notice: timedelta | None = None) -> int:
    """Raise ``card.expiring`` for each subscription whose next renewal, at most ``notice``
    away, falls on or after its card's expiry; once per card and subscription."""
    ahead = notice_period() if notice is None else notice
    raised = 0
    with rt.sessions() as session, session.begin():
        now = rt.clock.now()
        rows = session.execute(
            select(Subscription, CardToken)
            .join(CardToken, CardToken.id == Subscription.card_token_id)
            .where(
                CardToken.status == CardStatus.ACTIVE.value,
                Subscription.next_billing_at.is_not(None),
                Subscription.next_billing_at >= CardToken.expires_at,
                Subscription.next_billing_at <= now + ahead,
                Subscription.cancel_at_period_end.is_(False),
            )
        ).all()
        for sub, card in rows:
            seen = session.execute(
                select(Event.id).where(
                    Event.kind == "card.expiring",
                    Event.subscription_id == sub.id,
                    Event.payload["card_id"].as_integer() == card.id,
                )
            ).first()
            if seen is not None:
                continue
            record_event(
                session,
                "card.expiring",
                subscription=sub,
                now=now,
                payload={"card_id": card.id, "expires_at": card.expires_at.isoformat()},
            )
            raised += 1
    return raised


# -- an operator's view and choices ----------------------------------------------------------


def list_cards(session: Session, customer: Customer | None = None) -> list[CardToken]:
    query = select(CardToken).order_by(CardToken.customer_id, CardToken.id)
    if customer is not None:
        query = query.where(CardToken.customer_id == customer.id)
    return list(session.execute(query).scalars())


def _card(session: Session, card_id: int, *, lock: bool = False) -> CardToken:
    card = session.get(CardToken, card_id, with_for_update=lock or None)
    if card is None:
        raise NotFound(f"no card {card_id}")
    return card


def set_default(
    session: Session, card_id: int, now: datetime, *, subscription_id: int | None = None
) -> list[int]:
    """Charge the customer's subscriptions (or the one named) with this card from now on;
    returns the subscriptions switched. Canceled subscriptions are left as they are."""
    card = _card(session, card_id)
    if card.status != CardStatus.ACTIVE.value or card.expires_at <= now:
        raise BillingError(
            f"card {card_id} is {'expired' if card.status == 'active' else card.status}: "
            "it cannot be charged"
        )
    query = select(Subscription).where(
        Subscription.customer_id == card.customer_id,
        Subscription.status != SubscriptionStatus.CANCELED.value,
    )
    if subscription_id is not None:
        sub = session.get(Subscription, subscription_id)
        if sub is None:
            raise NotFound(f"no subscription {subscription_id}")
        if sub.customer_id != card.customer_id:
            raise BillingError(f"card {card_id} belongs to another customer than subscription")
        query = query.where(Subscription.id == subscription_id)
    switched = []
    for sub in session.execute(query.order_by(Subscription.id).with_for_update()).scalars():
        if sub.card_token_id != card.id:
            previous = sub.card_token_id
            sub.card_token_id = card.id
            sub.updated_at = now
            record_event(
                session,
                "subscription.card_changed",
                subscription=sub,
                now=now,
                payload={"card_id": card.id, "previous_card_id": previous, "by": "operator"},
            )
            switched.append(sub.id)
    if subscription_id is not None and not switched:
        sub = session.get(Subscription, subscription_id)
        if sub is not None and sub.status == SubscriptionStatus.CANCELED.value:
            raise BillingError(f"subscription {subscription_id} is canceled")
    return switched


@dataclass(frozen=True)
class Removal:
    card_id: int
    at_gateway: bool  # False: the token could not be read, so Fatora was not asked
    moved: dict[int, int | None]  # subscription id -> its card now (None: asks for a new one)


def remove_card(rt: Runtime, card_id: int, *, local_only: bool = False) -> Removal:
    """Deactivate the card at Fatora, then stop using it: its subscriptions move to the
    customer's newest other live card, or to none (the next charge asks for a new card).

    Nothing changes here unless Fatora confirmed (or said it was done already). A token that
    cannot be decrypted cannot be sent to Fatora: ``local_only`` removes it here only.
    """
    with rt.sessions() as session, session.begin():
        customer_id = _card(session, card_id).customer_id
        # The order every writer uses: the customer, then their subscriptions (in id order, as
        # the charge path locks them), then the card. A charge that has not chosen its card yet
        # waits, then reads it deactivated; one that has is sent before the card is touched.
        session.get(Customer, customer_id, with_for_update=True)
        session.execute(
            select(Subscription.id)
            .where(Subscription.customer_id == customer_id)
            .order_by(Subscription.id)
            .with_for_update()
        ).all()
        card = session.execute(
            select(CardToken)
            .where(CardToken.id == card_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()
        if card.status == CardStatus.DEACTIVATED.value:
            raise BillingError(f"card {card_id} is deactivated already")
        at_gateway = False
        if not local_only:
            try:
                token = rt.vault.decrypt(card.ciphertext)
            except TokenUnreadable:
                raise BillingError(
                    f"card {card_id} cannot be decrypted with the configured keys, so Fatora "
                    "cannot be asked to deactivate it; --local-only removes it here only"
                ) from None
            try:
                rt.gateway.deactivate_token(token)
            except FatoraError as exc:
                raise BillingError(
                    f"Fatora did not confirm the deactivation of card {card_id} "
                    f"({type(exc).__name__}); nothing was changed: try again"
                ) from None
            at_gateway = True
        now = rt.clock.now()
        moved = _retire(session, card, now, "removed by an operator")
    return Removal(card_id, at_gateway, moved)


def _retire(session: Session, card: CardToken, now: datetime, why: str) -> dict[int, int | None]:
    card.status = CardStatus.DEACTIVATED.value
    card.status_reason = why
    card.deactivated_at = now
    subs = session.execute(
        select(Subscription)
        .where(Subscription.card_token_id == card.id)
        .order_by(Subscription.id)
        .with_for_update()
    ).scalars()
    moved: dict[int, int | None] = {}
    cards = customer_cards(session, [card.customer_id])[card.customer_id]
    for sub in subs:
        replacement = pick_card(sub, cards, now)
        sub.card_token_id = replacement.id if replacement is not None else None
        sub.updated_at = now
        moved[sub.id] = sub.card_token_id
    record_event(
        session,
        "card.deactivated",
        customer_id=card.customer_id,
        now=now,
        payload={"card_id": card.id, "reason": why},
    )
    return moved


# -- tokens nobody needs ---------------------------------------------------------------------


# A token is deactivated only this long after its customer's last subscription ended (and this
# long after it was stored): a customer between two subscriptions, or whose card was stored
# before the subscription is created, keeps it.
UNNEEDED_AFTER = timedelta(days=7)


def _unneeded(customer_id: object, now: datetime) -> ColumnElement[bool]:
    """The customer has had subscriptions, and every one ended at least UNNEEDED_AFTER ago."""
    ended = Subscription.customer_id == customer_id
    return and_(
        exists().where(ended),
        ~exists().where(
            ended,
            or_(
                Subscription.status != SubscriptionStatus.CANCELED.value,
                Subscription.canceled_at.is_(None),
                Subscription.canceled_at > now - UNNEEDED_AFTER,
            ),
        ),
    )


@dataclass
class DeactivationReport:
    deactivated: int = 0
    failed: int = 0
    skipped: int = 0  # needed again, or locked by someone else: looked at on the next sweep


def deactivate_unneeded_tokens(rt: Runtime, limit: int = 200) -> DeactivationReport:
    """Deactivate at Fatora the live tokens of customers with no subscription left."""
    report = DeactivationReport()
    with rt.sessions() as session:
        now = rt.clock.now()
        candidates = list(
            session.execute(
                select(CardToken.id, CardToken.customer_id)
                .where(
                    CardToken.status == CardStatus.ACTIVE.value,
                    CardToken.expires_at > now,
                    CardToken.created_at <= now - UNNEEDED_AFTER,
                    _unneeded(CardToken.customer_id, now),
                )
                .order_by(CardToken.id)
                .limit(limit)
            ).all()
        )
    for card_id, customer_id in candidates:
        outcome = _deactivate_one(rt, card_id, customer_id)
        if outcome == "done":
            report.deactivated += 1
        elif outcome == "failed":
            report.failed += 1
        elif outcome == "stop":
            report.failed += 1
            break  # the gateway refuses our key: asking again for every card helps nobody
        else:
            report.skipped += 1
    return report


def _deactivate_one(rt: Runtime, card_id: int, customer_id: int) -> str:
    with rt.sessions() as session, session.begin():
        locked = session.execute(
            select(Customer.id)
            .where(Customer.id == customer_id)
            .with_for_update(skip_locked=_is_pg(session))
        ).first()
        card = session.execute(
            select(CardToken)
            .where(CardToken.id == card_id)
            .with_for_update(skip_locked=_is_pg(session))
        ).scalar_one_or_none()
        if locked is None or card is None or card.status != CardStatus.ACTIVE.value:
            return "skipped"
        if not session.execute(select(_unneeded(customer_id, rt.clock.now()))).scalar():
            return "skipped"
        try:
            token = rt.vault.decrypt(card.ciphertext)
        except TokenUnreadable:
            log.error("card %s cannot be decrypted: it cannot be deactivated at Fatora", card_id)
            return "failed"
        try:
            rt.gateway.deactivate_token(token)
        except FatoraError as exc:
            log.warning("card %s: deactivation not confirmed (%s)", card_id, exc.answer)
            return "stop" if exc.answer in (Answer.AUTH, Answer.KEY_WORDS) else "failed"
        _retire(session, card, rt.clock.now(), "no subscription needs it")
        return "done"


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"
