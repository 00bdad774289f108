"""One clock for every component.

Live mode reads the system clock. In test mode (``BILLING_MODE=test``) a test clock stored in the
database can be set: the scheduler, the workers and the sandbox then all read the same frozen
moment, so a test moves the whole system through months in seconds. Live mode refuses it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing.config import BillingMode, get_settings
from billing.models import ClockRow


class TestClockRefused(RuntimeError):
    """The test clock was asked for in live mode."""


class ClockWouldGoBack(ValueError):
    """The test clock was asked to move back in time without saying so."""

    def __init__(self, now: datetime, wanted: datetime) -> None:
        self.now = now.astimezone(UTC)
        self.wanted = wanted.astimezone(UTC)
        super().__init__(
            f"the test clock is at {_iso(self.now)}: {_iso(self.wanted)} would move it back"
        )


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that says what it is told (unit tests)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta


class DatabaseClock:
    """The test clock in the database when one is set, the system clock otherwise."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def now(self) -> datetime:
        with Session(self.engine) as session:
            row = session.get(ClockRow, 1)
            return row.now if row is not None else datetime.now(UTC)

    def is_frozen(self) -> bool:
        with Session(self.engine) as session:
            return session.get(ClockRow, 1) is not None

    def set(self, at: datetime, *, backwards: bool = True) -> datetime:
        """Freeze the clock at ``at``. With ``backwards=False`` a time before the one it is
        frozen at is refused (``ClockWouldGoBack``): what already ran then would not run
        again, and what the system recorded later would look like the future."""
        _refuse_in_live_mode()
        if at.tzinfo is None:
            raise ValueError("the test clock needs a time with a zone, e.g. 2026-01-31T00:00:00Z")
        with Session(self.engine) as session, session.begin():
            row = session.execute(select(ClockRow).with_for_update()).scalar_one_or_none()
            if row is not None and not backwards and at < row.now:
                raise ClockWouldGoBack(row.now, at)
            stamp = datetime.now(UTC)
            if row is None:
                session.add(ClockRow(id=1, now=at, updated_at=stamp))
            else:
                row.now = at
                row.updated_at = stamp
        return at.astimezone(UTC)

    def advance(self, delta: timedelta) -> datetime:
        _refuse_in_live_mode()
        return self.set(self.now() + delta)

    def release(self) -> None:
        """Go back to the system clock."""
        with Session(self.engine) as session, session.begin():
            row = session.get(ClockRow, 1)
            if row is not None:
                session.delete(row)


def _refuse_in_live_mode() -> None:
    if get_settings().mode is not BillingMode.TEST:
        raise TestClockRefused("the test clock is refused in live mode (set BILLING_MODE=test)")


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def clock_for(engine: Engine) -> Clock:
    """The clock every component uses: the database test clock only in test mode."""
    if get_settings().mode is BillingMode.TEST:
        return DatabaseClock(engine)
    return SystemClock()


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``15m``, ``2h``, ``1d``, ``3w``."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 2h, 1d, 3w)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 time; one without a zone is read as UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        reason = str(exc) if "isoformat" not in str(exc) else "not ISO 8601"
        raise ValueError(
            f"not a valid time: {text!r} ({reason}); use ISO 8601, e.g. 2027-01-31T09:00:00Z"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
