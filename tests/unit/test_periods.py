"""Billing periods: contiguity, month-end clamping, and DST on the customer's wall clock."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from billing.periods import (
    CronSchedule,
    Interval,
    IntervalSchedule,
    Period,
    Schedule,
    first_period,
    next_period,
    period_containing,
    validate_cron,
)

ZONES = [
    "UTC",
    "Asia/Qatar",
    "Europe/London",
    "America/New_York",
    "Australia/Lord_Howe",  # 30-minute DST
    "Asia/Kathmandu",  # +05:45, no DST
]


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(tz: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz))


def walk(schedule: Schedule, start: datetime, count: int) -> list[Period]:
    periods = [first_period(schedule, start)]
    while len(periods) < count:
        periods.append(next_period(schedule, periods[-1]))
    return periods


def starts(periods: list[Period]) -> list[datetime]:
    return [p.start for p in periods]


def assert_contiguous(periods: list[Period]) -> None:
    for before, after in pairwise(periods):
        assert before.start < before.end == after.start < after.end


# --- Period ---------------------------------------------------------------------------------


def test_period_requires_aware_utc_and_order() -> None:
    """A period is [start, end) in UTC with start < end; anything else is refused."""
    Period(utc(2026, 1, 1), utc(2026, 2, 1))
    with pytest.raises(ValueError, match="UTC"):
        Period(datetime(2026, 1, 1), utc(2026, 2, 1))
    with pytest.raises(ValueError, match="UTC"):
        Period(local("Asia/Qatar", 2026, 1, 1), utc(2026, 2, 1))
    with pytest.raises(ValueError, match="before"):
        Period(utc(2026, 1, 1), utc(2026, 1, 1))


def test_period_is_half_open() -> None:
    """The end instant belongs to the next period, never to two."""
    period = Period(utc(2026, 1, 1), utc(2026, 2, 1))
    assert utc(2026, 1, 1) in period
    assert utc(2026, 2, 1) not in period


# --- Interval schedules: examples -----------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor_day", "year", "expected"),
    [
        (31, 2026, [(1, 31), (2, 28), (3, 31), (4, 30), (5, 31), (6, 30)]),
        (30, 2026, [(1, 30), (2, 28), (3, 30), (4, 30), (5, 30), (6, 30)]),
        (29, 2026, [(1, 29), (2, 28), (3, 29), (4, 29), (5, 29), (6, 29)]),
        (31, 2028, [(1, 31), (2, 29), (3, 31), (4, 30), (5, 31), (6, 30)]),
        (30, 2028, [(1, 30), (2, 29), (3, 30), (4, 30), (5, 30), (6, 30)]),
        (29, 2028, [(1, 29), (2, 29), (3, 29), (4, 29), (5, 29), (6, 29)]),
    ],
)
def test_month_end_anchors_clamp_and_come_back(
    anchor_day: int, year: int, expected: list[tuple[int, int]]
) -> None:
    """A late-January anchor clamps in February (29 in leap years) and returns to its day after."""
    anchor = local("Asia/Qatar", year, 1, anchor_day, 10, 0)
    schedule = IntervalSchedule(Interval.MONTH, 1, anchor, "Asia/Qatar")
    periods = walk(schedule, anchor, 6)
    tz = ZoneInfo("Asia/Qatar")
    got = [(p.start.astimezone(tz).month, p.start.astimezone(tz).day) for p in periods]
    assert got == expected
    assert all(p.start.astimezone(tz).hour == 10 for p in periods)
    assert_contiguous(periods)


def test_leap_day_yearly_anchor() -> None:
    """A 29 Feb yearly anchor bills on 28 Feb in common years and 29 Feb in leap years."""
    anchor = utc(2028, 2, 29, 12)
    schedule = IntervalSchedule(Interval.YEAR, 1, anchor, "UTC")
    assert starts(walk(schedule, anchor, 6)) == [
        utc(2028, 2, 29, 12),
        utc(2029, 2, 28, 12),
        utc(2030, 2, 28, 12),
        utc(2031, 2, 28, 12),
        utc(2032, 2, 29, 12),
        utc(2033, 2, 28, 12),
    ]


def test_quarterly_counts_from_the_anchor() -> None:
    """With count 3, the k-th boundary is anchor + 3k months, clamped, with no drift."""
    anchor = utc(2026, 11, 30)
    schedule = IntervalSchedule(Interval.MONTH, 3, anchor, "UTC")
    assert starts(walk(schedule, anchor, 5)) == [
        utc(2026, 11, 30),
        utc(2027, 2, 28),
        utc(2027, 5, 30),
        utc(2027, 8, 30),
        utc(2027, 11, 30),
    ]


def test_weekly_kwd_plan() -> None:
    """A weekly plan in Kuwait bills every 7 days at the anchor's local time."""
    anchor = local("Asia/Kuwait", 2026, 2, 26, 18, 30)  # a Thursday
    schedule = IntervalSchedule(Interval.WEEK, 1, anchor, "Asia/Kuwait")
    periods = walk(schedule, anchor, 6)
    assert starts(periods) == [utc(2026, 2, 26, 15, 30) + timedelta(weeks=k) for k in range(6)]
    assert all(p.end - p.start == timedelta(weeks=1) for p in periods)


