"""The chaos run, small: real workers billing two periods while PostgreSQL, Redis, workers,
lock connections and the gateway's network fail; then the database against the gateway's own
ledger. ``bench/chaos.py`` starts PostgreSQL and Redis servers of its own on spare ports, so this
suite touches neither the shared servers nor Redis database 15.

The verdict itself is tested first, on made-up ledgers: a harness that could not see a double
charge would prove nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import (
    INVARIANTS,
    LEDGER_INVARIANTS,
    PROXY_FAULTS,
    START,
    AttemptRow,
    InvoiceRow,
    Subscriber,
    active_storm,
    draw_fault,
    fault_schedule,
    judge,
)
from billing.attempts import order_prefix
from billing.fatora.sandbox import add_months

ROOT = Path(__file__).resolve().parents[2]

# -- the verdict, on made-up ledgers ------------------------------------------------------------

GOOD = Subscriber(1, "chaos-a", START, "success")
DECLINING = Subscriber(2, "chaos-b", START, "insufficient_funds")


def _invoice(
    invoice_id: int, sub: Subscriber, period: int, status: str, amount_minor: int
) -> InvoiceRow:
    currency = "QAR"
    return InvoiceRow(
        invoice_id, sub.id, add_months(sub.anchor, period), amount_minor, currency, status, 0
    )


def _charge(sub: Subscriber, period: int, attempt: int, amount: str = "50.00") -> dict[str, Any]:
    order_id = order_prefix(sub.id, add_months(sub.anchor, period)) + str(attempt)
    return {"order_id": order_id, "status": "SUCCESS", "amount": amount, "currency": "QAR"}


def _attempt(invoice_id: int, charge: dict[str, Any], status: str = "succeeded") -> AttemptRow:
    return AttemptRow(invoice_id, invoice_id, str(charge["order_id"]), status, 5000, "QAR")


def test_a_clean_ledger_passes() -> None:
    first, second = _charge(GOOD, 0, 1), _charge(GOOD, 1, 1, "55.00")
    counts, examples = judge(
        [first, second],
        [GOOD, DECLINING],
        [
            _invoice(1, GOOD, 0, "paid", 5000),
            _invoice(2, GOOD, 1, "paid", 5500),
            _invoice(3, DECLINING, 0, "open", 1999),
        ],
        [_attempt(1, first), _attempt(2, second), AttemptRow(3, 3, "x", "declined", 1999, "QAR")],
        periods=2,
    )
    assert counts == dict.fromkeys(LEDGER_INVARIANTS, 0)
    assert examples == {}


def test_the_verdict_sees_every_kind_of_loss() -> None:
    """Two charges for one invoice (one not on record), a paid invoice without money, an
    attempt left unknown, a price that is not the plan's, and a period never invoiced."""
    twice = [_charge(GOOD, 0, 1), _charge(GOOD, 0, 2)]
    counts, examples = judge(
        [*twice, _charge(DECLINING, 0, 1, "20.00")],
        [GOOD, DECLINING],
        [_invoice(1, GOOD, 0, "paid", 5000), _invoice(3, DECLINING, 0, "paid", 1999)],
        [_attempt(1, twice[0]), AttemptRow(9, 1, twice[1]["order_id"], "unknown", 5000, "QAR")],
        periods=2,
    )
    assert counts["double_charges"] == 1
    assert counts["charges_missing_from_db"] == 2  # the second charge and the declined card's
    assert counts["attempts_unresolved"] == 1
    assert counts["wrong_amounts"] == 1  # 20.00 where chaos-b costs 19.99
    assert counts["renewals_missing"] == 1  # the good card's second period
    assert counts["invoices_never_charged"] == 0
    assert set(examples) == {name for name, n in counts.items() if n}


def test_an_unpaid_good_card_is_never_charged_and_a_decline_is_not() -> None:
    counts, _ = judge(
        [],
        [GOOD, DECLINING],
        [_invoice(1, GOOD, 0, "open", 5000), _invoice(2, DECLINING, 0, "open", 1999)],
        [],
        periods=1,
    )
    assert counts["invoices_never_charged"] == 1
    assert counts["paid_without_charge"] == 0


# -- the schedule and the proxy's draws: seeded -------------------------------------------------


def test_the_schedule_is_the_seeds_and_has_every_fault() -> None:
    one = fault_schedule(7, 60.0, 3, ["charges1", "charges2"], "maintenance")
    assert one == fault_schedule(7, 60.0, 3, ["charges1", "charges2"], "maintenance")
    assert one != fault_schedule(8, 60.0, 3, ["charges1", "charges2"], "maintenance")
    kinds = {f.kind for f in one}
    for kind in ("postgres_restart", "redis_restart", "sigkill_worker", "lock_cut"):
        assert kind in kinds
    assert any(k.startswith("storm:") for k in kinds)
    assert all(0 <= f.at < 60.0 for f in one)
    restarts = sorted(f.at for f in one if f.kind.endswith("_restart"))
    assert all(b - a >= 6.0 for a, b in pairwise(restarts))


def test_the_proxy_draws_the_same_fault_for_the_same_request() -> None:
    draws = [draw_fault(3, "collect", f"S{i}-20270115070000-1", 1, None, 0.5) for i in range(200)]
    again = [draw_fault(3, "collect", f"S{i}-20270115070000-1", 1, None, 0.5) for i in range(200)]
    assert draws == again
    kinds = {d.kind for d in draws}
    assert kinds - {None} <= set(PROXY_FAULTS["collect"])
    assert None in kinds and len(kinds) > 3
    storm = [draw_fault(3, "verify", f"S{i}-x-1", 1, "verify_lags", 0.0) for i in range(200)]
    assert 60 < sum(d.kind == "verify_lags" for d in storm) < 140
    assert active_storm(fault_schedule(7, 60.0, 3, ["c1"], "m"), -1.0) is None


# -- the run itself --------------------------------------------------------------------------------

pytestmark = pytest.mark.e2e


def test_a_small_chaos_run_loses_and_doubles_nothing() -> None:
    """Invariant, with real workers, servers restarted and the gateway's network failing: every
    invoice of a good card is charged exactly once and recorded, nothing is left unresolved, and
    no card token, API key or token key is left in clear in a log, in Redis or in a table."""
    began = datetime.now(UTC)
    proc = subprocess.Popen(
        [sys.executable, "bench/chaos.py", "--renewals", "60", "--periods", "2", "--seed", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the run stops its workers and servers on SIGTERM
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the chaos run did not finish in 150 s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-5000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    report = json.loads(lines[0])
    assert {name: report[name] for name in INVARIANTS} == dict.fromkeys(INVARIANTS, 0)
    assert report["secrets_in_clear"] == 0, report["secret_scan"]["found"]
    # The scan looked for every card and both keys, in the logs, Redis and the tables.
    assert report["secret_scan"]["secrets"] >= report["subscriptions"] + 2
    assert {"log", "redis", "table"} <= set(report["secret_scan"]["places"])
    assert report["settled"] is True
    assert report["renewals_expected"] > 40
    assert report["gateway_charges"] == report["renewals_expected"]
    happened = {f["fault"] for f in report["schedule"] if "started" in f}
    assert {"postgres_restart", "redis_restart", "sigkill_worker", "lock_cut"} <= happened
    assert report["proxy_faults"], "the gateway's network never failed"
    assert datetime.now(UTC) - began < timedelta(seconds=150)
