"""The plans file: the documented format, and every mistake reported at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from billing.dunning import STANDARD, DunningPolicy, FinalAction
from billing.periods import CronSchedule, Interval, IntervalSchedule
from billing.plans import (
    PlanIssue,
    PlansFileError,
    PlanSpec,
    PriceChange,
    PricePoint,
    load_plans,
    parse_plans,
    price_for_new,
    subscriber_price,
)
from billing.services.plans_sync import Cohort, decide_price

EXAMPLE = Path(__file__).resolve().parents[2] / "plans.example.toml"

BASIC = """
[plans.basic-monthly]
name = "Basic"
amount = "50.00"
currency = "QAR"
interval = "month"
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PlansFileError) as raised:
        parse_plans(text, "plans.toml")
    lines = str(raised.value).splitlines()
    assert lines == [str(issue) for issue in raised.value.errors]
    return lines


def plan_with(**fields: str) -> str:
    """A one-plan file: the basic plan with ``fields`` replaced or added (raw TOML values)."""
    values = {"name": '"Basic"', "amount": '"50.00"', "currency": '"QAR"', "interval": '"month"'}
    values.update(fields)
    body = "\n".join(f"{key} = {value}" for key, value in values.items() if value != "<drop>")
    return f"[plans.basic-monthly]\n{body}\n"


# --- Valid files ----------------------------------------------------------------------------


def test_example_file_loads() -> None:
    """The shipped example is valid and shows each kind of plan and two dunning policies."""
    config = load_plans(EXAMPLE)
    plans = config.plans
    assert plans["basic-monthly"].currency == "QAR"
    assert plans["basic-monthly"].interval is Interval.MONTH
    assert plans["pro-yearly"].interval is Interval.YEAR and plans["pro-yearly"].trial_days > 0
    assert plans["kwd-weekly"].amount == Decimal("1.250")
    assert plans["kwd-weekly"].interval is Interval.WEEK
    assert plans["weekly-office"].cron == "0 9 * * MON"
    assert len(config.dunning) == 2
    for plan in plans.values():
        assert config.dunning_for(plan).code == plan.dunning


def test_minimal_plan_gets_defaults_and_builtin_standard() -> None:
    """Optional keys default (count 1, no trial, standard dunning, a new amount for new
    subscribers only) and standard is built in."""
    config = parse_plans(BASIC, "plans.toml")
    assert config.plans == {
        "basic-monthly": PlanSpec(
            code="basic-monthly",
            name="Basic",
            amount=Decimal("50.00"),
            currency="QAR",
            interval=Interval.MONTH,
            interval_count=1,
            cron=None,
            trial_days=0,
            dunning="standard",
            price_change=PriceChange.NEW_SUBSCRIBERS,
        )
    }
    assert config.dunning == {"standard": STANDARD}
    assert config.source == "plans.toml"


def test_price_change_is_read_from_the_file() -> None:
    """Both values are accepted as written; the example file shows one of each."""
    for value in PriceChange:
        plan = parse_plans(plan_with(price_change=f'"{value}"'), "p.toml").plans["basic-monthly"]
        assert plan.price_change is value
    example = load_plans(EXAMPLE).plans
    assert example["basic-monthly"].price_change is PriceChange.NEW_SUBSCRIBERS
    assert {p.price_change for p in example.values()} == set(PriceChange)


def test_the_documented_format() -> None:
    """The exact example from the format description parses to the expected values."""
    text = """
[plans.basic-monthly]
name = "Basic"
amount = "50.00"            # a decimal string, in the currency's major unit
currency = "QAR"
interval = "month"          # day | week | month | year
interval_count = 1          # optional, default 1
trial_days = 0              # optional, default 0
dunning = "standard"        # optional, default "standard"

[plans.weekly-office]
name = "Office hours"
amount = "1.250"
currency = "KWD"
cron = "0 9 * * MON"        # instead of interval: calendar billing, in the customer's time zone

[dunning.standard]
retry_after_days = [1, 3, 5, 7]   # after the first failed charge of an invoice
final_action = "cancel"           # cancel | unpaid | pause
"""
    config = parse_plans(text, "plans.toml")
    office = config.plans["weekly-office"]
    assert (office.amount, office.currency, office.interval, office.cron) == (
        Decimal("1.250"),
        "KWD",
        None,
        "0 9 * * MON",
    )
    assert config.dunning == {"standard": STANDARD}


