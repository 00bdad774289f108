"""The outbox: events written in the same transaction as the state change they report.

Notifications (email, merchant webhooks) and alerts are delivered from here by
``billing.services.notifications``; an event exists if and only if the change it reports was
committed. Payloads carry ids and words,
never a card token.

``record_event`` keeps the row with the session's transaction; when that transaction commits,
its rows are written by one statement (``db.insert_rows``), after a flush, so that what they
point at exists. A transaction that rolls back, or a session closed without committing, writes
none of them. Events are not recorded inside a bare savepoint (whose own rollback could not take
them back alone); ``savepoint`` opens one that takes its events with it: kept for the outer
commit if it is released, dropped if it rolls back. Rows recorded in a transaction cannot be read
back before it commits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from billing.db import insert_rows
from billing.models import Event, Invoice, Subscription

_OUTBOX = "billing.outbox"
# How many ``savepoint`` blocks are open on the session (events may be recorded in them).
_SAVEPOINTS = "billing.outbox.savepoints"


def record_event(
    session: Session,
    kind: str,
    *,
    now: datetime,
    invoice: Invoice | None = None,
    subscription: Subscription | None = None,
    customer_id: int | None = None,
    payload: dict[str, Any] | None = None,
) -> None:
    if session.in_nested_transaction() and not session.info.get(_SAVEPOINTS):
        raise RuntimeError(
            "events are recorded in the outer transaction, or in events.savepoint, "
            "not in a bare savepoint"
        )
    session.connection()  # the row belongs to the transaction open now (begun if need be)
    subscription_id = subscription.id if subscription is not None else None
    if invoice is not None and subscription_id is None:
        subscription_id = invoice.subscription_id
    if subscription is not None and customer_id is None:
        customer_id = subscription.customer_id
    session.info.setdefault(_OUTBOX, []).append(
        {
            "kind": kind,
            "customer_id": customer_id,
            "subscription_id": subscription_id,
            "invoice_id": invoice.id if invoice is not None else None,
            "payload": dict(payload or {}),
            "created_at": now,
        }
    )


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """A savepoint (``session.begin_nested()``) that events may be recorded in.

    Leaving the block normally releases the savepoint, and its events join the outer
    transaction's (written when that commits); leaving it by an exception rolls the savepoint
    back, drops the events recorded in it, and re-raises.
    """
    _begin_outer(session)
    rows: list[dict[str, Any]] = session.info.setdefault(_OUTBOX, [])
    mark = len(rows)
    session.info[_SAVEPOINTS] = session.info.get(_SAVEPOINTS, 0) + 1
    try:
        with session.begin_nested():
            yield
    except BaseException:
        del rows[mark:]
        raise
    finally:
        session.info[_SAVEPOINTS] -= 1


def _begin_outer(session: Session) -> None:
    """Make sure the outer transaction has begun in the database, not only in the session.

    On SQLite, the driver (pysqlite) sends BEGIN only before the first write: a savepoint opened
    before it would itself start the transaction, and releasing it would commit what the outer
    transaction was meant to commit or roll back as a whole. BEGIN is sent first there.
    """
    connection = session.connection()  # the outer transaction, begun if need be
    if connection.dialect.name != "sqlite":
        return
    driver = connection.connection.driver_connection
    if driver is not None and not driver.in_transaction:
        driver.execute("BEGIN")


@event.listens_for(Session, "before_commit")
def _write_outbox(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: the rows wait for the outer commit
    rows: list[dict[str, Any]] | None = session.info.get(_OUTBOX)
    if rows:
        session.flush()
        insert_rows(session, Event, rows)
    session.info.pop(_OUTBOX, None)


@event.listens_for(Session, "after_transaction_end")
def _drop_unwritten(session: Session, transaction: SessionTransaction) -> None:
    # The outer transaction ended: committed (its rows are written already) or rolled back, or
    # the session closed without committing. Either way no row of it may reach a later one.
    if transaction.parent is None:
        session.info.pop(_OUTBOX, None)
