"""Apply a validated plans file to the database, idempotently; with ``dry_run``, only say what
would change.

Each change names what it does and how many subscriptions it affects, counting those that will
be billed again (every status but canceled). A plan missing from the file is retired (no new
subscriptions), never deleted. Dunning policies are upserted and never deleted (old invoices may
still follow them). Issued invoices keep their amounts.

A changed amount is a new price row from the sync on. With ``price_change = "new_subscribers"``
(the file's default) only subscriptions created from then on pay it; each existing one keeps the
price it signed up at. With ``"next_period"`` every existing subscription moves to it from its
next period, including subscriptions grandfathered earlier: a file that says ``next_period`` is
in force once every subscription pays its amount. A plan's currency never changes once it has
subscriptions (they are billed in it): such a file is refused before anything is written.

The price history stays minimal: a second sync at the same moment (a test clock that stands
still) rewrites or removes the row the first one wrote, as long as no subscription signed up at
it and every subscription pays what the two syncs in a row would have made it pay; a price
changed and changed back at one moment leaves the history as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from sqlalchemy import case, delete, exists, func, select, text, update
from sqlalchemy.orm import Session

from billing.lifecycle import SubscriptionStatus
from billing.models import DunningPolicyRow, Plan, PlanPrice, Subscription
from billing.money import format_money, from_minor, to_minor
from billing.plans import (
    PlanIssue,
    PlansConfig,
    PlansFileError,
    PlanSpec,
    PriceChange,
    PricePoint,
    price_for_new,
    subscriber_price,
)
from billing.services.subscriptions import price_history

# The advisory lock key that serialises plan syncs (apart from the invoice locks' space).
_SYNC_LOCK = 0x46A7_0001

_CANCELED = SubscriptionStatus.CANCELED.value

# Plan fields as the file names them, and whether changing one touches existing subscriptions
# (a trial is given when a subscription is created, so trial_days concerns new ones only).
_FIELDS: dict[str, tuple[str, bool]] = {
    "name": ("name", True),
    "description": ("description", True),
    "interval": ("interval", True),
    "interval_count": ("interval_count", True),
    "cron": ("cron", True),
    "trial_days": ("trial_days", False),
    "dunning_code": ("dunning", True),
}


@dataclass(frozen=True)
class Change:
    """One change a sync makes: ``affected`` of the plan's ``subscriptions`` that will be billed
    again see a difference; ``detail`` holds what ``--json`` shows besides."""

    kind: str
    target: str
    text: str
    affected: int = 0
    subscriptions: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "text": self.text,
            "affected": self.affected,
            "subscriptions": self.subscriptions,
            **self.detail,
        }


# -- prices (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cohort:
    """Subscriptions of a plan that will be billed again and sign up alike: at the price row
    ``price_id``, or, with none recorded, at the plan's price for new ones at ``since``."""

    price_id: int | None
    since: datetime | None
    count: int


@dataclass(frozen=True)
class PriceDecision:
    """How the history takes a new price: a row appended, the row ``row_id`` of this very
    moment rewritten, or that row removed (the price is back to what it was before it).
    ``moved`` subscriptions pay another amount from their next period, ``kept`` do not."""

    action: Literal["append", "rewrite", "remove"]
    row_id: int | None
    before: PricePoint | None
    moved: int
    kept: int


def _signed(history: Sequence[PricePoint], cohort: Cohort) -> PricePoint | None:
    if cohort.price_id is not None:
        return next((p for p in history if p.id == cohort.price_id), None)
    return price_for_new(history, cohort.since) if cohort.since is not None else None


def _pays(history: Sequence[PricePoint], cohort: Cohort, at: datetime) -> tuple[int, str] | None:
    signed = _signed(history, cohort)
    return subscriber_price(history, signed, at).money if signed is not None else None


def _outcome(
    history: Sequence[PricePoint], cohorts: Sequence[Cohort], at: datetime
) -> tuple[object, ...]:
    """What new subscriptions and each cohort pay at ``at`` under ``history``."""
    new = price_for_new(history, at)
    return (new.money if new is not None else None, *(_pays(history, c, at) for c in cohorts))


def decide_price(
    history: Sequence[PricePoint],
    cohorts: Sequence[Cohort],
    money: tuple[int, str],
    change: PriceChange,
    now: datetime,
    *,
    last_signed_up_at: bool,
) -> PriceDecision | None:
    """How a price of ``money`` with ``change`` enters ``history`` at ``now``; ``None`` when it
    is in force already. ``last_signed_up_at`` says whether some subscription signed up at the
    history's latest row (which is then kept whatever its moment)."""
    ordered = sorted(history, key=lambda p: p.order)
    before = price_for_new(ordered, now)
    payers = sum(c.count for c in cohorts)
    paying = sum(c.count for c in cohorts if _pays(ordered, c, now) == money)
    in_force = before is not None and before.money == money
    if in_force and (change is PriceChange.NEW_SUBSCRIBERS or paying == payers):
        return None
    new = PricePoint(max((p.id for p in ordered), default=0) + 1, money[0], money[1], now, change)
    appended = [*ordered, new]
    wanted = _outcome(appended, cohorts, now)
    action: Literal["append", "rewrite", "remove"] = "append"
    row_id = None
    last = ordered[-1] if ordered else None
    if last is not None and last.effective_from == now and not last_signed_up_at:
        earlier = ordered[:-1]
        if earlier and _outcome(earlier, cohorts, now) == wanted:
            action, row_id = "remove", last.id
        elif _outcome([*earlier, replace(new, id=last.id)], cohorts, now) == wanted:
            action, row_id = "rewrite", last.id
    moved = sum(c.count for c in cohorts if _pays(ordered, c, now) != _pays(appended, c, now))
    return PriceDecision(action, row_id, before, moved, payers - moved)