def test_currency_is_normalized_and_amount_padded() -> None:
    """A lower-case currency is accepted and the amount is quantized to its decimals."""
    config = parse_plans(plan_with(currency='"kwd"', amount='"2"'), "p.toml")
    plan = config.plans["basic-monthly"]
    assert (plan.currency, str(plan.amount)) == ("KWD", "2.000")


def test_iqd_amounts_have_three_decimals() -> None:
    """A plan in IQD takes ISO 4217's three decimals (fils), as the gateway does: "12.500" is
    accepted as written and "12.5" padded, never refused or rounded to whole dinars."""
    for written in ('"12.500"', '"12.5"'):
        plan = parse_plans(plan_with(currency='"IQD"', amount=written), "p.toml").plans[
            "basic-monthly"
        ]
        assert (plan.currency, str(plan.amount)) == ("IQD", "12.500")
    with pytest.raises(PlansFileError, match="has 4 decimals but IQD allows 3"):
        parse_plans(plan_with(currency='"IQD"', amount='"12.5001"'), "p.toml")


def test_custom_dunning_policy() -> None:
    """A plan can refer to a policy the file defines, with any final action."""
    text = plan_with(dunning='"gentle"') + (
        '[dunning.gentle]\nretry_after_days = [2, 4, 8]\nfinal_action = "pause"\n'
    )
    config = parse_plans(text, "p.toml")
    assert config.dunning == {"gentle": DunningPolicy("gentle", (2, 4, 8), FinalAction.PAUSE)}
    assert config.dunning_for(config.plans["basic-monthly"]).final_action is FinalAction.PAUSE


def test_plan_schedule() -> None:
    """A plan builds the matching schedule for a subscription."""
    config = load_plans(EXAMPLE)
    anchor = datetime(2026, 1, 31, 9, tzinfo=UTC)
    monthly = config.plans["basic-monthly"].schedule(anchor, "Asia/Qatar")
    assert monthly == IntervalSchedule(Interval.MONTH, 1, anchor, "Asia/Qatar")
    office = config.plans["weekly-office"].schedule(anchor, "Asia/Kuwait")
    assert office == CronSchedule("0 9 * * MON", "Asia/Kuwait")


