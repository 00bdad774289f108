"""Fixtures on the real PostgreSQL: a database of the suite's own, migrated with Alembic.

If PostgreSQL cannot be reached the fixture fails with a clear message; these tests are never
skipped, because a skipped persistence test proves nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from billing.clock import FixedClock
from billing.crypto import TokenVault, new_key
from billing.db import make_engine, session_factory
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.locks import PostgresAdvisoryLocker
from billing.migrate import upgrade
from billing.models import Base
from billing.runtime import Runtime
from tests.factories import RefundTap

PG_URL = os.environ.get(
    "BILLING_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 1, 31, 9, 0, tzinfo=UTC)


def _admin_engine() -> Engine:
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {make_url(PG_URL).render_as_string()}: {exc}. "
            "Start it (see .ci/run) or set BILLING_TEST_DATABASE_URL.",
            pytrace=False,
        )
    return engine


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this test run, migrated to head, dropped at the end."""
    admin = _admin_engine()
    name = f"billing_it_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    from billing.db import get_engine

    get_engine.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=10, max_overflow=10)
    yield engine
    engine.dispose()


@pytest.fixture()
def clean_db(pg_engine: Engine) -> Engine:
    """Every table emptied before the test: each test states its own world."""
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    return pg_engine


@pytest.fixture()
def sandbox() -> Sandbox:
    return Sandbox(now=lambda: START)


@pytest.fixture()
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture()
def vault() -> TokenVault:
    return TokenVault(new_key())


def make_runtime(
    engine: Engine,
    sandbox: Sandbox,
    clock: FixedClock,
    vault: TokenVault,
    *,
    api_key: str | None = None,
    live: bool = False,
) -> Runtime:
    client = FatoraClient(
        "http://sandbox.test/v1",
        api_key or sandbox.api_key,
        mode="live" if live else "test",
        timeout_s=5,
        transport=SandboxTransport(sandbox),
    )
    rt = Runtime(
        engine=engine,
        sessions=session_factory(engine),
        clock=clock,
        gateway=client,
        locker=PostgresAdvisoryLocker(engine),
        live_gateway=live,
        unknown_grace=timedelta(minutes=5),
        charge_concurrency=8,
        charge_batch_size=50,
        renewal_batch_size=100,
    )
    _made.append(rt)
    return rt.with_vault(vault)


_made: list[Runtime] = []


@pytest.fixture(autouse=True)
def _close_runtimes() -> Iterator[None]:
    """Every runtime a test made stops its call threads when the test ends."""
    yield
    while _made:
        _made.pop().close()


@pytest.fixture()
def rt(clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault) -> Runtime:
    return make_runtime(clean_db, sandbox, clock, vault)


AMOUNT = Decimal("50.00")


@pytest.fixture()
def web(rt: Runtime) -> Any:
    """`billing web` in process, on the test's runtime."""
    from starlette.testclient import TestClient

    from billing.web import create_app

    return TestClient(create_app(lambda: rt), base_url="http://billing.test")


@pytest.fixture()
def tap(sandbox: Sandbox) -> RefundTap:
    return RefundTap(sandbox)


@pytest.fixture()
def rtx(
    clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault, tap: RefundTap
) -> Runtime:
    """A runtime whose gateway goes through ``tap`` (the refund's bad days)."""
    rt = make_runtime(clean_db, sandbox, clock, vault)
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1", sandbox.api_key, mode="test", timeout_s=5, transport=tap
    )
    return rt