# -- the sync ----------------------------------------------------------------------------------


@dataclass
class _Counts:
    """Subscriptions per plan id: all of them, and those that will be billed again."""

    every: dict[int, int]
    billable: dict[int, int]


def sync_plans(
    session: Session, config: PlansConfig, now: datetime, *, dry_run: bool = False
) -> list[Change]:
    """Bring the database in line with ``config`` (or, with ``dry_run``, write nothing); return
    the changes, one per line of text. Raises :class:`PlansFileError` (nothing written) for a
    file the database cannot take: a plan with subscriptions whose currency changes."""
    # Two syncs at once would both read "missing" and both insert: the second waits here until
    # the first has committed, then reads what it wrote.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SYNC_LOCK})
    plans_query = select(Plan) if dry_run else select(Plan).with_for_update()
    existing = {p.code: p for p in session.execute(plans_query).scalars()}
    counts = _count(session)
    _refuse_currency_changes(config, existing, counts)

    changes: list[Change] = []
    actions: list[Callable[[], None]] = []
    for policy in config.dunning.values():
        row = session.get(DunningPolicyRow, policy.code)
        days, action = list(policy.retry_after_days), policy.final_action.value
        if row is None:
            line = f"create dunning policy {policy.code}"
            changes.append(Change("create_policy", policy.code, line))
            new_row = DunningPolicyRow(code=policy.code, retry_after_days=days, final_action=action)
            actions.append(partial(session.add, new_row))
        elif row.retry_after_days != days or row.final_action != action:
            using = sum(
                counts.billable.get(p.id, 0)
                for p in existing.values()
                if p.dunning_code == policy.code
            )
            what = []
            if row.retry_after_days != days:
                what.append(f"retry_after_days {row.retry_after_days} -> {days}")
            if row.final_action != action:
                what.append(f"final_action {row.final_action!r} -> {action!r}")
            changes.append(
                Change(
                    "update_policy",
                    policy.code,
                    f"update dunning policy {policy.code}: {', '.join(what)}"
                    f"{_affecting(using, using)}",
                    using,
                    using,
                    {"retry_after_days": days, "final_action": action},
                )
            )
            actions.append(partial(_set_policy, row, days, action))
    actions.append(session.flush)

    for spec in config.plans.values():
        plan = existing.get(spec.code)
        if plan is None:
            money = format_money(spec.amount, spec.currency)
            changes.append(
                Change(
                    "create_plan",
                    spec.code,
                    f"create plan {spec.code}: {money}",
                    detail={"amount": str(spec.amount), "currency": spec.currency},
                )
            )
            actions.append(partial(_create, session, spec, now))
            continue
        billable = counts.billable.get(plan.id, 0)
        for name, (label, touches) in _FIELDS.items():
            old, new = getattr(plan, name), _spec_value(spec, name)
            if old == new:
                continue
            affected = billable if touches else 0
            tail = _affecting(affected, billable) if touches else " (new subscriptions only)"
            changes.append(
                Change(
                    "update_plan",
                    plan.code,
                    f"update plan {plan.code}: {label} {old!r} -> {new!r}{tail}",
                    affected,
                    billable,
                    {"field": label, "from": old, "to": new},
                )
            )
            actions.append(partial(setattr, plan, name, new))
        if plan.retired_at is not None:
            changes.append(
                Change(
                    "restore_plan",
                    plan.code,
                    f"restore plan {plan.code} (back in the file): it takes new subscriptions",
                    0,
                    billable,
                )
            )
            actions.append(partial(setattr, plan, "retired_at", None))
        price = _price_change(session, plan, spec, billable, now, dry_run)
        if price is not None:
            change, act = price
            changes.append(change)
            actions.append(act)
    for code, plan in sorted(existing.items()):
        if code not in config.plans and plan.retired_at is None:
            billable = counts.billable.get(plan.id, 0)
            changes.append(
                Change(
                    "retire_plan",
                    code,
                    f"retire plan {code}: no new subscriptions; {billable} subscription(s)"
                    " keep renewing as they are",
                    0,
                    billable,
                )
            )
            actions.append(partial(setattr, plan, "retired_at", now))

    if dry_run:
        return changes
    for act in actions:
        act()
    touched = {c.target for c in changes if c.kind.endswith("_plan") or c.kind == "price"}
    for code in touched:
        if code in existing:
            existing[code].updated_at = now
    session.flush()
    return changes


