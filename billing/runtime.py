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
from billing.db import get_engine, session_factory
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.locks import InvoiceLocker, locker_for

# FATORA_BASE_URL=sandbox://embedded runs the gateway sandbox inside this process.
EMBEDDED_SANDBOX_URL = "sandbox://embedded"


@dataclass
class Runtime:
    engine: Engine
    sessions: sessionmaker[Session]
    clock: Clock
    gateway: FatoraClient
    locker: InvoiceLocker
    live_gateway: bool
    # A 'not found' after a call that got no answer is trusted only after this much real time.
    unknown_grace: timedelta = timedelta(minutes=5)
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