def test_plan_spec_needs_exactly_one_timing() -> None:
    """A PlanSpec built in code cannot have both or neither of interval and cron."""
    common = {"code": "x", "name": "X", "amount": Decimal("1.00"), "currency": "QAR"}
    common |= {"interval_count": 1, "trial_days": 0, "dunning": "standard"}
    with pytest.raises(ValueError):
        PlanSpec(interval=Interval.DAY, cron="0 0 * * *", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PlanSpec(interval=None, cron=None, **common)  # type: ignore[arg-type]


# --- Errors ---------------------------------------------------------------------------------


def test_decimal_error_has_the_documented_shape() -> None:
    """The message format is FILE: plans.CODE.FIELD: message."""
    assert errors_of(plan_with(amount='"50.001"')) == [
        'plans.toml: plans.basic-monthly.amount: amount "50.001" has 3 decimals but QAR allows 2'
    ]


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"amount": "50.0"}, "amount", "must be a string"),
        ({"amount": "50"}, "amount", "decimal string"),
        ({"amount": '"fifty"'}, "amount", "not a decimal string"),
        ({"amount": '"0.00"'}, "amount", "must be positive"),
        ({"amount": '"-5.00"'}, "amount", "must be positive"),
        ({"amount": "<drop>"}, "amount", "missing required key"),
        ({"name": '""'}, "name", "non-empty"),
        ({"name": '"   "'}, "name", "non-empty"),
        ({"name": "<drop>"}, "name", "missing required key"),
        ({"currency": '"QQQ"'}, "currency", "unknown currency 'QQQ'"),
        ({"currency": "634"}, "currency", "must be a string"),
        ({"interval": '"fortnight"'}, "interval", "not one of day, week, month, year"),
        ({"interval": "<drop>"}, "interval", "give interval"),
        ({"cron": '"0 9 * * MON"'}, "cron", "not both"),
        ({"interval_count": "0"}, "interval_count", "integer >= 1"),
        ({"interval_count": '"2"'}, "interval_count", "integer >= 1"),
        ({"interval_count": "1.5"}, "interval_count", "integer >= 1"),
        ({"trial_days": "-1"}, "trial_days", "integer >= 0"),
        ({"trial_days": "true"}, "trial_days", "integer >= 0"),
        ({"dunning": '"gentle"'}, "dunning", "unknown dunning policy 'gentle'"),
        ({"description": "5"}, "description", "must be a string"),
        ({"intervall": '"month"'}, "intervall", "did you mean 'interval'"),
        (
            {"price_change": '"next-period"'},
            "price_change",
            "'next-period' is not one of new_subscribers, next_period"
            " (did you mean 'next_period'?)",
        ),
        ({"price_change": '"everyone"'}, "price_change", "not one of new_subscribers"),
        ({"price_change": "true"}, "price_change", "must be a string, not a boolean"),
        ({"price_chnage": '"next_period"'}, "price_chnage", "did you mean 'price_change'"),
    ],
)
def test_each_plan_mistake_is_reported_on_its_field(
    fields: dict[str, str], field: str, fragment: str
) -> None:
    """Each kind of mistake is caught and pinned to the plan and field it is in."""
    lines = errors_of(plan_with(**fields))
    assert any(
        line.startswith(f"plans.toml: plans.basic-monthly.{field}: ") and fragment in line
        for line in lines
    ), lines


def test_float_amount_says_to_quote_it() -> None:
    """A TOML float amount is refused with a message that says a string is required."""
    [line] = errors_of(plan_with(amount="50.0"))
    assert 'must be a string such as "50.0"' in line and "float" in line


@pytest.mark.parametrize(
    ("cron", "fragment"),
    [("61 * * * *", "out of range"), ("0 0 30 2 *", "never fires"), ("0 9 * *", "5 fields")],
)
def test_bad_cron_gives_the_reason(cron: str, fragment: str) -> None:
    """A bad cron expression is reported with croniter's reason."""
    [line] = errors_of(plan_with(interval="<drop>", cron=f'"{cron}"'))
    assert line.startswith("plans.toml: plans.basic-monthly.cron: ") and fragment in line


def test_interval_count_on_a_cron_plan_is_refused() -> None:
    """interval_count only applies to interval plans; on a cron plan it is a mistake."""
    [line] = errors_of(plan_with(interval="<drop>", cron='"@daily"', interval_count="2"))
    assert "plans.basic-monthly.interval_count" in line


def test_all_errors_are_listed_at_once() -> None:
    """One run reports every mistake in the file, one per line."""
    text = """
[plan.typo]
name = "x"

[plans.basic-monthly]
name = ""
amount = 50.0
currency = "QAR"
interval = "fortnight"
trial_days = -3
colour = "blue"

[plans.kwd]
name = "K"
amount = "1.2345"
currency = "KWD"
cron = "not a cron"
"""
    lines = errors_of(text)
    assert lines[0] == "plans.toml: plan: unknown top-level table 'plan' (did you mean 'plans'?)"
    fields = [line.split(": ")[1] for line in lines[1:]]
    assert fields == [
        "plans.basic-monthly.colour",
        "plans.basic-monthly.name",
        "plans.basic-monthly.amount",
        "plans.basic-monthly.interval",
        "plans.basic-monthly.trial_days",
        "plans.kwd.amount",
        "plans.kwd.cron",
    ]


