"""Apply a validated plans file to the database, idempotently.

A changed amount becomes a new price that applies to periods starting from the sync on; issued
invoices keep their amounts. A plan missing from the file is retired (no new subscriptions), never
deleted. Dunning policies are upserted and never deleted (old invoices may still follow them).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from billing.models import DunningPolicyRow, Plan, PlanPrice
from billing.money import format_money, from_minor, to_minor
from billing.plans import PlansConfig, PlanSpec
from billing.services.subscriptions import price_at

# The advisory lock key that serialises plan syncs (apart from the invoice locks' space).
_SYNC_LOCK = 0x46A7_0001


def sync_plans(session: Session, config: PlansConfig, now: datetime) -> list[str]:
    """Bring the database in line with ``config``; return one line per change made."""
    changes: list[str] = []
    # Two syncs at once would both read "missing" and both insert: the second waits here until
    # the first has committed, then reads what it wrote.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SYNC_LOCK})
    for policy in config.dunning.values():
        row = session.get(DunningPolicyRow, policy.code)
        days = list(policy.retry_after_days)
        if row is None:
            session.add(
                DunningPolicyRow(
                    code=policy.code, retry_after_days=days, final_action=policy.final_action.value
                )
            )
            changes.append(f"create dunning policy {policy.code}")
        elif row.retry_after_days != days or row.final_action != policy.final_action.value:
            row.retry_after_days = days
            row.final_action = policy.final_action.value
            changes.append(f"update dunning policy {policy.code}")
    session.flush()
    existing = {p.code: p for p in session.execute(select(Plan).with_for_update()).scalars()}
    for spec in config.plans.values():
        plan = existing.get(spec.code)
        if plan is None:
            _create(session, spec, now)
            changes.append(f"create plan {spec.code}: {format_money(spec.amount, spec.currency)}")
        else:
            changes.extend(_update(session, plan, spec, now))
    for code, plan in sorted(existing.items()):
        if code not in config.plans and plan.retired_at is None:
            plan.retired_at = now
            plan.updated_at = now
            changes.append(f"retire plan {code} (kept for its subscriptions)")
    session.flush()
    return changes


def _create(session: Session, spec: PlanSpec, now: datetime) -> None:
    plan = Plan(
        code=spec.code,
        name=spec.name,
        description=spec.description,
        currency=spec.currency,
        interval=spec.interval.value if spec.interval is not None else None,
        interval_count=spec.interval_count,
        cron=spec.cron,
        trial_days=spec.trial_days,
        dunning_code=spec.dunning,
        created_at=now,
        updated_at=now,
    )
    session.add(plan)
    session.flush()
    session.add(
        PlanPrice(
            plan_id=plan.id,
            amount_minor=to_minor(spec.amount, spec.currency),
            currency=spec.currency,
            effective_from=now,
        )
    )


def _update(session: Session, plan: Plan, spec: PlanSpec, now: datetime) -> list[str]:
    changes: list[str] = []
    fields = {
        "name": spec.name,
        "description": spec.description,
        "interval": spec.interval.value if spec.interval is not None else None,
        "interval_count": spec.interval_count,
        "cron": spec.cron,
        "trial_days": spec.trial_days,
        "dunning_code": spec.dunning,
    }
    for name, value in fields.items():
        if getattr(plan, name) != value:
            changes.append(f"update plan {plan.code}: {name} {getattr(plan, name)!r} -> {value!r}")
            setattr(plan, name, value)
    if plan.retired_at is not None:
        plan.retired_at = None
        changes.append(f"restore plan {plan.code} (back in the file)")
    current = price_at(session, plan.id, now)
    amount_minor = to_minor(spec.amount, spec.currency)
    if current.amount_minor != amount_minor or current.currency != spec.currency:
        old = format_money(from_minor(current.amount_minor, current.currency), current.currency)
        new = format_money(spec.amount, spec.currency)
        session.add(
            PlanPrice(
                plan_id=plan.id,
                amount_minor=amount_minor,
                currency=spec.currency,
                effective_from=now,
            )
        )
        plan.currency = spec.currency
        changes.append(
            f"price of {plan.code}: {old} -> {new} for periods from {now:%Y-%m-%d %H:%M} UTC"
        )
    if changes:
        plan.updated_at = now
    return changes
