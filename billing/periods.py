"""Billing periods: contiguous half-open ``[start, end)`` spans of UTC time.

Two kinds of schedule produce the period boundaries:

* :class:`IntervalSchedule` -- every ``count`` days, weeks, months or years from an anchor. The
  k-th boundary is computed from the anchor, never from the previous boundary, on the anchor's
  local wall-clock time in the customer's zone. Month and year steps clamp to the month's end, so
  an anchor on 31 Jan bills on 28 Feb (29 in leap years), 31 Mar, 30 Apr, ... and never drifts.
* :class:`CronSchedule` -- a five-field cron expression evaluated on the customer's wall clock
  (with croniter); periods run from one fire to the next.

Wall-clock times that DST makes invalid are resolved by one rule, used by both schedules:

* a time in a *gap* (clocks jump forward, e.g. 02:30 on the US spring-forward day) resolves to the
  first instant after the gap (03:00 local), which is also what cron daemons do for jobs whose time
  was skipped;
* a time in a *fold* (clocks go back, so 01:30 happens twice) resolves to its first occurrence
  (PEP 495 ``fold=0``); a cron fire is billed once, not twice.

This rule maps wall-clock times to instants monotonically, which is what guarantees that
boundaries never go backwards. Several cron fires inside one gap collapse into a single boundary.

The public operations are :func:`first_period`, :func:`next_period` and
:func:`period_containing`; each returns periods whose datetimes are aware and in UTC.
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

__all__ = [
    "CronSchedule",
    "Interval",
    "IntervalSchedule",
    "Period",
    "Schedule",
    "first_period",
    "next_period",
    "period_containing",
    "validate_cron",
    "zone",
]

# The widest DST shift in use is two hours (Antarctica/Troll); cron searches start this far before
# the target on the wall clock so that a fire moved across a gap or fold is never missed.
_CRON_SEARCH_MARGIN = timedelta(hours=3)
_CRON_ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


class Interval(StrEnum):
    """Unit of an interval schedule."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


def _require_utc(name: str, value: datetime) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() != timedelta(0):
        raise ValueError(f"{name} must be an aware datetime in UTC, got {value!r}")


