"""Alerts: the outbox's ``alert.*`` events, as the operator reads and acknowledges them.

An alert is recorded like any event (``billing/services/events.py``), by whatever found the
problem: collection paused, a charge stalled or rejected, an attempt left unresolved, a row
quarantined, a duplicate payment... It is open until an operator acknowledges it
(``billing alerts ack``), which records when, by whom and, optionally, why (``acked_at``,
``acked_by``, ``ack_note``). Acknowledging changes nothing else: the alert email goes out (or
not) as it would, and the problem itself is not touched. ``billing status`` counts the open ones
from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from billing.models import OPEN_ALERTS_SQL, Event
from billing.notify import ALERT_PREFIX, iso
from billing.services.errors import NotFound

ACK_BY_MAX = 120
ACK_NOTE_MAX = 500

# The same predicate as the partial index ix_events_open_alerts, so that the index serves it.
_OPEN = text(OPEN_ALERTS_SQL)
_ALERT = Event.kind.startswith(ALERT_PREFIX, autoescape=True)


def list_alerts(session: Session, *, include_acked: bool = False, limit: int = 100) -> list[Event]:
    """The latest alerts, newest first: open ones only, unless ``include_acked``."""
    query = select(Event).where(_OPEN if not include_acked else _ALERT)
    return list(session.execute(query.order_by(Event.id.desc()).limit(limit)).scalars())


def open_alerts_by_kind(session: Session) -> dict[str, int]:
    """How many alerts are open, by kind."""
    rows = session.execute(select(Event.kind, func.count()).where(_OPEN).group_by(Event.kind))
    return {str(kind): int(count) for kind, count in rows}


@dataclass
class Acknowledged:
    """What ``acknowledge`` did: the alerts it acknowledged now, and those acknowledged before
    (left as they were: the first acknowledgement stands)."""

    acked: list[int] = field(default_factory=list)
    already: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[int]]:
        return {"acked": self.acked, "already_acked": self.already}


def acknowledge(
    session: Session,
    alert_ids: list[int] | None,
    *,
    by: str,
    note: str | None,
    now: datetime,
) -> Acknowledged:
    """Acknowledge the alerts ``alert_ids`` (every open one when ``None``), as ``by``, with an
    optional ``note``. An id that is not an alert is ``NotFound``, raised before anything is
    changed (so that the caller's transaction can be rolled back whole)."""
    by = " ".join(by.split())[:ACK_BY_MAX] or "unknown"
    note = " ".join(note.split())[:ACK_NOTE_MAX] if note else None
    if alert_ids is None:
        query = select(Event).where(_OPEN)
    else:
        query = select(Event).where(_ALERT, Event.id.in_(sorted(set(alert_ids))))
    events = list(session.execute(query.order_by(Event.id).with_for_update()).scalars())
    if alert_ids is not None:
        missing = sorted(set(alert_ids) - {e.id for e in events})
        if missing:
            listed = ", ".join(str(i) for i in missing)
            raise NotFound(f"not an alert: {listed} (see `billing alerts list --all`)")
    done = Acknowledged()
    for event in events:
        if event.acked_at is not None:
            done.already.append(event.id)
            continue
        event.acked_at, event.acked_by, event.ack_note = now, by, note
        done.acked.append(event.id)
    return done


def describe_alert(event: Event) -> dict[str, Any]:
    """An alert as ``billing alerts list --json`` shows it (payloads carry ids and words only)."""
    return {
        "id": event.id,
        "kind": event.kind,
        "created_at": iso(event.created_at),
        "customer_id": event.customer_id,
        "subscription_id": event.subscription_id,
        "invoice_id": event.invoice_id,
        "payload": event.payload,
        "open": event.acked_at is None,
        "acked_at": iso(event.acked_at),
        "acked_by": event.acked_by,
        "ack_note": event.ack_note,
        "delivery": event.delivery_status,
    }
