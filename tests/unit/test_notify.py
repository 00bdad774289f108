"""The pure delivery decisions: routing, the retry schedule, the outcome of a run, the webhook
signature and body, and the scrubbing of secrets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook

from billing.notify import (
    GIVE_UP_AFTER,
    MAX_RETRY_DELAY,
    BadWebhookSecret,
    Channel,
    ChannelStatus,
    DeliveryStatus,
    channels_for,
    conclude,
    max_tries,
    message_id,
    next_retry,
    retry_delay,
    scrub,
    webhook_body,
    webhook_headers,
    webhook_key,
)

# The test vector of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_signature_matches_the_specifications_example() -> None:
    """Merchants verify with any Standard Webhooks library: our headers reproduce the spec's
    published signature exactly."""
    headers = webhook_headers(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert headers == {
        "content-type": "application/json",
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_a_fresh_delivery_verifies_with_the_reference_library() -> None:
    """What we sign now, the `standardwebhooks` verifier accepts (its clock check included)."""
    body = webhook_body(
        event_id=7,
        kind="invoice.paid",
        created_at=datetime(2026, 1, 31, 9, tzinfo=UTC),
        customer={"id": 1, "external_id": "C1"},
        subscription_id=2,
        invoice=None,
        invoice_id=None,
        payload={"order_id": "o-1"},
    )
    now = int(datetime.now(UTC).timestamp())
    headers = webhook_headers(SPEC_SECRET, "7", now, body)
    assert Webhook(SPEC_SECRET).verify(body, headers)["data"]["event_id"] == 7


@pytest.mark.parametrize(
    "secret", ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="]
)
def test_a_malformed_secret_is_refused_without_repeating_it(secret: str) -> None:
    """A secret that is not whsec_<base64> (of at least 16 bytes) signs nothing, and the error
    never shows it."""
    with pytest.raises(BadWebhookSecret) as info:
        webhook_key(secret)
    assert secret == "" or secret not in str(info.value)
    with pytest.raises(BadWebhookSecret):
        webhook_headers(secret, "1", 1, b"{}")


def test_the_body_is_stable_and_leaves_credential_like_keys_out() -> None:
    """The same event gives the same bytes on every re-send; a payload key that sounds like a
    credential never reaches the merchant."""
    kwargs = {
        "event_id": 1,
        "kind": "card.expiring",
        "created_at": datetime(2026, 1, 31, 9, tzinfo=UTC),
        "customer": None,
        "subscription_id": 3,
        "invoice": None,
        "invoice_id": None,
        "payload": {"card_id": 4, "card_token": "tok", "expires_at": "2026-07-01"},
    }
    body = webhook_body(**kwargs)  # type: ignore[arg-type]
    assert body == webhook_body(**kwargs)  # type: ignore[arg-type]
    document = json.loads(body)
    assert document["type"] == "card.expiring" and document["timestamp"] == "2026-01-31T09:00:00Z"
    assert document["data"]["payload"] == {"card_id": 4, "expires_at": "2026-07-01"}


def test_routing() -> None:
    """Customers get email (and push) for the five kinds that concern them; alerts go to the
    operator only; the merchant gets every other kind but the operator's bookkeeping."""
    assert channels_for("invoice.paid", {}) == (Channel.EMAIL, Channel.PUSH, Channel.WEBHOOK)
    assert channels_for("invoice.created", {}) == (Channel.WEBHOOK,)
    assert channels_for("alert.duplicate_payment", {}) == (Channel.ALERT_EMAIL,)
    assert channels_for("row.released", {}) == ()
    assert channels_for("subscription.canceled", {}) == (
        Channel.EMAIL,
        Channel.PUSH,
        Channel.WEBHOOK,
    )
    assert channels_for("subscription.canceled", {"reason": "dunning_exhausted"}) == (
        Channel.WEBHOOK,
    )
    assert channels_for("some.new_kind", {}) == (Channel.WEBHOOK,)


