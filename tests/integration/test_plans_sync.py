"""`billing plans sync`: who a price change applies to, what a dry run shows, a price changed
and changed back, a currency that cannot change, and the upgrade that grandfathers no one.

On the real PostgreSQL (the command line on SQLite too): the renewal bills each subscription at
the price it signed up at until a ``next_period`` change moves it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing.cli import app
from billing.clock import FixedClock
from billing.config import reset_settings_cache
from billing.crypto import new_key
from billing.db import get_engine
from billing.fatora.sandbox import Sandbox
from billing.migrate import downgrade, upgrade
from billing.models import Invoice, PlanPrice, Subscription
from billing.plans import PlansConfig, PlansFileError, parse_plans
from billing.runtime import Runtime, reset_runtime
from billing.services.plans_sync import Change, sync_plans
from billing.services.subscriptions import subscription_price
from tests.factories import renew, subscriber
from tests.integration.conftest import PG_URL, START, _admin_engine

DAY = timedelta(days=1)


def plans_file(
    amount: str = "50.00",
    *,
    price_change: str | None = None,
    currency: str = "QAR",
    name: str = "Monthly",
    trial_days: int = 0,
    days: str = "[1, 3, 5, 7]",
    yearly: bool = True,
) -> str:
    """A 'monthly' plan (and a 'yearly' one unless ``yearly`` is false) as a merchant writes."""
    change = f'price_change = "{price_change}"\n' if price_change else ""
    text_ = (
        f'[plans.monthly]\nname = "{name}"\namount = "{amount}"\ncurrency = "{currency}"\n'
        f'interval = "month"\ntrial_days = {trial_days}\n{change}\n'
    )
    if yearly:
        text_ += '[plans.yearly]\nname = "Yearly"\namount = "500.00"\ncurrency = "QAR"\n'
        text_ += 'interval = "year"\n\n'
    return text_ + f'[dunning.standard]\nretry_after_days = {days}\nfinal_action = "cancel"\n'


def config_of(text_: str) -> PlansConfig:
    return parse_plans(text_, "plans.toml")


def sync(rt: Runtime, text_: str, *, dry_run: bool = False) -> list[Change]:
    with rt.sessions() as session, session.begin():
        return sync_plans(session, config_of(text_), rt.clock.now(), dry_run=dry_run)


def prices(rt: Runtime, code: str = "monthly") -> list[tuple[int, str]]:
    """The plan's price rows, in the order they apply: (amount, price_change)."""
    with rt.sessions() as session:
        rows = session.execute(
            text(
                "SELECT pp.amount_minor, pp.price_change FROM plan_prices pp"
                " JOIN plans p ON p.id = pp.plan_id WHERE p.code = :code"
                " ORDER BY pp.effective_from, pp.id"
            ),
            {"code": code},
        ).all()
    return [(int(amount), str(change)) for amount, change in rows]


def amounts(rt: Runtime, sub_id: int) -> list[int]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Invoice.amount_minor)
            .where(Invoice.subscription_id == sub_id)
            .order_by(Invoice.period_start)
        ).scalars()
        return list(rows)


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("plans", "plan_prices", "dunning_policies", "subscriptions", "invoices", "events")
    with engine.connect() as conn:
        return {
            t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))]
            for t in tables
        }


# -- who pays what -----------------------------------------------------------------------------


