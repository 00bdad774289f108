"""Running the service: clock, keys, collection, quarantine, events, tick, web, sandbox, demo."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import typer

from billing import serialize
from billing.cli.base import (
    JsonOpt,
    app,
    clock_app,
    collection_app,
    emit,
    events_app,
    fail,
    keys_app,
    out,
    quarantine_app,
    say,
    table,
    unit_of_work,
)
from billing.clock import ClockWouldGoBack, DatabaseClock, parse_duration, parse_instant
from billing.config import get_settings
from billing.crypto import new_key

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
def clock_set(
    at: Annotated[
        datetime,
        typer.Argument(
            parser=parse_instant, metavar="AT", help="An ISO 8601 time, e.g. 2027-01-31T09:00:00Z."
        ),
    ],
    backwards: Annotated[
        bool,
        typer.Option(
            "--backwards",
            help="Allow a time before the clock's: what already ran is not run again.",
        ),
    ] = False,
) -> None:
    """Freeze the test clock at an ISO 8601 time (never back in time without --backwards)."""
    try:
        now = _db_clock().set(at, backwards=backwards)
    except ClockWouldGoBack as exc:
        raise fail(f"{exc}; add --backwards to move it back anyway") from None
    say(str(serialize.iso(now)))


@clock_app.command("advance")
def clock_advance(
    by: Annotated[str, typer.Argument(help="A duration such as 1d, 12h, 30m, 2w.")],
) -> None:
    """Move the test clock forward by a duration such as 1d, 12h, 30m."""
    now = _db_clock().advance(parse_duration(by))
    say(str(serialize.iso(now)))


@keys_app.command("new")
def keys_new() -> None:
    """Print a new Fernet key for BILLING_TOKEN_KEY."""
    say(new_key())


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored token with the first key of BILLING_TOKEN_KEY.

    All or nothing: if a token cannot be decrypted with any of the keys, nothing is changed
    and the cards concerned are named.
    """
    from sqlalchemy import select

    from billing.models import CardToken
    from billing.runtime import get_runtime

    vault = get_runtime().vault
    with unit_of_work() as (session, _now):
        cards = {card.id: card for card in session.execute(select(CardToken)).scalars()}
        rotated = vault.rotate_all({card_id: card.ciphertext for card_id, card in cards.items()})
        for card_id, (ciphertext, fingerprint) in rotated.items():
            cards[card_id].ciphertext = ciphertext
            cards[card_id].fingerprint = fingerprint
    say(f"{len(rotated)} token(s) re-encrypted with the primary key")


@collection_app.command("resume")
def collection_resume() -> None:
    """Resume collection after it paused on an authentication error from Fatora."""
    from billing.services.control import resume_collection

    with unit_of_work() as (session, now):
        resumed = resume_collection(session, now)
    say("collection resumed" if resumed else "collection was not paused")


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
        say("nothing is quarantined")
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
        say("no failed event" if wanted is DeliveryStatus.FAILED else "no event")
    else:  # one line per event (grep-friendly, never folded by the terminal's width)
        for row in rows:
            when = {
                "pending": f"next {row['next_delivery_at'] or 'now'}",
                "delivered": f"at {row['delivered_at']}",
                "failed": f"at {row['failed_at']}",
            }.get(row["status"], "")
            error = f"  {row['last_error']}" if row["last_error"] else ""
            say(
                f"{row['id']}  {row['created_at']}  {row['kind']}  {row['status']} {when}  "
                f"tries {row['attempts']}{error}"
            )


@events_app.command("deliver")
def events_deliver(as_json: JsonOpt = False) -> None:
    """Deliver every event that is due now (what beat runs every minute)."""
    from billing.runtime import get_runtime
    from billing.services.notifications import channels_from_settings, deliver_due

    with channels_from_settings() as channels:
        counts = deliver_due(get_runtime(), channels).as_dict()
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
        datetime | None,
        typer.Option(
            "--now",
            parser=parse_instant,
            metavar="TIME",
            help="Test mode: set the test clock to this ISO 8601 time, then run.",
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the charges to settle; exit 1 if one is not settled in time or fails.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds --wait waits, in all.")
    ] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """One scheduler pass: renew what is due, queue the charges (and due retries)."""
    from billing import runner

    result = runner.tick(now=now, wait=wait, timeout=timeout)
    emit(result, as_json, runner.describe_tick(result))
    problem = runner.tick_problem(result, timeout) if wait else None
    if problem is not None:
        raise fail(problem)


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

    from billing.logs import configure_logging
    from billing.web import create_app

    configure_logging()  # as the worker logs: BILLING_LOG_FORMAT, bound ids, no secret
    # log_config=None: uvicorn's own lines go through the same handlers and redaction.
    uvicorn.run(create_app(), host=host, port=port, log_level="warning", log_config=None)


@app.command("sandbox")
def sandbox(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8765,
    latency_ms: Annotated[int, typer.Option("--latency-ms", min=0)] = 0,
    api_key: Annotated[str | None, typer.Option("--api-key")] = None,
    decline_style: Annotated[str, typer.Option("--decline-style")] = "http200",
    hang_s: Annotated[
        float, typer.Option("--hang-s", min=0, help="How long a hung call hangs.")
    ] = 120.0,
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
    from billing.logs import configure_logging

    configure_logging()
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
