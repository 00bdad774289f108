"""Subscription plans from a TOML file: ``billing plans ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from sqlalchemy import select

from billing import serialize
from billing.cli.base import (
    JsonOpt,
    emit,
    err,
    fail,
    out,
    plans_app,
    say,
    table,
    unit_of_work,
)
from billing.plans import PlansConfig, PlansFileError, load_plans

# -- plans -------------------------------------------------------------------------------------


def _load(file: Path) -> PlansConfig:
    try:
        return load_plans(file)
    except PlansFileError as exc:
        _refused(file, exc)


def _refused(file: Path, exc: PlansFileError) -> NoReturn:
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
def plans_sync(
    file: Path,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show every change and the subscriptions it affects; write nothing.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply a plans file to the database: idempotent; nothing is written if it is invalid.

    Each change says how many subscriptions that will be billed again it affects, and a price
    change whether existing subscribers move to it (price_change = "next_period") or keep their
    price (price_change = "new_subscribers", the default).
    """
    from billing.services.plans_sync import sync_plans

    config = _load(file)
    try:
        with unit_of_work() as (session, now):
            changes = sync_plans(session, config, now, dry_run=dry_run)
    except PlansFileError as exc:
        _refused(file, exc)
    if as_json:
        record = {
            "dry_run": dry_run,
            "changes": [str(c) for c in changes],
            "details": [c.as_dict() for c in changes],
        }
        emit(record, True, "")
        return
    for change in changes:
        say(change.text)
    if dry_run:
        say(f"dry run: {len(changes)} change(s) to make; nothing was written")
    elif not changes:
        say("no change")


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