def test_daily_interval_keeps_local_time_across_dst() -> None:
    """Daily billing stays at the same wall-clock time; the DST day is 23 hours long."""
    anchor = local("Europe/London", 2026, 3, 28, 9)
    schedule = IntervalSchedule(Interval.DAY, 1, anchor, "Europe/London")
    periods = walk(schedule, anchor, 3)
    assert starts(periods) == [utc(2026, 3, 28, 9), utc(2026, 3, 29, 8), utc(2026, 3, 30, 8)]
    assert periods[0].end - periods[0].start == timedelta(hours=23)


def test_interval_boundary_in_dst_gap_moves_to_the_gap_end() -> None:
    """A boundary at 02:30 on the US spring-forward day resolves to 03:00 local, once."""
    anchor = local("America/New_York", 2026, 2, 8, 2, 30)
    schedule = IntervalSchedule(Interval.MONTH, 1, anchor, "America/New_York")
    assert starts(walk(schedule, anchor, 3)) == [
        utc(2026, 2, 8, 7, 30),  # 02:30 EST
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT: 02:30 does not exist that day
        utc(2026, 4, 8, 6, 30),  # 02:30 EDT
    ]


def test_interval_boundary_in_dst_fold_takes_the_first_occurrence() -> None:
    """01:30 happens twice on the US fall-back day; the boundary is the first one (EDT)."""
    anchor = local("America/New_York", 2026, 10, 1, 1, 30)
    schedule = IntervalSchedule(Interval.MONTH, 1, anchor, "America/New_York")
    assert starts(walk(schedule, anchor, 2))[1] == utc(2026, 11, 1, 5, 30)


def test_first_period_of_an_interval_schedule_starts_at_the_anchor() -> None:
    """The first period is [anchor, anchor + 1 unit), also when asked for an earlier start."""
    anchor = utc(2026, 1, 31, 8)
    schedule = IntervalSchedule(Interval.MONTH, 1, anchor, "UTC")
    expected = Period(anchor, utc(2026, 2, 28, 8))
    assert first_period(schedule, anchor) == expected
    assert first_period(schedule, utc(2025, 1, 1)) == expected
    # Later starts give the first period that begins at or after them.
    assert first_period(schedule, utc(2026, 2, 1)).start == utc(2026, 2, 28, 8)
    assert first_period(schedule, utc(2026, 2, 28, 8)).start == utc(2026, 2, 28, 8)


def test_period_containing_interval() -> None:
    """period_containing finds the period with start <= at < end; none exists before the anchor."""
    anchor = utc(2026, 1, 31, 8)
    schedule = IntervalSchedule(Interval.MONTH, 1, anchor, "UTC")
    assert period_containing(schedule, utc(2026, 3, 31, 7, 59)) == Period(
        utc(2026, 2, 28, 8), utc(2026, 3, 31, 8)
    )
    assert period_containing(schedule, utc(2026, 3, 31, 8)).start == utc(2026, 3, 31, 8)
    with pytest.raises(ValueError, match="before the schedule's anchor"):
        period_containing(schedule, utc(2026, 1, 31, 7))


