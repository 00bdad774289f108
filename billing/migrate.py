"""Schema migrations (Alembic), callable from the command line and from tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from billing.config import get_settings
from billing.db import normalize_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would read a '%' in a password as a directive.
    cfg.set_main_option(
        "sqlalchemy.url", normalize_url(url or get_settings().database_url).replace("%", "%%")
    )
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_heads(url: str | None = None) -> tuple[str, ...]:
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config(url)).get_heads())
