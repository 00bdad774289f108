"""Migration 0005 on a database that already has events, on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from billing.migrate import downgrade, upgrade
from tests.integration.test_migrations import scratch_pg

__all__ = ["scratch_pg"]

NOW = datetime.now(UTC)


def _insert(url: str) -> None:
    engine = create_engine(url)
    rows = [
        ("long.delivered", NOW - timedelta(days=30), NOW - timedelta(days=30)),
        ("old.undelivered", NOW - timedelta(days=3), None),
        ("recent.undelivered", NOW - timedelta(hours=2), None),
    ]
    with engine.begin() as conn:
        for kind, created, delivered in rows:
            params = {"kind": kind, "created": created, "delivered": delivered}
            if engine.dialect.name == "sqlite":  # naive UTC text, as billing.db stores it
                params = {
                    k: v.replace(tzinfo=None).isoformat(" ") if isinstance(v, datetime) else v
                    for k, v in params.items()
                }
            conn.execute(
                text(
                    "INSERT INTO events (kind, payload, created_at, delivered_at, "
                    "delivery_attempts) VALUES (:kind, '{}', :created, :delivered, 0)"
                ),
                params,
            )
    engine.dispose()


def _statuses(url: str) -> dict[str, tuple[str, str | None]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT kind, delivery_status, last_error FROM events")).all()
    engine.dispose()
    return {kind: (status, error) for kind, status, error in rows}


def _check(url: str) -> None:
    upgrade(url, "0004")
    _insert(url)
    upgrade(url)
    statuses = _statuses(url)
    assert statuses["long.delivered"] == ("delivered", None)
    assert statuses["recent.undelivered"] == ("pending", None)
    status, why = statuses["old.undelivered"]
    assert status == "skipped" and "more than a day before" in (why or "")
    downgrade(url, "0004")
    engine = create_engine(url)
    columns = {c["name"] for c in inspect(engine).get_columns("events")}
    engine.dispose()
    assert "delivery_status" not in columns and "delivered_at" in columns
    upgrade(url)


def test_existing_events_are_not_mass_sent_on_postgresql(scratch_pg: str) -> None:
    """Upgrading keeps delivered events delivered, skips (with the reason) those older than a
    day, which nobody wants emailed now, and leaves the recent ones to be sent; it downgrades
    cleanly with data in the table."""
    _check(scratch_pg)


def test_existing_events_are_not_mass_sent_on_sqlite(tmp_path: Path) -> None:
    """The same on the embedded default."""
    _check(f"sqlite:///{tmp_path / 'e.sqlite3'}")


def test_the_status_constraint_accepts_the_four_statuses_only(tmp_path: Path) -> None:
    """A status the deliverer does not know cannot be written, whatever the code does."""
    url = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    upgrade(url)
    engine = create_engine(url)
    insert = text(
        "INSERT INTO events (kind, payload, created_at, delivery_attempts, delivery_status) "
        "VALUES ('k', '{}', '2026-01-01 00:00:00', 0, :status)"
    )
    with engine.begin() as conn:
        for status in ("pending", "delivered", "skipped", "failed"):
            conn.execute(insert, {"status": status})
    with pytest.raises(Exception, match="CHECK"), engine.begin() as conn:
        conn.execute(insert, {"status": "lost"})
    engine.dispose()