def test_next_period_is_contiguous_even_for_a_foreign_period() -> None:
    """next_period always starts at the given end, and ends on the schedule's next boundary."""
    schedule = IntervalSchedule(Interval.MONTH, 1, utc(2026, 1, 15), "UTC")
    odd = Period(utc(2026, 2, 1), utc(2026, 2, 20))
    assert next_period(schedule, odd) == Period(utc(2026, 2, 20), utc(2026, 3, 15))
    early = Period(utc(2025, 12, 1), utc(2026, 1, 1))
    assert next_period(schedule, early) == Period(utc(2026, 1, 1), utc(2026, 1, 15))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 0},
        {"count": True},
        {"anchor": datetime(2026, 1, 1)},
        {"tz": "Mars/Olympus_Mons"},
        {"unit": "fortnight"},
    ],
)
def test_interval_schedule_validation(kwargs: dict[str, object]) -> None:
    """A schedule with a bad count, naive anchor, unknown zone or unit cannot be built."""
    args: dict[str, object] = {
        "unit": Interval.MONTH,
        "count": 1,
        "anchor": utc(2026, 1, 1),
        "tz": "UTC",
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        IntervalSchedule(**args)  # type: ignore[arg-type]


# --- Interval schedules: properties ---------------------------------------------------------


@st.composite
def anchors(draw: st.DrawFn) -> tuple[datetime, str]:
    """Anchors biased to month ends, leap days and the early-morning DST hours."""
    tz = draw(st.sampled_from(ZONES))
    year = draw(st.integers(2000, 2035))
    month = draw(st.integers(1, 12))
    last = calendar.monthrange(year, month)[1]
    day = draw(st.sampled_from([1, 15, 28, 29, 30, 31, last]) | st.integers(1, 31))
    day = min(day, last)
    hour = draw(st.sampled_from([0, 1, 2, 3, 23]) | st.integers(0, 23))
    minute = draw(st.sampled_from([0, 15, 30, 45]) | st.integers(0, 59))
    micro = draw(st.sampled_from([0, 999_999]))
    wall = datetime(year, month, day, hour, minute, 0, micro)
    return wall.replace(tzinfo=ZoneInfo(tz)), tz


def expected_wall(anchor_wall: datetime, unit: Interval, n: int) -> datetime:
    """Independent statement of the calendar rule: anchor + n units, day clamped to month end."""
    if unit is Interval.DAY:
        return anchor_wall + timedelta(days=n)
    if unit is Interval.WEEK:
        return anchor_wall + timedelta(days=7 * n)
    step = 12 * n if unit is Interval.YEAR else n
    year = anchor_wall.year + (anchor_wall.month - 1 + step) // 12
    month = (anchor_wall.month - 1 + step) % 12 + 1
    day = min(anchor_wall.day, calendar.monthrange(year, month)[1])
    return datetime.combine(date(year, month, day), anchor_wall.time())


def wall_exists(wall: datetime, tz: ZoneInfo) -> bool:
    return wall.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anchors(), st.sampled_from(list(Interval)), st.integers(1, 12))