def test_toml_syntax_error_has_the_line() -> None:
    """A TOML syntax error is reported with its line and column."""
    [line] = errors_of('[plans.basic]\nname = "Basic\n')
    assert line.startswith("plans.toml: invalid TOML: ") and "line 2" in line


def test_exact_duplicate_plan_is_a_toml_error() -> None:
    """TOML itself refuses a table declared twice; the error points at the line."""
    [line] = errors_of(BASIC + BASIC)
    assert "invalid TOML" in line and "line 8" in line


def test_case_insensitive_duplicate_codes() -> None:
    """Codes differing only in case are refused (and upper case is not a valid code anyway)."""
    lines = errors_of(BASIC + BASIC.replace("basic-monthly", "Basic-Monthly"))
    assert any("plans.Basic-Monthly: code 'Basic-Monthly' must match" in line for line in lines)
    assert any("duplicates 'basic-monthly'" in line for line in lines)


@pytest.mark.parametrize("code", ["-basic", "_x", "basic monthly", "bäsic", "Basic"])
def test_invalid_plan_codes(code: str) -> None:
    """Plan codes are lower-case ASCII: [a-z0-9][a-z0-9_-]*."""
    lines = errors_of(BASIC.replace("basic-monthly", f'"{code}"'))
    assert any("must match [a-z0-9][a-z0-9_-]*" in line for line in lines)


def test_entry_that_is_not_a_table() -> None:
    """`plans.x = 1` is not a plan."""
    assert errors_of("plans.x = 1\n") == ["plans.toml: plans.x: must be a table, not an integer"]


def test_no_plans_is_an_error() -> None:
    """A file without plans is almost certainly a mistake."""
    [line] = errors_of('[dunning.standard]\nretry_after_days = [1]\nfinal_action = "cancel"\n')
    assert "defines no plans" in line


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ("retry_after_days = []\nfinal_action = 'cancel'", "retry_after_days", "at least one"),
        ("retry_after_days = [3, 1]\nfinal_action = 'cancel'", "retry_after_days", "increasing"),
        ("retry_after_days = [1, 1]\nfinal_action = 'cancel'", "retry_after_days", "increasing"),
        ("retry_after_days = [0, 2]\nfinal_action = 'cancel'", "retry_after_days", "positive"),
        ("retry_after_days = 3\nfinal_action = 'cancel'", "retry_after_days", "list"),
        ("retry_after_days = [1.5]\nfinal_action = 'cancel'", "retry_after_days", "whole"),
        ("final_action = 'cancel'", "retry_after_days", "missing required key"),
        ("retry_after_days = [1]\nfinal_action = 'delete'", "final_action", "not one of"),
        ("retry_after_days = [1]", "final_action", "missing required key"),
        ("retry_after_days = [1]\nfinal_action = 'cancel'\nretries = 2", "retries", "unknown key"),
    ],
)
def test_dunning_policy_mistakes(body: str, field: str, fragment: str) -> None:
    """Dunning ladders are validated like plans, and a plan referring to a broken policy does
    not get a second, misleading 'unknown policy' error."""
    lines = errors_of(BASIC + f"\n[dunning.standard]\n{body}\n")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"plans.toml: dunning.standard.{field}: ") and fragment in lines[0]


def test_defining_policies_replaces_the_builtin() -> None:
    """Once the file defines policies, the built-in standard is gone, and the error says so."""
    text = BASIC + '\n[dunning.gentle]\nretry_after_days = [2]\nfinal_action = "unpaid"\n'
    assert errors_of(text) == [
        "plans.toml: plans.basic-monthly.dunning: unknown dunning policy 'standard' "
        "(defined: gentle)"
    ]