def test_existing_subscribers_keep_their_price_until_next_period_moves_them(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """By default a new amount is for new subscribers: the one who signed up at 50.00 is billed
    50.00 month after month while a later one pays 60.00. A sync that says next_period moves the
    first one too from its next period (its issued invoices keep their amounts); syncing the
    same file again changes nothing."""
    sync(rt, plans_file("50.00"))
    early = subscriber(rt, sandbox, ["success"], name="early")
    assert renew(rt)
    clock.at = START + 10 * DAY
    (change,) = sync(rt, plans_file("60.00"))
    assert (change.kind, change.target, change.affected, change.subscriptions) == (
        "price",
        "monthly",
        0,
        1,
    )
    assert change.detail["existing_move"] is False
    assert "QAR50.00 -> QAR60.00 for new subscriptions" in change.text
    assert "existing ones keep their price (1 subscription(s))" in change.text
    late = subscriber(rt, sandbox, ["success"], name="late")
    clock.at = datetime(2026, 4, 1, tzinfo=UTC)
    renew(rt)
    assert amounts(rt, early) == [5000, 5000, 5000]
    assert amounts(rt, late) == [6000, 6000]
    assert sync(rt, plans_file("60.00")) == []  # idempotent

    (move,) = sync(rt, plans_file("60.00", price_change="next_period"))
    assert (move.kind, move.affected, move.subscriptions) == ("price", 1, 2)
    assert move.detail["existing_move"] is True
    assert "existing subscriptions move to QAR60.00 from their next period" in move.text
    assert sync(rt, plans_file("60.00", price_change="next_period")) == []
    clock.at = datetime(2026, 5, 1, tzinfo=UTC)
    renew(rt)
    assert amounts(rt, early) == [5000, 5000, 5000, 6000]
    assert amounts(rt, late) == [6000, 6000, 6000]
    assert prices(rt) == [
        (5000, "new_subscribers"),
        (6000, "new_subscribers"),
        (6000, "next_period"),
    ]

    # A raise for everyone, then one for new subscribers only: the first one stays at 70.00.
    clock.at = datetime(2026, 5, 10, tzinfo=UTC)
    (raised,) = sync(rt, plans_file("70.00", price_change="next_period"))
    assert raised.affected == 2 and raised.detail["kept"] == 0
    clock.at = datetime(2026, 5, 20, tzinfo=UTC)
    sync(rt, plans_file("80.00"))
    newest = subscriber(rt, sandbox, ["success"], name="newest")
    clock.at = datetime(2026, 6, 1, tzinfo=UTC)
    renew(rt)
    assert amounts(rt, early)[-1] == 7000
    assert amounts(rt, late)[-1] == 7000
    assert amounts(rt, newest) == [8000]


def test_a_price_changed_and_changed_back_at_one_moment_leaves_the_history_as_it_was(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """The test clock stands still: a sync that changes a price back at the moment of the
    change never fails on the history; a row no one signed up at is rewritten or removed, one
    someone signed up at is kept, and each subscriber pays what it signed up at."""
    sync(rt, plans_file("50.00"))
    (first,) = sync(rt, plans_file("60.00"))
    assert first.kind == "price"
    assert prices(rt) == [(6000, "new_subscribers")]  # the plan's own first row, rewritten
    (back,) = sync(rt, plans_file("50.00"))
    assert "QAR60.00 -> QAR50.00" in back.text
    assert prices(rt) == [(5000, "new_subscribers")]

    at_50 = subscriber(rt, sandbox, ["success"], name="at50")
    sync(rt, plans_file("60.00"))
    at_60 = subscriber(rt, sandbox, ["success"], name="at60")
    sync(rt, plans_file("50.00"))
    assert prices(rt) == [
        (5000, "new_subscribers"),
        (6000, "new_subscribers"),
        (5000, "new_subscribers"),
    ]
    assert sync(rt, plans_file("50.00")) == []
    sync(rt, plans_file("60.00"))  # back again: the last row, which no one took, goes
    assert prices(rt) == [(5000, "new_subscribers"), (6000, "new_subscribers")]
    for _ in range(3):  # and back and forth, never a crash, never a row more
        sync(rt, plans_file("50.00"))
        sync(rt, plans_file("60.00"))
    assert prices(rt) == [(5000, "new_subscribers"), (6000, "new_subscribers")]
    renew(rt)
    assert amounts(rt, at_50) == [5000]
    assert amounts(rt, at_60) == [6000]

    # Everyone moved to 70.00 at this moment, then 60.00 for new subscribers only: the move
    # stands (the row that made it is kept), and new subscribers pay 60.00.
    sync(rt, plans_file("70.00", price_change="next_period"))
    sync(rt, plans_file("60.00", price_change="new_subscribers"))
    with rt.sessions() as session:
        paid = {
            sub_id: subscription_price(
                session, session.get_one(Subscription, sub_id), START + 40 * DAY
            ).amount_minor
            for sub_id in (at_50, at_60)
        }
    assert paid == {at_50: 7000, at_60: 7000}  # the move to 70.00 happened; 60.00 is for new ones


# -- dry run and counts ------------------------------------------------------------------------


def _subscribers_in_every_status(rt: Runtime, sandbox: Sandbox) -> dict[str, int]:
    subs = {
        status: subscriber(rt, sandbox, ["success"], name=status)
        for status in ("active", "trialing", "past_due", "unpaid", "paused", "canceled")
    }
    with rt.sessions() as session, session.begin():
        for status, sub_id in subs.items():
            session.execute(
                text("UPDATE subscriptions SET status = :status WHERE id = :id"),
                {"status": status, "id": sub_id},
            )
    return subs


def test_dry_run_shows_every_change_and_whom_it_affects_and_writes_nothing(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """Every subscription but a canceled one will be billed again and is counted. The dry run
    lists exactly what the sync then does, and the database is the same after it."""
    sync(rt, plans_file("50.00"))
    _subscribers_in_every_status(rt, sandbox)
    subscriber(rt, sandbox, ["success"], name="yearly1", plan="yearly")
    subscriber(rt, sandbox, ["success"], name="yearly2", plan="yearly")
    clock.advance(DAY)
    changed = (
        plans_file(
            "55.00",
            price_change="next_period",
            name="Monthly plus",
            trial_days=7,
            days="[2, 4]",
            yearly=False,
        )
        + '\n[plans.weekly]\nname = "Weekly"\namount = "15.00"\ncurrency = "QAR"\n'
        + 'interval = "week"\n'
    )
    before = snapshot(rt.engine)
    planned = sync(rt, changed, dry_run=True)
    assert snapshot(rt.engine) == before
    by_kind = {(c.kind, c.detail.get("field")): c for c in planned}
    policy = by_kind[("update_policy", None)]
    assert (policy.affected, policy.subscriptions) == (7, 7)  # 5 monthly + 2 yearly follow it
    name = by_kind[("update_plan", "name")]
    assert (name.affected, name.subscriptions) == (5, 5)
    assert "update plan monthly: name 'Monthly' -> 'Monthly plus': 5 of 5" in name.text
    trial = by_kind[("update_plan", "trial_days")]
    assert trial.affected == 0 and "new subscriptions only" in trial.text
    price = by_kind[("price", None)]
    assert (price.affected, price.subscriptions, price.detail["kept"]) == (5, 5, 0)
    assert price.detail["from"] == "50.00" and price.detail["to"] == "55.00"
    assert price.detail["price_change"] == "next_period"
    retire = by_kind[("retire_plan", None)]
    assert (retire.target, retire.subscriptions) == ("yearly", 2)
    assert "2 subscription(s) keep renewing" in retire.text
    assert by_kind[("create_plan", None)].target == "weekly"

    done = sync(rt, changed)
    assert [c.as_dict() for c in done] == [c.as_dict() for c in planned]
    assert snapshot(rt.engine) != before
    assert sync(rt, changed, dry_run=True) == []


# -- currency ----------------------------------------------------------------------------------


def test_a_currency_change_is_refused_once_the_plan_has_subscriptions(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """The subscribers are billed in the plan's currency: a file that changes it is refused,
    naming the file, the plan and the field, and nothing of it is written (not even its other
    changes). A plan no one subscribed to may still change currency."""
    sync(rt, plans_file("50.00"))
    sub_id = subscriber(rt, sandbox, ["success"], name="c")
    with rt.sessions() as session, session.begin():  # a canceled one still has its invoices
        session.execute(
            text("UPDATE subscriptions SET status = 'canceled' WHERE id = :id"), {"id": sub_id}
        )
    clock.advance(DAY)
    before = snapshot(rt.engine)
    for dry_run in (True, False):
        with pytest.raises(PlansFileError) as refused:
            sync(rt, plans_file("5.000", currency="KWD", name="Renamed"), dry_run=dry_run)
        (issue,) = refused.value.errors
        assert (issue.file, issue.entry, issue.field) == ("plans.toml", "plans.monthly", "currency")
        assert "from QAR to KWD" in issue.message and "new plan code" in issue.message
        assert str(issue).startswith("plans.toml: plans.monthly.currency: ")
    assert snapshot(rt.engine) == before

    yearly_in_kwd = plans_file("50.00").replace(
        'amount = "500.00"\ncurrency = "QAR"', 'amount = "50.000"\ncurrency = "KWD"'
    )
    (change,) = sync(rt, yearly_in_kwd)
    assert change.target == "yearly" and "QAR500.00 -> KWD50.000" in change.text


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def cli_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_db: Engine,
) -> Iterator[str]:
    if request.param == "postgresql":
        url = clean_db.url.render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    monkeypatch.setenv("BILLING_DATABASE_URL", url)
    monkeypatch.setenv("BILLING_TOKEN_KEY", new_key())
    monkeypatch.setenv("BILLING_MODE", "test")
    monkeypatch.setenv("BILLING_BROKER_URL", "memory://")
    monkeypatch.setenv("FATORA_BASE_URL", "sandbox://embedded")
    reset_settings_cache()
    reset_runtime()
    cli("db", "upgrade")
    cli("clock", "set", "2027-01-31T09:00:00Z")  # and it stands still
    yield url
    reset_runtime()
    get_engine.cache_clear()


def cli(*args: str, input: str | None = None, ok: bool = True) -> str:
    result = CliRunner().invoke(app, list(args), input=input)
    assert (result.exit_code == 0) is ok, result.output
    assert "Traceback" not in result.output
    return result.output


def _subscribe(external_id: str) -> int:
    cli(
        "customers",
        "add",
        "--external-id",
        external_id,
        "--name",
        external_id,
        "--email",
        "a@example.com",
    )
    card = cli(
        "cards", "add", "--customer", external_id, "--token", "-", input=f"tok-{external_id}\n"
    )
    created = cli(
        "subscriptions",
        "create",
        "--customer",
        external_id,
        "--plan",
        "monthly",
        "--card",
        card.strip(),
        "--json",
    )
    return int(json.loads(created)["id"])


def _pays(sub_id: int) -> str:
    return str(json.loads(cli("subscriptions", "show", str(sub_id), "--json"))["amount"])


def test_the_command_line_dry_run_then_sync_then_back_and_forth(
    cli_env: str, tmp_path: Path
) -> None:
    """`plans sync --dry-run` names each change with its count and whether existing subscribers
    move, in text and JSON, and writes nothing; the sync does it; changing the price back and
    forth at one moment of the test clock never fails and leaves each subscriber's price."""
    file = tmp_path / "plans.toml"
    file.write_text(plans_file("50.00", yearly=False), encoding="utf-8")
    cli("plans", "sync", str(file))
    first = _subscribe("C1")
    file.write_text(plans_file("60.00", yearly=False), encoding="utf-8")

    shown = cli("plans", "sync", str(file), "--dry-run")
    assert "price of monthly: QAR50.00 -> QAR60.00 for new subscriptions" in shown
    assert "existing ones keep their price (1 subscription(s))" in shown
    assert "dry run: 1 change(s) to make; nothing was written" in shown
    record = json.loads(cli("plans", "sync", str(file), "--dry-run", "--json"))
    assert record["dry_run"] is True
    (detail,) = record["details"]
    assert (detail["kind"], detail["target"], detail["affected"], detail["subscriptions"]) == (
        "price",
        "monthly",
        0,
        1,
    )
    assert (detail["price_change"], detail["existing_move"]) == ("new_subscribers", False)
    assert record["changes"] == [detail["text"]]
    assert json.loads(cli("plans", "list", "--json"))[0]["amount"] == "50.00"

    applied = json.loads(cli("plans", "sync", str(file), "--json"))
    assert applied["dry_run"] is False and applied["changes"] == record["changes"]
    assert json.loads(cli("plans", "list", "--json"))[0]["amount"] == "60.00"
    second = _subscribe("C2")
    for amount in ("50.00", "60.00", "50.00", "60.00"):
        file.write_text(plans_file(amount, yearly=False), encoding="utf-8")
        assert "price of monthly" in cli("plans", "sync", str(file))
    assert cli("plans", "sync", str(file)).strip() == "no change"
    assert (_pays(first), _pays(second)) == ("50.00", "60.00")

    file.write_text(plans_file("60.00", price_change="next_period", yearly=False), encoding="utf-8")
    moving = cli("plans", "sync", str(file), "--dry-run")
    assert "existing subscriptions move to QAR60.00 from their next period: 1 of 2" in moving
    cli("plans", "sync", str(file))
    assert (_pays(first), _pays(second)) == ("60.00", "60.00")

    file.write_text(plans_file("6.000", currency="KWD", yearly=False), encoding="utf-8")
    refused = cli("plans", "sync", str(file), "--dry-run", ok=False)
    assert f"{file}: plans.monthly.currency: currency changes from QAR to KWD" in refused
    assert "1 error(s); nothing was written" in refused

    file.write_text(plans_file("60.00", price_change="sometimes", yearly=False), encoding="utf-8")
    bad = cli("plans", "sync", str(file), ok=False)
    assert f"{file}: plans.monthly.price_change: price_change 'sometimes' is not one of" in bad


# -- the upgrade -------------------------------------------------------------------------------


@pytest.fixture()
def scratch_url() -> Iterator[str]:
    admin = _admin_engine()
    name = f"billing_terms_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _old_release(engine: Engine) -> dict[str, int]:
    """Rows as the release before price terms wrote them: a plan whose price went 50 -> 60 ->
    70 (every change re-priced everyone), subscriptions created before, between and after the
    changes (one back-dated), and a plan with no price at all."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO dunning_policies (code, retry_after_days, final_action)"
                " VALUES ('standard', '[1]', 'cancel')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO plans (id, code, name, currency, interval, interval_count,"
                " trial_days, dunning_code, created_at, updated_at) VALUES"
                " (1, 'monthly', 'M', 'QAR', 'month', 1, 0, 'standard', :t0, :t0),"
                " (2, 'bare', 'B', 'QAR', 'month', 1, 0, 'standard', :t0, :t0)"
            ),
            {"t0": T0},
        )
        conn.execute(
            text(
                "INSERT INTO plan_prices (plan_id, amount_minor, currency, effective_from) VALUES"
                " (1, 5000, 'QAR', :t0), (1, 6000, 'QAR', :t1), (1, 7000, 'QAR', :t2)"
            ),
            {"t0": T0, "t1": T0 + 40 * DAY, "t2": T0 + 80 * DAY},
        )
        conn.execute(
            text(
                "INSERT INTO customers (id, external_id, name, email, created_at)"
                " VALUES (1, 'c', 'C', 'c@example.com', :t0)"
            ),
            {"t0": T0},
        )
        made = {
            # name: (plan, created_at, next_billing_at)
            "before": (1, T0 + 10 * DAY, T0 + 41 * DAY),
            "between": (1, T0 + 50 * DAY, T0 + 81 * DAY),
            "after": (1, T0 + 90 * DAY, T0 + 90 * DAY),
            "backdated": (1, T0 + 50 * DAY, T0 - 5 * DAY),
            "paused": (1, T0 + 10 * DAY, None),
            "bare": (2, T0 + 10 * DAY, T0 + 10 * DAY),
        }
        ids = {}
        for name, (plan_id, created, due) in made.items():
            ids[name] = conn.execute(
                text(
                    "INSERT INTO subscriptions (customer_id, plan_id, status, anchor_at,"
                    " next_billing_at, created_at, updated_at)"
                    " VALUES (1, :plan, 'active', :created, :due, :created, :created) RETURNING id"
                ),
                {"plan": plan_id, "created": created, "due": due},
            ).scalar_one()
    return ids


def test_the_upgrade_signs_each_subscription_up_at_what_it_was_paying(scratch_url: str) -> None:
    """Every price written before the upgrade re-priced everyone, so each row becomes
    next_period; each subscription signs up at the price in force at the earlier of its creation
    and its next billing, so that every period it will be billed for costs what it cost before
    the upgrade (the price in force at the period's start). A plan with no price leaves its
    subscriptions unsigned (their renewal is quarantined, as before). The downgrade goes back,
    keeping the latest of any rows of one moment."""
    upgrade(scratch_url, "0006")
    engine = create_engine(scratch_url)
    try:
        ids = _old_release(engine)
        upgrade(scratch_url, "0010")
        with engine.connect() as conn:
            terms = conn.execute(text("SELECT DISTINCT price_change FROM plan_prices")).scalars()
            assert list(terms) == ["next_period"]
            signed: dict[int, int | None] = dict(
                conn.execute(
                    text(
                        "SELECT s.id, pp.amount_minor FROM subscriptions s"
                        " LEFT JOIN plan_prices pp ON pp.id = s.price_id"
                    )
                ).all()
            )
        assert {name: signed[sub_id] for name, sub_id in ids.items()} == {
            "before": 5000,
            "between": 6000,
            "after": 7000,
            "backdated": 5000,  # its first period starts before the plan's first price
            "paused": 5000,
            "bare": None,
        }
        old_rule = [(T0 - 5 * DAY, 5000), (T0 + 41 * DAY, 6000), (T0 + 81 * DAY, 7000)]
        upgrade(scratch_url)  # the models are at head
        with Session(engine) as session:
            for name in ("before", "between", "backdated", "paused"):
                sub = session.get_one(Subscription, ids[name])
                for at, expected in old_rule:
                    if sub.next_billing_at is None or at >= sub.next_billing_at:
                        assert subscription_price(session, sub, at).amount_minor == expected, name

            # A row of the same moment as another (allowed from now on), then the downgrade.
            session.add(
                PlanPrice(
                    plan_id=1, amount_minor=7500, currency="QAR", effective_from=T0 + 80 * DAY
                )
            )
            session.commit()
        downgrade(scratch_url, "0006")
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT amount_minor FROM plan_prices WHERE plan_id = 1 ORDER BY effective_from"
                )
            ).scalars()
            assert list(rows) == [5000, 6000, 7500]
        upgrade(scratch_url)
    finally:
        engine.dispose()
