"""The ``billing`` command line (Typer + Rich).

Every read command has ``--json``; a command that creates something prints its id (the whole
record with ``--json``). Errors are one clear line on standard error and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import serialize
from billing.clock import DatabaseClock, TestClockRefused, parse_duration, parse_instant
from billing.config import get_settings
from billing.crypto import TokenKeyMissing, TokenUnreadable, new_key
from billing.lifecycle import IllegalTransition, InvoiceStatus, SubscriptionStatus
from billing.models import ChargeAttempt, Invoice, Subscription
from billing.plans import PlansFileError, load_plans
from billing.services.errors import BillingError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
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


# -- plans -------------------------------------------------------------------------------------


def _load(file: Path) -> Any:
    try:
        return load_plans(file)
    except PlansFileError as exc:
        for issue in exc.errors:
            err.print(str(issue), highlight=False, soft_wrap=True)
        raise fail(f"{file}: {len(exc.errors)} error(s); nothing was written") from None


@plans_app.command("check")
def plans_check(file: Path, as_json: JsonOpt = False) -> None:
    """Validate a plans file; every mistake is named with its file, entry and field."""
    config = _load(file)
    rows = [serialize.plan_spec(p) for p in config.plans.values()]
    if as_json:
        emit(rows, True, "")
        return
    out.print(f"{file}: {len(rows)} plan(s), {len(config.dunning)} dunning policy(ies): valid")


@plans_app.command("sync")
def plans_sync(file: Path, as_json: JsonOpt = False) -> None:
    """Apply a plans file to the database: idempotent; nothing is written if it is invalid."""
    from billing.services.plans_sync import sync_plans

    config = _load(file)
    with unit_of_work() as (session, now):
        changes = sync_plans(session, config, now)
    if as_json:
        emit({"changes": changes}, True, "")
        return
    if not changes:
        out.print("no change")
    for line in changes:
        out.print(line, highlight=False)


@plans_app.command("list")
def plans_list(as_json: JsonOpt = False) -> None:
    """The plans in the database."""
    from billing.models import Plan

    with unit_of_work() as (session, now):
        rows = [serialize.plan(session, p, now) for p in session.execute(select(Plan)).scalars()]
    if as_json:
        emit(rows, True, "")
    else:
        table(rows, ["code", "name", "amount", "currency", "schedule", "retired_at"])


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


# -- subscriptions ---------------------------------------------------------------------------


@subs_app.command("create")
def subs_create(
    customer: Annotated[str, typer.Option("--customer", help="The customer's external id.")],
    plan: Annotated[str, typer.Option("--plan")],
    card: Annotated[int | None, typer.Option("--card")] = None,
    start: Annotated[str | None, typer.Option("--start")] = None,
    trial_days: Annotated[int | None, typer.Option("--trial-days")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Subscribe a customer to a plan; prints the subscription id."""
    from billing.services import subscriptions as subs
    from billing.services.customers import card_of, customer_by_external_id

    with unit_of_work() as (session, now):
        sub = subs.create_subscription(
            session,
            customer=customer_by_external_id(session, customer),
            plan=subs.plan_by_code(session, plan),
            card=card_of(session, card) if card is not None else None,
            start=parse_instant(start) if start else None,
            trial_days=trial_days,
            now=now,
        )
        record = serialize.subscription(session, sub)
    emit(record, as_json, str(record["id"]))


def _change(
    sub_id: int, action: Callable[[Session, Subscription, datetime], None], as_json: bool
) -> None:
    from billing.services.subscriptions import get_subscription

    with unit_of_work() as (session, now):
        sub = get_subscription(session, sub_id)
        action(session, sub, now)
        record = serialize.subscription(session, sub)
    emit(
        record,
        as_json,
        f"subscription {sub_id}: {record['status']}"
        + (" (cancels at period end)" if record["cancel_at_period_end"] else ""),
    )


