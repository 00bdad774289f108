"""Prometheus metrics: what the billing processes count, and the figures read at each scrape.

Two kinds of figure:

* **Counted where things happen**: charge outcomes, money collected, gateway calls and their
  latency, the gateway cap, janitor results. prometheus_client counters and histograms. In a
  Celery prefork worker the pool processes count and the worker's own process serves them:
  prometheus_client's multiprocess mode, each process writing its values to files in
  ``PROMETHEUS_MULTIPROC_DIR`` that the serving process adds up (``serve_worker``).
* **Read at scrape time**: invoices open by dunning step, unresolved attempts and the age of the
  oldest, collection paused, queue depth, gateway slots in use (``BillingCollector``), with
  cheap queries under a short timeout. A source that cannot be read is reported
  (``billing_scrape_source_up`` 0, ``billing_scrape_errors_total``), never a failed scrape.

Every label value comes from a small fixed set (outcome words, ISO currency codes, call names,
queue names): never a card token, a key, a customer's name or email, nor an id.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from sqlalchemy import Engine

__all__ = [
    "BillingCollector",
    "BrokerFigures",
    "DatabaseFigures",
    "charge_recorded",
    "gateway_request",
    "janitor_finished",
    "serve",
    "serve_worker",
]

log = logging.getLogger("billing.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The Celery queues (workers/app.py) whose depth is read from Redis.
QUEUES = ("charges", "notifications", "maintenance")
# Kombu's Redis transport keeps a queue's messages in one list per priority step.
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
_KOMBU_SEPARATOR = "\x06\x16"
# The gateway calls, as FatoraClient names them.
CALLS = frozenset({"collect", "verify", "checkout", "refund", "deactivate"})
# How a gateway request ended: an HTTP status class, or the transport's failure.
GATEWAY_RESULTS = frozenset(
    {
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "timeout",
        "connect_error",
        "connection_error",
        "decode_error",
        "not_sent",
        "error",
    }
)
# Results that say the gateway (or the way to it) is failing, for the error-rate alert.
GATEWAY_ERROR_RESULTS = ("5xx", "timeout", "connect_error", "connection_error", "decode_error")
# Attempt statuses (billing.attempts.AttemptStatus values).
OUTCOMES = frozenset(
    {"in_flight", "unknown", "pending", "succeeded", "declined", "failed", "anomaly"}
)
# Dunning steps above this are shown together ("10+").
MAX_STEP = 10
# Scrape-time queries must be cheap: they give up after this long.
QUERY_TIMEOUT_MS = 2000
CONNECT_TIMEOUT_S = 2
REDIS_TIMEOUT_S = 1.0
OTHER = "other"

# The *_created series double every counter for nothing an alert or a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

CHARGES = Counter(
    "billing_charges",
    "Charge attempt outcomes recorded (committed), by the attempt's status and currency. An "
    "unresolved attempt verified again counts again.",
    ["outcome", "currency"],
)
COLLECTED = Counter(
    "billing_collected_amount",
    "Money taken by verified successful charges, in the currency's major unit.",
    ["currency"],
)
GATEWAY_SECONDS = Histogram(
    "billing_gateway_request_duration_seconds",
    "Time a Fatora request took, from sending to the end of the answer (or the failure), by "
    "call. The wait for a slot under the gateway cap is not included.",
    ["call"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0),
)
GATEWAY_REQUESTS = Counter(
    "billing_gateway_requests",
    "Fatora requests by call and result (HTTP status class, or timeout, connect_error, "
    "connection_error, decode_error, not_sent, error).",
    ["call", "result"],
)
CAP_WAIT = Histogram(
    "billing_gateway_cap_wait_seconds",
    "Time a gateway call waited for a slot under BILLING_GATEWAY_MAX_IN_FLIGHT, by call.",
    ["call"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CAP_REFUSALS = Counter(
    "billing_gateway_cap_refusals",
    "Gateway calls not sent for want of a slot: busy (every slot held for the whole wait) or "
    "unavailable (Redis could not be asked).",
    ["call", "reason"],
)
JANITOR_RESULTS = Counter(
    "billing_janitor_results",
    "What the janitor's verifies made of unresolved attempts, by result word (paid, unknown, "
    "pending, soft_declined...), plus 'alerted' for stale attempts alerted on and 'failed' for "
    "invoices whose settling raised.",
    ["result"],
)
JANITOR_RUNS = Counter(
    "billing_janitor_runs",
    "Janitor runs, by status (complete, incomplete).",
    ["status"],
)


# -- bounded label values ------------------------------------------------------------------


def currency_label(code: str) -> str:
    """An ISO 4217 code as a label; anything else is 'other'."""
    upper = code.strip().upper()
    return upper if re.fullmatch(r"[A-Z]{3}", upper) else OTHER


def _one_of(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


def word_label(word: str) -> str:
    """A result word of the code's own (``paid``, ``soft_declined``) as a label."""
    return word if re.fullmatch(r"[a-z][a-z_]{0,39}", word) else OTHER


