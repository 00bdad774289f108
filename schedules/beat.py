"""The beat timetable: what runs when (``celery -A workers.app beat``).

Renewal, due retries and the outbox delivery (queue ``notifications``) every minute; the janitor
every five minutes (each attempt carries its own next verify time, so a frequent janitor costs
little); the token expiry sweep hourly, and the deactivation of tokens nobody needs daily.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "renew-due-subscriptions": {
        "task": "billing.renew",
        "schedule": 60.0,
        "options": {"queue": "maintenance", "expires": 55},
    },
    "retry-due-invoices": {
        "task": "billing.retry_due",
        "schedule": 60.0,
        "options": {"queue": "maintenance", "expires": 55},
    },
    "deliver-events": {
        "task": "billing.deliver_events",
        "schedule": 60.0,
        "options": {"queue": "notifications", "expires": 55},
    },
    "janitor": {
        "task": "billing.janitor",
        "schedule": 300.0,
        "options": {"queue": "maintenance", "expires": 290},
    },
    "token-expiry-sweep": {
        "task": "billing.token_expiry_sweep",
        "schedule": crontab(minute=7),
        "options": {"queue": "maintenance"},
    },
    "deactivate-unneeded-tokens": {
        "task": "billing.deactivate_unneeded_tokens",
        "schedule": crontab(hour=3, minute=17),
        "options": {"queue": "maintenance"},
    },
}
