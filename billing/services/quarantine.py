"""Quarantine: one row that raises must not stop the rows processed with it.

Renewal (``schedules/renewal.py``) and the write-ahead (``billing/services/charging.py``) work in
batches. When a batch raises, it is rolled back and done again row by row, each row in a
savepoint (``events.savepoint``); a row that raises again is *quarantined* here: it gets
``quarantined_at`` (since when), ``quarantine_reason`` (the exception's class and the first line
of its message, at most 200 characters, anything token-like removed) and
``quarantine_retry_at`` (an hour on), and ``alert.row_quarantined`` is raised once, when it
enters quarantine. It is tried again every hour; the first try that does not raise releases it
(the columns are cleared and ``row.released`` is recorded). ``billing quarantine release``
releases it at once.

A fault of the database itself (a lost connection, a deadlock, a missing column) is not the
row's: ``systemic`` says so, and such an error is raised to the caller instead of quarantining
every row it happens to touch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from billing.lifecycle import InvoiceStatus
from billing.models import Invoice, Subscription
from billing.services.errors import NotFound
from billing.services.events import record_event

log = logging.getLogger("billing.quarantine")

RETRY_EVERY = timedelta(hours=1)
REASON_MAX = 200
ALERT = "alert.row_quarantined"
RELEASED = "row.released"

Quarantinable = Subscription | Invoice

# Long runs of token or key characters (a card token, a Fernet key, a ciphertext): never kept.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9+/=_\-|\\]{16,}")


def systemic(exc: BaseException) -> bool:
    """True for a fault of the database or its connection rather than of one row's data."""
    return isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError | DataError)


def reason_for(exc: BaseException) -> str:
    """The exception's class and the first line of its message (the driver's own message for a
    database error, not the statement and its parameters), without anything token-like."""
    message = str(exc.orig) if isinstance(exc, DBAPIError) else str(exc)
    lines = message.strip().splitlines()
    first = _SECRET_LIKE.sub(_redact, lines[0]) if lines else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason[:REASON_MAX]


def _redact(match: re.Match[str]) -> str:
    word = match.group(0)
    if any(c.isdigit() for c in word) and any(c.isalpha() for c in word):
        return "[redacted]"
    return word  # a long name (a constraint, a table) is no secret


def table_of(row: Quarantinable) -> str:
    return str(row.__tablename__)


def hold(session: Session, row: Quarantinable, exc: BaseException, now: datetime) -> bool:
    """Quarantine ``row``, whose processing raised ``exc``, until an hour from ``now``.

    Call it in the outer transaction, after the savepoint the row raised in was rolled back.
    True when the row enters quarantine now: only then is ``alert.row_quarantined`` raised; a
    failed retry only moves the retry time (and keeps the latest reason).
    """
    reason = reason_for(exc)
    entering = row.quarantined_at is None
    row.quarantine_reason = reason
    row.quarantine_retry_at = now + RETRY_EVERY
    if isinstance(row, Invoice) and row.next_attempt_at is not None:
        # Not due before its retry: the retry sweep's index scan never meets it meanwhile.
        row.next_attempt_at = max(row.next_attempt_at, row.quarantine_retry_at)
    row.updated_at = now
    table = table_of(row)
    if not entering:
        log.warning(
            "%s %s still raises, retried at %s: %s", table, row.id, row.quarantine_retry_at, reason
        )
        return False
    row.quarantined_at = now
    log.error("%s %s quarantined: %s", table, row.id, reason)
    _record(session, ALERT, row, now, {"table": table, "id": row.id, "reason": reason})
    return True


# A row set aside for an operator is not retried by itself: only `billing quarantine release`.
SET_ASIDE = timedelta(days=3650)


