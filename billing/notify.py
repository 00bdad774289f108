"""Delivery decisions for the outbox, as pure functions: no database, network or Celery.

Which channels an event goes to, when a failed delivery is tried again and when it is given up,
what an event's delivery status is once its channels have been tried, the merchant webhook's
body and headers, and how an error text is cleaned of secrets before it is stored or logged.
``billing/services/notifications.py`` applies them; ``billing/messages.py`` writes the emails.

Channels:

- ``email``: the customer, for the kinds in :data:`CUSTOMER_EMAIL_KINDS`.
- ``push``: the same messages, shortened, to the customer's phone through Firebase Cloud
  Messaging (when the customer has a device token and ``BILLING_FCM_CREDENTIALS_FILE`` is set).
- ``alert_email``: the operator (``BILLING_ALERT_EMAIL``), for every ``alert.*`` kind.
- ``webhook``: the merchant (``BILLING_WEBHOOK_URL``), for every kind but the operator's own
  (``alert.*`` and :data:`INTERNAL_KINDS`). A kind added later reaches the merchant by default.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from standardwebhooks import Webhook


class Channel(StrEnum):
    EMAIL = "email"
    PUSH = "push"
    ALERT_EMAIL = "alert_email"
    WEBHOOK = "webhook"


class DeliveryStatus(StrEnum):
    """An event's delivery status (``events.delivery_status``)."""

    PENDING = "pending"  # still to be sent on at least one channel (next_delivery_at says when)
    DELIVERED = "delivered"  # every channel in effect took it (some may have been skipped)
    SKIPPED = "skipped"  # no channel was in effect for it: nothing was sent, nothing failed
    FAILED = "failed"  # a channel gave up (after the bound, or at once for a permanent fault)


class ChannelStatus(StrEnum):
    """One channel's state for one event (``events.delivery_channels``)."""

    SENT = "sent"
    SKIPPED = "skipped"  # not configured, or nobody to send it to: final, never an error
    RETRY = "retry"  # tried and failed: tried again after the backoff
    FAILED = "failed"  # given up
    DEFERRED = "deferred"  # not tried in this run (its endpoint failed on an earlier event)


FINAL_CHANNEL = frozenset({ChannelStatus.SENT, ChannelStatus.SKIPPED, ChannelStatus.FAILED})

# The customer is written to about these; every other kind only reaches the merchant's webhook.
CUSTOMER_EMAIL_KINDS = frozenset(
    {
        "invoice.paid",
        "invoice.payment_failed",
        "invoice.dunning_exhausted",
        "card.expiring",
        "subscription.canceled",
    }
)
ALERT_PREFIX = "alert."
# Bookkeeping of the operator's own tools: noise for a merchant's system.
INTERNAL_KINDS = frozenset({"row.released", "collection.resumed"})


def is_alert(kind: str) -> bool:
    return kind.startswith(ALERT_PREFIX)


def channels_for(kind: str, payload: Mapping[str, Any]) -> tuple[Channel, ...]:
    """The channels an event of ``kind`` goes to, whether or not they are configured.

    A subscription canceled by dunning is announced to the customer by the final notice
    (``invoice.dunning_exhausted``, recorded in the same transaction, which says so): its own
    ``subscription.canceled`` would be a second email about the same thing.
    """
    if is_alert(kind):
        return (Channel.ALERT_EMAIL,)
    channels: list[Channel] = []
    if kind in CUSTOMER_EMAIL_KINDS and not (
        kind == "subscription.canceled" and payload.get("reason") == "dunning_exhausted"
    ):
        channels.extend((Channel.EMAIL, Channel.PUSH))
    if kind not in INTERNAL_KINDS:
        channels.append(Channel.WEBHOOK)
    return tuple(channels)


# -- retries -------------------------------------------------------------------------------------

