"""Shared pieces of the command line: the command groups, output helpers and the error fence.

Every error a command meets ends as one line on standard error, ``error: <cause and what to
do>``, and a non-zero exit: ``fail`` for the errors a command words itself, ``BillingGroup``
for any exception that escapes a command (and for usage mistakes). ``--debug`` (or
``BILLING_DEBUG=1``) lets an unexpected exception through with its traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup, TyperOption

from billing.clock import TestClockRefused
from billing.config import SettingsError
from billing.crypto import TokenKeyMissing, TokenUnreadable
from billing.lifecycle import IllegalTransition
from billing.services.errors import BillingError

DEBUG_HELP = "Show the traceback of an unexpected error instead of one line (or BILLING_DEBUG=1)."
DEBUG_HINT = "run again with --debug for the traceback"


class BillingGroup(TyperGroup):
    """The top-level command group: whatever escapes a command becomes one line on standard
    error and exit status 1 (``--debug``: the exception and its traceback); a usage mistake
    (unknown option, bad value) becomes one line too, naming the option, and exit status 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Any = None,
        **extra: Any,
    ) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except NoArgsIsHelpError:
            raise
        except ClickException as exc:
            raise _click_failure(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, NoArgsIsHelpError):
            raise
        except ClickException as exc:
            raise _click_failure(exc) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise fail(error_line(exc)) from None


def _click_failure(exc: ClickException) -> typer.Exit:
    ctx = getattr(exc, "ctx", None)
    # Typer checks values with pydantic, whose messages may start with "Value error, ".
    message = exc.format_message().replace("Value error, ", "")
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return fail(message, exc.exit_code)


def _flags_show_no_type(self: TyperOption, ctx: Any) -> str | None:
    """A flag takes no value: its help line shows no ``<bool>`` where a value's type goes."""
    if self.is_flag and self.metavar is None:
        return None
    return _option_type(self, ctx)


_option_type = TyperOption.display_type_rich
setattr(TyperOption, "display_type_rich", _flags_show_no_type)  # noqa: B010

app = typer.Typer(
    cls=BillingGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Recurring billing through the Fatora gateway. Every read command has --json; errors are "
    "one line on standard error (--debug shows the traceback).",
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _group(help_text: str) -> typer.Typer:
    return typer.Typer(no_args_is_help=True, help=help_text, rich_markup_mode="markdown")


db_app = _group("The database schema.")
plans_app = _group("Subscription plans from a TOML file.")
customers_app = _group("Customers.")
cards_app = _group("Stored card tokens (encrypted at rest).")
subs_app = _group("Subscriptions.")
invoices_app = _group("Invoices.")
clock_app = _group("The test clock (BILLING_MODE=test only).")
keys_app = _group("Encryption keys for card tokens.")
collection_app = _group("Pause or resume all collection.")
quarantine_app = _group("Subscriptions and invoices set aside because processing them raised.")
events_app = _group("The outbox: events and their delivery by email and merchant webhook.")
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


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="BILLING_DEBUG", help=DEBUG_HELP)
    ] = False,
) -> None:
    # The options of every command; BillingGroup.invoke reads --debug from its context.
    pass


# Standard output keeps Rich markup for the renderables that use it (the demo's rules); what a
# command prints goes through ``say``, ``emit`` and ``table``, which never read it as markup.
# Standard error never does: an error quotes what it was given, brackets included.
out = Console()
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
T = TypeVar("T")

# Errors a user can cause: their message is the whole story, worded for the user.
USER_ERRORS: tuple[type[Exception], ...] = (
    BillingError,
    IllegalTransition,
    TestClockRefused,
    TokenKeyMissing,
    TokenUnreadable,
    ValueError,
)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: MESSAGE`` as one line on standard error; raise what it returns."""
    err.print(Text.assemble(("error:", "red"), " ", one_line(message)))
    return typer.Exit(code)


def one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(exc: BaseException) -> str:
    """What went wrong, in one line an operator can act on, for any exception."""
    from alembic.util import CommandError

    from billing.migrate import describe_database_error

    described = describe_database_error(exc)
    if described is not None:
        return described
    broker = _broker_problem(exc)
    if broker is not None:
        return broker
    if isinstance(exc, CommandError):  # Alembic: a revision it cannot go to
        return f"cannot migrate: {one_line(str(exc))}"
    if isinstance(exc, (SettingsError, *USER_ERRORS)):
        return one_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    words = one_line(str(exc))
    return f"{type(exc).__name__}{': ' + words if words else ''} ({DEBUG_HINT})"


def _broker_problem(exc: BaseException) -> str | None:
    """The broker or the result backend (Redis) cannot be reached: kombu's error or redis-py's,
    bare or as the cause of Celery's own (its result backend gives up with a RuntimeError)."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, KombuOperationalError | RedisConnectionError):
            return (
                f"cannot reach Redis ({one_line(str(seen)).rstrip('.')}): is it running, and "
                "are BILLING_BROKER_URL and BILLING_RESULT_BACKEND right?"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def say(text: str) -> None:
    """Print a line of output as it is: brackets are never read as markup."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def unit_of_work() -> Iterator[tuple[Session, datetime]]:
    """A committed transaction and the clock's now. Whatever it raises is worded by
    ``BillingGroup`` (``error_line``)."""
    from billing.runtime import get_runtime

    rt = get_runtime()
    with rt.sessions() as session, session.begin():
        yield session, rt.clock.now()


def emit(record: dict[str, Any] | list[dict[str, Any]], as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    else:
        say(text)


def table(rows: list[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """Rows as a table. In a terminal it fits the width, folding long cells; piped or
    redirected, it is as wide as its content: no cell is ever cut."""
    t = Table(title=title)
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*[Text("" if row.get(c) is None else str(row.get(c))) for c in columns])
    if out.is_terminal:
        out.print(t)
        return
    width = Measurement.get(out, out.options.update(width=1_000_000), t).maximum
    Console(file=out.file, width=max(width, 1), color_system=None).print(t)