def step_label(failure_count: int) -> str:
    return f"{MAX_STEP}+" if failure_count >= MAX_STEP else str(max(failure_count, 0))


def http_result(status_code: int) -> str:
    """The label of an HTTP answer: its status class."""
    return f"{status_code // 100}xx" if 200 <= status_code < 600 else "error"


# -- counting --------------------------------------------------------------------------------

# Charge outcomes are counted once the transaction that recorded them commits.
_PENDING_KEY = "billing.metrics.charges"


def charge_recorded(session: Session, outcome: str, currency: str, amount: Decimal) -> None:
    """Count an attempt's outcome (and, for a success, the money) once ``session`` commits."""
    pending: list[tuple[str, str, Decimal]] = session.info.setdefault(_PENDING_KEY, [])
    pending.append((str(outcome), currency, amount))


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    pending = session.info.pop(_PENDING_KEY, None) if session.info else None
    for outcome, currency, amount in pending or ():
        label = currency_label(currency)
        CHARGES.labels(_one_of(outcome, OUTCOMES), label).inc()
        if outcome == "succeeded":
            COLLECTED.labels(label).inc(float(amount))


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    if session.info:
        session.info.pop(_PENDING_KEY, None)


def gateway_request(call: str, result: str, seconds: float) -> None:
    """A Fatora request that was sent (or failed trying): its latency and how it ended."""
    seconds_of, count = _gateway_series(_one_of(call, CALLS), _one_of(result, GATEWAY_RESULTS))
    seconds_of.observe(seconds)
    count.inc()


@cache  # a few dozen label pairs at most (both are bounded above)
def _gateway_series(call: str, result: str) -> tuple[Histogram, Counter]:
    """The two series of a gateway request's labels, looked up once (twice per charge)."""
    return GATEWAY_SECONDS.labels(call), GATEWAY_REQUESTS.labels(call, result)


_REFUSAL_REASONS = frozenset({"busy", "unavailable"})


def gateway_cap_waited(call: str, seconds: float) -> None:
    CAP_WAIT.labels(_one_of(call, CALLS)).observe(max(seconds, 0.0))


def gateway_cap_refused(call: str, reason: str) -> None:
    CAP_REFUSALS.labels(_one_of(call, CALLS), _one_of(reason, _REFUSAL_REASONS)).inc()


def janitor_finished(report: Any) -> None:
    """Count a janitor run's results (a ``schedules.sweeps.JanitorReport``)."""
    words = Tally(word_label(word) for word in report.settled.values())
    words["alerted"] += len(report.alerted)
    words["failed"] += len(report.failed)
    for word, count in words.items():
        if count:
            JANITOR_RESULTS.labels(word).inc(count)
    JANITOR_RUNS.labels("incomplete" if report.failed else "complete").inc()


# -- figures read at scrape time ------------------------------------------------------------


@dataclass(frozen=True)
class UnresolvedGroup:
    kind: str  # collect or checkout
    status: str  # in_flight, unknown or pending
    count: int
    oldest_written_at: datetime | None  # system time the oldest was written


@dataclass(frozen=True)
class DatabaseFigures:
    open_by_step: Mapping[int, int]  # invoices open, by failure_count
    unresolved: tuple[UnresolvedGroup, ...]
    paused: bool


@dataclass(frozen=True)
class BrokerFigures:
    queue_depth: Mapping[str, int]
    slots_in_use: int | None = None  # None: no gateway cap
    slots_limit: int | None = None


_KINDS = ("collect", "checkout")
_UNRESOLVED = ("in_flight", "pending", "unknown")


