"""The plans file: a TOML file of plans and dunning policies, validated all at once.

Format (see ``plans.example.toml``)::

    [plans.basic-monthly]
    name = "Basic"
    amount = "50.00"        # a decimal *string*, in the currency's major unit
    currency = "QAR"
    interval = "month"      # day | week | month | year; or cron = "0 9 * * MON" instead
    interval_count = 1      # optional, default 1
    trial_days = 0          # optional, default 0
    dunning = "standard"    # optional, default "standard"
    description = "..."     # optional
    price_change = "new_subscribers"  # optional: who a new amount applies to (see below)

    [dunning.standard]
    retry_after_days = [1, 3, 5, 7]   # after the first failed charge of an invoice
    final_action = "cancel"           # cancel | unpaid | pause

When a sync finds a plan's amount changed, ``price_change`` says who pays the new amount:
``"new_subscribers"`` (the default) gives it to subscriptions created from then on, while
existing subscriptions keep the price they signed up at (grandfathering); ``"next_period"`` moves
every existing subscription to it too, from its next period. A plan's price history is a list of
:class:`PricePoint`; :func:`subscriber_price` is the one rule that reads it.

A file with mistakes raises :class:`PlansFileError` listing every mistake, one per line, as
``FILE: plans.CODE.FIELD: message``, so an operator fixes them in one pass instead of one per
restart. The built-in ``standard`` dunning policy exists only when the file defines none.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cache
from typing import Any

from babel.core import get_global
from babel.numbers import get_territory_currencies

from billing.dunning import STANDARD, DunningPolicy, FinalAction, retry_days_problem
from billing.money import (
    UnknownCurrency,
    format_money,
    from_minor,
    normalize_currency,
    parse_amount,
    parse_decimal,
    to_minor,
)
from billing.periods import CronSchedule, Interval, IntervalSchedule, Schedule, validate_cron

__all__ = [
    "PlanIssue",
    "PlanSpec",
    "PlansConfig",
    "PlansFileError",
    "PriceChange",
    "PricePoint",
    "load_plans",
    "parse_plans",
    "price_for_new",
    "subscriber_price",
]

CODE_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")

_PLAN_REQUIRED = ("name", "amount", "currency")
_PLAN_KEYS = frozenset(
    {
        *_PLAN_REQUIRED,
        "interval",
        "interval_count",
        "cron",
        "trial_days",
        "dunning",
        "description",
        "price_change",
    }
)
_DUNNING_KEYS = frozenset({"retry_after_days", "final_action"})
_TOP_LEVEL = ("plans", "dunning")

# What the database and the calendar can hold (the plans, plan_prices and dunning_policies
# columns; dates end in year 9999): a file past these is refused here, not half-written later.
_MAX_CODE, _MAX_NAME, _MAX_CRON = 64, 200, 120
_MAX_MINOR = 2**63 - 1  # plan_prices.amount_minor is a BIGINT
_MAX_DAYS = 36_500  # trial_days and dunning offsets: a hundred years
_MAX_COUNT = {"day": 36_500, "week": 5_200, "month": 1_200, "year": 100}  # a hundred years
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # NUL breaks PostgreSQL text

_Fail = Callable[[str, str], None]


class PriceChange(StrEnum):
    """Who a plan's new amount applies to."""

    NEW_SUBSCRIBERS = "new_subscribers"  # subscriptions created from then on (grandfathering)
    NEXT_PERIOD = "next_period"  # also every existing subscription, from its next period


# What a plans file means when it does not say: existing subscribers keep their price.
DEFAULT_PRICE_CHANGE = PriceChange.NEW_SUBSCRIBERS


@dataclass(frozen=True)
class PlanIssue:
    """One mistake in a plans file; ``entry`` and ``field`` are ``None`` when not applicable."""

    file: str
    entry: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = ".".join(part for part in (self.entry, self.field) if part)
        if not where.isprintable():
            where = repr(where)  # a key with control characters must not drive the terminal
        return f"{self.file}: {where}: {self.message}" if where else f"{self.file}: {self.message}"


class PlansFileError(ValueError):
    """The plans file is invalid; ``errors`` holds every issue found, section by section."""

    def __init__(self, errors: list[PlanIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in errors))
        self.errors = errors


