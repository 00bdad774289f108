"""The Celery application: ``celery -A workers.app worker`` and ``celery -A workers.app beat``.

JSON only; three queues (``charges``, ``notifications``, ``maintenance``): a worker started
without ``-Q`` consumes all of them, production runs a worker per queue. Tasks are acknowledged
late and handed to another worker if theirs dies; the Redis visibility timeout is longer than
any charge task can take, so a slow task is never delivered twice while it still runs.
``BILLING_BROKER_URL=memory://`` runs tasks in the calling process (the embedded default).
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from billing.config import get_settings
from schedules.beat import BEAT_SCHEDULE

# Longer than the slowest charge task: a batch of 100 invoices at 25 at a time, each with a
# collect and a verify of up to 30 s, takes at most about 4 x 60 s (plus the verifies of any
# attempts left unresolved, as many again).
VISIBILITY_TIMEOUT_S = 2 * 60 * 60


def make_app() -> Celery:
    settings = get_settings()
    broker = settings.broker_url
    embedded = broker.startswith("memory://")
    backend = settings.result_backend or ("cache+memory://" if embedded else broker)
    app = Celery("billing", broker=broker, backend=backend, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_queues=[Queue("charges"), Queue("notifications"), Queue("maintenance")],
        task_default_queue="charges",
        task_routes={
            "billing.charge_invoices": {"queue": "charges"},
            "billing.noop": {"queue": "charges"},
            "billing.deliver_events": {"queue": "notifications"},
            "billing.*": {"queue": "maintenance"},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_expires=24 * 60 * 60,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=BEAT_SCHEDULE,
        task_always_eager=embedded,
        task_eager_propagates=embedded,
    )
    return app


app = make_app()