def database_families(figures: DatabaseFigures, now: datetime) -> list[Metric]:
    """The database figures as metric families (pure: ``now`` is the system time)."""
    open_invoices = GaugeMetricFamily(
        "billing_invoices_open",
        "Invoices open (not paid, void or uncollectible), by dunning step (failed attempts so "
        f"far; {MAX_STEP}+ together).",
        labels=["dunning_step"],
    )
    by_step: Tally[str] = Tally({"0": 0})
    for failures, count in figures.open_by_step.items():
        by_step[step_label(failures)] += count
    for step in sorted(by_step, key=lambda s: int(s.rstrip("+"))):
        open_invoices.add_metric([step], by_step[step])

    unresolved = GaugeMetricFamily(
        "billing_attempts_unresolved",
        "Charge attempts whose outcome is not known yet, by kind and status.",
        labels=["kind", "status"],
    )
    oldest = GaugeMetricFamily(
        "billing_attempts_unresolved_oldest_seconds",
        "Age in seconds of the oldest unresolved attempt, by kind (0 when there is none).",
        labels=["kind"],
    )
    counts: Tally[tuple[str, str]] = Tally()
    oldest_at: dict[str, datetime] = {}
    for group in figures.unresolved:
        kind = group.kind if group.kind in _KINDS else OTHER
        status = group.status if group.status in _UNRESOLVED else OTHER
        counts[(kind, status)] += group.count
        if group.oldest_written_at is not None:
            seen = oldest_at.get(kind)
            if seen is None or group.oldest_written_at < seen:
                oldest_at[kind] = group.oldest_written_at
    for kind in _KINDS:
        for status in _UNRESOLVED:
            counts.setdefault((kind, status), 0)
    for (kind, status), count in sorted(counts.items()):
        unresolved.add_metric([kind, status], count)
    for kind in sorted(set(_KINDS) | set(oldest_at)):
        at = oldest_at.get(kind)
        oldest.add_metric([kind], max((now - at).total_seconds(), 0.0) if at else 0.0)

    paused = GaugeMetricFamily(
        "billing_collection_paused",
        "1 while collection is paused (billing collection status says why), else 0.",
        value=1 if figures.paused else 0,
    )
    return [open_invoices, unresolved, oldest, paused]


def broker_families(figures: BrokerFigures) -> list[Metric]:
    depth = GaugeMetricFamily(
        "billing_queue_depth",
        "Tasks waiting in each Celery queue (Redis list lengths).",
        labels=["queue"],
    )
    for queue in sorted(figures.queue_depth):
        depth.add_metric([queue], figures.queue_depth[queue])
    families: list[Metric] = [depth]
    if figures.slots_in_use is not None and figures.slots_limit is not None:
        families.append(
            GaugeMetricFamily(
                "billing_gateway_slots_in_use",
                "Gateway calls in flight across every worker (leases held under the cap).",
                value=figures.slots_in_use,
            )
        )
        families.append(
            GaugeMetricFamily(
                "billing_gateway_slots_limit",
                "BILLING_GATEWAY_MAX_IN_FLIGHT: the most gateway calls in flight at once.",
                value=figures.slots_limit,
            )
        )
    return families


def health_families(up: Mapping[str, bool], errors: Mapping[str, int]) -> list[Metric]:
    source_up = GaugeMetricFamily(
        "billing_scrape_source_up",
        "1 when the source (database, redis) was read for this scrape, 0 when it failed.",
        labels=["source"],
    )
    for source in sorted(up):
        source_up.add_metric([source], 1 if up[source] else 0)
    failed = CounterMetricFamily(
        "billing_scrape_errors",
        "Scrapes (of this process) whose reading of a source failed.",
        labels=["source"],
    )
    for source in sorted(set(up) | set(errors)):
        failed.add_metric([source], errors.get(source, 0))
    return [source_up, failed]