def test_interval_periods_over_five_years(
    anchored: tuple[datetime, str], unit: Interval, count: int
) -> None:
    """Over 5+ years: contiguous, strictly increasing, every boundary on the clamped anchor day.

    Each boundary's local wall time is the anchor's wall time (or, when that does not exist
    because of DST, the first valid time after the gap, less than 2 hours later).
    """
    anchor, tz_name = anchored
    tz = ZoneInfo(tz_name)
    schedule = IntervalSchedule(unit, count, anchor, tz_name)
    horizon = anchor + timedelta(days=5 * 366)
    periods = [first_period(schedule, anchor)]
    while periods[-1].end < horizon:
        periods.append(next_period(schedule, periods[-1]))
    assert periods[0].start == anchor.astimezone(UTC)
    assert_contiguous(periods)

    anchor_wall = anchor.astimezone(tz).replace(tzinfo=None)
    for k, period in enumerate(periods):
        if k == 0:
            continue
        want = expected_wall(anchor_wall, unit, k * count)
        got = period.start.astimezone(tz).replace(tzinfo=None)
        if wall_exists(want, tz):
            assert got == want
            # A time in a fold resolves to its first occurrence.
            assert period.start == want.replace(tzinfo=tz, fold=0).astimezone(UTC)
        else:
            assert want < got < want + timedelta(hours=2)
            assert (period.start - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None) < want
        assert got.date() == want.date() or not wall_exists(want, tz)

    # Every instant belongs to exactly the period that the walk produced.
    for period in periods[:: max(1, len(periods) // 20)]:
        assert period_containing(schedule, period.start) == period
        assert period_containing(schedule, period.end - timedelta(microseconds=1)) == period


# --- Cron schedules: examples ---------------------------------------------------------------


def test_weekly_cron_in_london_across_both_dst_changes() -> None:
    """`0 9 * * MON` stays 09:00 London time: 09:00 UTC in winter, 08:00 UTC in summer."""
    schedule = CronSchedule("0 9 * * MON", "Europe/London")
    march = starts(walk(schedule, utc(2026, 3, 16), 4))
    assert march == [
        utc(2026, 3, 16, 9),
        utc(2026, 3, 23, 9),
        utc(2026, 3, 30, 8),
        utc(2026, 4, 6, 8),
    ]
    october = starts(walk(schedule, utc(2026, 10, 12), 4))
    assert october == [
        utc(2026, 10, 12, 8),
        utc(2026, 10, 19, 8),
        utc(2026, 10, 26, 9),
        utc(2026, 11, 2, 9),
    ]
    tz = ZoneInfo("Europe/London")
    assert all(s.astimezone(tz).hour == 9 for s in march + october)


def test_daily_cron_on_new_york_spring_forward_day() -> None:
    """02:30 does not exist on 8 Mar 2026 in New York: that day's fire is 03:00 EDT, once."""
    schedule = CronSchedule("30 2 * * *", "America/New_York")
    periods = walk(schedule, utc(2026, 3, 7), 3)
    assert starts(periods) == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]
    assert [p.end - p.start for p in periods[:2]] == [timedelta(hours=23, minutes=30)] * 2


def test_daily_cron_on_new_york_fall_back_day_fires_once() -> None:
    """01:30 happens twice on 1 Nov 2026; the cron fires at the first one only."""
    schedule = CronSchedule("30 1 * * *", "America/New_York")
    periods = walk(schedule, utc(2026, 10, 31), 3)
    assert starts(periods) == [
        utc(2026, 10, 31, 5, 30),
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
    ]
    assert periods[1].end - periods[1].start == timedelta(hours=25)


def test_cron_in_lord_howe_half_hour_gap() -> None:
    """Lord Howe skips 02:00-02:30 on 4 Oct 2026: a 02:15 fire moves to 02:30 local (+11)."""
    schedule = CronSchedule("15 2 * * *", "Australia/Lord_Howe")
    periods = walk(schedule, utc(2026, 10, 2, 15), 3)
    assert starts(periods) == [
        utc(2026, 10, 2, 15, 45),  # 02:15 +10:30 on 3 Oct
        utc(2026, 10, 3, 15, 30),  # 02:30 +11 on 4 Oct: the gap end
        utc(2026, 10, 4, 15, 15),  # 02:15 +11 on 5 Oct
    ]


def test_frequent_cron_through_a_gap_collapses_to_one_boundary() -> None:
    """Several fires inside a DST gap become one boundary: periods never have zero length."""
    schedule = CronSchedule("*/15 * * * *", "America/New_York")
    periods = walk(schedule, utc(2026, 3, 8, 6, 30), 4)
    assert starts(periods) == [
        utc(2026, 3, 8, 6, 30),  # 01:30 EST
        utc(2026, 3, 8, 6, 45),  # 01:45 EST
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT, standing for 02:00-02:45 and 03:00
        utc(2026, 3, 8, 7, 15),  # 03:15 EDT
    ]


def test_first_cron_period_starts_at_the_first_fire_at_or_after_start() -> None:
    """A start on a fire begins there; otherwise the first period waits for the next fire."""
    schedule = CronSchedule("0 0 1 * *", "UTC")
    assert first_period(schedule, utc(2026, 3, 1)) == Period(utc(2026, 3, 1), utc(2026, 4, 1))
    assert first_period(schedule, utc(2026, 3, 1, 0, 0, 1)).start == utc(2026, 4, 1)


def test_period_containing_cron() -> None:
    """period_containing picks [last fire <= at, next fire), also exactly on a fire."""
    schedule = CronSchedule("0 9 * * MON", "Europe/London")
    assert period_containing(schedule, utc(2026, 3, 29, 12)) == Period(
        utc(2026, 3, 23, 9), utc(2026, 3, 30, 8)
    )
    assert period_containing(schedule, utc(2026, 3, 30, 8)).start == utc(2026, 3, 30, 8)


def test_monthly_cron_on_the_31st_skips_short_months() -> None:
    """Cron semantics, unlike interval plans: `0 0 31 * *` fires only in 31-day months."""
    schedule = CronSchedule("0 0 31 * *", "UTC")
    assert [s.month for s in starts(walk(schedule, utc(2026, 1, 1), 4))] == [1, 3, 5, 7]


def test_cron_five_year_walk_is_contiguous() -> None:
    """Five years of weekly London periods are contiguous, at 09:00 local every time."""
    schedule = CronSchedule("0 9 * * MON", "Europe/London")
    periods = walk(schedule, utc(2026, 1, 1), 5 * 52)
    assert_contiguous(periods)
    tz = ZoneInfo("Europe/London")
    assert {(p.start.astimezone(tz).weekday(), p.start.astimezone(tz).hour) for p in periods} == {
        (0, 9)
    }


@pytest.mark.parametrize("expr", ["0 9 * * MON", "@daily", "@monthly", "0 0 L * *", "0 9 * * 1#2"])
def test_validate_cron_accepts(expr: str) -> None:
    """Standard five-field expressions, croniter's extensions and aliases are accepted."""
    validate_cron(expr)


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("61 * * * *", "out of range"),
        ("0 9 * * FOO", "not acceptable"),
        ("* * *", "must have 5 fields"),
        ("0 0 * * * *", "must have 5 fields"),
        ("", "must have 5 fields"),
        ("0 0 30 2 *", "never fires"),
        ("@reboot", "not supported"),
        ("H 0 * * *", "hash"),
    ],
)
def test_validate_cron_rejects_with_reason(expr: str, reason: str) -> None:
    """An invalid expression raises ValueError carrying croniter's (or our) reason."""
    with pytest.raises(ValueError, match=reason):
        validate_cron(expr)


