"""Database engine and sessions.

PostgreSQL in production (psycopg 3), SQLite for the embedded default. Every timestamp is stored
in UTC and comes back timezone-aware, on both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    DateTime,
    Engine,
    String,
    Table,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.types import TypeDecorator, TypeEngine

from billing.config import get_settings


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no zone: store naive UTC there)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where an aware UTC datetime is required")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def normalize_url(url: str) -> str:
    """Accept the plain ``postgresql://`` form and pick the psycopg 3 driver for it."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    url = normalize_url(url or get_settings().database_url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # A connection that holds invoice locks sits idle while the gateway answers: TCP keepalives
    # find a dead peer (a restarted server, a cut network) in about a minute instead of hours.
    connect_args = {**_PG_KEEPALIVES, **kwargs.pop("connect_args", {})}
    return create_engine(url, connect_args=connect_args, **kwargs)


_PG_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    return make_engine(url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session] | None = None) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on any error."""
    session = (factory or session_factory())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def insert_for(session: Session, model: type[Any]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT of ``model`` in the session's dialect, which offers ``on_conflict_do_nothing``
    (a race two workers can lose is settled by a unique constraint, not by an error)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def id_in(
    session: Session, column: ColumnElement[int] | QueryableAttribute[int], ids: Iterable[int]
) -> ColumnElement[bool]:
    """``column IN ids``. On PostgreSQL it is ``column = ANY(:ids)`` with one array parameter:
    the statement text is the same whatever the number of ids, so the driver converts it once
    instead of parsing a new statement with a parameter per id on every batch."""
    wanted = sorted(set(ids))
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, wanted, type_=ARRAY(column.type)))
    return column.in_(wanted)


def insert_rows(
    session: Session,
    model: type[Any],
    rows: Sequence[Mapping[str, Any]],
    returning: Sequence[QueryableAttribute[Any]] = (),
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (each with the same keys) of ``model`` in one statement; the
    ``returning`` columns of each row written, in no promised order (return a key to match
    them by).

    On PostgreSQL the rows go as one array parameter per column (``INSERT ... SELECT unnest(...)``):
    the statement text is the same whatever the number of rows, so the driver converts it once and
    the server prepares it, where a multi-row VALUES list would be a new statement, with a
    parameter per value, on every batch (and an executemany, a round of the driver's work per
    row)."""
    if not rows:
        return []
    statement = insert(model)
    params: list[dict[str, Any]] | None = [dict(row) for row in rows]
    if session.get_bind().dialect.name == "postgresql":
        table: Table = model.__table__
        columns = [
            func.unnest(bindparam(f"rows_{name}", [row[name] for row in rows], _array(table, name)))
            for name in rows[0]
        ]
        statement, params = statement.from_select(list(rows[0]), select(*columns)), None
    if not returning:
        session.execute(statement, params)
        return []
    return [tuple(row) for row in session.execute(statement.returning(*returning), params)]


def _array(table: Table, name: str) -> ARRAY[Any]:
    """A column's type as an array: strings without their length, since a cast to
    ``varchar(n)`` cuts a longer value silently where the insert must refuse it."""
    column_type: TypeEngine[Any] = table.c[name].type
    return ARRAY(String() if isinstance(column_type, String) else column_type)
