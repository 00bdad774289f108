"""The database schema: ``billing db ...``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from billing.cli.base import db_app, fail, say


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="The revision to go to.")] = "head",
) -> None:
    """Create or upgrade the schema (Alembic)."""
    from billing.migrate import database_at, upgrade

    upgrade(revision=revision)
    say(f"database at {', '.join(database_at()) or 'base'}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[
        str, typer.Argument(help="The revision to go back to; base drops every table.")
    ],
    yes: Annotated[
        bool, typer.Option("--yes", help="Do not ask: the tables and columns go, with their data.")
    ] = False,
) -> None:
    """Downgrade the schema to REVISION: what later revisions added is dropped, with its data
    (`base` drops every table). Asks first, unless --yes."""
    from billing.migrate import check_revision, database_at, downgrade

    check_revision(revision)
    what = "every table" if revision == "base" else f"what came after revision {revision}"
    if not yes:
        if not sys.stdin.isatty():
            raise fail(f"downgrading drops {what}, with its data: add --yes to confirm")
        typer.confirm(f"Drop {what}, with its data? This cannot be undone", abort=True)
    downgrade(revision=revision)
    say(f"database at {', '.join(database_at()) or 'base'}")