def test_cron_schedule_validates() -> None:
    """A cron schedule cannot be built from a bad expression or zone."""
    with pytest.raises(ValueError):
        CronSchedule("bad", "UTC")
    with pytest.raises(ValueError, match="unknown time zone"):
        CronSchedule("0 9 * * MON", "Nowhere/City")


# --- Cron schedules: properties against a brute-force oracle --------------------------------


def oracle_fires(expr: str, tz: ZoneInfo, begin: datetime, end: datetime) -> list[datetime]:
    """Every fire in [begin, end), found by checking each UTC minute on the local wall clock.

    The rule, stated independently of the implementation: a minute fires when its wall time
    matches and it is the first occurrence of that wall time; the first minute after a DST gap
    also fires when any skipped wall minute matches.
    """
    # The matching wall times, listed once (croniter only does naive calendar arithmetic here).
    matching = set()
    walls = croniter(expr, begin.astimezone(tz).replace(tzinfo=None) - timedelta(hours=3))
    last_wall = end.astimezone(tz).replace(tzinfo=None) + timedelta(hours=3)
    while (wall := walls.get_next(datetime)) < last_wall:
        matching.add(wall)
    fires = []
    minute = begin
    while minute < end:
        here = minute.astimezone(tz)
        wall = here.replace(tzinfo=None)
        previous = (minute - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None)
        fired = here.fold == 0 and wall in matching
        skipped = previous + timedelta(minutes=1)
        while not fired and skipped < wall:
            fired = skipped in matching
            skipped += timedelta(minutes=1)
        if fired:
            fires.append(minute)
        minute += timedelta(minutes=1)
    return fires


