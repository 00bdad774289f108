"""Subscription plans from a TOML file: ``billing plans ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from billing import serialize
from billing.cli.base import (
    JsonOpt,
    emit,
    err,
    fail,
    out,
    plans_app,
    table,
    unit_of_work,
)
from billing.plans import PlansFileError, load_plans

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
