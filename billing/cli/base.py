"""Shared pieces of the command line: the command groups, output helpers and the error fence."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from billing.clock import TestClockRefused
from billing.crypto import TokenKeyMissing, TokenUnreadable
from billing.lifecycle import IllegalTransition
from billing.services.errors import BillingError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Recurring billing through the Fatora gateway. Every read command has --json; errors are "
    "one line on standard error.",
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(no_args_is_help=True, help="The database schema.")
plans_app = typer.Typer(no_args_is_help=True, help="Subscription plans from a TOML file.")
customers_app = typer.Typer(no_args_is_help=True, help="Customers.")
cards_app = typer.Typer(no_args_is_help=True, help="Stored card tokens (encrypted at rest).")
subs_app = typer.Typer(no_args_is_help=True, help="Subscriptions.")
invoices_app = typer.Typer(no_args_is_help=True, help="Invoices.")
clock_app = typer.Typer(no_args_is_help=True, help="The test clock (BILLING_MODE=test only).")
keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys for card tokens.")
collection_app = typer.Typer(no_args_is_help=True, help="Pause or resume all collection.")
quarantine_app = typer.Typer(
    no_args_is_help=True,
    help="Subscriptions and invoices set aside because processing them raised.",
)
events_app = typer.Typer(
    no_args_is_help=True,
    help="The outbox: events and their delivery by email and merchant webhook.",
)
for sub_app, name in (
    (db_app, "db"),
    (plans_app, "plans"),
    (customers_app, "customers"),
    (cards_app, "cards"),
    (subs_app, "subscriptions"),
    (invoices_app, "invoices"),
    (clock_app, "clock"),
    (keys_app, "keys"),
    (collection_app, "collection"),
    (quarantine_app, "quarantine"),
    (events_app, "events"),
):
    app.add_typer(sub_app, name=name)

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
T = TypeVar("T")

# Errors a user can cause: reported as one line, never a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    BillingError,
    IllegalTransition,
    TestClockRefused,
    TokenKeyMissing,
    TokenUnreadable,
    ValueError,
)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def unit_of_work() -> Iterator[tuple[Session, datetime]]:
    """A committed transaction and the clock's now; user errors become one line."""
    from billing.runtime import get_runtime

    try:
        rt = get_runtime()
        with rt.sessions() as session, session.begin():
            yield session, rt.clock.now()
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        if isinstance(exc, OperationalError | ProgrammingError):
            raise fail(
                f"database error ({type(exc.orig).__name__}): is the schema up to date? "
                "Run `billing db upgrade`."
            ) from None
        raise


def emit(record: dict[str, Any] | list[dict[str, Any]], as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    else:
        out.print(text, highlight=False, soft_wrap=True)


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if row.get(c) is None else str(row.get(c)) for c in columns])
    out.print(t)