FIRST_RETRY = timedelta(minutes=1)
MAX_RETRY_DELAY = timedelta(hours=6)
# No try is made later than this after the first one: then the event is failed (and listed).
GIVE_UP_AFTER = timedelta(hours=24)


def retry_delay(failures: int) -> timedelta:
    """The wait after the ``failures``-th failed try: 1 min, doubling, at most 6 h."""
    if failures < 1:
        raise ValueError("retry_delay counts failed tries from 1")
    delay: timedelta = FIRST_RETRY * (2 ** min(failures - 1, 30))
    return min(delay, MAX_RETRY_DELAY)


def next_retry(tries: int) -> timedelta | None:
    """How long to wait after ``tries`` tries of which the last failed, or ``None`` to give up.

    The backoff of :func:`retry_delay`, with the last try exactly :data:`GIVE_UP_AFTER` after
    the first: 13 tries in all, at 0, 1, 3, 7, 15, 31, 63 min, ~2.1, ~4.3, ~8.5, ~14.5, ~20.5 and
    24 h. After that one, it gives up.
    """
    offset = timedelta()  # of the latest try, from the first
    for k in range(1, tries):
        offset = min(offset + retry_delay(k), GIVE_UP_AFTER)
    if offset >= GIVE_UP_AFTER:
        return None
    return min(retry_delay(tries), GIVE_UP_AFTER - offset)


def max_tries() -> int:
    """How many tries a delivery that always fails gets before it is failed."""
    tries = 1
    while next_retry(tries) is not None:
        tries += 1
    return tries


# -- the outcome of one run over an event --------------------------------------------------------


@dataclass(frozen=True)
class Conclusion:
    status: DeliveryStatus
    channels: dict[str, ChannelStatus]  # after giving up, RETRY and DEFERRED become FAILED
    retry_in: timedelta | None  # PENDING after a failed try: when to try again
    due_now: bool  # PENDING without a try in this run: due again at once


def conclude(channels: Mapping[str, ChannelStatus], tries: int) -> Conclusion:
    """An event's status once each of its channels has been tried (or not) in a run.

    ``tries`` counts the runs in which at least one of its channels was actually tried,
    this one included.
    """
    states = dict(channels)
    tried_and_failed = any(s is ChannelStatus.RETRY for s in states.values())
    open_ = [c for c, s in states.items() if s not in FINAL_CHANNEL]
    if open_ and tried_and_failed:
        delay = next_retry(tries)
        if delay is not None:
            return Conclusion(DeliveryStatus.PENDING, states, delay, False)
        for channel in open_:
            states[channel] = ChannelStatus.FAILED
        open_ = []
    if open_:
        return Conclusion(DeliveryStatus.PENDING, states, None, True)
    values = set(states.values())
    if ChannelStatus.FAILED in values:
        status = DeliveryStatus.FAILED
    elif ChannelStatus.SENT in values:
        status = DeliveryStatus.DELIVERED
    else:
        status = DeliveryStatus.SKIPPED
    return Conclusion(status, states, None, False)


# -- secrets -------------------------------------------------------------------------------------

MAX_ERROR = 500
_MASK = "***"


def scrub(text: str, secrets: Iterable[str], limit: int = MAX_ERROR) -> str:
    """``text`` with every secret replaced, on one line, clipped to ``limit`` characters.

    The secrets are removed before clipping, so that a clip can never leave a secret's prefix.
    Secrets shorter than 4 characters are not looked for (they would mask ordinary words).
    """
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- merchant webhooks (Standard Webhooks 1.0) ---------------------------------------------------

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SENSITIVE_KEY_PARTS = ("token", "secret", "password", "api_key", "card_number", "cvv")


