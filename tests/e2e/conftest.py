"""The end-to-end suites use the integration suite's PostgreSQL database fixtures."""

from tests.integration.conftest import clean_db, pg_engine, pg_url

__all__ = ["clean_db", "pg_engine", "pg_url"]
