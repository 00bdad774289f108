"""The Alembic migrations and the models describe the same schema, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from billing.migrate import downgrade, upgrade
from billing.models import Base
from tests.integration.conftest import PG_URL, _admin_engine


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = list(compare_metadata(context, Base.metadata))
    engine.dispose()
    return diff


@pytest.fixture()
def scratch_pg() -> object:
    admin = _admin_engine()
    name = f"billing_mig_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _check_round_trip(url: str) -> None:
    upgrade(url)
    assert _diff(url) == [], "models and migrations disagree"
    downgrade(url, "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade(url)  # and up again from empty
    assert _diff(url) == []


def test_migrations_match_models_on_postgresql(scratch_pg: str) -> None:
    """Upgrade from empty, compare with the models, downgrade cleanly, upgrade again."""
    _check_round_trip(scratch_pg)


def test_migrations_match_models_on_sqlite(tmp_path: Path) -> None:
    """The embedded default gets the same schema from the same migrations."""
    _check_round_trip(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_iqd_amounts_move_to_three_decimals(scratch_pg: str) -> None:
    """No amount changes value in an upgrade: 12 dinars stored with 0 decimals (12) are 12000
    thousandths after it, not 0.012 IQD; other currencies are left alone."""
    upgrade(scratch_pg, "0002")
    engine = create_engine(scratch_pg)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO dunning_policies (code, retry_after_days, final_action) "
                "VALUES ('std', '[1]', 'cancel')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO plans (id, code, name, currency, interval, interval_count, "
                "trial_days, dunning_code, created_at, updated_at) VALUES "
                "(1, 'p', 'P', 'IQD', 'month', 1, 0, 'std', now(), now()), "
                "(2, 'q', 'Q', 'QAR', 'month', 1, 0, 'std', now(), now())"
            )
        )
        conn.execute(
            text(
                "INSERT INTO plan_prices (plan_id, amount_minor, currency, effective_from) "
                "VALUES (1, 12, 'IQD', now()), (2, 5000, 'QAR', now())"
            )
        )
    upgrade(scratch_pg)
    with engine.connect() as conn:
        amounts = dict(conn.execute(text("SELECT currency, amount_minor FROM plan_prices")).all())
    engine.dispose()
    assert amounts == {"IQD": 12000, "QAR": 5000}