def test_load_plans_reports_unreadable_file(tmp_path: Path) -> None:
    """A missing or non-UTF-8 file is a PlansFileError naming the file, like any other mistake."""
    with pytest.raises(PlansFileError, match="cannot read"):
        load_plans(tmp_path / "missing.toml")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(BASIC.replace("Basic", "B\xe4sic").encode("latin-1"))
    with pytest.raises(PlansFileError, match="not UTF-8"):
        load_plans(latin)


def test_load_plans_names_the_file(tmp_path: Path) -> None:
    """Errors from load_plans start with the file's path."""
    path = tmp_path / "plans.toml"
    path.write_text(plan_with(amount='"1.001"'), encoding="utf-8")
    with pytest.raises(PlansFileError) as raised:
        load_plans(path)
    assert str(raised.value).startswith(f"{path}: plans.basic-monthly.amount: ")


def test_plan_issue_str() -> None:
    """An issue prints as FILE: ENTRY.FIELD: MESSAGE, leaving out the parts it lacks."""
    assert str(PlanIssue("f", "plans.a", "amount", "bad")) == "f: plans.a.amount: bad"
    assert str(PlanIssue("f", "plans.a", None, "bad")) == "f: plans.a: bad"
    assert str(PlanIssue("f", None, None, "bad")) == "f: bad"
    assert issubclass(PlansFileError, ValueError)


# --- Prices over time ---------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 2, 1, tzinfo=UTC)
T2 = datetime(2026, 3, 1, tzinfo=UTC)
T3 = datetime(2026, 4, 1, tzinfo=UTC)
NEW, NEXT = PriceChange.NEW_SUBSCRIBERS, PriceChange.NEXT_PERIOD


def qar(row_id: int, amount: int, at: datetime, change: PriceChange = NEW) -> PricePoint:
    return PricePoint(row_id, amount, "QAR", at, change)


def test_a_subscriber_keeps_its_price_until_a_next_period_change_moves_it() -> None:
    """A (t0), B for new subscribers (t1), C for everyone (t2), D for new subscribers (t3): who
    signed up at A pays A until t2, then C, and still C after t3; who signed up at B pays B, then
    C; new subscribers after t3 pay D. A period is priced at its start."""
    a, b, c, d = qar(1, 5000, T0), qar(2, 6000, T1), qar(3, 7000, T2, NEXT), qar(4, 8000, T3)
    history = [a, b, c, d]
    assert price_for_new(history, T1 - timedelta(seconds=1)) == a
    assert price_for_new(history, T1) == b
    assert price_for_new(history, T3 + timedelta(days=1)) == d
    assert price_for_new(history, T0 - timedelta(days=1)) == a  # before the plan: its first
    assert price_for_new([], T0) is None
    assert subscriber_price(history, a, T1 + timedelta(days=1)) == a
    assert subscriber_price(history, a, T2) == c
    assert subscriber_price(history, a, T3 + timedelta(days=1)) == c
    assert subscriber_price(history, b, T2 - timedelta(seconds=1)) == b
    assert subscriber_price(history, b, T3) == c
    assert subscriber_price(history, d, T3 + timedelta(days=1)) == d
    assert subscriber_price(history, d, T0) == d  # a back-dated period: its own price


def test_rows_of_one_moment_apply_in_the_order_written() -> None:
    """A standing test clock: the plan's first price, a subscriber signs up at it, then a new
    price for new subscribers at the same moment: the subscriber keeps the first."""
    first, second = qar(1, 5000, T0), qar(2, 6000, T0)
    assert price_for_new([second, first], T0) == second
    assert subscriber_price([first, second], first, T1) == first
    assert subscriber_price([first, qar(2, 6000, T0, NEXT)], first, T1).amount_minor == 6000


