"""Invoice locks: while a worker is collecting an invoice, no other worker may touch it.

On PostgreSQL the lock is a transaction-scoped advisory lock held on a connection of its own for
the whole collection, gateway calls included. If the worker dies, its connection closes and the
lock goes with it; the attempt rows it committed stay, and the next worker settles them with
verify before charging. On SQLite (the embedded default, one process) a process-local lock
plays the same part.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from sqlalchemy import Engine, text

# The first key of the two-int advisory lock: keeps invoice locks apart from anything else.
INVOICE_LOCK_SPACE = 0x46A7


class InvoiceLocker(Protocol):
    def hold(self, invoice_ids: Sequence[int]) -> AbstractContextManager[list[int]]:
        """Lock what can be locked now, without waiting; yield the ids that were locked."""
        ...


class PostgresAdvisoryLocker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def hold(self, invoice_ids: Sequence[int]) -> Iterator[list[int]]:
        if not invoice_ids:
            yield []
            return
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id FROM unnest(CAST(:ids AS integer[])) AS t(id) "
                    "WHERE pg_try_advisory_xact_lock(:space, id)"
                ),
                {"ids": sorted(set(invoice_ids)), "space": INVOICE_LOCK_SPACE},
            )
            locked = [int(row[0]) for row in rows]
            try:
                yield locked
            finally:
                conn.rollback()  # ends the transaction: releases every lock it took


class LocalLocker:
    """Process-local locks, for SQLite where a single process does the work."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[int] = set()

    @contextmanager
    def hold(self, invoice_ids: Sequence[int]) -> Iterator[list[int]]:
        with self._guard:
            locked = [i for i in sorted(set(invoice_ids)) if i not in self._held]
            self._held.update(locked)
        try:
            yield locked
        finally:
            with self._guard:
                self._held.difference_update(locked)


_LOCAL = LocalLocker()


def locker_for(engine: Engine) -> InvoiceLocker:
    if engine.dialect.name == "postgresql":
        return PostgresAdvisoryLocker(engine)
    return _LOCAL