def read_database(engine: Engine) -> DatabaseFigures:
    """Open invoices by step, unresolved attempts, the pause flag: three small queries under
    ``QUERY_TIMEOUT_MS`` (PostgreSQL). Unresolved attempts are read through their partial
    index; the pause flag by its primary key."""
    from sqlalchemy import func, select, text

    from billing.attempts import UNRESOLVED_VALUES
    from billing.lifecycle import InvoiceStatus
    from billing.models import ChargeAttempt, ControlFlag, Invoice
    from billing.services.control import COLLECTION_PAUSED

    with engine.connect() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SET LOCAL statement_timeout = {int(QUERY_TIMEOUT_MS)}"))
            conn.execute(text(f"SET LOCAL lock_timeout = {int(QUERY_TIMEOUT_MS)}"))
        open_rows = conn.execute(
            select(Invoice.failure_count, func.count())
            .where(Invoice.status == InvoiceStatus.OPEN.value)
            .group_by(Invoice.failure_count)
        ).all()
        unresolved_rows = conn.execute(
            select(
                ChargeAttempt.kind,
                ChargeAttempt.status,
                func.count(),
                func.min(ChargeAttempt.created_wall_at),
            )
            .where(ChargeAttempt.status.in_(UNRESOLVED_VALUES))
            .group_by(ChargeAttempt.kind, ChargeAttempt.status)
        ).all()
        paused = conn.execute(
            select(ControlFlag.name).where(ControlFlag.name == COLLECTION_PAUSED)
        ).first()
    return DatabaseFigures(
        open_by_step={int(failures or 0): int(count) for failures, count in open_rows},
        unresolved=tuple(
            UnresolvedGroup(str(kind), str(status), int(count), oldest)
            for kind, status, count, oldest in unresolved_rows
        ),
        paused=paused is not None,
    )


def read_broker(client: Any, slots: Callable[[], int] | None, limit: int | None) -> BrokerFigures:
    """Queue depths (every priority list of each queue) in one round trip, and the slots held
    under the gateway cap."""
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for step in _KOMBU_PRIORITY_STEPS:
            pipe.llen(f"{queue}{_KOMBU_SEPARATOR}{step}" if step else queue)
    lengths = iter(pipe.execute())
    depth = {queue: sum(int(next(lengths)) for _ in _KOMBU_PRIORITY_STEPS) for queue in QUEUES}
    in_use = slots() if slots is not None else None
    return BrokerFigures(depth, in_use, limit if in_use is not None else None)


class BillingCollector(Collector):
    """The scrape-time figures. Each reader is called at every scrape; one that raises is
    reported as that source down and counted, and the scrape goes on."""

    def __init__(self, readers: Mapping[str, Callable[[], list[Metric]]]) -> None:
        self.readers = readers
        self._errors: Tally[str] = Tally()
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # nothing is read when the collector is registered

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        up: dict[str, bool] = {}
        for source, read in self.readers.items():
            try:
                families.extend(read())
                up[source] = True
            except Exception as exc:
                up[source] = False
                with self._lock:
                    self._errors[source] += 1
                # The class only: a driver's message may carry a host or a user name.
                log.warning("metrics: %s not read (%s)", source, type(exc).__name__)
        with self._lock:
            errors = dict(self._errors)
        families.extend(health_families(up, errors))
        return families


