"""Customers and their cards: ``billing customers ...`` and ``billing cards ...``."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import select

from billing import serialize
from billing.cli.base import (
    JsonOpt,
    cards_app,
    customers_app,
    emit,
    fail,
    table,
    unit_of_work,
)
from billing.clock import parse_instant

# -- customers and cards ---------------------------------------------------------------------


@customers_app.command("add")
def customers_add(
    external_id: Annotated[str, typer.Option("--external-id")],
    name: Annotated[str, typer.Option("--name")],
    email: Annotated[str, typer.Option("--email")],
    phone: Annotated[str | None, typer.Option("--phone")] = None,
    language: Annotated[str, typer.Option("--language")] = "en",
    timezone: Annotated[str, typer.Option("--timezone")] = "Asia/Qatar",
    as_json: JsonOpt = False,
) -> None:
    """Add a customer; prints its id."""
    from billing.services.customers import add_customer

    with unit_of_work() as (session, now):
        customer = add_customer(
            session,
            external_id=external_id,
            name=name,
            email=email,
            phone=phone,
            language=language,
            timezone=timezone,
            now=now,
        )
        record = serialize.customer(customer)
    emit(record, as_json, str(record["id"]))


@customers_app.command("list")
def customers_list(as_json: JsonOpt = False) -> None:
    from billing.models import Customer

    with unit_of_work() as (session, _now):
        rows = [serialize.customer(c) for c in session.execute(select(Customer)).scalars()]
    if as_json:
        emit(rows, True, "")
    else:
        table(rows, ["id", "external_id", "name", "email", "timezone", "language"])


# A card token is never taken as a command-line value: the process list (ps, /proc) and the shell
# history would show it to anyone on the machine. These are the ways it may come in.
CARD_INPUT_OPTIONS = "--token - (standard input), --token-file PATH or --token-env NAME"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_card_token(token: str | None, token_file: Path | None, token_env: str | None) -> str:
    """The card token from the one source given: standard input, a file or an environment variable.

    A literal ``--token VALUE`` is refused. No message ever repeats what was given (the value, the
    path or the variable name), since a confused user may have put the token itself there.
    """
    sources = {"--token": token, "--token-file": token_file, "--token-env": token_env}
    given = [option for option, value in sources.items() if value is not None]
    if token is not None and token != "-":  # noqa: S105 - "-" means standard input
        raise fail(
            "a card token is not accepted on the command line, where the process list and the "
            f"shell history show it: pass it with {CARD_INPUT_OPTIONS}"
        )
    if len(given) > 1:
        raise fail(f"give the card token one way only: {' or '.join(given)}")
    if not given:
        raise fail(f"the card token is missing: pass it with {CARD_INPUT_OPTIONS}")
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise fail("the file given by --token-file is not UTF-8 text") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise fail(f"cannot read the file given by --token-file: {reason}") from None
    if token_env is not None:
        if not _ENV_NAME.fullmatch(token_env):
            raise fail(
                "--token-env takes the name of an environment variable (letters, digits and _), "
                "not the token itself"
            )
        value = os.environ.get(token_env)
        if not value:
            raise fail("the environment variable named by --token-env is not set or is empty")
        return value
    return sys.stdin.readline().rstrip("\r\n")


@cards_app.command("add")
def cards_add(
    customer: Annotated[str, typer.Option("--customer", help="The customer's external id.")],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="-",
            help="- reads the card token from standard input. A token written here is refused: "
            "the process list and the shell history would show it.",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", metavar="PATH", help="Read the card token from this file."),
    ] = None,
    token_env: Annotated[
        str | None,
        typer.Option(
            "--token-env",
            metavar="NAME",
            help="Read the card token from the environment variable NAME.",
        ),
    ] = None,
    issued_at: Annotated[str | None, typer.Option("--issued-at")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a card token obtained out of band (encrypted); prints the card id.

    The token comes from --token - (stdin), --token-file or --token-env, never the command line.
    """
    from billing.runtime import get_runtime
    from billing.services.customers import add_card, customer_by_external_id

    card_token = read_card_token(token, token_file, token_env)
    with unit_of_work() as (session, now):
        owner = customer_by_external_id(session, customer)
        card = add_card(
            session,
            get_runtime().vault,
            customer=owner,
            token=card_token,
            now=now,
            issued_at=parse_instant(issued_at) if issued_at else None,
        )
        record = serialize.card(card)
    emit(record, as_json, str(record["id"]))