@dataclass(frozen=True)
class PlanSpec:
    """A validated plan: either an interval plan or a cron plan, never both."""

    code: str
    name: str
    amount: Decimal
    currency: str
    interval: Interval | None
    interval_count: int
    cron: str | None
    trial_days: int
    dunning: str
    description: str | None = None
    # A spec built in code moves existing subscribers, as every price change did before the
    # plans file could say otherwise; the file's own default is DEFAULT_PRICE_CHANGE.
    price_change: PriceChange = PriceChange.NEXT_PERIOD

    def __post_init__(self) -> None:
        if (self.interval is None) == (self.cron is None):
            raise ValueError(f"plan {self.code!r} needs exactly one of interval and cron")
        if self.interval_count < 1:
            raise ValueError(f"plan {self.code!r}: interval_count must be >= 1")
        if self.trial_days < 0:
            raise ValueError(f"plan {self.code!r}: trial_days must be >= 0")

    def schedule(self, anchor: datetime, tz: str) -> Schedule:
        """The billing schedule of a subscription to this plan, anchored at ``anchor`` in ``tz``."""
        if self.interval is not None:
            return IntervalSchedule(self.interval, self.interval_count, anchor, tz)
        assert self.cron is not None  # guaranteed by __post_init__
        return CronSchedule(self.cron, tz)


@dataclass(frozen=True)
class PlansConfig:
    """All plans and dunning policies from one file, by code; ``source`` names the file."""

    plans: dict[str, PlanSpec]
    dunning: dict[str, DunningPolicy] = field(default_factory=lambda: {"standard": STANDARD})
    source: str = "plans file"

    def dunning_for(self, plan: PlanSpec) -> DunningPolicy:
        """The dunning policy that ``plan`` refers to."""
        return self.dunning[plan.dunning]