def dst_transitions(tz: ZoneInfo, year: int) -> list[datetime]:
    """UTC instants (to the hour) around which the zone's offset changes in ``year``."""
    found = []
    hour = utc(year, 1, 1)
    while hour.year == year:
        if (hour + timedelta(hours=1)).astimezone(tz).utcoffset() != hour.astimezone(
            tz
        ).utcoffset():
            found.append(hour)
        hour += timedelta(hours=1)
    return found


CRON_EXPRS = [
    "0 9 * * MON",
    "30 2 * * *",
    "15 1 * * *",
    "45 1,2 * * *",
    "*/30 * * * *",
    "0 0 1 * *",
    "0 0 L * *",
    "0 2 * * SUN",
    "10 0,2,3 * * *",
]


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(CRON_EXPRS),
    st.sampled_from(["Europe/London", "America/New_York", "Australia/Lord_Howe"]),
    st.integers(2024, 2030),
    st.integers(0, 1),
)
def test_cron_matches_brute_force_across_dst(
    expr: str, tz_name: str, year: int, which: int
) -> None:
    """Around each DST change, the cron boundaries are exactly the oracle's fires: none lost,
    none doubled, strictly increasing."""
    tz = ZoneInfo(tz_name)
    transition = dst_transitions(tz, year)[which]
    begin, end = transition - timedelta(days=2), transition + timedelta(days=2)
    expected = oracle_fires(expr, tz, begin, end)
    schedule = CronSchedule(expr, tz_name)
    got = []
    period = first_period(schedule, begin)
    while period.start < end:
        got.append(period.start)
        period = next_period(schedule, period)
    assert got == expected


cron_fields = st.tuples(
    st.sampled_from(["0", "30", "59", "*/20", "5,35"]),
    st.sampled_from(["*", "0", "1", "2", "3", "9", "23", "1-3"]),
    st.sampled_from(["*", "1", "15", "28", "29", "31", "L"]),
    st.sampled_from(["*", "2", "1,7", "*/3"]),
    st.sampled_from(["*", "MON", "SUN", "1-5"]),
).map(" ".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cron_fields,
    st.sampled_from(ZONES),
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
    ),
)
def test_cron_periods_are_contiguous_and_on_schedule(
    expr: str, tz_name: str, start: datetime
) -> None:
    """Up to five years of cron periods (at most 250) are contiguous and strictly increasing,
    each boundary is a matching wall time (or a gap end), and lookups agree with the walk."""
    tz = ZoneInfo(tz_name)
    try:
        validate_cron(expr)
    except ValueError:
        assume(False)  # e.g. "0 * 31 2 *": never fires, refused by validation (tested above)
    schedule = CronSchedule(expr, tz_name)
    periods = [first_period(schedule, start)]
    assert periods[0].start >= start
    horizon = start + timedelta(days=5 * 366)
    while len(periods) < 250 and periods[-1].end < horizon:
        periods.append(next_period(schedule, periods[-1]))
    assert_contiguous(periods)
    for period in periods:
        wall = period.start.astimezone(tz).replace(tzinfo=None)
        just_before = (period.start - timedelta(seconds=1)).astimezone(tz)
        after_gap = just_before.utcoffset() != period.start.astimezone(tz).utcoffset()
        assert croniter.match(expr, wall) or after_gap
    for period in periods[:: max(1, len(periods) // 10)]:
        assert period_containing(schedule, period.start) == period
        assert period_containing(schedule, period.end - timedelta(seconds=1)) == period
