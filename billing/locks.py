"""Invoice locks: while a worker is collecting an invoice, no other worker should touch it.

On PostgreSQL the lock is a transaction-scoped advisory lock held on a connection of its own for
the whole collection, gateway calls included. If the worker dies, its connection closes and the
lock goes with it; the attempt rows it committed stay, and the next worker settles them with
verify before charging. On SQLite (the embedded default, one process) a process-local lock
plays the same part.

The lock keeps workers out of each other's way; it is not what keeps an invoice from being
charged twice. That fence is in the database (one unresolved attempt per invoice, rows locked
for every read-modify-write), because a lock on a connection can be lost: an idle-in-transaction
timeout, a restarted server, a cut network. The lock connection is protected against the first
(the timeout is switched off for its transaction) and the last (TCP keepalives, see
``billing.db``), and ``Held.check`` tells the caller when it is gone, so that no further
request is sent under a lock that no longer exists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Connection, Engine, text

log = logging.getLogger("billing.locks")

# The first key of the two-int advisory lock: keeps invoice locks apart from anything else.
INVOICE_LOCK_SPACE = 0x46A7


@dataclass
class Held:
    """The invoices a worker holds, and a way to ask whether it still holds them."""

    ids: list[int]
    _probe: Callable[[], bool] = field(default=lambda: True, repr=False)

    def check(self) -> bool:
        """True while the locks are held; False once they are known to be lost."""
        return self._probe()


class InvoiceLocker(Protocol):
    def hold(self, invoice_ids: Sequence[int]) -> AbstractContextManager[Held]:
        """Lock what can be locked now, without waiting; yield what was locked."""
        ...


class PostgresAdvisoryLocker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def hold(self, invoice_ids: Sequence[int]) -> Iterator[Held]:
        if not invoice_ids:
            yield Held([])
            return
        with self.engine.connect() as conn:
            # The transaction stays idle while the gateway is called: a server-wide
            # idle_in_transaction_session_timeout (common on managed PostgreSQL) must not end it.
            conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
            rows = conn.execute(
                text(
                    "SELECT id FROM unnest(CAST(:ids AS integer[])) AS t(id) "
                    "WHERE pg_try_advisory_xact_lock(:space, id)"
                ),
                {"ids": sorted(set(invoice_ids)), "space": INVOICE_LOCK_SPACE},
            )
            locked = [int(row[0]) for row in rows]
            try:
                yield Held(locked, lambda: _alive(conn))
            finally:
                try:
                    conn.rollback()  # ends the transaction: releases every lock it took
                except Exception:
                    log.warning("the invoice lock connection was already gone", exc_info=True)


def _alive(conn: Connection) -> bool:
    """The locks live as long as their transaction: a round trip on it proves both."""
    try:
        conn.execute(text("SELECT 1"))
    except Exception:
        log.error("the invoice lock connection is lost: sending nothing more under it")
        return False
    return True


class LocalLocker:
    """Process-local locks, for SQLite where a single process does the work."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[int] = set()

    @contextmanager
    def hold(self, invoice_ids: Sequence[int]) -> Iterator[Held]:
        with self._guard:
            locked = [i for i in sorted(set(invoice_ids)) if i not in self._held]
            self._held.update(locked)
        try:
            yield Held(locked)
        finally:
            with self._guard:
                self._held.difference_update(locked)


_LOCAL = LocalLocker()


def locker_for(engine: Engine) -> InvoiceLocker:
    if engine.dialect.name == "postgresql":
        return PostgresAdvisoryLocker(engine)
    return _LOCAL
