"""The Celery application: ``celery -A workers.app worker`` and ``celery -A workers.app beat``.

JSON only; three queues (``charges``, ``notifications``, ``maintenance``): a worker started
without ``-Q`` consumes all of them, production runs a worker per queue. Tasks are acknowledged
late and handed to another worker if theirs dies; the Redis visibility timeout is longer than
any charge task can take, so a slow task is never delivered twice while it still runs.
``BILLING_BROKER_URL=memory://`` runs tasks in the calling process (the embedded default).

A worker refuses to start on SQLite with a real broker and more than one pool process: SQLite's
invoice lock is process-local (see ``billing.runtime.unlocked_worker_problem``). A worker and
beat also refuse to start, with one line naming the setting, when what they need is missing or
wrong: the settings themselves, the token key and the database (worker), the broker (both).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from billing import logs
from billing.config import BillingSettings, SettingsError, get_settings
from billing.runtime import ONE_PROCESS_POOLS, unlocked_worker_problem
from schedules.beat import BEAT_SCHEDULE

# Longer than the slowest charge task: a batch of 100 invoices at 25 at a time, each with a
# collect and a verify of up to 30 s, takes at most about 4 x 60 s (plus the verifies of any
# attempts left unresolved, as many again).
VISIBILITY_TIMEOUT_S = 2 * 60 * 60


# Why the settings cannot be read, if they cannot: the app is still made (from the raw
# environment), so that importing it never fails, and a worker or beat refuses to start.
settings_problem: str | None = None


def make_app() -> Celery:
    global settings_problem
    try:
        settings = get_settings()
        broker, result_backend = settings.broker_url, settings.result_backend
    except SettingsError as exc:
        settings_problem = str(exc)
        default = str(BillingSettings.model_fields["broker_url"].default)
        broker = os.environ.get("BILLING_BROKER_URL", default)
        result_backend = os.environ.get("BILLING_RESULT_BACKEND")
    embedded = broker.startswith("memory://")
    backend = result_backend or ("cache+memory://" if embedded else broker)
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


@signals.worker_init.connect
def refuse_misconfigured_workers(sender: Any = None, **_: Any) -> None:
    """Stop a worker that could only fail every task: settings that cannot be read, no usable
    token key, a database it cannot reach or whose schema is not this code's, or a broker it
    cannot reach. One line on standard error and exit status 1, as above."""
    problem = daemon_problem(sender.app if sender is not None else app, needs_database=True)
    if problem is not None:
        refuse_to_start(problem)


@signals.beat_init.connect
def refuse_misconfigured_beat(sender: Any = None, **_: Any) -> None:
    """Stop beat before its first pass when it could send nothing: settings that cannot be read
    or a broker it cannot reach."""
    problem = daemon_problem(getattr(sender, "app", None) or app, needs_database=False)
    if problem is not None:
        refuse_to_start(problem)


def refuse_to_start(problem: str) -> None:
    """``error: refusing to start: PROBLEM`` on the process's real standard error (beat has sent
    ``sys.stderr`` to its log by now), then exit status 1."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"error: refusing to start: {problem}\n")
    stream.flush()
    raise SystemExit(1)


def daemon_problem(celery_app: Celery, *, needs_database: bool) -> str | None:
    """What keeps a worker (``needs_database``) or beat from working, as one line; ``None`` if
    nothing does. Never quotes a secret: settings errors name the variable, URLs lose their
    password."""
    if settings_problem is not None:
        return settings_problem
    try:
        settings = get_settings()
    except SettingsError as exc:
        return str(exc)
    if needs_database:
        from billing.crypto import TokenKeyMissing, vault_from_settings
        from billing.migrate import schema_problem

        try:
            vault_from_settings()
        except TokenKeyMissing as exc:
            return str(exc)
        problem = schema_problem(settings.database_url)
        if problem is not None:
            return problem
    return broker_problem(celery_app)


def broker_problem(celery_app: Celery, timeout_s: float = 5.0) -> str | None:
    """``None`` if the broker answers within ``timeout_s``, else why not (its URL without the
    password). ``memory://`` runs no daemon, and needs nothing."""
    url = str(celery_app.conf.broker_url or "")
    if url.startswith("memory://"):
        return None
    try:
        connection = celery_app.connection_for_write()
        where = connection.as_uri()
    except Exception as exc:
        return f"cannot use BILLING_BROKER_URL ({_words(exc)})"
    try:
        with connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=1, timeout=timeout_s
            )
    except Exception as exc:
        return f"cannot reach the broker at {where} ({_words(exc)}): is it running?"
    return None


def _words(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


@signals.worker_init.connect
def serve_metrics(sender: Any = None, **_: Any) -> None:
    """Serve /metrics on BILLING_METRICS_PORT from the worker's own process, before its pool
    forks: pool processes count into PROMETHEUS_MULTIPROC_DIR, this one adds them up."""
    from billing import metrics

    metrics.serve_worker(several_processes=pool_name(sender.pool_cls) not in ONE_PROCESS_POOLS)


@signals.worker_process_shutdown.connect
def forget_pool_process(pid: int | None = None, **_: Any) -> None:
    """A pool process exits (sent in that process): drop its live gauges; its counts stay."""
    from billing import metrics

    metrics.process_exited(pid)


@signals.worker_shutdown.connect
def stop_metrics(**_: Any) -> None:
    from billing import metrics

    metrics.stop_worker()


# The worker and beat log through billing/logs.py (BILLING_LOG_FORMAT text or json, no secret in
# a line) instead of Celery's own setup; every line a task logs carries its name and id.
signals.celeryd_init.connect(logs.celery_worker_starting)
signals.setup_logging.connect(logs.celery_setup_logging)
signals.task_prerun.connect(logs.celery_task_started)
signals.task_postrun.connect(logs.celery_task_ended)

app = make_app()