def set_aside(session: Session, row: Quarantinable, reason: str, now: datetime) -> None:
    """Quarantine ``row`` until an operator releases it (a case no retry can settle, such as a
    payment found that does not match its invoice). An invoice is not charged meanwhile."""
    entering = row.quarantined_at is None
    row.quarantined_at = row.quarantined_at or now
    row.quarantine_reason = reason[:200]
    row.quarantine_retry_at = now + SET_ASIDE
    if isinstance(row, Invoice):
        row.next_attempt_at = None
    row.updated_at = now
    if entering:
        log.error("%s %s set aside: %s", table_of(row), row.id, reason)
        _record(session, ALERT, row, now, {"table": table_of(row), "id": row.id, "reason": reason})


def release(session: Session, row: Quarantinable, now: datetime, *, by: str = "retry") -> bool:
    """Take ``row`` out of quarantine (its processing succeeded, or an operator said so); True
    when it was quarantined. ``row.released`` is recorded."""
    if row.quarantined_at is None:
        return False
    since = row.quarantined_at
    row.quarantined_at = None
    row.quarantine_reason = None
    row.quarantine_retry_at = None
    row.updated_at = now
    log.info("%s %s released (%s)", table_of(row), row.id, by)
    payload = {"table": table_of(row), "id": row.id, "by": by, "since": since.isoformat()}
    _record(session, RELEASED, row, now, payload)
    return True


def release_now(session: Session, row: Quarantinable, now: datetime) -> bool:
    """``billing quarantine release``: released at once, and due at once. A subscription is due
    again by its own ``next_billing_at`` (which has passed); an open invoice whose next attempt
    the quarantine held back to its retry time gets it back at ``now`` (one whose next attempt
    is later for another reason, a dunning step, keeps it)."""
    retry_at = row.quarantine_retry_at
    if not release(session, row, now, by="operator"):
        return False
    if (
        isinstance(row, Invoice)
        and row.status == InvoiceStatus.OPEN.value
        and row.next_attempt_at is not None
        and retry_at is not None
        and row.next_attempt_at <= retry_at
    ):
        row.next_attempt_at = min(row.next_attempt_at, now)
    elif isinstance(row, Invoice) and row.status == InvoiceStatus.OPEN.value:
        row.next_attempt_at = row.next_attempt_at or now  # set aside: due once released
    return True


def _record(
    session: Session, kind: str, row: Quarantinable, now: datetime, payload: dict[str, object]
) -> None:
    if isinstance(row, Invoice):
        record_event(session, kind, invoice=row, now=now, payload=payload)
    else:
        record_event(session, kind, subscription=row, now=now, payload=payload)


@dataclass(frozen=True)
class QuarantinedRow:
    table: str
    id: int
    since: datetime
    reason: str | None
    retry_at: datetime | None


def quarantined(session: Session) -> list[QuarantinedRow]:
    """Every quarantined subscription and invoice, longest quarantined first (read over the
    partial indexes that hold only quarantined rows)."""
    rows: list[Quarantinable] = [
        *session.execute(select(Subscription).where(Subscription.quarantined_at.is_not(None)))
        .scalars()
        .all(),
        *session.execute(select(Invoice).where(Invoice.quarantined_at.is_not(None)))
        .scalars()
        .all(),
    ]
    found = [
        QuarantinedRow(
            table_of(row),
            row.id,
            row.quarantined_at,
            row.quarantine_reason,
            row.quarantine_retry_at,
        )
        for row in rows
        if row.quarantined_at is not None
    ]
    return sorted(found, key=lambda r: (r.since, r.table, r.id))


def locked(session: Session, table: str, row_id: int) -> Quarantinable:
    """The row of ``table`` (``subscriptions`` or ``invoices``), locked for update; ``NotFound``
    if there is none."""
    row: Quarantinable | None
    if table == Subscription.__tablename__:
        row = session.get(Subscription, row_id, with_for_update=True)
    elif table == Invoice.__tablename__:
        row = session.get(Invoice, row_id, with_for_update=True)
    else:
        raise ValueError(f"no quarantine on table {table!r}")
    if row is None:
        raise NotFound(f"no {table[:-1]} {row_id}")
    return row