def _count(session: Session) -> _Counts:
    rows = session.execute(
        select(
            Subscription.plan_id,
            func.count(),
            func.count().filter(Subscription.status != _CANCELED),
        ).group_by(Subscription.plan_id)
    ).all()
    return _Counts(
        every={plan_id: int(n) for plan_id, n, _ in rows},
        billable={plan_id: int(n) for plan_id, _, n in rows},
    )


def _refuse_currency_changes(
    config: PlansConfig, existing: Mapping[str, Plan], counts: _Counts
) -> None:
    issues = []
    for spec in config.plans.values():
        plan = existing.get(spec.code)
        if plan is None or plan.currency == spec.currency:
            continue
        held = counts.every.get(plan.id, 0)
        if held:
            issues.append(
                PlanIssue(
                    config.source,
                    f"plans.{spec.code}",
                    "currency",
                    f"currency changes from {plan.currency} to {spec.currency}, but the plan"
                    f" has {held} subscription(s) in {plan.currency}: a plan keeps its currency"
                    " once subscribed to; put the new price under a new plan code",
                )
            )
    if issues:
        raise PlansFileError(issues)


def _affecting(affected: int, billable: int) -> str:
    return f": {affected} of {billable} subscription(s) affected"


def _spec_value(spec: PlanSpec, name: str) -> object:
    if name == "interval":
        return spec.interval.value if spec.interval is not None else None
    if name == "dunning_code":
        return spec.dunning
    return getattr(spec, name)


def _set_policy(row: DunningPolicyRow, days: list[int], action: str) -> None:
    row.retry_after_days = days
    row.final_action = action


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
            price_change=spec.price_change.value,
        )
    )


def _cohorts(session: Session, plan_id: int) -> list[Cohort]:
    since = case((Subscription.price_id.is_(None), Subscription.created_at))
    rows = session.execute(
        select(Subscription.price_id, since, func.count())
        .where(Subscription.plan_id == plan_id, Subscription.status != _CANCELED)
        .group_by(Subscription.price_id, since)
    ).all()
    return [Cohort(price_id, at, int(n)) for price_id, at, n in rows]


def _price_change(
    session: Session, plan: Plan, spec: PlanSpec, billable: int, now: datetime, dry_run: bool
) -> tuple[Change, Callable[[], None]] | None:
    history = price_history(session, plan.id)
    money = (to_minor(spec.amount, spec.currency), spec.currency)
    last = max(history, key=lambda p: p.order, default=None)
    if last is not None and last.effective_from == now and not dry_run:
        # It may be rewritten or removed: a subscription signing up at it meanwhile waits for
        # this sync (its foreign key check needs the row), or is seen by the check below.
        session.execute(select(PlanPrice.id).where(PlanPrice.id == last.id).with_for_update())
    signed_up_at_last = last is not None and bool(
        session.execute(select(exists().where(Subscription.price_id == last.id))).scalar()
    )
    decision = decide_price(
        history,
        _cohorts(session, plan.id),
        money,
        spec.price_change,
        now,
        last_signed_up_at=signed_up_at_last,
    )
    if decision is None:
        return None
    new = format_money(spec.amount, spec.currency)
    old = (
        format_money(from_minor(*decision.before.money), decision.before.currency)
        if decision.before is not None
        else "none"
    )
    moves = spec.price_change is PriceChange.NEXT_PERIOD
    when = f"from {now:%Y-%m-%d %H:%M} UTC"
    if not moves:
        line = (
            f"price of {plan.code}: {old} -> {new} for new subscriptions {when};"
            f" existing ones keep their price ({decision.kept} subscription(s))"
        )
        if decision.moved:  # rows written by hand at this very moment, with no price of theirs
            line += f"; {decision.moved} created at this moment take it"
    elif decision.before is not None and decision.before.money == money:
        line = (
            f"price of {plan.code}: existing subscriptions move to {new} from their next"
            f" period: {decision.moved} of {billable} subscription(s) move"
        )
    else:
        line = (
            f"price of {plan.code}: {old} -> {new} {when}, for new subscriptions and existing"
            f" ones from their next period: {decision.moved} of {billable} subscription(s) move"
        )
    change = Change(
        "price",
        plan.code,
        line,
        decision.moved,
        billable,
        {
            "from": str(from_minor(*decision.before.money)) if decision.before else None,
            "from_currency": decision.before.currency if decision.before else None,
            "to": str(spec.amount),
            "currency": spec.currency,
            "price_change": spec.price_change.value,
            "existing_move": moves,
            "kept": decision.kept,
            "effective_from": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        },
    )

    def apply() -> None:
        plan.currency = spec.currency
        values = {
            "amount_minor": money[0],
            "currency": money[1],
            "price_change": spec.price_change.value,
        }
        if decision.action == "remove":
            session.execute(delete(PlanPrice).where(PlanPrice.id == decision.row_id))
        elif decision.action == "rewrite":
            session.execute(update(PlanPrice).where(PlanPrice.id == decision.row_id).values(values))
        else:
            session.add(PlanPrice(plan_id=plan.id, effective_from=now, **values))

    return change, apply
