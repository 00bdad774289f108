"""The outbox on real PostgreSQL: an event exists if and only if the change it reports was
committed. Notifications and alerts are sent from these rows; a missing one is a customer never
told they were charged, an extra one is an alert about something that did not happen."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing.models import Customer, Event
from billing.services.events import record_event

NOW = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def _customer(session: Session, name: str) -> Customer:
    customer = Customer(external_id=name, name=name, email=f"{name}@example.com", created_at=NOW)
    session.add(customer)
    return customer


def _kinds(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.execute(select(Event.kind).order_by(Event.id)).scalars())


def test_a_committed_change_writes_its_events_pointing_at_rows_made_in_the_same_transaction(
    clean_db: Engine,
) -> None:
    with Session(clean_db) as session, session.begin():
        customer = _customer(session, "a")
        session.flush()
        record_event(session, "customer.created", customer_id=customer.id, now=NOW)
        record_event(session, "customer.welcomed", customer_id=customer.id, now=NOW)
    assert _kinds(clean_db) == ["customer.created", "customer.welcomed"]


def test_a_rolled_back_change_writes_no_event_and_leaves_none_for_the_next_commit(
    clean_db: Engine,
) -> None:
    with Session(clean_db) as session:
        with pytest.raises(RuntimeError), session.begin():
            _customer(session, "b")
            record_event(session, "customer.created", now=NOW)
            raise RuntimeError("the change failed")
        with session.begin():
            record_event(session, "later.change", now=NOW)
    assert _kinds(clean_db) == ["later.change"]


def test_a_session_closed_without_commit_writes_nothing_and_a_reused_one_starts_clean(
    clean_db: Engine,
) -> None:
    session = Session(clean_db)
    record_event(session, "never.committed", now=NOW)
    session.close()
    with session.begin():
        record_event(session, "committed", now=NOW)
    session.close()
    assert _kinds(clean_db) == ["committed"]


def test_each_commit_writes_its_own_events_once(clean_db: Engine) -> None:
    with Session(clean_db) as session:
        record_event(session, "first", now=NOW)
        session.commit()
        record_event(session, "second", now=NOW)
        session.commit()
        session.commit()
    assert _kinds(clean_db) == ["first", "second"]


def test_a_payload_changed_after_recording_does_not_change_the_event(clean_db: Engine) -> None:
    payload: dict[str, object] = {"step": 1}
    with Session(clean_db) as session, session.begin():
        record_event(session, "payload.kept", now=NOW, payload=payload)
        payload["step"] = 2
    with Session(clean_db) as session:
        assert session.execute(select(Event.payload)).scalar_one() == {"step": 1}


def test_events_are_refused_inside_a_savepoint_and_outer_ones_survive_its_rollback(
    clean_db: Engine,
) -> None:
    """A savepoint's own rollback could not take its events back alone: recording there is
    refused, and the events of the outer transaction are kept when a savepoint rolls back."""
    with Session(clean_db) as session, session.begin():
        record_event(session, "outer", now=NOW)
        savepoint = session.begin_nested()
        with pytest.raises(RuntimeError, match="savepoint"):
            record_event(session, "inner", now=NOW)
        savepoint.rollback()
    assert _kinds(clean_db) == ["outer"]