class BadWebhookSecret(ValueError):
    """``BILLING_WEBHOOK_SECRET`` is not ``whsec_`` followed by base64 (never repeated)."""

    def __init__(self) -> None:
        super().__init__("BILLING_WEBHOOK_SECRET is not of the form whsec_<base64>")


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret, or :class:`BadWebhookSecret`."""
    if not secret.startswith(SECRET_PREFIX):
        raise BadWebhookSecret()
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise BadWebhookSecret() from None
    if len(key) < 16:
        raise BadWebhookSecret()
    return key


def webhook_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of a delivery: ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
    ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, signed by the
    ``standardwebhooks`` package with the ``whsec_`` secret (checked first: the package itself
    would take a malformed one)."""
    webhook_key(secret)
    signature = Webhook(secret).sign(
        msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode("utf-8")
    )
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def public_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The event's payload as a merchant may see it. Payloads carry ids and words only; a key
    that sounds like a credential is left out anyway, should one ever be added by mistake."""
    return {
        k: v
        for k, v in payload.items()
        if not any(part in k.lower() for part in SENSITIVE_KEY_PARTS)
    }


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def webhook_body(
    *,
    event_id: int,
    kind: str,
    created_at: datetime,
    customer: Mapping[str, Any] | None,
    subscription_id: int | None,
    invoice: Mapping[str, Any] | None,
    invoice_id: int | None,
    payload: Mapping[str, Any],
) -> bytes:
    """The JSON body: ``{"type", "timestamp", "data"}`` as Standard Webhooks recommends.

    The same event always gives the same bytes (sorted keys), so a re-send is identical.
    """
    document = {
        "type": kind,
        "timestamp": iso(created_at),
        "data": {
            "event_id": event_id,
            "customer": dict(customer) if customer is not None else None,
            "subscription_id": subscription_id,
            "invoice_id": invoice_id,
            "invoice": dict(invoice) if invoice is not None else None,
            "payload": public_payload(payload),
        },
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def message_id(event_id: int, channel: Channel, domain: str) -> str:
    """A ``Message-ID`` that depends only on the event, the channel and the sender's domain: a
    re-sent email carries the same one, so mail clients and the receiver see the duplicate."""
    return f"<billing-event-{event_id}.{channel.value}@{domain or 'localhost'}>"


# -- push (Firebase Cloud Messaging, HTTP v1) ----------------------------------------------------

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
PUSH_BODY_LIMIT = 240


def push_message(
    device_token: str, title: str, text: str, data: Mapping[str, str | None]
) -> dict[str, Any]:
    """The ``messages:send`` body: the email's subject as the title, its first paragraph after
    the greeting as the body, and the event's ids and link as data (FCM data values are
    strings)."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    body = paragraphs[1] if len(paragraphs) > 1 else (paragraphs[0] if paragraphs else title)
    body = " ".join(body.split())
    if len(body) > PUSH_BODY_LIMIT:
        body = body[: PUSH_BODY_LIMIT - 1].rstrip() + "\u2026"
    return {
        "message": {
            "token": device_token,
            "notification": {"title": " ".join(title.split()), "body": body},
            "data": {key: str(value) for key, value in data.items() if value is not None},
        }
    }


# FCM's answer for a device token that is not (or no longer) valid: sending again never helps.
_DEAD_DEVICE = frozenset({"UNREGISTERED", "INVALID_ARGUMENT", "NOT_FOUND", "SENDER_ID_MISMATCH"})


def push_failure(status: int, body: bytes) -> tuple[str, bool]:
    """What a non-2xx FCM answer means: a reason, and whether it is permanent (a dead device
    token or a malformed message). 401/403 (an access token refused), 429 and 5xx are
    transient."""
    code = ""
    try:
        document = json.loads(body)
        error = document.get("error", {}) if isinstance(document, dict) else {}
        code = str(error.get("status") or "")
        for detail in error.get("details") or []:
            if isinstance(detail, dict) and detail.get("errorCode"):
                code = str(detail["errorCode"])
    except (ValueError, AttributeError, TypeError):
        pass
    reason = f"FCM answered HTTP {status}" + (f" ({code})" if code else "")
    permanent = code in _DEAD_DEVICE or status in (400, 404)
    return reason, permanent