def load_plans(path: str | os.PathLike[str]) -> PlansConfig:
    """Read and validate the plans file at ``path``."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise PlansFileError(
            [PlanIssue(source, None, None, f"cannot read: {error.strerror}")]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            message = "not UTF-8 but UTF-16: save the file as UTF-8"
        else:
            before = data[: error.start]
            line = before.count(b"\n") + 1
            column = error.start - (before.rfind(b"\n") + 1) + 1
            where = _where(before.decode("utf-8", "replace"), line)
            message = f"not UTF-8: {error.reason} (at line {line}, column {column}){where}"
        raise PlansFileError([PlanIssue(source, None, None, message)]) from None
    return parse_plans(text, source)


def parse_plans(text: str, source: str) -> PlansConfig:
    """Validate plans-file ``text``; ``source`` names the file in error messages."""
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write is no mistake
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The message carries "(at line N, column M)"; duplicate tables and keys land here too.
        found = re.search(r"at line (\d+)", str(error))
        where = _where(text, int(found.group(1))) if found else ""
        message = f"invalid TOML: {error}{where}"
        raise PlansFileError([PlanIssue(source, None, None, message)]) from None
    except (ValueError, RecursionError) as error:
        # What tomllib lets through: an integer past Python's digit limit, or arrays and inline
        # tables nested deeper than the parser's recursion allows.
        # Neither says where: blame the line with the most brackets, or the longest number.
        deep = isinstance(error, RecursionError)
        why = "arrays or tables nested too deeply" if deep else "a number with too many digits"
        lines = text.split("\n")

        def weight(number: int) -> int:
            content = lines[number - 1]
            if deep:
                return content.count("[") + content.count("{")
            return max(map(len, re.findall(r"[0-9_]+", content)), default=0)

        line = max(range(1, len(lines) + 1), key=weight)
        message = f"invalid TOML: {why} (at line {line}){_where(text, line)}"
        raise PlansFileError([PlanIssue(source, None, None, message)]) from None
    return _Validator(source).run(document)


_HEADER_RE = re.compile(r"\s*\[+\s*([^\]#]*?)\s*(?:\]|#|$)")
_LEADING_KEY_RE = re.compile(r"\s*([A-Za-z0-9_-]+)")


def _where(text: str, line: int) -> str:
    """Where a mistake on ``line`` of ``text`` is, as ``", in 'ENTRY.FIELD'"``: the table header
    above it and the key the line starts with, as far as a file that does not parse tells."""
    lines = text.split("\n")[:line]
    entry = None
    for content in lines:
        header = _HEADER_RE.match(content)
        if header:
            entry = re.sub(r"\s*\.\s*", ".", header.group(1)) or entry
    key = _LEADING_KEY_RE.match(lines[-1]) if lines and not _HEADER_RE.match(lines[-1]) else None
    where = ".".join(part for part in (entry, key.group(1) if key else None) if part)
    return f", in {where!r}" if where else ""


@cache
def _tender() -> frozenset[str]:
    """The currencies legal tender in some territory today, by CLDR (through Babel): the codes
    Babel knows also name dead currencies (DEM, VEF), metals (XAU), test and no-currency codes
    (XTS, XXX), none of which a card is charged in."""
    territories = get_global("territory_currencies")
    return frozenset(
        code for territory in territories for code in get_territory_currencies(territory)
    )


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), f"a {type(value).__name__}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Validator:
    """Collects every issue in a parsed document instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.issues: list[PlanIssue] = []

    def error(self, entry: str | None, field_name: str | None, message: str) -> None:
        self.issues.append(PlanIssue(self.source, entry, field_name, message))

    def has_issue(self, entry: str) -> bool:
        return any(issue.entry == entry for issue in self.issues)

    def run(self, document: Mapping[str, Any]) -> PlansConfig:
        for key in document:
            if key not in _TOP_LEVEL:
                self.error(key, None, f"unknown top-level table {key!r}{_hint(key, _TOP_LEVEL)}")

        if "dunning" in document:
            declared, policies = self.dunning_section(document["dunning"])
        else:
            declared, policies = {STANDARD.code}, {STANDARD.code: STANDARD}
        plans = self.plans_section(document.get("plans"), declared)

        if self.issues:
            raise PlansFileError(self.issues)
        return PlansConfig(plans=plans, dunning=policies, source=self.source)

    def entries(
        self, section: str, table: object, allowed: frozenset[str]
    ) -> list[tuple[str, Mapping[str, Any]]]:
        """The ``[section.CODE]`` entries that are tables, in file order."""
        if not isinstance(table, dict):
            self.error(section, None, f"must be a table of entries, not {_type_name(table)}")
            return []
        seen: dict[str, str] = {}
        good: list[tuple[str, Mapping[str, Any]]] = []
        for code, body in table.items():
            entry = f"{section}.{code}"
            if not CODE_RE.fullmatch(code):
                self.error(entry, None, f"code {code!r} must match {CODE_RE.pattern}")
            elif len(code) > _MAX_CODE:
                self.error(entry, None, f"code is {len(code)} characters long, at most {_MAX_CODE}")
            if code.lower() in seen:
                first = seen[code.lower()]
                self.error(entry, None, f"code {code!r} duplicates {first!r} (case-insensitive)")
            seen.setdefault(code.lower(), code)
            if not isinstance(body, dict):
                self.error(entry, None, f"must be a table, not {_type_name(body)}")
                continue
            for key in body:
                if key not in allowed:
                    self.error(entry, key, f"unknown key {key!r}{_hint(key, allowed)}")
            # An entry with a bad code is still checked, so that all its mistakes show at once;
            # has_issue() then keeps it out of the result.
            good.append((code, body))
        return good

    def dunning_section(self, table: object) -> tuple[set[str], dict[str, DunningPolicy]]:
        """Declared policy codes (so plans can refer to a broken one) and the valid policies."""
        entries = self.entries("dunning", table, _DUNNING_KEYS)
        policies = {}
        for code, body in entries:
            entry = f"dunning.{code}"
            days = body.get("retry_after_days")
            if days is None:
                self.error(entry, "retry_after_days", "missing required key")
            else:
                problem = retry_days_problem(days)
                if problem:
                    self.error(entry, "retry_after_days", problem)
                elif max(days) > _MAX_DAYS:
                    most = f"days must be at most {_MAX_DAYS}, got {max(days)}"
                    self.error(entry, "retry_after_days", most)
            action = body.get("final_action")
            if action is None:
                self.error(entry, "final_action", "missing required key")
            elif action not in tuple(FinalAction):
                choices = ", ".join(FinalAction)
                self.error(
                    entry, "final_action", f"final_action {action!r} is not one of {choices}"
                )
            if days is not None and action is not None and not self.has_issue(entry):
                policies[code] = DunningPolicy(code, tuple(days), FinalAction(action))
        return {code for code, _ in entries if CODE_RE.fullmatch(code)}, policies

    def plans_section(self, table: object, policies: set[str]) -> dict[str, PlanSpec]:
        if table is None or table == {}:
            self.error(None, None, "the file defines no plans (expected [plans.CODE] tables)")
            return {}
        plans = {}
        for code, body in self.entries("plans", table, _PLAN_KEYS):
            plan = self.plan(code, body, policies)
            if plan is not None:
                plans[code] = plan
        return plans

    def plan(self, code: str, body: Mapping[str, Any], policies: set[str]) -> PlanSpec | None:
        entry = f"plans.{code}"

        def fail(field_name: str, message: str) -> None:
            self.error(entry, field_name, message)

        for key in _PLAN_REQUIRED:
            if key not in body:
                fail(key, "missing required key")

        name = body.get("name")
        if "name" in body and (not isinstance(name, str) or not name.strip()):
            fail("name", "name must be a non-empty string")
        elif isinstance(name, str) and len(name.strip()) > _MAX_NAME:
            fail("name", f"name is {len(name.strip())} characters long, at most {_MAX_NAME}")
        elif isinstance(name, str) and any(ch < " " or ch == "\x7f" for ch in name):
            fail("name", "name must not contain control characters (tabs, line breaks, NUL...)")

        currency: str | None = None
        if "currency" in body:
            raw = body["currency"]
            if not isinstance(raw, str):
                fail("currency", f'currency must be a string like "QAR", not {_type_name(raw)}')
            else:
                try:
                    currency = normalize_currency(raw)
                except UnknownCurrency as error:
                    fail("currency", str(error))
                else:
                    if currency not in _tender():
                        fail("currency", f"{currency} is not legal tender anywhere today")
                        currency = None

        amount = _amount(body, currency, fail)
        interval, cron = self.timing(body, fail)

        interval_count = body.get("interval_count", 1)
        if "interval_count" in body and "interval" not in body and "cron" in body:
            fail("interval_count", "interval_count applies to interval plans, not cron plans")
        elif not _is_int(interval_count) or interval_count < 1:
            fail(
                "interval_count", f"interval_count must be an integer >= 1, got {interval_count!r}"
            )
        elif interval is not None and interval_count > _MAX_COUNT[interval.value]:
            most = f"at most {_MAX_COUNT[interval.value]} for a {interval.value} plan"
            fail("interval_count", f"interval_count must be {most}, got {interval_count}")

        trial_days = body.get("trial_days", 0)
        if not _is_int(trial_days) or trial_days < 0:
            fail("trial_days", f"trial_days must be an integer >= 0, got {trial_days!r}")
        elif trial_days > _MAX_DAYS:
            fail("trial_days", f"trial_days must be at most {_MAX_DAYS}, got {trial_days}")

        dunning = body.get("dunning", STANDARD.code)
        if not isinstance(dunning, str):
            fail("dunning", f"dunning must be a policy code string, not {_type_name(dunning)}")
        elif dunning not in policies:
            known = ", ".join(sorted(policies)) or "none"
            fail("dunning", f"unknown dunning policy {dunning!r} (defined: {known})")

        description = body.get("description")
        if description is not None and not isinstance(description, str):
            fail("description", f"description must be a string, not {_type_name(description)}")
        elif description is not None and _CONTROL_RE.search(description):
            fail("description", "description must not contain control characters (NUL...)")

        price_change = body.get("price_change", DEFAULT_PRICE_CHANGE.value)
        if not isinstance(price_change, str):
            fail(
                "price_change",
                f"price_change must be a string, not {_type_name(price_change)}"
                f" (one of {', '.join(PriceChange)})",
            )
        elif price_change not in tuple(PriceChange):
            fail(
                "price_change",
                f"price_change {price_change!r} is not one of {', '.join(PriceChange)}"
                f"{_hint(price_change, [c.value for c in PriceChange])}",
            )

        if self.has_issue(entry):
            return None
        assert isinstance(name, str) and amount is not None and currency is not None
        return PlanSpec(
            code=code,
            name=name.strip(),
            amount=amount,
            currency=currency,
            interval=interval,
            interval_count=interval_count,
            cron=cron,
            trial_days=trial_days,
            dunning=dunning,
            description=description,
            price_change=PriceChange(price_change),
        )

    @staticmethod
    def timing(body: Mapping[str, Any], fail: _Fail) -> tuple[Interval | None, str | None]:
        """The plan's interval or cron expression: exactly one must be given."""
        interval: Interval | None = None
        cron: str | None = None
        has_interval, has_cron = "interval" in body, "cron" in body
        if has_interval and has_cron:
            fail("cron", "give either interval or cron, not both")
        elif not has_interval and not has_cron:
            fail("interval", "missing: give interval (day, week, month or year) or cron")
        if has_interval:
            raw = body["interval"]
            if raw in tuple(Interval):
                interval = Interval(raw)
            else:
                fail("interval", f"interval {raw!r} is not one of {', '.join(Interval)}")
        if has_cron:
            raw = body["cron"]
            if not isinstance(raw, str):
                fail("cron", f"cron must be a string, not {_type_name(raw)}")
            elif len(raw.strip()) > _MAX_CRON:
                fail("cron", f"cron is {len(raw.strip())} characters long, at most {_MAX_CRON}")
            else:
                try:
                    validate_cron(raw)
                    cron = raw.strip()
                except ValueError as error:
                    fail("cron", str(error))
        return interval, cron


