"""``billing status`` and ``billing alerts`` against real PostgreSQL (and the CLI on SQLite too):
the figures of a world built through the services, and alerts acknowledged for good."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing.cli import app
from billing.clock import FixedClock
from billing.config import reset_settings_cache
from billing.crypto import new_key
from billing.db import get_engine, make_engine
from billing.dunning import STANDARD
from billing.fatora.sandbox import Sandbox
from billing.migrate import upgrade
from billing.models import ChargeAttempt, Event, Subscription
from billing.periods import Interval
from billing.plans import PlansConfig, PlanSpec
from billing.runtime import Runtime, reset_runtime
from billing.services import alerts, control, quarantine
from billing.services.charging import collect_invoices
from billing.services.errors import NotFound
from billing.services.events import record_event
from billing.services.status import read_status
from tests.factories import renew, seed_plans, subscriber
from tests.integration.conftest import START


def _plan(code: str, currency: str, amount: str) -> PlanSpec:
    return PlanSpec(
        code=code,
        name=code,
        amount=Decimal(amount),
        currency=currency,
        interval=Interval.MONTH,
        interval_count=1,
        cron=None,
        trial_days=0,
        dunning="standard",
    )


TWO_CURRENCIES = PlansConfig(
    plans={"monthly": _plan("monthly", "QAR", "50.00"), "pro": _plan("pro", "USD", "20.00")},
    dunning={"standard": STANDARD},
)


def _world(rt: Runtime, sandbox: Sandbox) -> dict[str, int]:
    """Paid, declined and unknown charges in two currencies; ids by name."""
    seed_plans(rt, TWO_CURRENCIES)
    ids = {
        "paid": subscriber(rt, sandbox, ["success"], name="paid"),
        "declined": subscriber(rt, sandbox, ["insufficient_funds"], name="declined"),
        "unknown": subscriber(
            rt, sandbox, ["server_error_before_charge"], name="unknown", plan="pro"
        ),
        "later": subscriber(
            rt, sandbox, ["success"], name="later", start=START + timedelta(days=3)
        ),
    }
    results = collect_invoices(rt, renew(rt)).results
    assert sorted(results.values()) == ["paid", "soft_declined", "unknown"]
    return ids


def _alert(session: Session, kind: str, now: datetime, **payload: object) -> int:
    record_event(session, kind, now=now, payload=dict(payload))
    session.commit()
    return int(session.execute(select(Event.id).order_by(Event.id.desc()).limit(1)).scalar_one())


def test_status_reads_every_figure(rt: Runtime, sandbox: Sandbox, clock: FixedClock) -> None:
    ids = _world(rt, sandbox)
    with rt.sessions() as session, session.begin():
        now = clock.now()
        control.pause_collection(session, "authentication failed: HTTP 401", now)
        sub = session.get(Subscription, ids["later"])
        assert sub is not None
        quarantine.hold(session, sub, ValueError("a plan that cannot be priced"), now)
    with rt.sessions() as session:
        unknown = session.execute(
            select(ChargeAttempt).where(ChargeAttempt.status == "unknown")
        ).scalar_one()
        wall = unknown.created_wall_at + timedelta(seconds=90)
        status = read_status(session, clock.now(), wall)
        later = read_status(session, clock.now() + timedelta(days=2), wall)

    assert status.subscriptions["active"] == 3  # paid, unknown (no step yet), later
    assert status.subscriptions["past_due"] == 1
    assert sum(status.subscriptions.values()) == 4
    by_currency = {t.currency: t for t in status.invoices}
    assert set(by_currency) == {"QAR", "USD"}
    qar, usd = by_currency["QAR"], by_currency["USD"]
    assert (qar.open_count, qar.open_amount, qar.paid_count, qar.paid_amount) == (
        1,
        Decimal("50.00"),
        1,
        Decimal("50.00"),
    )
    assert (usd.open_count, usd.open_amount, usd.paid_count) == (1, Decimal("20.00"), 0)
    assert status.unresolved.count == 1 and status.unresolved_age_s == 90.0
    assert status.paused is not None
    assert status.paused.reason == "authentication failed: HTTP 401"
    assert status.open_alerts == {"alert.collection_paused": 1, "alert.row_quarantined": 1}
    assert status.failures == {"soft_decline": 1}
    assert later.failures == {}  # a day later, that decline is out of the window
    assert status.quarantined == {"subscriptions": 1, "invoices": 0}
    # The next renewals: due soonest first, the quarantined one left out.
    due = [r.next_billing_at for r in status.next_renewals]
    assert due == sorted(due) and len(due) == 3
    assert ids["later"] not in {r.subscription_id for r in status.next_renewals}
    assert {r.customer for r in status.next_renewals} == {"paid", "declined", "unknown"}
    record = status.as_dict()
    json.dumps(record)  # --json prints it as is
    assert record["invoices"]["QAR"]["open_amount"] == "50.00"
    assert record["open_alerts"]["count"] == 2
    assert record["failures_last_day"] == {"count": 1, "by_reason": {"soft_decline": 1}}


def test_alerts_are_open_until_acknowledged(rt: Runtime, clock: FixedClock) -> None:
    now = clock.now()
    with rt.sessions() as session:
        first = _alert(session, "alert.collection_stalled", now, reason="no answer")
        second = _alert(session, "alert.row_quarantined", now, table="invoices")
        notice = _alert(session, "invoice.paid", now)  # an event, not an alert
    with rt.sessions() as session:
        assert [e.id for e in alerts.list_alerts(session)] == [second, first]
        assert alerts.open_alerts_by_kind(session) == {
            "alert.collection_stalled": 1,
            "alert.row_quarantined": 1,
        }
    later = now + timedelta(hours=2)
    with rt.sessions() as session, session.begin():
        done = alerts.acknowledge(session, [first], by=" on  call ", note="gateway back", now=later)
    assert (done.acked, done.already) == ([first], [])
    with rt.sessions() as session, session.begin():
        again = alerts.acknowledge(session, [first, second], by="someone else", note=None, now=now)
    assert (again.acked, again.already) == ([second], [first])
    with rt.sessions() as session:
        assert alerts.list_alerts(session) == []
        assert alerts.open_alerts_by_kind(session) == {}
        shown = {
            a["id"]: a
            for a in map(alerts.describe_alert, alerts.list_alerts(session, include_acked=True))
        }
    assert set(shown) == {first, second}  # the paid notice is no alert
    assert shown[first]["acked_by"] == "on call"  # the first acknowledgement stands
    assert shown[first]["ack_note"] == "gateway back"
    assert shown[first]["acked_at"] == "2026-01-31T11:00:00Z"
    assert shown[first]["open"] is False and shown[second]["acked_by"] == "someone else"
    with rt.sessions() as session, session.begin(), pytest.raises(NotFound, match=str(notice)):
        alerts.acknowledge(session, [notice], by="x", note=None, now=now)


def test_acknowledging_an_unknown_id_changes_nothing(rt: Runtime, clock: FixedClock) -> None:
    now = clock.now()
    with rt.sessions() as session:
        known = _alert(session, "alert.charge_rejected", now)
    with pytest.raises(NotFound, match="not an alert: 987654"):  # noqa: SIM117
        with rt.sessions() as session, session.begin():
            alerts.acknowledge(session, [known, 987654], by="x", note=None, now=now)
    with rt.sessions() as session:
        assert [e.id for e in alerts.list_alerts(session)] == [known]
    with rt.sessions() as session, session.begin():
        assert alerts.acknowledge(session, None, by="x", note=None, now=now).acked == [known]


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def cli_db(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_db: Engine,
) -> Iterator[Engine]:
    if request.param == "postgresql":
        engine = clean_db
        url = engine.url.render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
        upgrade(url)
        engine = make_engine(url)
    monkeypatch.setenv("BILLING_DATABASE_URL", url)
    monkeypatch.setenv("BILLING_TOKEN_KEY", new_key())
    monkeypatch.setenv("BILLING_MODE", "test")
    monkeypatch.setenv("BILLING_BROKER_URL", "memory://")
    monkeypatch.setenv("FATORA_BASE_URL", "sandbox://embedded")
    reset_settings_cache()
    reset_runtime()
    yield engine
    reset_settings_cache()
    reset_runtime()
    get_engine.cache_clear()
    if engine is not clean_db:
        engine.dispose()


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(app, list(args))
    assert (result.exit_code == 0) is ok, result.output
    return result.output


def test_status_and_alerts_commands(cli_db: Engine) -> None:
    now = datetime(2026, 1, 31, 9, 0, tzinfo=UTC)
    with Session(cli_db) as session, session.begin():
        control.pause_collection(session, "authentication failed [401]: key revoked", now)
    with Session(cli_db) as session:
        stalled = _alert(session, "alert.collection_stalled", now, reason="[bold]no answer[/]")

    status = json.loads(run("status", "--json"))
    assert status["collection"]["paused"] is True
    assert status["open_alerts"] == {
        "count": 2,
        "by_kind": {"alert.collection_paused": 1, "alert.collection_stalled": 1},
    }
    assert status["subscriptions"]["active"] == 0 and status["invoices"] == {}
    text = run("status")
    assert "PAUSED" in text and "authentication failed [401]: key revoked" in text
    assert "open alerts" in text and "alert.collection_stalled 1" in text

    listed = run("alerts", "list")
    assert "[bold]no answer[/]" in listed  # printed as it is, never read as markup
    (paused_id,) = [
        a["id"] for a in json.loads(run("alerts", "list", "--json")) if a["id"] != stalled
    ]

    assert "error: name the alerts to acknowledge" in run("alerts", "ack", ok=False)
    assert "not an alert: 424242" in run("alerts", "ack", "424242", ok=False)
    acked = json.loads(
        run("alerts", "ack", str(stalled), "--note", "card issuer", "--by", "ana", "--json")
    )
    assert acked == {"acked": [stalled], "already_acked": []}
    assert [a["id"] for a in json.loads(run("alerts", "list", "--json"))] == [paused_id]
    assert "1 alert(s) acknowledged: " + str(paused_id) in run("alerts", "ack", "--all")
    assert run("alerts", "list").strip() == "no open alert"
    every = {a["id"]: a for a in json.loads(run("alerts", "list", "--all", "--json"))}
    assert (every[stalled]["acked_by"], every[stalled]["ack_note"]) == ("ana", "card issuer")
    assert every[paused_id]["acked_by"]  # the user running the command
    assert json.loads(run("status", "--json"))["open_alerts"]["count"] == 0
