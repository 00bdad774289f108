"""Customers and their cards: ``billing customers ...`` and ``billing cards ...``."""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime
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
    issued_at: Annotated[
        datetime | None,
        typer.Option("--issued-at", parser=parse_instant, metavar="TIME", help="ISO 8601."),
    ] = None,
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
            issued_at=issued_at,
        )
        record = serialize.card(card)
    emit(record, as_json, str(record["id"]))


@customers_app.command("show")
def customers_show(
    external_id: Annotated[str, typer.Argument(help="The customer's external id.")],
    as_json: JsonOpt = False,
) -> None:
    """A customer with their cards, subscriptions and the invoices still to be paid."""
    from billing.models import CardToken, Invoice, Subscription
    from billing.services.customers import customer_by_external_id

    with unit_of_work() as (session, _now):
        who = customer_by_external_id(session, external_id)
        cards = session.execute(
            select(CardToken).where(CardToken.customer_id == who.id).order_by(CardToken.id)
        ).scalars()
        subs = list(
            session.execute(
                select(Subscription)
                .where(Subscription.customer_id == who.id)
                .order_by(Subscription.id)
            ).scalars()
        )
        owed = session.execute(
            select(Invoice)
            .where(
                Invoice.subscription_id.in_([s.id for s in subs]),
                Invoice.status.in_(["open", "uncollectible"]),
            )
            .order_by(Invoice.id)
        ).scalars()
        record = {
            **serialize.customer(who),
            "cards": [serialize.card(c) for c in cards],
            "subscriptions": [serialize.subscription(session, s) for s in subs],
            "unpaid_invoices": [serialize.invoice(i) for i in owed],
        }
    if as_json:
        emit(record, True, "")
        return
    lines = [
        f"customer {record['id']} ({who.external_id}): {who.name} "
        f"<{who.email}>, {who.language}, {who.timezone}" + (", push on" if record["push"] else ""),
    ]
    for c in record["cards"]:
        reason = f" ({c['status_reason']})" if c["status_reason"] else ""
        lines.append(f"  card {c['id']}: {c['status']}{reason}, expires {c['expires_at']}")
    for sub in record["subscriptions"]:
        lines.append(
            f"  subscription {sub['id']}: {sub['plan']} {sub['status']}, "
            f"card {sub['card_id'] or 'none'}, next billing {sub['next_billing_at'] or 'none'}"
        )
    for inv in record["unpaid_invoices"]:
        lines.append(f"  invoice {inv['id']}: {inv['amount']} {inv['currency']} {inv['status']}")
    emit(record, False, "\n".join(lines))


@customers_app.command("update")
def customers_update(
    external_id: Annotated[str, typer.Argument(help="The customer's external id.")],
    name: Annotated[str | None, typer.Option("--name")] = None,
    email: Annotated[str | None, typer.Option("--email")] = None,
    phone: Annotated[str | None, typer.Option("--phone", help='"" clears it.')] = None,
    language: Annotated[str | None, typer.Option("--language", help="en or ar.")] = None,
    timezone: Annotated[str | None, typer.Option("--timezone")] = None,
    fcm_token_env: Annotated[
        str | None,
        typer.Option(
            "--fcm-token-env",
            metavar="NAME",
            help="Set the device token for push messages from the environment variable NAME "
            "(an empty value clears it).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a customer's contact details; messages not yet sent use the new ones."""
    from billing.services.customers import customer_by_external_id, update_customer

    fcm_token = None
    if fcm_token_env is not None:
        if not _ENV_NAME.fullmatch(fcm_token_env):
            raise fail("--fcm-token-env takes the name of an environment variable")
        fcm_token = os.environ.get(fcm_token_env, "")
    with unit_of_work() as (session, _now):
        who = customer_by_external_id(session, external_id)
        changed = update_customer(
            session,
            who,
            name=name,
            email=email,
            phone=phone,
            language=language,
            timezone=timezone,
            fcm_token=fcm_token,
        )
        record = {**serialize.customer(who), "changed": changed}
    emit(record, as_json, f"changed: {', '.join(changed)}" if changed else "no change")


@cards_app.command("list")
def cards_list(
    customer: Annotated[
        str | None, typer.Option("--customer", help="Only this customer's (external id).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stored cards: id, status and dates (never the token)."""
    from billing.services.cards import list_cards
    from billing.services.customers import customer_by_external_id

    with unit_of_work() as (session, _now):
        owner = customer_by_external_id(session, customer) if customer is not None else None
        rows = [serialize.card(c) for c in list_cards(session, owner)]
    if as_json:
        emit(rows, True, "")
    else:
        table(rows, ["id", "customer_id", "status", "status_reason", "issued_at", "expires_at"])


@cards_app.command("set-default")
def cards_set_default(
    card_id: Annotated[int, typer.Argument(help="The card to charge from now on.")],
    subscription: Annotated[
        int | None,
        typer.Option("--subscription", help="Only this subscription (default: all of theirs)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Charge the customer's subscriptions with this card from now on."""
    from billing.services.cards import set_default

    with unit_of_work() as (session, now):
        switched = set_default(session, card_id, now, subscription_id=subscription)
    listed = ", ".join(str(i) for i in switched)
    emit(
        {"card_id": card_id, "subscriptions": switched},
        as_json,
        f"subscription(s) {listed} now charged with card {card_id}"
        if switched
        else f"card {card_id} was already the card of every subscription concerned",
    )


@cards_app.command("remove")
def cards_remove(
    card_id: Annotated[int, typer.Argument(help="The card to remove.")],
    local_only: Annotated[
        bool,
        typer.Option(
            "--local-only",
            help="For a token that cannot be decrypted: remove it here without asking Fatora "
            "to deactivate it.",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Deactivate a card at Fatora and stop charging it; its subscriptions move to the
    customer's newest other live card, or ask for a new one at their next charge."""
    from billing.runtime import get_runtime
    from billing.services.cards import remove_card
    from billing.services.errors import BillingError

    if not yes:
        if not sys.stdin.isatty():
            raise fail(f"removing card {card_id} cannot be undone: add --yes to confirm")
        typer.confirm(f"Deactivate card {card_id} at Fatora? This cannot be undone", abort=True)
    try:
        removal = remove_card(get_runtime(), card_id, local_only=local_only)
    except BillingError as exc:
        raise fail(str(exc)) from None
    moved = ", ".join(
        f"subscription {sub} -> {f'card {card}' if card else 'no card (asks for one)'}"
        for sub, card in removal.moved.items()
    )
    where = "at Fatora and here" if removal.at_gateway else "here only (Fatora was not asked)"
    emit(
        {"card_id": card_id, "at_gateway": removal.at_gateway, "moved": removal.moved},
        as_json,
        f"card {card_id} deactivated {where}" + (f"; {moved}" if moved else ""),
    )