@subs_app.command("cancel")
def subs_cancel(
    sub_id: int,
    at_period_end: Annotated[bool, typer.Option("--at-period-end")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Cancel now, or at the end of the current period."""
    from billing.services.subscriptions import cancel

    _change(sub_id, lambda s, sub, now: cancel(s, sub, now, at_period_end=at_period_end), as_json)


@subs_app.command("pause")
def subs_pause(sub_id: int, as_json: JsonOpt = False) -> None:
    """Stop billing until resumed."""
    from billing.services.subscriptions import pause

    _change(sub_id, pause, as_json)


@subs_app.command("resume")
def subs_resume(sub_id: int, as_json: JsonOpt = False) -> None:
    """Resume billing: within a paid period the next charge stays at its end; later, a new
    period starts now."""
    from billing.services.subscriptions import resume

    _change(sub_id, resume, as_json)


@subs_app.command("show")
def subs_show(sub_id: int, as_json: JsonOpt = False) -> None:
    """A subscription with its invoices and their charge attempts."""
    from billing.services.subscriptions import get_subscription

    with unit_of_work() as (session, _now):
        sub = get_subscription(session, sub_id)
        record = serialize.subscription(session, sub)
        invoices = session.execute(
            select(Invoice).where(Invoice.subscription_id == sub.id).order_by(Invoice.period_start)
        ).scalars()
        record["invoices"] = []
        for invoice in invoices:
            item = serialize.invoice(invoice)
            attempts = session.execute(
                select(ChargeAttempt)
                .where(ChargeAttempt.invoice_id == invoice.id)
                .order_by(ChargeAttempt.id)
            ).scalars()
            item["attempts"] = [serialize.attempt(a) for a in attempts]
            record["invoices"].append(item)
    if as_json:
        emit(record, True, "")
        return
    out.print(
        f"subscription {record['id']}  {record['status']}  plan {record['plan']}  "
        f"customer {record['customer']}  next billing {record['next_billing_at']}",
        highlight=False,
    )
    for item in record["invoices"]:
        out.print(
            f"  invoice {item['id']}  {item['period_start']} .. {item['period_end']}  "
            f"{item['amount']} {item['currency']}  {item['status']}",
            highlight=False,
        )
        for a in item["attempts"]:
            out.print(
                f"    attempt {a['id']}  order {a['order_id']}  {a['status']}  "
                f"{a['classification'] or ''} {a['description'] or ''}",
                highlight=False,
            )


@subs_app.command("list")
def subs_list(
    status: Annotated[str | None, typer.Option("--status")] = None, as_json: JsonOpt = False
) -> None:
    """Subscriptions, optionally of one status."""
    query = select(Subscription).order_by(Subscription.id)
    if status is not None:
        try:
            query = query.where(Subscription.status == SubscriptionStatus(status).value)
        except ValueError:
            words = ", ".join(s.value for s in SubscriptionStatus)
            raise fail(f"--status must be one of {words}") from None
    with unit_of_work() as (session, _now):
        rows = [serialize.subscription(session, s) for s in session.execute(query).scalars()]
    if as_json:
        emit(rows, True, "")
    else:
        table(rows, ["id", "customer", "plan", "status", "current_period_end", "next_billing_at"])


@invoices_app.command("retry")
def invoices_retry(invoice_id: int, as_json: JsonOpt = False) -> None:
    """Charge an open invoice at the next pass (refused while a charge's outcome is unknown)."""
    from billing.services.invoices import retry_now

    with unit_of_work() as (session, now):
        record = serialize.invoice(retry_now(session, invoice_id, now))
    emit(record, as_json, f"invoice {invoice_id}: charged at the next pass")


@invoices_app.command("void")
def invoices_void(invoice_id: int, as_json: JsonOpt = False) -> None:
    """Write an invoice off: it is never charged again (refused while a charge is unknown)."""
    from billing.services.invoices import void

    with unit_of_work() as (session, now):
        record = serialize.invoice(void(session, invoice_id, now))
    emit(record, as_json, f"invoice {invoice_id}: void")


@invoices_app.command("link")
def invoices_link(invoice_id: int, as_json: JsonOpt = False) -> None:
    """The customer's pay-and-update link for an open invoice (served by `billing web`)."""
    from billing.crypto import vault_from_settings
    from billing.services.paylink import PAYABLE, link_for

    with unit_of_work() as (session, _now):
        invoice = session.get(Invoice, invoice_id)
        if invoice is None:
            raise fail(f"no invoice {invoice_id}")
        if invoice.status not in PAYABLE:
            raise fail(f"invoice {invoice_id} is {invoice.status}: there is nothing to pay")
    link = link_for(vault_from_settings(), invoice_id)
    emit({"invoice_id": invoice_id, "link": link}, as_json, link)


@invoices_app.command("list")
def invoices_list(
    subscription: Annotated[int | None, typer.Option("--subscription")] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Invoices, optionally of one subscription or status."""
    query = select(Invoice).order_by(Invoice.id)
    if subscription is not None:
        query = query.where(Invoice.subscription_id == subscription)
    if status is not None:
        try:
            query = query.where(Invoice.status == InvoiceStatus(status).value)
        except ValueError:
            words = ", ".join(s.value for s in InvoiceStatus)
            raise fail(f"--status must be one of {words}") from None
    with unit_of_work() as (session, _now):
        rows = [serialize.invoice(i) for i in session.execute(query).scalars()]
    if as_json:
        emit(rows, True, "")
    else:
        table(
            rows,
            [
                "id",
                "subscription_id",
                "period_start",
                "amount",
                "currency",
                "status",
                "next_attempt_at",
            ],
        )


# -- clock, keys, collection --------------------------------------------------------------------


def _db_clock() -> DatabaseClock:
    from billing.runtime import get_runtime

    return DatabaseClock(get_runtime().engine)


@clock_app.command("show")
def clock_show(as_json: JsonOpt = False) -> None:
    """What time the system believes it is."""
    clock = _db_clock()
    test = get_settings().mode.value == "test"
    now = clock.now() if test else datetime.now().astimezone()
    record = {"now": serialize.iso(now), "test_clock": test and clock.is_frozen()}
    emit(record, as_json, f"{record['now']}" + ("  (test clock)" if record["test_clock"] else ""))


@clock_app.command("set")
def clock_set(at: str) -> None:
    """Freeze the test clock at an ISO 8601 time."""
    try:
        now = _db_clock().set(parse_instant(at))
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    out.print(serialize.iso(now))


@clock_app.command("advance")
def clock_advance(by: str) -> None:
    """Move the test clock forward by a duration such as 1d, 12h, 30m."""
    try:
        now = _db_clock().advance(parse_duration(by))
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    out.print(serialize.iso(now))


@keys_app.command("new")
def keys_new() -> None:
    """Print a new Fernet key for BILLING_TOKEN_KEY."""
    out.print(new_key())


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored token with the first key of BILLING_TOKEN_KEY."""
    from billing.models import CardToken
    from billing.runtime import get_runtime

    vault = get_runtime().vault
    count = 0
    with unit_of_work() as (session, _now):
        for card in session.execute(select(CardToken)).scalars():
            card.ciphertext = vault.rotate(card.ciphertext)
            card.fingerprint = vault.fingerprint(vault.decrypt(card.ciphertext))
            count += 1
    out.print(f"{count} token(s) re-encrypted with the primary key")


@collection_app.command("resume")
def collection_resume() -> None:
    """Resume collection after it paused on an authentication error from Fatora."""
    from billing.services.control import resume_collection

    with unit_of_work() as (session, now):
        resumed = resume_collection(session, now)
    out.print("collection resumed" if resumed else "collection was not paused")


@collection_app.command("status")
def collection_status(as_json: JsonOpt = False) -> None:
    from billing.services.control import collection_paused

    with unit_of_work() as (session, _now):
        reason = collection_paused(session)
    emit(
        {"paused": reason is not None, "reason": reason},
        as_json,
        f"paused: {reason}" if reason else "running",
    )


# -- quarantine ------------------------------------------------------------------------------


@quarantine_app.command("list")
def quarantine_list(as_json: JsonOpt = False) -> None:
    """Quarantined rows: table, id, since when, why, and when they are tried again."""
    from billing.services.quarantine import quarantined

    with unit_of_work() as (session, _now):
        rows = [serialize.quarantined(row) for row in quarantined(session)]
    if as_json:
        emit(rows, True, "")
    elif not rows:
        out.print("nothing is quarantined")
    else:
        table(rows, ["table", "id", "since", "reason", "next_retry"])


@quarantine_app.command("release")
def quarantine_release(
    subscription: Annotated[
        list[int] | None, typer.Option("--subscription", help="A subscription id (repeatable).")
    ] = None,
    invoice: Annotated[
        list[int] | None, typer.Option("--invoice", help="An invoice id (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Release rows at once: they are tried by the next pass (renewal, or due retries)."""
    from billing.services.quarantine import locked, release_now

    wanted = [("subscriptions", i) for i in subscription or []]
    wanted += [("invoices", i) for i in invoice or []]
    if not wanted:
        raise fail("name at least one row: --subscription ID or --invoice ID")
    results: list[dict[str, Any]] = []
    with unit_of_work() as (session, now):
        for table_name, row_id in wanted:
            row = locked(session, table_name, row_id)
            released = release_now(session, row, now)
            results.append({"table": table_name, "id": row_id, "released": released})
    lines = [
        f"{r['table'][:-1]} {r['id']}: " + ("released" if r["released"] else "was not quarantined")
        for r in results
    ]
    emit(results, as_json, "\n".join(lines))


# -- events (the outbox and its delivery) ------------------------------------------------------


@events_app.command("list")
def events_list(
    failed: Annotated[
        bool, typer.Option("--failed", help="Only events whose delivery was given up.")
    ] = False,
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only events of this delivery status."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """The latest events, newest first, with how their delivery went."""
    from billing.notify import DeliveryStatus
    from billing.services.notifications import describe_event, list_events

    wanted: DeliveryStatus | None = DeliveryStatus.FAILED if failed else None
    if status is not None:
        try:
            chosen = DeliveryStatus(status)
        except ValueError:
            words = ", ".join(s.value for s in DeliveryStatus)
            raise fail(f"--status must be one of {words}") from None
        if wanted is not None and chosen is not wanted:
            raise fail("--failed and --status disagree: give one of them")
        wanted = chosen
    with unit_of_work() as (session, _now):
        rows = [describe_event(e) for e in list_events(session, status=wanted, limit=limit)]
    if as_json:
        emit(rows, True, "")
    elif not rows:
        out.print("no failed event" if wanted is DeliveryStatus.FAILED else "no event")
    else:  # one line per event (grep-friendly, never folded by the terminal's width)
        for row in rows:
            when = {
                "pending": f"next {row['next_delivery_at'] or 'now'}",
                "delivered": f"at {row['delivered_at']}",
                "failed": f"at {row['failed_at']}",
            }.get(row["status"], "")
            error = f"  {row['last_error']}" if row["last_error"] else ""
            out.print(
                f"{row['id']}  {row['created_at']}  {row['kind']}  {row['status']} {when}  "
                f"tries {row['attempts']}{error}",
                highlight=False,
                soft_wrap=True,
            )


@events_app.command("deliver")
def events_deliver(as_json: JsonOpt = False) -> None:
    """Deliver every event that is due now (what beat runs every minute)."""
    from billing.runtime import get_runtime
    from billing.services.notifications import channels_from_settings, deliver_due

    try:
        with channels_from_settings() as channels:
            counts = deliver_due(get_runtime(), channels).as_dict()
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    emit(counts, as_json, ", ".join(f"{name} {count}" for name, count in counts.items()))


@events_app.command("retry")
def events_retry(
    event_ids: Annotated[list[int] | None, typer.Argument(help="Failed events to retry.")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed event.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Deliver failed events again, with a fresh retry schedule.

    After fixing the endpoint: the next delivery run (within a minute) tries their failed
    channels again; channels already sent are not sent again.
    """
    from billing.services.notifications import retry_failed

    if bool(event_ids) == all_failed:
        raise fail("name the failed events to retry (IDs), or give --all-failed")
    with unit_of_work() as (session, now):
        retried = retry_failed(session, None if all_failed else list(event_ids or []), now)
        missing = sorted(set(event_ids or []) - set(retried))
        if missing:  # raised inside the transaction: nothing is changed
            listed = ", ".join(str(i) for i in missing)
            raise fail(f"not a failed event: {listed}; nothing was changed")
    emit({"retried": retried}, as_json, f"{len(retried)} event(s) to be delivered again")


# -- the billing run -------------------------------------------------------------------------


@app.command("tick")
def tick(
    now: Annotated[
        str | None,
        typer.Option("--now", help="Test mode: set the test clock to this time, then run."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the charges to settle.")] = False,
    timeout: Annotated[float, typer.Option("--timeout")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """One scheduler pass: renew what is due, queue the charges (and due retries)."""
    from billing import runner

    try:
        result = runner.tick(now=parse_instant(now) if now else None, wait=wait, timeout=timeout)
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    emit(result, as_json, runner.describe_tick(result))


@app.command("reconcile")
def reconcile(
    after_restore: Annotated[
        bool,
        typer.Option(
            "--after-restore",
            help="After restoring a backup, with no worker or beat running: find and record "
            "every payment made after the backup before anything is charged.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify every unresolved charge now, whatever the janitor's schedule says."""
    from billing import runner

    if after_restore:
        restored = runner.reconcile_after_restore()
        emit(restored, as_json, runner.describe_restore(restored))
        return
    result = runner.reconcile()
    emit(result, as_json, runner.describe_reconcile(result))


@app.command("web")
def web(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
) -> None:
    """Serve the pay-and-update links and Fatora's return pages (BILLING_PUBLIC_URL points here)."""
    import uvicorn

    from billing.web import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="warning")


@app.command("sandbox")
def sandbox(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8765,
    latency_ms: Annotated[int, typer.Option("--latency-ms")] = 0,
    api_key: Annotated[str | None, typer.Option("--api-key")] = None,
    decline_style: Annotated[str, typer.Option("--decline-style")] = "http200",
    hang_s: Annotated[float, typer.Option("--hang-s", help="How long a hung call hangs.")] = 120.0,
    land_delay_s: Annotated[
        float,
        typer.Option("--land-delay-s", min=0, help="When a held or 504'd charge lands."),
    ] = 1.0,
    verify_lag_s: Annotated[
        float, typer.Option("--verify-lag-s", min=0, help="How long verify lags a charge.")
    ] = 1.0,
) -> None:
    """Serve the Fatora sandbox under /v1 (FATORA_BASE_URL=http://HOST:PORT/v1)."""
    from billing.fatora.sandbox.server import run_server

    run_server(
        host,
        port,
        api_key=api_key,
        latency_ms=latency_ms,
        decline_style=_decline_style(decline_style),
        hang_s=hang_s,
        land_delay_s=land_delay_s,
        verify_lag_s=verify_lag_s,
    )


def _decline_style(value: str) -> Literal["http200", "http4xx"]:
    if value == "http200":
        return "http200"
    if value == "http4xx":
        return "http4xx"
    raise fail("--decline-style must be http200 or http4xx")


@app.command("demo")
def demo() -> None:
    """A scripted tour on the embedded default: no server needed."""
    from billing.demo import run_demo

    run_demo(out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
