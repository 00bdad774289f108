"""What a process needs to do billing work, built once from the settings.

The database engine, the clock, the token vault, the gateway client and the invoice locker are
assembled here and nowhere else, so that a test can build a Runtime of its own with a sandbox
transport or a fixed clock.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing.clock import Clock, clock_for
from billing.config import GatewayMode, get_fatora_settings, get_settings
from billing.crypto import TokenVault, vault_from_settings
from billing.db import get_engine, normalize_url, session_factory
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.locks import InvoiceLocker, locker_for

# FATORA_BASE_URL=sandbox://embedded runs the gateway sandbox inside this process.
EMBEDDED_SANDBOX_URL = "sandbox://embedded"

# The broker that runs tasks in the calling process (the embedded default): no other worker.
MEMORY_BROKER_PREFIX = "memory://"


@dataclass
class Runtime:
    engine: Engine
    sessions: sessionmaker[Session]
    clock: Clock
    gateway: FatoraClient
    locker: InvoiceLocker
    live_gateway: bool
    # A 'not found' after a call without a clear answer is trusted only this long after the send.
    unknown_grace: timedelta = timedelta(hours=6)
    charge_concurrency: int = 25
    charge_batch_size: int = 100
    renewal_batch_size: int = 500
    _vault: TokenVault | None = field(default=None, repr=False)
    _calls: ThreadPoolExecutor | None = field(default=None, repr=False)
    _calls_pid: int = field(default=0, repr=False)
    _calls_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def vault(self) -> TokenVault:
        if self._vault is None:
            self._vault = vault_from_settings()
        return self._vault

    @property
    def gateway_calls(self) -> ThreadPoolExecutor:
        """The threads that make gateway calls, ``charge_concurrency`` of them, shared by every
        collection in this process. Built on first use in each process: a pool inherited
        through a fork (a Celery prefork child) has no threads and is never used."""
        with self._calls_lock:
            if self._calls is None or self._calls_pid != os.getpid():
                self._calls = ThreadPoolExecutor(
                    max_workers=self.charge_concurrency, thread_name_prefix="fatora-call"
                )
                self._calls_pid = os.getpid()
            return self._calls

    def close(self) -> None:
        """Stop the call threads (idle ones; a collection under way finishes first)."""
        with self._calls_lock:
            calls, self._calls = self._calls, None
        if calls is not None and self._calls_pid == os.getpid():
            calls.shutdown(wait=True)

    def with_vault(self, vault: TokenVault) -> Runtime:
        self._vault = vault
        return self


_embedded_lock = threading.Lock()
_embedded: Sandbox | None = None


def embedded_sandbox(engine: Engine) -> Sandbox:
    """One in-process sandbox per process, reading the same clock as everything else."""
    global _embedded
    with _embedded_lock:
        if _embedded is None:
            _embedded = Sandbox(now=clock_for(engine).now)
        return _embedded


def embedded_sandbox_transport(engine: Engine) -> httpx.BaseTransport:
    return SandboxTransport(embedded_sandbox(engine))


def build_runtime(database_url: str | None = None) -> Runtime:
    settings = get_settings()
    fatora = get_fatora_settings()
    engine = get_engine(database_url or settings.database_url)
    transport = None
    base_url = fatora.base_url
    if base_url == EMBEDDED_SANDBOX_URL:
        transport = embedded_sandbox_transport(engine)
        base_url = "http://sandbox.invalid/v1"
    gateway = FatoraClient(
        base_url,
        fatora.api_key.get_secret_value(),
        mode=fatora.mode.value,
        timeout_s=fatora.timeout_s,
        connect_timeout_s=fatora.connect_timeout_s,
        transport=transport,
    )
    return Runtime(
        engine=engine,
        sessions=session_factory(engine),
        clock=clock_for(engine),
        gateway=gateway,
        locker=locker_for(engine),
        live_gateway=fatora.mode is GatewayMode.LIVE,
        unknown_grace=timedelta(seconds=settings.unknown_grace_s),
        charge_concurrency=settings.charge_concurrency,
        charge_batch_size=settings.charge_batch_size,
        renewal_batch_size=settings.renewal_batch_size,
    )


# Celery pools that run every task inside the worker's own process; any other pool (prefork, or
# one we do not know) may run tasks in several processes.
ONE_PROCESS_POOLS = frozenset({"solo", "threads", "gevent", "eventlet"})


def unlocked_worker_problem(
    *,
    database_url: str,
    broker_url: str,
    pool: str,
    concurrency: int | None,
    autoscale_max: int | None = None,
) -> str | None:
    """Why a Celery worker set up this way could charge an invoice twice, or ``None`` if it cannot.

    On SQLite the invoice lock is process-local (``billing.locks.LocalLocker``): it keeps the
    tasks of one process apart, but nothing keeps two processes from collecting the same invoice.
    So on SQLite a worker must not run tasks in more than one process, unless the broker is
    ``memory://`` (tasks run in the process that sends them, no worker shares them). ``pool`` is
    Celery's pool name (``prefork``, ``solo``, ``threads``...); ``concurrency`` its number of
    processes or threads, ``None`` while Celery has yet to size it (``--concurrency auto``);
    ``autoscale_max`` the upper bound of ``--autoscale``.
    """
    if not normalize_url(database_url).startswith("sqlite"):
        return None  # PostgreSQL: advisory locks hold across processes and hosts
    if broker_url.startswith(MEMORY_BROKER_PREFIX) or pool in ONE_PROCESS_POOLS:
        return None
    processes = max(concurrency or 0, autoscale_max or 0)
    if concurrency is not None and processes <= 1:
        return None
    how_many = "one per CPU" if concurrency is None else str(processes)
    return (
        f"refusing to start: this worker would run tasks in several processes ({pool} pool, "
        f"{how_many}) on SQLite with a {broker_url.split(':', 1)[0]} broker, and SQLite's invoice "
        "lock holds only within one process, so two of them could charge the same invoice twice. "
        "Use PostgreSQL (BILLING_DATABASE_URL=postgresql://...), or start a single worker with "
        "--concurrency 1 or --pool solo."
    )


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime (Celery workers build it once, on first use)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = build_runtime()
        return _runtime


def reset_runtime() -> None:
    global _runtime
    with _runtime_lock:
        _runtime = None