def test_decide_price_appends_only_what_changes_something() -> None:
    """The amount in force is no change; a new amount is appended, moving no one for new
    subscribers and every payer of another amount for next_period; next_period with the amount
    unchanged moves only the grandfathered, and is no change once no one is."""
    history = [qar(1, 5000, T0), qar(2, 6000, T1)]
    old, new = Cohort(1, None, 3), Cohort(2, None, 2)
    now = T2
    assert (
        decide_price(history, [old, new], (6000, "QAR"), NEW, now, last_signed_up_at=True) is None
    )
    raised = decide_price(history, [old, new], (7000, "QAR"), NEW, now, last_signed_up_at=True)
    assert raised is not None
    assert (raised.action, raised.moved, raised.kept) == ("append", 0, 5)
    assert raised.before == history[1]
    moving = decide_price(history, [old, new], (7000, "QAR"), NEXT, now, last_signed_up_at=True)
    assert moving is not None and (moving.action, moving.moved, moving.kept) == ("append", 5, 0)
    catch_up = decide_price(history, [old, new], (6000, "QAR"), NEXT, now, last_signed_up_at=True)
    assert catch_up is not None and (catch_up.moved, catch_up.kept) == (3, 2)
    everyone = [*history, qar(3, 6000, T2, NEXT)]
    later = T2 + timedelta(days=1)
    assert (
        decide_price(everyone, [old, new], (6000, "QAR"), NEXT, later, last_signed_up_at=False)
        is None
    )


def test_decide_price_at_the_same_moment_rewrites_or_removes() -> None:
    """A row of this very moment that no one signed up at is rewritten, or removed when the
    price goes back to what it was before it; one that someone signed up at is kept."""
    history = [qar(1, 5000, T0), qar(2, 6000, T1)]
    cohorts = [Cohort(1, None, 4)]
    back = decide_price(history, cohorts, (5000, "QAR"), NEW, T1, last_signed_up_at=False)
    assert back is not None and (back.action, back.row_id, back.moved) == ("remove", 2, 0)
    again = decide_price(history, cohorts, (6500, "QAR"), NEW, T1, last_signed_up_at=False)
    assert again is not None and (again.action, again.row_id) == ("rewrite", 2)
    kept = decide_price(history, cohorts, (5000, "QAR"), NEW, T1, last_signed_up_at=True)
    assert kept is not None and (kept.action, kept.row_id) == ("append", None)
    # Everyone was moved to 6000 at this moment: a new-subscribers price now cannot undo that,
    # so the row that moved them stays and the new one is appended.
    moved = [qar(1, 5000, T0), qar(2, 6000, T1, NEXT)]
    after = decide_price(moved, cohorts, (7000, "QAR"), NEW, T1, last_signed_up_at=False)
    assert after is not None and (after.action, after.kept) == ("append", 4)
    # ... while moving them back to what they paid removes it.
    undo = decide_price(moved, cohorts, (5000, "QAR"), NEXT, T1, last_signed_up_at=False)
    assert undo is not None and (undo.action, undo.row_id, undo.moved) == ("remove", 2, 4)
    # The plan's only row, written at this moment, is rewritten in place.
    only = decide_price([qar(1, 5000, T1)], [], (6000, "QAR"), NEW, T1, last_signed_up_at=False)
    assert only is not None and (only.action, only.row_id) == ("rewrite", 1)


def test_a_subscription_with_no_recorded_price_signed_up_when_created() -> None:
    """Rows written without a price (by hand, or whose price was deleted) count as signed up at
    the plan's price for new subscribers at their creation."""
    history = [qar(1, 5000, T0), qar(2, 6000, T1)]
    cohorts = [Cohort(None, T0 + timedelta(days=1), 2), Cohort(None, T1 + timedelta(days=1), 1)]
    moving = decide_price(history, cohorts, (6000, "QAR"), NEXT, T2, last_signed_up_at=False)
    assert moving is not None and (moving.moved, moving.kept) == (2, 1)
