"""Subscriptions and invoices: ``billing subscriptions ...`` and ``billing invoices ...``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import serialize
from billing.cli.base import (
    USER_ERRORS,
    JsonOpt,
    app,
    emit,
    fail,
    invoices_app,
    say,
    subs_app,
    table,
    unit_of_work,
)
from billing.clock import parse_instant
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import ChargeAttempt, Invoice, Subscription

# -- subscriptions ---------------------------------------------------------------------------


@subs_app.command("create")
def subs_create(
    customer: Annotated[str, typer.Option("--customer", help="The customer's external id.")],
    plan: Annotated[str, typer.Option("--plan")],
    card: Annotated[int | None, typer.Option("--card")] = None,
    start: Annotated[
        datetime | None,
        typer.Option("--start", parser=parse_instant, metavar="TIME", help="ISO 8601."),
    ] = None,
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
            start=start,
            trial_days=trial_days,
            now=now,
        )
        record = serialize.subscription(session, sub)
    emit(record, as_json, str(record["id"]))


@subs_app.command("checkout-link")
def subs_checkout_link(
    customer: Annotated[str, typer.Option("--customer", help="The customer's external id.")],
    plan: Annotated[str, typer.Option("--plan")],
    as_json: JsonOpt = False,
) -> None:
    """Start a subscription whose first period the customer pays on Fatora's hosted page, which
    also saves their card; prints the link to send them (served by `billing web`)."""
    from billing.crypto import vault_from_settings
    from billing.services import subscriptions as subs
    from billing.services.customers import customer_by_external_id
    from billing.services.paylink import link_for

    with unit_of_work() as (session, now):
        vault = vault_from_settings()  # before anything is written: the link needs the key
        sub, invoice_id = subs.start_with_checkout(
            session,
            customer=customer_by_external_id(session, customer),
            plan=subs.plan_by_code(session, plan),
            now=now,
        )
        record = {**serialize.subscription(session, sub), "invoice_id": invoice_id}
    record["link"] = link_for(vault, invoice_id)
    emit(record, as_json, f"subscription {record['id']}: {record['link']}")


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
    say(
        f"subscription {record['id']}  {record['status']}  plan {record['plan']}  "
        f"customer {record['customer']}  next billing {record['next_billing_at'] or 'none'}"
    )
    for item in record["invoices"]:
        say(
            f"  invoice {item['id']}  {item['period_start']} .. {item['period_end']}  "
            f"{item['amount']} {item['currency']}  {item['status']}"
        )
        for a in item["attempts"]:
            say(
                f"    attempt {a['id']}  order {a['order_id']}  {a['status']}  "
                f"{a['classification'] or ''} {a['description'] or ''}"
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


@invoices_app.command("show")
def invoices_show(invoice_id: int, as_json: JsonOpt = False) -> None:
    """The whole story of an invoice: its attempts and Fatora's answers, and the messages sent."""
    from billing.services.invoices import story

    with unit_of_work() as (session, _now):
        record = story(session, invoice_id)
    if as_json:
        emit(record, True, "")
        return
    sub = record["subscription"]
    lines = [
        f"invoice {record['id']}: {record['amount']} {record['currency']} {record['status']}, "
        f"period {record['period_start']} to {record['period_end']}",
        f"  subscription {sub['id']} ({sub['plan']}, {sub['status']}), customer "
        f"{sub['customer']!s}",
        f"  attempts {record['attempt_count']}, declines {record['failure_count']}, "
        f"next attempt {record['next_attempt_at'] or 'none'}, paid {record['paid_at'] or 'no'}",
    ]
    if record["quarantined_at"]:
        lines.append(
            f"  set aside since {record['quarantined_at']}: {record['quarantine_reason']!s}"
        )
    for a in record["attempts"]:
        answer = f": {a['description']}" if a["description"] else ""
        card = f" card {a['card_id']}" if a["card_id"] else ""
        lines.append(
            f"  {a['created_at']}  {a['kind']} {a['order_id']}{card}  {a['status']}"
            f" ({a['classification'] or a['call_ending'] or '-'}){answer}"
        )
    for e in record["events"]:
        lines.append(
            f"  {e['created_at']}  {e['kind']}  {e['status']}"
            + (f"  {e['last_error']}" if e["last_error"] else "")
        )
    emit(record, False, "\n".join(lines))


@app.command("refund")
def refund(
    invoice_id: Annotated[int, typer.Argument(help="The paid invoice to refund in full.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Refund a paid invoice in full through Fatora. Safe to run again: a refund done is not
    asked twice, and one whose answer was lost is looked up through verify first."""
    from billing.money import format_money, from_minor
    from billing.runtime import get_runtime
    from billing.services.refunds import refund_invoice

    if not yes:
        if not sys.stdin.isatty():
            raise fail(f"a refund sends money back: add --yes to refund invoice {invoice_id}")
        typer.confirm(f"Refund invoice {invoice_id} in full through Fatora?", abort=True)
    try:
        report = refund_invoice(get_runtime(), invoice_id)
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    money = format_money(from_minor(report.amount_minor, report.currency), report.currency)
    record = {
        "invoice_id": invoice_id,
        "status": report.status.value,
        "asked": report.asked,
        "already": report.already,
        "amount": str(from_minor(report.amount_minor, report.currency)),
        "currency": report.currency,
        "description": report.description,
    }
    text = {
        "completed": f"invoice {invoice_id}: {money} refunded"
        + (" (already, nothing asked again)" if report.already else ""),
        "pending": f"invoice {invoice_id}: refund of {money} accepted by Fatora, not complete "
        "yet; run the command again later to follow it",
        "rejected": f"invoice {invoice_id}: Fatora refused the refund "
        f"({report.description or 'no reason given'}); nothing was refunded",
        "requested": f"invoice {invoice_id}: the outcome of the refund is not known yet "
        f"({report.description or 'no answer'}); run the command again: it checks "
        "with Fatora before asking again",
    }[report.status.value]
    emit(record, as_json, text)
    if report.status.value in ("rejected", "requested"):
        raise typer.Exit(1)


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
