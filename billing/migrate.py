"""Schema migrations (Alembic), callable from the command line and from tests; and what to tell
an operator when the database cannot be reached or its schema is not the one this code needs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util import CommandError

from billing.config import get_settings
from billing.db import normalize_url

MIGRATIONS = Path(__file__).parent / "migrations"

UPGRADE_HINT = "run `billing db upgrade`"
CONNECT_TIMEOUT_S = 10
CONNECT_HINT = "is the database server running, and is BILLING_DATABASE_URL right?"

# PostgreSQL's codes for a table or a column that does not exist (SQLSTATE class 42).
_MISSING_OBJECT_STATES = frozenset({"42P01", "42703"})
# SQLite says the same in words.
_SQLITE_MISSING = ("no such table", "no such column", "has no column named")
_PLAIN_REVISION = re.compile(r"[A-Za-z0-9_]+")


class UnknownRevision(ValueError):
    """``billing db upgrade|downgrade REVISION`` named a revision that does not exist."""


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would read a '%' in a password as a directive.
    cfg.set_main_option(
        "sqlalchemy.url", normalize_url(url or get_settings().database_url).replace("%", "%%")
    )
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    cfg = alembic_config(url)
    _known(cfg, revision)
    command.upgrade(cfg, revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    cfg = alembic_config(url)
    _known(cfg, revision)
    command.downgrade(cfg, revision)


def current_heads(url: str | None = None) -> tuple[str, ...]:
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config(url)).get_heads())


def check_revision(revision: str, url: str | None = None) -> None:
    """``UnknownRevision`` if ``revision`` is a plain id that names no migration."""
    _known(alembic_config(url), revision)


def _known(cfg: Config, revision: str) -> None:
    """Refuse a plain revision id that names nothing, before any connection is made (relative
    forms such as ``+1`` or ``head-1`` are left to Alembic)."""
    from alembic.script import ScriptDirectory

    if not _PLAIN_REVISION.fullmatch(revision):
        return
    script = ScriptDirectory.from_config(cfg)
    try:
        script.get_revisions(revision)
    except CommandError:
        revisions = [r.revision for r in script.walk_revisions()]
        listed = ", ".join(sorted(revisions))
        raise UnknownRevision(
            f"no schema revision {revision!r}: give one of {listed}, head or base"
        ) from None


def database_at(url: str | None = None) -> tuple[str, ...]:
    """The revisions the database is at (empty if it has no schema yet)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.pool import NullPool

    from billing.db import make_engine

    url = normalize_url(url or get_settings().database_url)
    extra: dict[str, Any] = {}
    if not url.startswith("sqlite"):
        extra["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    engine = make_engine(url, poolclass=NullPool, **extra)
    try:
        with engine.connect() as connection:
            return tuple(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()


def schema_problem(url: str | None = None) -> str | None:
    """Why a daemon cannot work on this database (unreachable, no schema, or a schema older or
    newer than this code), as one line; ``None`` if it is at this code's head."""
    try:
        at = set(database_at(url))
    except Exception as exc:
        described = describe_database_error(exc)
        if described is None:
            raise
        return described
    heads = set(current_heads(url))
    if at == heads:
        return None
    if not at:
        return f"the database has no schema yet: {UPGRADE_HINT}"
    have, need = ", ".join(sorted(at)), ", ".join(sorted(heads))
    if at - heads <= set(_all_revisions(url)):
        return f"the database schema is at revision {have}, this code needs {need}: {UPGRADE_HINT}"
    return (
        f"the database schema is at revision {have}, which this code does not know (it needs "
        f"{need}): is newer code running against it?"
    )


def _all_revisions(url: str | None) -> list[str]:
    from alembic.script import ScriptDirectory

    return [r.revision for r in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()]


def describe_database_error(exc: BaseException) -> str | None:
    """One line for a database error an operator can act on, ``None`` for any other error.

    It tells an unreachable database (refused, unknown host, wrong role or password, no such
    database) from a reachable one whose schema lacks a table or a column. It quotes the
    driver's first line only: never the SQL statement or its parameters.
    """
    from sqlalchemy.exc import DBAPIError

    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    first = (str(orig).strip().splitlines() or [""])[0].strip()
    first = " ".join(first.replace("FATAL:", "").split())
    state = getattr(orig, "sqlstate", None)
    module = type(orig).__module__
    if state in _MISSING_OBJECT_STATES or (
        module == "sqlite3" and any(word in first for word in _SQLITE_MISSING)
    ):
        return f"the database schema is not up to date ({first}): {UPGRADE_HINT}"
    if module.startswith("psycopg") and state is None:
        # libpq's connection failures carry no SQLSTATE: refused, unknown host, no such role,
        # wrong password, no such database, timeout, a connection lost.
        cause = first.removeprefix("connection failed: ")
        return f"cannot reach the database ({cause}): {CONNECT_HINT}"
    if module == "sqlite3" and "unable to open database file" in first:
        return f"cannot open the SQLite database file ({first}): {CONNECT_HINT}"
    kind = type(orig).__name__
    return f"database error ({kind}{f' {state}' if state else ''}: {first})"
