"""Which card a charge uses: the one rule in ``dunning_flow.pick_card``.

Charging a dead or expired token wastes a decline on the customer's record and can trip the
gateway's fraud rules; charging the wrong live card surprises the customer. These tests pin the
choice without a database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing.models import CardStatus, CardToken, Subscription
from billing.services.dunning_flow import pick_card

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def card(
    card_id: int,
    *,
    issued_days_ago: int,
    status: CardStatus = CardStatus.ACTIVE,
    expires_in_days: int = 90,
) -> CardToken:
    return CardToken(
        id=card_id,
        customer_id=1,
        ciphertext=b"x",
        fingerprint=f"f{card_id}",
        issued_at=NOW - timedelta(days=issued_days_ago),
        expires_at=NOW + timedelta(days=expires_in_days),
        status=status.value,
    )


def sub(card_id: int | None) -> Subscription:
    return Subscription(id=1, customer_id=1, card_token_id=card_id)


def test_the_subscriptions_own_live_card_wins_over_a_newer_one() -> None:
    own, newer = card(1, issued_days_ago=100), card(2, issued_days_ago=1)
    assert pick_card(sub(1), [newer, own], NOW) is own


def test_a_dead_own_card_falls_back_to_the_newest_live_card() -> None:
    cards = [
        card(1, issued_days_ago=100, status=CardStatus.DEAD),
        card(2, issued_days_ago=30),
        card(3, issued_days_ago=5),
        card(4, issued_days_ago=1, status=CardStatus.DEACTIVATED),
    ]
    assert pick_card(sub(1), cards, NOW) is cards[2]


def test_an_expired_token_is_never_chosen() -> None:
    own = card(1, issued_days_ago=200, expires_in_days=0)  # expires exactly now: not alive
    other = card(2, issued_days_ago=300, expires_in_days=-1)
    assert pick_card(sub(1), [own, other], NOW) is None


def test_no_card_on_the_subscription_takes_the_newest_live_one() -> None:
    old, new = card(1, issued_days_ago=60), card(2, issued_days_ago=2)
    assert pick_card(sub(None), [old, new], NOW) is new


def test_cards_issued_at_the_same_moment_are_chosen_the_same_way_every_time() -> None:
    a, b = card(7, issued_days_ago=3), card(9, issued_days_ago=3)
    assert pick_card(sub(None), [a, b], NOW) is b
    assert pick_card(sub(None), [b, a], NOW) is b


def test_no_cards_at_all() -> None:
    assert pick_card(sub(1), [], NOW) is None
