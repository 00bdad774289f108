"""``db.insert_rows``: the one statement that writes a batch's new attempts and a transaction's
outbox events. What it must keep: every row written as given (NULLs, aware datetimes, JSON), the
returned keys matched to the right rows, and, on PostgreSQL, one statement text whatever the
number of rows (so that the driver converts it once and the server prepares it)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import DBAPIError

from billing.db import insert_rows, make_engine, session_factory
from billing.models import Base, Customer, Event

T0 = datetime(2027, 1, 31, 7, 0, tzinfo=UTC)


def _events(n: int, customer_id: int | None) -> list[dict[str, Any]]:
    return [
        {
            "kind": f"test.kind_{i}",
            "customer_id": customer_id if i % 2 else None,
            "subscription_id": None,
            "invoice_id": None,
            "payload": {"n": i, "word": 'naïve "quoted" \\ text', "nested": {"list": [i, None]}},
            "created_at": T0 + timedelta(seconds=i),
        }
        for i in range(n)
    ]


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        yield request.getfixturevalue("clean_db")
        return
    lite = make_engine(f"sqlite:///{tmp_path / 'rows.sqlite3'}")
    Base.metadata.create_all(lite)
    yield lite
    lite.dispose()


def _customer(engine: Engine) -> int:
    with session_factory(engine)() as session, session.begin():
        customer = Customer(
            external_id="c-rows", name="Rows", email="rows@example.com", created_at=T0
        )
        session.add(customer)
        session.flush()
        return customer.id


def test_every_row_is_written_as_given_and_its_key_comes_back_with_it(engine: Engine) -> None:
    customer_id = _customer(engine)
    rows = _events(7, customer_id)
    with session_factory(engine)() as session, session.begin():
        back = insert_rows(session, Event, rows, [Event.kind, Event.id])
    ids = dict(back)
    assert set(ids) == {row["kind"] for row in rows}
    with session_factory(engine)() as session:
        for row in rows:
            stored = session.get(Event, ids[row["kind"]])
            assert stored is not None
            assert (stored.kind, stored.customer_id, stored.payload) == (
                row["kind"],
                row["customer_id"],
                row["payload"],
            )
            assert stored.created_at == row["created_at"]
            assert stored.delivery_status == "pending"  # server defaults still apply


def test_nothing_to_write_writes_nothing(engine: Engine) -> None:
    with session_factory(engine)() as session, session.begin():
        assert insert_rows(session, Event, [], [Event.id]) == []
    with session_factory(engine)() as session:
        assert session.execute(select(Event.id)).first() is None


def test_one_statement_text_serves_every_batch_size(clean_db: Engine) -> None:
    """The point of the unnest form on PostgreSQL: one row or a hundred, the same text."""
    seen: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO EVENTS"):
            seen.append(statement)

    event.listen(clean_db, "before_cursor_execute", spy)
    try:
        for n in (1, 3, 100):
            with session_factory(clean_db)() as session, session.begin():
                insert_rows(session, Event, _events(n, None))
    finally:
        event.remove(clean_db, "before_cursor_execute", spy)
    assert len(seen) == 3
    assert len(set(seen)) == 1
    with session_factory(clean_db)() as session:
        assert len(session.execute(select(Event.id)).all()) == 104


def test_a_value_too_long_for_its_column_is_refused_not_cut(clean_db: Engine) -> None:
    """An order id cut to fit would name another order than the one sent: the insert fails."""
    rows = _events(1, None)
    rows[0]["kind"] = "k" * 70  # the column holds 64
    with pytest.raises(DBAPIError), session_factory(clean_db)() as session, session.begin():
        insert_rows(session, Event, rows)
    with session_factory(clean_db)() as session:
        assert session.execute(select(Event.id)).first() is None