def _as_utc(name: str, value: datetime) -> datetime:
    """``value`` in UTC; naive datetimes are refused.

    Everything is compared in UTC: Python reports a local time in a DST fold as unequal to every
    datetime in another zone (PEP 495), which would break ``==`` between zones.
    """
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got naive {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Period:
    """A billing period ``[start, end)``: aware UTC datetimes with ``start < end``."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        _require_utc("start", self.start)
        _require_utc("end", self.end)
        if not self.start < self.end:
            raise ValueError(f"period start {self.start} must be before its end {self.end}")

    def __contains__(self, at: object) -> bool:
        return isinstance(at, datetime) and self.start <= at < self.end


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``, or ``ValueError`` if it does not exist."""
    if not isinstance(name, str):
        raise TypeError(f"time zone must be a str, not {type(name).__name__}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    """Naive local wall-clock time of ``instant`` in ``tz``."""
    return instant.astimezone(tz).replace(tzinfo=None)


def _resolve(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant for a naive wall-clock time in ``tz``, by the module's DST rule."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(first, tz) == wall:
        # Exists; fold=0 picks the first occurrence when the time is ambiguous.
        return first
    # In a gap. fold=1 applies the offset from after the transition, which lands before it; the
    # transition (the first valid instant after the gap) lies in (before, first]. Transitions fall
    # on whole seconds, so a binary search over integer timestamps finds it exactly.
    before = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    old_offset = before.astimezone(tz).utcoffset()
    lo, hi = math.floor(before.timestamp()), math.ceil(first.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(tz).utcoffset() == old_offset:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


@dataclass(frozen=True)
class IntervalSchedule:
    """Every ``count`` days, weeks, months or years from ``anchor``, at its wall time in ``tz``."""

    unit: Interval
    count: int
    anchor: datetime
    tz: str

    def __post_init__(self) -> None:
        Interval(self.unit)  # ValueError for anything that is not a unit
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"interval count must be an integer >= 1, got {self.count!r}")
        _as_utc("anchor", self.anchor)
        zone(self.tz)

    def boundary(self, k: int) -> datetime:
        """The k-th period boundary (k >= 0) in UTC; boundary 0 is the anchor itself."""
        if k < 0:
            raise ValueError(f"boundary index must be >= 0, got {k}")
        if k == 0:
            return self.anchor.astimezone(UTC)
        tz = zone(self.tz)
        return _resolve(_add_units(_wall(self.anchor, tz), Interval(self.unit), k * self.count), tz)

    def _index_at_or_before(self, at: datetime) -> int:
        """Largest k >= 0 with ``boundary(k) <= at``; requires ``at >= anchor``."""
        tz = zone(self.tz)
        start, here = _wall(self.anchor, tz), _wall(at, tz)
        unit = Interval(self.unit)
        if unit is Interval.DAY:
            units = (here.date() - start.date()).days
        elif unit is Interval.WEEK:
            units = (here.date() - start.date()).days // 7
        elif unit is Interval.MONTH:
            units = (here.year - start.year) * 12 + here.month - start.month
        else:
            units = here.year - start.year
        # The estimate is off by at most one step either way (time of day, clamping, DST).
        k = max(units // self.count, 0)
        while k > 0 and self.boundary(k) > at:
            k -= 1
        while self.boundary(k + 1) <= at:
            k += 1
        return k


def _add_units(wall: datetime, unit: Interval, n: int) -> datetime:
    """``wall`` plus ``n`` units on the calendar, clamping the day to the month's end."""
    if unit is Interval.DAY:
        return wall + timedelta(days=n)
    if unit is Interval.WEEK:
        return wall + timedelta(weeks=n)
    months = n * 12 if unit is Interval.YEAR else n
    year, month0 = divmod(wall.year * 12 + wall.month - 1 + months, 12)
    month = month0 + 1
    return wall.replace(
        year=year, month=month, day=min(wall.day, calendar.monthrange(year, month)[1])
    )


def validate_cron(expr: str) -> None:
    """Raise ``ValueError`` (with croniter's reason) unless ``expr`` is a usable cron expression.

    Accepted: the five standard fields (minute hour day-of-month month day-of-week), with what
    croniter supports inside them (``L``, ``1#2``, names), and the aliases such as
    ``@monthly``. Seconds and year fields are refused: billing more often than each minute makes no
    sense, and a sixth field would be ambiguous between the two. An expression that can never fire
    (``0 0 30 2 *``) is refused too.
    """
    if not isinstance(expr, str):
        raise TypeError(f"cron expression must be a str, not {type(expr).__name__}")
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in _CRON_ALIASES:
            raise ValueError(
                f"cron alias {text!r} is not supported (use one of {sorted(_CRON_ALIASES)})"
            )
    else:
        fields = len(re.split(r"\s+", text)) if text else 0
        if fields != 5:
            raise ValueError(
                f"cron expression {expr!r} must have 5 fields "
                f"(minute hour day-of-month month day-of-week), got {fields}"
            )
    try:
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterError as error:
        reason = str(error) or type(error).__name__
        if "failed to find" in reason:
            reason = "it never fires"
        raise ValueError(f"invalid cron expression {expr!r}: {reason}") from None


@dataclass(frozen=True)
class CronSchedule:
    """Periods from one cron fire to the next, evaluated on the wall clock of ``tz``."""

    expr: str
    tz: str

    def __post_init__(self) -> None:
        validate_cron(self.expr)
        zone(self.tz)

    def fire_after(self, instant: datetime, *, inclusive: bool = False) -> datetime:
        """First fire (UTC) after ``instant``, or at it when ``inclusive``."""
        tz = zone(self.tz)
        instant = _as_utc("instant", instant)
        # Iterate on the naive wall clock (croniter then does pure calendar arithmetic, no DST)
        # and resolve each fire; resolution is monotonic, so the first fire past ``instant`` wins.
        fires = croniter(self.expr.strip(), _wall(instant, tz) - _CRON_SEARCH_MARGIN)
        while True:
            fire = _resolve(fires.get_next(datetime), tz)
            if fire > instant or (inclusive and fire == instant):
                return fire

    def fire_at_or_before(self, instant: datetime) -> datetime:
        """Last fire (UTC) at or before ``instant``."""
        tz = zone(self.tz)
        instant = _as_utc("instant", instant)
        fires = croniter(self.expr.strip(), _wall(instant, tz) + _CRON_SEARCH_MARGIN)
        while True:
            fire = _resolve(fires.get_prev(datetime), tz)
            if fire <= instant:
                return fire


Schedule: TypeAlias = IntervalSchedule | CronSchedule


def first_period(schedule: Schedule, start: datetime) -> Period:
    """The first period that begins at or after ``start``.

    For an interval schedule whose anchor is the subscription start this is
    ``[anchor, anchor + 1 unit)``; a ``start`` before the anchor also gives that period. For a
    cron schedule it begins at the first fire at or after ``start``: the time between sign-up and
    that fire is not a billing period (a trial or a prorated charge covers it, if anything).
    """
    start = _as_utc("start", start)
    if isinstance(schedule, CronSchedule):
        begin = schedule.fire_after(start, inclusive=True)
        return Period(begin, schedule.fire_after(begin))
    if start <= schedule.boundary(0):
        return Period(schedule.boundary(0), schedule.boundary(1))
    k = schedule._index_at_or_before(start)
    if schedule.boundary(k) < start:
        k += 1
    return Period(schedule.boundary(k), schedule.boundary(k + 1))


def next_period(schedule: Schedule, period: Period) -> Period:
    """The period that follows ``period``: it starts exactly at ``period.end``.

    It ends at the schedule's first boundary after ``period.end``, so the result is contiguous
    even if ``period`` did not come from this schedule (for example after a plan change).
    """
    if isinstance(schedule, CronSchedule):
        return Period(period.end, schedule.fire_after(period.end))
    if period.end < schedule.boundary(0):
        return Period(period.end, schedule.boundary(0))
    k = schedule._index_at_or_before(period.end)
    return Period(period.end, schedule.boundary(k + 1))


def period_containing(schedule: Schedule, at: datetime) -> Period:
    """The schedule's period with ``start <= at < end``.

    ``ValueError`` for an interval schedule when ``at`` is before its anchor: no period exists.
    """
    at = _as_utc("at", at)
    if isinstance(schedule, CronSchedule):
        begin = schedule.fire_at_or_before(at)
        return Period(begin, schedule.fire_after(begin))
    if at < schedule.boundary(0):
        raise ValueError(f"{at} is before the schedule's anchor {schedule.anchor}")
    k = schedule._index_at_or_before(at)
    return Period(schedule.boundary(k), schedule.boundary(k + 1))
