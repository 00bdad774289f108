"""Token lifetime: warn before a renewal falls after a token's expiry.

A Fatora token dies six months after issue. The sweep raises one ``card.expiring`` event per
card for each subscription whose next billing falls on or after the card's expiry, so the
customer can be sent a checkout link (paying it yields a fresh token) before the charge fails.
"""

from __future__ import annotations

from sqlalchemy import select

from billing.models import CardStatus, CardToken, Event, Subscription
from billing.runtime import Runtime
from billing.services.events import record_event


def sweep_expiring_tokens(rt: Runtime) -> int:
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
