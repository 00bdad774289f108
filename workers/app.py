"""The Celery application: ``celery -A workers.app worker`` and ``celery -A workers.app beat``.

JSON only; three queues (``charges``, ``notifications``, ``maintenance``): a worker started
without ``-Q`` consumes all of them, production runs a worker per queue. Tasks are acknowledged
late and handed to another worker if theirs dies; the Redis visibility timeout is longer than
any charge task can take, so a slow task is never delivered twice while it still runs.
``BILLING_BROKER_URL=memory://`` runs tasks in the calling process (the embedded default).

A worker refuses to start on SQLite with a real broker and more than one pool process: SQLite's
invoice lock is process-local (see ``billing.runtime.unlocked_worker_problem``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from billing.config import get_settings
from billing.runtime import unlocked_worker_problem
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


def pool_name(pool: object) -> str:
    """Celery's name for a worker pool given as an alias (``"prefork"``) or as its class."""
    if isinstance(pool, str):
        name = pool.lower()
    else:
        module = getattr(pool, "__module__", "") or ""
        name = module.rsplit(".", 1)[-1] if module.startswith("celery.concurrency.") else module
    return {"processes": "prefork", "thread": "threads"}.get(name, name or repr(pool))


def _autoscale_max(autoscale: object) -> int | None:
    """The upper bound of ``--autoscale MAX[,MIN]``, given as text or as a pair."""
    if not autoscale:
        return None
    if isinstance(autoscale, str):
        autoscale = autoscale.split(",")
    if isinstance(autoscale, Sequence):
        return int(autoscale[0])
    return None


def worker_problem(worker: Any) -> str | None:
    """What ``unlocked_worker_problem`` says of a worker being set up (Celery's WorkController)."""
    concurrency = worker.concurrency
    return unlocked_worker_problem(
        database_url=get_settings().database_url,
        broker_url=str(worker.app.conf.broker_url or get_settings().broker_url),
        pool=pool_name(worker.pool_cls),
        concurrency=concurrency if isinstance(concurrency, int) else None,
        autoscale_max=_autoscale_max((getattr(worker, "options", None) or {}).get("autoscale")),
    )


@signals.worker_init.connect
def refuse_unlocked_workers(sender: Any = None, **_: Any) -> None:
    """Stop a worker before its pool starts when it could charge an invoice twice.

    ``worker_init`` comes once the pool and its concurrency are known and before any process is
    forked or any broker connection made. A handler's exception would only be logged by Celery,
    so the refusal is a ``SystemExit``: one line on standard error and exit status 1.
    """
    problem = worker_problem(sender)
    if problem is not None:
        raise SystemExit(f"error: {problem}")


app = make_app()