def test_the_retry_schedule() -> None:
    """1 min doubling, at most 6 h apart, the last try exactly 24 h after the first, then none:
    13 tries."""
    assert [retry_delay(k) for k in (1, 2, 3, 9, 10, 40)] == [
        timedelta(minutes=1),
        timedelta(minutes=2),
        timedelta(minutes=4),
        timedelta(minutes=256),
        MAX_RETRY_DELAY,
        MAX_RETRY_DELAY,
    ]
    offsets = [timedelta()]
    for tries in range(1, 100):
        delay = next_retry(tries)
        if delay is None:
            break
        offsets.append(offsets[-1] + delay)
    assert len(offsets) == max_tries() == 13
    assert offsets[-1] == GIVE_UP_AFTER
    assert next_retry(13) is None and next_retry(50) is None


@given(st.integers(min_value=1, max_value=12))
def test_every_wait_is_positive_and_bounded(tries: int) -> None:
    delay = next_retry(tries)
    assert delay is not None and timedelta() < delay <= MAX_RETRY_DELAY


S = ChannelStatus


@pytest.mark.parametrize(
    ("channels", "tries", "status", "retry_in", "due_now"),
    [
        ({"email": S.SENT, "webhook": S.SENT}, 1, DeliveryStatus.DELIVERED, None, False),
        ({"email": S.SKIPPED, "webhook": S.SENT}, 1, DeliveryStatus.DELIVERED, None, False),
        ({"email": S.SKIPPED, "webhook": S.SKIPPED}, 0, DeliveryStatus.SKIPPED, None, False),
        ({}, 0, DeliveryStatus.SKIPPED, None, False),
        ({"email": S.SENT, "webhook": S.RETRY}, 1, DeliveryStatus.PENDING, 60, False),
        ({"email": S.SENT, "webhook": S.RETRY}, 3, DeliveryStatus.PENDING, 240, False),
        ({"email": S.SENT, "webhook": S.DEFERRED}, 1, DeliveryStatus.PENDING, None, True),
        ({"email": S.RETRY, "webhook": S.DEFERRED}, 13, DeliveryStatus.FAILED, None, False),
        ({"email": S.FAILED, "webhook": S.SENT}, 1, DeliveryStatus.FAILED, None, False),
        ({"email": S.FAILED, "webhook": S.RETRY}, 1, DeliveryStatus.PENDING, 60, False),
    ],
)
def test_the_outcome_of_a_run(
    channels: dict[str, ChannelStatus],
    tries: int,
    status: DeliveryStatus,
    retry_in: int | None,
    due_now: bool,
) -> None:
    """Delivered when every channel in effect took it (skips allowed), skipped when none was
    in effect, pending with the backoff while one is to retry, failed when one gave up."""
    outcome = conclude(channels, tries)
    assert outcome.status is status
    assert outcome.retry_in == (timedelta(seconds=retry_in) if retry_in is not None else None)
    assert outcome.due_now is due_now
    if status is DeliveryStatus.FAILED and tries == 13:
        assert set(outcome.channels.values()) == {S.FAILED}


def test_scrub_removes_secrets_before_clipping() -> None:
    """A secret is masked wherever it appears, longest first, and a clip never leaves part of
    one; the text stays on one line."""
    secret = "s3cr3t-" + "x" * 600
    text = "boom\n" + "a" * 490 + secret + " and " + secret[:20]
    cleaned = scrub(text, [secret, secret[:20], "ab"])
    assert "s3cr3t" not in cleaned and "\n" not in cleaned and len(cleaned) <= 500
    assert scrub("password pa55word", ["pa55word"]) == "password ***"


def test_the_message_id_is_stable_per_event_and_channel() -> None:
    """A re-sent email carries the same Message-ID; the customer's and the operator's differ."""
    assert message_id(12, Channel.EMAIL, "shop.example") == "<billing-event-12.email@shop.example>"
    assert message_id(12, Channel.EMAIL, "shop.example") == message_id(
        12, Channel.EMAIL, "shop.example"
    )
    assert message_id(12, Channel.ALERT_EMAIL, "") == "<billing-event-12.alert_email@localhost>"