def _amount(body: Mapping[str, Any], currency: str | None, fail: _Fail) -> Decimal | None:
    if "amount" not in body:
        return None
    raw = body["amount"]
    if isinstance(raw, float):
        fail(
            "amount",
            f'amount must be a string such as "{raw}" (in quotes), not the TOML float {raw}:'
            " a float cannot hold money exactly",
        )
        return None
    if not isinstance(raw, str):
        fail("amount", f'amount must be a decimal string such as "50.00", not {_type_name(raw)}')
        return None
    if len(raw) > len(str(_MAX_MINOR)) + 2:  # the digits and a point, whatever the currency
        fail("amount", f"amount has {len(raw)} characters: no currency allows that many digits")
        return None
    try:
        if currency is None:
            # The decimals depend on the currency, which is reported on its own; still check the
            # syntax and the sign so that every mistake shows up in one pass.
            parse_decimal(raw)
            return None
        amount = parse_amount(raw, currency)
        if to_minor(amount, currency) > _MAX_MINOR:
            most = format_money(from_minor(_MAX_MINOR, currency), currency)
            fail("amount", f'amount "{raw}" is too large: at most {most}')
            return None
        return amount
    except ValueError as error:
        fail("amount", str(error))
        return None


# -- prices over time (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class PricePoint:
    """One row of a plan's price history: ``amount_minor`` of ``currency`` from
    ``effective_from`` on, for new subscriptions and, if ``change`` is ``next_period``, for
    every existing one from its next period. Rows are ordered by (``effective_from``, ``id``):
    two rows of the same moment (a test clock that stands still) apply in the order written."""

    id: int
    amount_minor: int
    currency: str
    effective_from: datetime
    change: PriceChange

    @property
    def order(self) -> tuple[datetime, int]:
        return (self.effective_from, self.id)

    @property
    def money(self) -> tuple[int, str]:
        return (self.amount_minor, self.currency)


def price_for_new(history: Sequence[PricePoint], at: datetime) -> PricePoint | None:
    """The price a subscription created at ``at`` signs up at: the latest row in force then
    (the plan's first row if ``at`` is before it); ``None`` for a plan with no price at all."""
    if not history:
        return None
    in_force = [point for point in history if point.effective_from <= at]
    if in_force:
        return max(in_force, key=lambda point: point.order)
    return min(history, key=lambda point: point.order)


def subscriber_price(history: Sequence[PricePoint], signed: PricePoint, at: datetime) -> PricePoint:
    """What a subscription that signed up at ``signed`` pays for a period starting at ``at``:
    its own price, unless a ``next_period`` change written after it has taken effect by then,
    in which case the latest such change. A ``new_subscribers`` change never moves it."""
    moves = [
        point
        for point in history
        if point.change is PriceChange.NEXT_PERIOD
        and point.order > signed.order
        and point.effective_from <= at
    ]
    return max(moves, key=lambda point: point.order, default=signed)
