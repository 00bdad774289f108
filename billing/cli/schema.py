"""The database schema: ``billing db ...``."""

from __future__ import annotations

import typer

from billing.cli.base import (
    db_app,
    out,
)

# -- db ----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Create or upgrade the schema (Alembic)."""
    from billing.migrate import upgrade

    upgrade(revision=revision)
    out.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(...)) -> None:
    """Downgrade the schema to REVISION (``base`` drops everything)."""
    from billing.migrate import downgrade

    downgrade(revision=revision)
    out.print(f"database at {revision}")