def collector_from_settings() -> BillingCollector:
    """Database figures from BILLING_DATABASE_URL, queue depth and slots from the broker's
    Redis (when it is Redis). Connections are opened per scrape, never kept: a connection of
    the serving process is never inherited by a forked pool process."""
    from sqlalchemy.pool import NullPool

    from billing.config import get_settings
    from billing.db import make_engine, normalize_url

    settings = get_settings()
    url = normalize_url(settings.database_url)
    if url.startswith("sqlite"):
        engine = make_engine(url, poolclass=NullPool)
    else:
        engine = make_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
        )

    def database() -> list[Metric]:
        return database_families(read_database(engine), datetime.now(UTC))

    readers: dict[str, Callable[[], list[Metric]]] = {"database": database}
    broker = settings.broker_url
    if broker.startswith(("redis://", "rediss://", "unix://")):
        import redis

        from billing.gateway_cap import CAP_KEY, RedisLeases

        client = redis.Redis.from_url(
            broker, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        limit = settings.gateway_max_in_flight
        slots = RedisLeases(client, CAP_KEY).in_use if limit > 0 else None

        def redis_figures() -> list[Metric]:
            return broker_families(read_broker(client, slots, limit or None))

        readers["redis"] = redis_figures
    return BillingCollector(readers)


# -- serving ---------------------------------------------------------------------------------


class _Forward(Collector):
    """This process's own metrics (prometheus_client's default registry), served alongside."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def serving_registry(
    collector: Collector | None, multiprocess_dir: Path | None
) -> CollectorRegistry:
    """What /metrics shows: the counted figures (added up over every process writing to
    ``multiprocess_dir``, or this process's own), and ``collector``'s."""
    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=str(multiprocess_dir)
        )
    else:
        registry.register(_Forward())
    if collector is not None:
        registry.register(collector)
    return registry


def serve(registry: CollectorRegistry, port: int, host: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at http://host:port/metrics from a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread


def use_multiprocess(path: Path, *, clear: bool) -> None:
    """Count into files under ``path`` from now on, in this process and every process it forks.

    prometheus_client picks its value store when it is imported, from ``PROMETHEUS_MULTIPROC_DIR``;
    a worker decides only once it knows its pool, so the store is switched here, before any
    metric has a value (every metric above has labels: none has a value before its first use).
    ``clear`` removes the files of earlier runs, whose processes are gone.
    """
    path.mkdir(parents=True, exist_ok=True)
    if clear:
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


@dataclass
class _Worker:
    multiprocess_dir: Path | None = None
    owns_dir: bool = False
    server: WSGIServer | None = None


_worker = _Worker()


def serve_worker(*, several_processes: bool) -> None:
    """Called as a Celery worker starts, before its pool forks: count across its processes and
    serve /metrics on BILLING_METRICS_PORT from this (the parent) process.

    ``PROMETHEUS_MULTIPROC_DIR`` is created if missing and emptied (its files belong to earlier
    runs). Without it, a worker whose pool runs several processes uses a directory of its own
    under the temporary directory, removed when it stops (and those of dead workers when it
    starts). A port that cannot be bound is logged and the worker goes on: metrics never stop
    collection.
    """
    from billing.config import get_settings

    settings = get_settings()
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        _worker.multiprocess_dir = Path(given)
    elif several_processes:
        base = Path(tempfile.gettempdir())
        remove_dead_workers_dirs(base)
        _worker.multiprocess_dir = base / f"{_OWN_DIR_PREFIX}{os.getpid()}"
        _worker.owns_dir = True
    if _worker.multiprocess_dir is not None:
        use_multiprocess(_worker.multiprocess_dir, clear=True)
    if not settings.metrics_port:
        log.info("metrics: not served (BILLING_METRICS_PORT=0)")
        return
    registry = serving_registry(collector_from_settings(), _worker.multiprocess_dir)
    try:
        _worker.server, _thread = serve(registry, settings.metrics_port, settings.metrics_host)
    except OSError as exc:
        log.error(
            "metrics: not served, cannot listen on %s:%d (%s)",
            settings.metrics_host,
            settings.metrics_port,
            exc.strerror or type(exc).__name__,
        )
        return
    log.info("metrics: http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)


_OWN_DIR_PREFIX = "billing-metrics-"


def remove_dead_workers_dirs(base: Path) -> list[Path]:
    """Remove the directories that workers killed before they could (SIGKILL, a crash) made for
    themselves under ``base``: those whose process is gone."""
    removed = []
    for path in base.glob(f"{_OWN_DIR_PREFIX}*"):
        pid = path.name.removeprefix(_OWN_DIR_PREFIX)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def process_exited(pid: int | None) -> None:
    """A pool process has exited: drop its live gauges (its counters stay, and keep counting
    in the totals)."""
    if pid is not None and _worker.multiprocess_dir is not None:
        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            pid, str(_worker.multiprocess_dir)
        )


def stop_worker() -> None:
    """The worker stops: stop serving, remove the directory it made for itself."""
    server, _worker.server = _worker.server, None
    if server is not None:
        server.shutdown()
        server.server_close()
    if _worker.owns_dir and _worker.multiprocess_dir is not None:
        shutil.rmtree(_worker.multiprocess_dir, ignore_errors=True)


def exporter_registry() -> CollectorRegistry:
    """What ``billing metrics`` serves: the scrape-time figures, and the counted ones of the
    processes writing to ``PROMETHEUS_MULTIPROC_DIR`` if it is set (a worker on this host whose
    own port is 0), else this process's own."""
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else None
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return serving_registry(collector_from_settings(), path)


def sample_names(registry: CollectorRegistry) -> Iterator[str]:
    """The name of every sample ``registry`` exposes now (``_total``, ``_bucket``...)."""
    for family in registry.collect():
        for sample in family.samples:
            yield sample.name
