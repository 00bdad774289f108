"""The operator's view: ``billing status``, ``billing alerts list|ack``, and the logging of the
daemons ``billing web`` and ``billing sandbox``."""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from billing.cli.base import JsonOpt, app, emit, fail, out, say, table, unit_of_work

alerts_app = typer.Typer(
    no_args_is_help=True,
    help="Alerts raised for the operator (the outbox's alert.* events): list, acknowledge.",
    rich_markup_mode="markdown",
)
app.add_typer(alerts_app, name="alerts")


# -- status ------------------------------------------------------------------------------------


@app.command("status")
def status(
    renewals: Annotated[
        int, typer.Option("--renewals", min=0, help="How many of the next renewals to show.")
    ] = 5,
    as_json: JsonOpt = False,
) -> None:
    """The whole system at a glance: subscriptions, invoices, unresolved attempts, collection,
    open alerts, next renewals, failures in the last day."""
    from datetime import UTC, datetime

    from billing.services.status import read_status

    with unit_of_work() as (session, now):
        figures = read_status(session, now, datetime.now(UTC), renewals=renewals)
    if as_json:
        emit(figures.as_dict(), True, "")
        return
    _show_status(figures.as_dict())


def _show_status(record: dict[str, Any]) -> None:
    say(f"billing status at {record['now']}")
    summary = Table(show_header=False)
    summary.add_column("what", style="bold", no_wrap=True)
    summary.add_column("value", overflow="fold")
    collection = record["collection"]
    if collection["paused"]:
        paused = Text("PAUSED", style="bold red")
        paused.append(f" since {collection['since']}: {collection['reason']}", style="red")
        paused.append(" (billing collection resume)", style="dim")
        summary.add_row("collection", paused)
    else:
        summary.add_row("collection", Text("running", style="green"))
    summary.add_row("subscriptions", Text(_counts(record["subscriptions"]) or "none"))
    unresolved = record["unresolved_attempts"]
    if unresolved["count"]:
        age = _age(unresolved["oldest_age_s"])
        summary.add_row(
            "unresolved attempts",
            Text(f"{unresolved['count']}, the oldest written {age} ago", style="yellow"),
        )
    else:
        summary.add_row("unresolved attempts", Text("none"))
    alerts = record["open_alerts"]
    if alerts["count"]:
        line = Text(f"{alerts['count']}", style="bold yellow")
        line.append(f": {_counts(alerts['by_kind'])} (billing alerts list)")
        summary.add_row("open alerts", line)
    else:
        summary.add_row("open alerts", Text("none"))
    failures = record["failures_last_day"]
    summary.add_row(
        "failures, last day",
        Text(
            f"{failures['count']}: {_counts(failures['by_reason'])}"
            if failures["count"]
            else "none"
        ),
    )
    quarantined = record["quarantined"]
    if quarantined["subscriptions"] or quarantined["invoices"]:
        summary.add_row(
            "quarantined",
            Text(
                f"{quarantined['subscriptions']} subscription(s), "
                f"{quarantined['invoices']} invoice(s) (billing quarantine list)",
                style="yellow",
            ),
        )
    _print(summary)
    invoices = [{"currency": currency, **totals} for currency, totals in record["invoices"].items()]
    if invoices:
        table(invoices, ["currency", "open", "open_amount", "paid", "paid_amount"], "Invoices")
    else:
        say("no invoice yet")
    if record["next_renewals"]:
        columns = ["subscription_id", "customer", "plan", "status", "next_billing_at"]
        table(record["next_renewals"], columns, "Next renewals")
    else:
        say("no renewal scheduled")


def _counts(counts: dict[str, int]) -> str:
    """``active 12, past_due 1``: the non-zero counts, largest first."""
    shown = sorted(((n, k) for k, n in counts.items() if n), key=lambda p: (-p[0], p[1]))
    return ", ".join(f"{key} {n}" for n, key in shown)


def _age(seconds: float | None) -> str:
    left = int(seconds or 0)
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0s"


def _print(renderable: RenderableType) -> None:
    """As ``table`` prints: fitted to a terminal, as wide as its content when piped."""
    if out.is_terminal:
        out.print(renderable)
        return
    width = Measurement.get(out, out.options.update(width=1_000_000), renderable).maximum
    Console(file=out.file, width=max(width, 1), color_system=None).print(renderable)


# -- alerts ------------------------------------------------------------------------------------


@alerts_app.command("list")
def alerts_list(
    show_all: Annotated[
        bool, typer.Option("--all", help="Acknowledged alerts too, not only the open ones.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Open alerts (not acknowledged yet), newest first."""
    from billing.services.alerts import describe_alert, list_alerts

    with unit_of_work() as (session, _now):
        rows = [
            describe_alert(e) for e in list_alerts(session, include_acked=show_all, limit=limit)
        ]
    if as_json:
        emit(rows, True, "")
        return
    if not rows:
        say("no alert" if show_all else "no open alert")
        return
    for row in rows:
        row["detail"] = ", ".join(f"{k}={v}" for k, v in sorted(row["payload"].items()))
    columns = ["id", "kind", "created_at", "subscription_id", "invoice_id", "detail"]
    if show_all:
        columns += ["acked_at", "acked_by", "ack_note"]
    table(rows, columns)


@alerts_app.command("ack")
def alerts_ack(
    alert_ids: Annotated[
        list[int] | None, typer.Argument(help="The alerts to acknowledge (ids).", min=1)
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every open alert.")] = False,
    note: Annotated[
        str | None, typer.Option("--note", help="Why, or what was done about it.")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Who acknowledges them. Default: the user running this."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge alerts: they leave `alerts list` and the open count of `status`; when, by
    whom and the note are kept (`alerts list --all`)."""
    from billing.services.alerts import acknowledge

    if bool(alert_ids) == every:
        raise fail("name the alerts to acknowledge (IDs), or give --all")
    who = by or _user()
    with unit_of_work() as (session, now):
        done = acknowledge(
            session, None if every else list(alert_ids or []), by=who, note=note, now=now
        )
    lines = [f"{len(done.acked)} alert(s) acknowledged" + _ids(done.acked)]
    if done.already:
        lines.append("already acknowledged (left as they were)" + _ids(done.already))
    emit(done.as_dict(), as_json, "\n".join(lines))


def _ids(ids: list[int]) -> str:
    return ": " + ", ".join(str(i) for i in ids) if ids else ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "unknown"
