"""The ``billing`` command line (Typer + Rich).

Every read command has ``--json``; a command that creates something prints its id (the whole
record with ``--json``). Errors are one clear line on standard error and a non-zero exit.

The commands live in one module per group; importing them registers them on ``app``.
"""

from __future__ import annotations

from billing.cli import operations, people, plans, schema, subscriptions
from billing.cli.base import app

__all__ = ["app", "main", "operations", "people", "plans", "schema", "subscriptions"]


def main() -> None:
    app()
