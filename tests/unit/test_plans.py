"""The plans file: the documented format, and every mistake reported at once."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from billing.dunning import STANDARD, DunningPolicy, FinalAction
from billing.periods import CronSchedule, Interval, IntervalSchedule
from billing.plans import PlanIssue, PlansFileError, PlanSpec, load_plans, parse_plans

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
    """Optional keys default (count 1, no trial, standard dunning) and standard is built in."""
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
        )
    }
    assert config.dunning == {"standard": STANDARD}


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
