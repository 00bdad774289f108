"""A worker refuses a setup in which two processes could charge the same invoice.

On SQLite the invoice lock is process-local, so a Celery worker on a real broker must run its
tasks in one process; on PostgreSQL (advisory locks) or with the in-process ``memory://`` broker
(the demo) anything goes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool

from billing.config import reset_settings_cache
from billing.runtime import unlocked_worker_problem
from workers.app import pool_name, refuse_unlocked_workers, worker_problem

SQLITE = "sqlite:///billing.sqlite3"
POSTGRES = "postgresql://billing@db/billing"
REDIS = "redis://localhost:6379/0"
MEMORY = "memory://"


@pytest.mark.parametrize(
    ("database_url", "broker_url", "pool", "concurrency", "autoscale_max", "refused"),
    [
        # The embedded default on a real broker: only one process may collect.
        (SQLITE, REDIS, "prefork", 2, None, True),
        (SQLITE, REDIS, "prefork", 8, None, True),
        (SQLITE, "amqp://guest@rabbit//", "prefork", 4, None, True),
        (SQLITE, REDIS, "prefork", None, None, True),  # --concurrency auto: one per CPU
        (SQLITE, REDIS, "prefork", 1, 4, True),  # --autoscale 4,1 grows to four processes
        (SQLITE, REDIS, "custom.Pool", 2, None, True),  # an unknown pool may fork
        (SQLITE, REDIS, "prefork", 1, None, False),  # --concurrency 1
        (SQLITE, REDIS, "solo", 8, None, False),  # --pool solo ignores the concurrency
        (SQLITE, REDIS, "threads", 8, None, False),  # one process: the local lock covers it
        ("sqlite://", REDIS, "prefork", 2, None, True),  # in-memory SQLite is SQLite too
        # memory:// runs every task in the process that sends it (make demo).
        (SQLITE, MEMORY, "prefork", 8, None, False),
        (SQLITE, MEMORY, "prefork", None, 10, False),
        # PostgreSQL's advisory locks hold across processes.
        (POSTGRES, REDIS, "prefork", 8, None, False),
        ("postgresql+psycopg://billing@db/billing", REDIS, "prefork", None, 10, False),
    ],
)
def test_unlocked_worker_problem_for_each_combination(
    database_url: str,
    broker_url: str,
    pool: str,
    concurrency: int | None,
    autoscale_max: int | None,
    refused: bool,
) -> None:
    """No invoice charged twice (DESIGN invariant 2): SQLite with a real broker and more than
    one worker process is refused; every other combination is allowed."""
    problem = unlocked_worker_problem(
        database_url=database_url,
        broker_url=broker_url,
        pool=pool,
        concurrency=concurrency,
        autoscale_max=autoscale_max,
    )
    assert (problem is not None) is refused


def test_the_refusal_names_the_cause_and_the_fix() -> None:
    """The message says why (SQLite's lock is per process) and what to do instead (PostgreSQL,
    --concurrency 1 or --pool solo), on one line, without the URLs' credentials or paths."""
    problem = unlocked_worker_problem(
        database_url="sqlite:////var/lib/billing/secret-name.sqlite3",
        broker_url="redis://:hunter2@redis:6379/0",
        pool="prefork",
        concurrency=4,
    )
    assert problem is not None
    for expected in ("SQLite", "one process", "twice", "PostgreSQL", "--concurrency 1"):
        assert expected in problem
    assert "--pool solo" in problem and "prefork pool, 4" in problem
    assert "\n" not in problem and "hunter2" not in problem and "secret-name" not in problem


@pytest.mark.parametrize(
    ("pool", "name"),
    [
        (PreforkPool, "prefork"),
        (SoloPool, "solo"),
        (ThreadPool, "threads"),
        ("prefork", "prefork"),
        ("processes", "prefork"),
        ("Solo", "solo"),
        ("threads", "threads"),
        ("gevent", "gevent"),
    ],
)
def test_pool_name_reads_celerys_aliases_and_classes(pool: object, name: str) -> None:
    """The CLI hands the pool over as a class, the configuration as an alias: both are read."""
    assert pool_name(pool) == name


@pytest.fixture
def sqlite_on_redis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("BILLING_DATABASE_URL", f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    monkeypatch.setenv("BILLING_BROKER_URL", REDIS)
    reset_settings_cache()
    yield
    reset_settings_cache()


def _worker(pool: object, concurrency: object, autoscale: object = None) -> SimpleNamespace:
    """What Celery's WorkController holds when it sends ``worker_init``."""
    app = SimpleNamespace(conf=SimpleNamespace(broker_url=REDIS))
    return SimpleNamespace(
        app=app, pool_cls=pool, concurrency=concurrency, options={"autoscale": autoscale}
    )


@pytest.mark.usefixtures("sqlite_on_redis")
def test_worker_init_stops_a_prefork_worker_on_sqlite() -> None:
    """The ``worker_init`` handler turns the refusal into a SystemExit (Celery only logs a
    handler's exceptions), before any pool process is started."""
    with pytest.raises(SystemExit) as stopped:
        refuse_unlocked_workers(sender=_worker(PreforkPool, 2))
    assert str(stopped.value.code).startswith("error: refusing to start")
    with pytest.raises(SystemExit):
        refuse_unlocked_workers(sender=_worker(PreforkPool, "auto"))
    with pytest.raises(SystemExit):
        refuse_unlocked_workers(sender=_worker(PreforkPool, 1, autoscale=(4, 1)))


@pytest.mark.usefixtures("sqlite_on_redis")
def test_worker_init_lets_a_single_process_worker_start() -> None:
    """--concurrency 1 and --pool solo are the documented ways to run on SQLite."""
    assert worker_problem(_worker(PreforkPool, 1)) is None
    assert worker_problem(_worker(SoloPool, 2)) is None
    refuse_unlocked_workers(sender=_worker(SoloPool, 2))  # does not raise
