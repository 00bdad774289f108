"""Chaos run: renewals over several periods while everything around the workers breaks, then
the database is compared with the gateway's own list of charges.

Everything runs on this machine, and nothing is shared with anyone:

* PostgreSQL and Redis of the run's own (``bench/_servers.py``), in a temporary directory, on
  spare ports, so that restarting or killing them disturbs nothing else.
* The Fatora sandbox (``billing.fatora.sandbox``) served over HTTP by uvicorn in this process,
  behind ``FaultProxy`` (in this process too), through which every gateway call passes. Each
  card carries a sandbox behaviour for its whole life (``BEHAVIOUR_WEIGHTS``: timeouts after
  the charge, a 5xx or 429 before it, an edge 504 or a timeout whose charge lands later, verify
  lagging, PENDING, garbled and undocumented answers, and real declines). The proxy adds
  network faults on top, per request (``PROXY_FAULTS``): a timeout after the charge, a 5xx
  before it, an edge 504 whose charge lands later, a dropped connection (before or after the
  request reached the gateway), a slow answer, and a verify that does not find a charge yet.
* Real ``celery -A workers.app worker`` processes: ``--workers`` on queue ``charges`` and one on
  ``maintenance``.
* This process plays beat. Every round (a second) it moves the test clock a minute on and
  queues ``billing.renew`` and ``billing.retry_due`` (``billing.janitor`` every five rounds), as
  beat does every minute. Period ``p`` starts a calendar month after period ``p - 1``;
  subscriptions are anchored a minute apart over the first part of a period, so renewals and
  charges go on while the faults happen.

The fault schedule (``fault_schedule``) is drawn from ``--seed``: storms (a few seconds when one
proxy fault hits half of the requests, on top of a low rate of every kind), worker processes
killed with SIGKILL (a whole worker, restarted after a moment, or one pool child), Redis killed
and started again (what it had queued is lost), PostgreSQL stopped with ``-m immediate`` and
started again, and the connection holding invoice locks cut (``pg_terminate_backend`` on a
backend holding one of them) while a charge of the same invoices is queued again at once, as a
duplicate delivery would. A kill goes to a worker whose pool process holds invoice locks (in the
middle of a collection) when there is one. A worker that exits on its own (a worker does when
Redis goes away under it, or when it starts while PostgreSQL is down) is started again after a
second, as the compose file's restart policy does, and counted in ``worker_exits``. The proxy's
draw for a request depends only on the seed, the call, the order id and how many times that call
was seen, so a replay with the same seed meets the same schedule and the same faults per order;
the exact interleaving of processes is not replayable.

When the faults stop, every server and worker is up again and this process lets the janitor
finish, as an operator running ``billing reconcile`` and ``billing tick`` would: it verifies
every unresolved attempt, queues due retries, and moves the test clock on to the next retry or
dunning step (never into the next period). A worker killed before it recorded when it sent its
request leaves an attempt whose request may have left up to ``attempts.SEND_WINDOW`` (10 minutes
of real time) after it was written; the run does not wait that long: once no charge can still
land, those attempts' real-time marks are moved that far into the past (``aged_attempts`` in the
report), as the end-to-end tests do.

Then the verdict, against the sandbox's ledger (every charge it took):

* ``double_charges``: invoices with more than one successful charge at the gateway;
* ``invoices_never_charged``: invoices of a good card (no decline behaviour) with none;
* ``charges_missing_from_db``: successful gateway charges without a succeeded attempt;
* ``attempts_unresolved``: attempts still in flight, unknown or pending;
* ``wrong_amounts``: charges or invoices whose amount or currency is not the plan's price in
  force at the period's start (one plan's price changes after the first period);
* ``paid_without_charge``, ``charged_not_paid``: invoices paid in the database without money at
  the gateway, and the reverse;
* ``renewals_missing``: periods of good cards that were never invoiced.

And one count that is not the ledger's, taken after settling, before anything is stopped:

* ``secrets_in_clear``: places holding a card token the sandbox issued, its API key or the token
  key in clear (``bench/secret_scan.py``: as is, JSON-escaped or percent-encoded): every log in
  the temporary directory (workers, this process, PostgreSQL, Redis), every key of the run's
  Redis (task messages and results) and every column of every table of its database. One per
  place and secret; ``secret_scan`` in the report says how many secrets and places were looked
  at and which places had which secrets (named by kind and number, never by value).

One JSON line is printed, with those counts, ``time to settle`` and the schedule; the exit status
is 1 if any of them is not zero (the temporary directory, with every server's and worker's log,
is then kept and named on standard error), 2 if the run could not be set up.

    .venv/bin/python bench/chaos.py [--renewals 4000] [--periods 3] [--seed 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import h11
import httpx
import psutil
import psycopg
import redis
from sqlalchemy import Engine, insert, select, text

# Run from a checkout without installing: the project root is the parent of bench/.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._servers import ServerError, TempPostgres, TempRedis  # noqa: E402
from bench.secret_scan import Secrets, scan_database, scan_files, scan_redis  # noqa: E402
from billing.attempts import SEND_WINDOW, UNRESOLVED_VALUES, order_prefix  # noqa: E402
from billing.fatora.sandbox import Sandbox, ServerHandle, add_months  # noqa: E402
from billing.locks import INVOICE_LOCK_SPACE  # noqa: E402
from billing.money import from_minor, to_minor  # noqa: E402

# -- the world -------------------------------------------------------------------------------

# The first period starts here (a 15th: every month has one, no end-of-month clamping).
START = datetime(2027, 1, 15, 7, 0, tzinfo=UTC)
ROUND_S = 1.0  # one beat round: a minute of test time
JANITOR_EVERY = 5  # rounds, as beat's janitor runs every five minutes
FATORA_TIMEOUT_S = 1.0
# Verify's "not found" counts as "never charged" this long (real time) after the request left
# (the workers' BILLING_UNKNOWN_GRACE_S). Every charge that lands later here lands within
# LAND_MAX_S, well inside it; ``--grace-seconds`` below that is the unsafe setting the grace
# exists to prevent, and the run shows what it costs.
GRACE_S = 8.0
LAND_MAX_S = 2.5  # the proxy's edge 504: the charge lands this long after, at most
SANDBOX_LAND_S = 1.0  # the sandbox's own behaviours that land later
SANDBOX_VERIFY_LAG_S = 1.0  # the sandbox's ``verify_lags`` cards
VERIFY_LAG_S = 1.5  # how long the proxy's lagging verify misses a charge, at most
SANDBOX_LATENCY_MS = 20
BASE_RATE = 0.04  # share of gateway requests with some proxy fault during the fault phase
STORM_RATE = 0.5  # share of requests hit by the storm's fault while it lasts
# The settle phase moves the test clock at most this far past the last period's start: every
# dunning step (STANDARD: days 1 to 7) has come, the next period has not.
SETTLE_CLOCK_SPAN = timedelta(days=20)
MAX_PERIODS = 5  # card tokens live six months
# Each period's charges come in its first part (subscriptions are anchored over its first 60 %
# of rounds): the process and server faults go there.
ACTIVE_SHARE = 0.7

# Card behaviours (see billing.fatora.sandbox.core.BEHAVIOURS) and their shares. Declines are the
# only ones whose invoices may rightly stay unpaid. Left out: answers that rightly pause all
# collection (an HTML 200 reads as a broken route) and hard declines (a cluster of them trips the
# breaker, which pauses collection by design); either would stop the run on purpose.
BEHAVIOUR_WEIGHTS: dict[str, float] = {
    "success": 0.61,
    "timeout_after_charge": 0.04,
    "server_error_before_charge": 0.04,
    "edge_504_lands_later": 0.04,
    "timeout_lands_later": 0.03,
    "verify_lags": 0.04,
    "pending_then_success": 0.04,
    "rate_limited_before_charge": 0.02,
    "garbled_after_charge": 0.02,
    "processing": 0.02,
    "approved_shape": 0.02,
    "error_envelope_after_charge": 0.02,
    "insufficient_funds": 0.03,
    "do_not_honor": 0.03,
}
DECLINING = frozenset({"insufficient_funds", "do_not_honor"})


@dataclass(frozen=True)
class Price:
    effective_from: datetime
    amount: Decimal
    currency: str


# Plan code -> its prices, oldest first. ``chaos-a`` costs more from the second period on.
PRICES: dict[str, tuple[Price, ...]] = {
    "chaos-a": (
        Price(START - timedelta(days=1), Decimal("50.00"), "QAR"),
        Price(START + timedelta(days=20), Decimal("55.00"), "QAR"),
    ),
    "chaos-b": (Price(START - timedelta(days=1), Decimal("19.99"), "QAR"),),
    "chaos-c": (Price(START - timedelta(days=1), Decimal("7.125"), "KWD"),),
}


def price_at(plan: str, at: datetime) -> Price:
    """The price of ``plan`` in force at ``at`` (its first price before it existed)."""
    prices = PRICES[plan]
    current = [p for p in prices if p.effective_from <= at]
    return current[-1] if current else prices[0]


# -- the fault schedule (pure) ---------------------------------------------------------------

PROXY_FAULTS: dict[str, tuple[str, ...]] = {
    "collect": (
        "timeout_after_charge",
        "5xx_before_charge",
        "edge_504_lands_later",
        "dropped_connection",
        "slow_answer",
    ),
    "verify": (
        "timeout_after_charge",
        "5xx_before_charge",
        "dropped_connection",
        "slow_answer",
        "verify_lags",
    ),
}
STORM_KINDS = tuple(dict.fromkeys(k for kinds in PROXY_FAULTS.values() for k in kinds))


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: ``at`` seconds after the faults start; ``lasts`` is a storm's
    length, a server's downtime or a killed worker's time before its restart."""

    at: float
    kind: str
    target: str | None = None
    lasts: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.at, 2), "fault": self.kind}
        if self.target is not None:
            out["target"] = self.target
        if self.lasts:
            out["lasts"] = round(self.lasts, 2)
        return out


def fault_schedule(
    seed: int, fault_s: float, periods: int, charge_workers: Sequence[str], maintenance: str
) -> list[Fault]:
    """The faults of a run, by time. Each period's charges come in its first ``ACTIVE_SHARE``,
    so that is where the process and server faults go; storms cover the whole phase."""
    rng = random.Random(f"chaos-schedule:{seed}")
    period_s = fault_s / periods
    events: list[Fault] = []

    t = rng.uniform(0.5, 2.0)
    kinds = list(STORM_KINDS)
    rng.shuffle(kinds)
    i = 0
    while t < fault_s - 1.0:
        lasts = min(rng.uniform(2.0, 5.0), fault_s - t)
        events.append(Fault(t, "storm:" + kinds[i % len(kinds)], lasts=lasts))
        i += 1
        t += lasts + rng.uniform(1.0, 4.0)

    def when() -> float:
        period = rng.randrange(periods)
        return period * period_s + rng.uniform(0.5, ACTIVE_SHARE * period_s)

    # Servers: at least one restart of each, never two at once, a few seconds apart.
    restarts = max(1, round(fault_s / 80))
    busy: list[float] = []
    for kind in ("postgres_restart", "redis_restart") * restarts:
        for _ in range(100):
            at = when()
            if all(abs(at - other) >= 6.0 for other in busy):
                break
        busy.append(at)
        events.append(Fault(at, kind, lasts=rng.uniform(1.0, 3.0)))
    workers = [*charge_workers, maintenance]
    for _ in range(max(2, round(fault_s / 12))):
        events.append(
            Fault(when(), "sigkill_worker", rng.choice(workers), lasts=rng.uniform(0.5, 3.0))
        )
    for _ in range(max(1, round(fault_s / 25))):
        events.append(Fault(when(), "sigkill_pool_child", rng.choice(workers)))
    for _ in range(max(2, round(fault_s / 20))):
        events.append(Fault(when(), "lock_cut"))
    return sorted(events, key=lambda f: f.at)


def active_storm(schedule: Sequence[Fault], t: float) -> str | None:
    """The proxy fault a storm makes frequent at ``t`` seconds, if one is under way."""
    for fault in schedule:
        if fault.kind.startswith("storm:") and fault.at <= t < fault.at + fault.lasts:
            return fault.kind.removeprefix("storm:")
    return None


@dataclass(frozen=True)
class Draw:
    """What the proxy does to one request: ``kind`` (None: nothing), and for a slow answer or
    a charge that lands later, the delay; for a dropped connection, whether the request reached
    the gateway first."""

    kind: str | None
    delay: float = 0.0
    after: bool = False


def draw_fault(
    seed: int, call: str, order_id: str, nth: int, storm: str | None, base_rate: float
) -> Draw:
    """The proxy's fault for the ``nth`` request of ``call`` about ``order_id`` (pure)."""
    rng = random.Random(f"chaos-proxy:{seed}:{call}:{order_id}:{nth}")
    kinds = PROXY_FAULTS[call]
    kind: str | None = None
    if storm in kinds and rng.random() < STORM_RATE:
        kind = storm
    elif rng.random() < base_rate:
        kind = rng.choice(kinds)
    if kind == "slow_answer":
        # Some answers come after the client has given up: a timeout after the call took effect.
        return Draw(kind, delay=rng.uniform(0.2, 1.8) * FATORA_TIMEOUT_S)
    if kind == "edge_504_lands_later":
        return Draw(kind, delay=rng.uniform(0.1, LAND_MAX_S))
    if kind == "dropped_connection":
        return Draw(kind, after=rng.random() < 0.5)
    return Draw(kind)


def behaviours_for(seed: int, n: int) -> list[str]:
    """The card behaviour of each of ``n`` subscribers (pure)."""
    rng = random.Random(f"chaos-cards:{seed}")
    names = list(BEHAVIOUR_WEIGHTS)
    weights = list(BEHAVIOUR_WEIGHTS.values())
    return rng.choices(names, weights=weights, k=n)


# -- the verdict (pure) ----------------------------------------------------------------------

# What ``judge`` counts, from the gateway's ledger and the database.
LEDGER_INVARIANTS = (
    "double_charges",
    "invoices_never_charged",
    "charges_missing_from_db",
    "attempts_unresolved",
    "wrong_amounts",
    "paid_without_charge",
    "charged_not_paid",
    "renewals_missing",
)
# Every count that must be zero: the ledger's, and the secret scan's.
INVARIANTS = (*LEDGER_INVARIANTS, "secrets_in_clear")


@dataclass(frozen=True)
class Subscriber:
    id: int
    plan: str
    anchor: datetime
    behaviour: str

    @property
    def good_card(self) -> bool:
        return self.behaviour not in DECLINING


@dataclass(frozen=True)
class InvoiceRow:
    id: int
    subscription_id: int
    period_start: datetime
    amount_minor: int
    currency: str
    status: str
    failure_count: int


@dataclass(frozen=True)
class AttemptRow:
    id: int
    invoice_id: int
    order_id: str
    status: str
    amount_minor: int
    currency: str


_ORDER = re.compile(r"(S\d+-\d{14}-)\d+")


def judge(
    charges: Sequence[dict[str, Any]],
    subscribers: Sequence[Subscriber],
    invoices: Sequence[InvoiceRow],
    attempts: Sequence[AttemptRow],
    periods: int,
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """The invariant counts (every one must be zero), with a few examples of each failure.

    ``charges`` is the gateway's ledger (``Sandbox.charges()``): every payment with a
    transaction, its order id, amount, currency and status."""
    subs = {s.id: s for s in subscribers}
    by_prefix = {order_prefix(i.subscription_id, i.period_start): i for i in invoices}
    taken = [c for c in charges if c["status"] == "SUCCESS"]
    taken_by_prefix: dict[str, list[dict[str, Any]]] = {}
    for charge in taken:
        match = _ORDER.fullmatch(str(charge["order_id"]))
        prefix = match.group(1) if match else f"?{charge['order_id']}"
        taken_by_prefix.setdefault(prefix, []).append(charge)
    succeeded = {a.order_id for a in attempts if a.status == "succeeded"}
    examples: dict[str, list[str]] = {name: [] for name in LEDGER_INVARIANTS}
    counts = dict.fromkeys(LEDGER_INVARIANTS, 0)

    def fail(name: str, example: str) -> None:
        counts[name] += 1
        if len(examples[name]) < 5:
            examples[name].append(example)

    for prefix, money in sorted(taken_by_prefix.items()):
        if len(money) > 1:
            fail("double_charges", f"{prefix}: {', '.join(str(c['order_id']) for c in money)}")
        invoice = by_prefix.get(prefix)
        for charge in money:
            order_id = str(charge["order_id"])
            if order_id not in succeeded:
                fail("charges_missing_from_db", order_id)
            sub = subs.get(invoice.subscription_id) if invoice else None
            if sub is not None and invoice is not None:
                want = price_at(sub.plan, invoice.period_start)
                if (
                    Decimal(str(charge["amount"])) != want.amount
                    or str(charge["currency"]) != want.currency
                ):
                    fail(
                        "wrong_amounts",
                        f"{order_id}: {charge['amount']} {charge['currency']}, "
                        f"not {want.amount} {want.currency}",
                    )
    invoiced: dict[int, set[datetime]] = {}
    for invoice in invoices:
        invoiced.setdefault(invoice.subscription_id, set()).add(invoice.period_start)
        sub = subs[invoice.subscription_id]
        prefix = order_prefix(invoice.subscription_id, invoice.period_start)
        money = taken_by_prefix.get(prefix, [])
        want = price_at(sub.plan, invoice.period_start)
        if to_minor(want.amount, want.currency) != invoice.amount_minor or (
            want.currency != invoice.currency
        ):
            amount = from_minor(invoice.amount_minor, invoice.currency)
            fail("wrong_amounts", f"invoice {invoice.id}: {amount} {invoice.currency}")
        if sub.good_card and not money:
            fail("invoices_never_charged", f"invoice {invoice.id} ({invoice.status})")
        if invoice.status == "paid" and not money:
            fail("paid_without_charge", f"invoice {invoice.id}")
        if money and invoice.status != "paid":
            fail("charged_not_paid", f"invoice {invoice.id} ({invoice.status})")
    for attempt in attempts:
        if attempt.status in UNRESOLVED_VALUES:
            fail("attempts_unresolved", f"{attempt.order_id} ({attempt.status})")
    for sub in subscribers:
        if not sub.good_card:
            continue
        for period in range(periods):
            start = add_months(sub.anchor, period)
            if start not in invoiced.get(sub.id, set()):
                fail("renewals_missing", f"subscription {sub.id} from {start:%Y-%m-%d %H:%M}")
    return counts, {name: found for name, found in examples.items() if found}


# -- the fault proxy -------------------------------------------------------------------------


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


class _ClientGone(Exception):
    """The worker closed its connection (it gave up waiting) before the answer came."""


# Request headers passed on to the sandbox (the rest is the connection's business).
_FORWARDED = frozenset({"api_key", "api-key", "content-type", "accept"})
_NOT_FOUND_BODY = json.dumps(
    {
        "status": "ERROR",
        "error": {"error_code": "404", "description": "Specified payment does not exists"},
    }
).encode()
_UNAVAILABLE_BODY = json.dumps(
    {"status": "ERROR", "error": {"error_code": "503", "description": "Service Unavailable"}}
).encode()
_EDGE_504_BODY = (
    b"<html><head><title>504 Gateway Time-out</title></head>"
    b"<body><center><h1>504 Gateway Time-out</h1></center></body></html>"
)


class FaultProxy:
    """An HTTP/1.1 proxy in front of the sandbox that breaks requests as ``draw_fault`` says.

    It runs an asyncio loop in a thread of its own; requests are parsed with h11 and passed on
    with an ``httpx.AsyncClient``. What it does to a request reaches the gateway exactly as a
    real network or edge would: a 5xx or a dropped connection before forwarding moves no money;
    a dropped connection, a swallowed answer or a slow one after forwarding leaves the charge
    taken; an edge 504 is answered at once and the request is forwarded later (``LAND_MAX_S``
    at most: ``late_landings`` counts any that the machine's load delayed past the grace, which
    would make a double charge the run's own doing). A lagging verify answers "not found" for a
    charge that reached the gateway less than ``VERIFY_LAG_S`` ago, until verify has once
    found it.
    """

    def __init__(
        self, upstream: str, seed: int, schedule: Sequence[Fault], grace_s: float = GRACE_S
    ) -> None:
        self._upstream = upstream
        self.grace_s = grace_s
        self._seed = seed
        self._schedule = list(schedule)
        self._t0 = 0.0
        self.enabled = False
        self.applied: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.pending_landings = 0
        self.late_landings = 0
        self._seen: Counter[str] = Counter()
        self._reached: dict[str, float] = {}  # order id -> when its collect reached the gateway
        self._found: set[str] = set()  # order ids verify has found once
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def start(self) -> str:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def _open(self) -> int:
        self._client = httpx.AsyncClient(
            base_url=self._upstream,
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=200),
            trust_env=False,
        )
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=2048)
        return int(self._server.sockets[0].getsockname()[1])

    def begin_faults(self, t0: float) -> None:
        self._t0 = t0
        self.enabled = True

    def end_faults(self) -> None:
        self.enabled = False

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _close(self) -> None:
        """Close every connection (each one's reader sees the end and returns), then wait."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()  # charges still to land: the run is over
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        if others:
            await asyncio.wait(others, timeout=5.0)
        if self._client is not None:
            await self._client.aclose()

    # -- one connection -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(conn, reader)
                if request is None or not await self._answer(conn, reader, writer, request):
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError, _ClientGone):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: _Request,
    ) -> bool:
        """Answer one request (or not); False when the connection must close."""
        route = request.target.split("?", 1)[0].rstrip("/").lower()
        call = (
            "collect"
            if route.endswith("/collect-payment")
            else "verify"
            if route.endswith("/verify")
            else None
        )
        draw = Draw(None)
        order_id = ""
        if call is not None:
            order_id = _order_id(request.body)
            self.calls[call] += 1
            if self.enabled:
                key = f"{call}:{order_id}"
                self._seen[key] += 1
                storm = active_storm(self._schedule, time.monotonic() - self._t0)
                draw = draw_fault(self._seed, call, order_id, self._seen[key], storm, BASE_RATE)
        if draw.kind == "verify_lags" and not self._lagging(order_id):
            draw = Draw(None)  # nothing to lag behind: an ordinary verify
        if draw.kind is not None:
            detail = (
                f"/{'after' if draw.after else 'before'}" if draw.kind.startswith("drop") else ""
            )
            self.applied[f"{call}:{draw.kind}{detail}"] += 1
        if draw.kind == "dropped_connection" and not draw.after:
            return False
        if draw.kind == "5xx_before_charge":
            await _respond(conn, writer, 503, "application/json", _UNAVAILABLE_BODY)
            return True
        if draw.kind == "edge_504_lands_later":
            self._land_later(request, order_id, draw.delay)
            await _respond(conn, writer, 504, "text/html", _EDGE_504_BODY)
            return True
        if draw.kind == "verify_lags":
            await _respond(conn, writer, 404, "application/json", _NOT_FOUND_BODY)
            return True
        try:
            answer = await self._forward(request, reader)
        except httpx.HTTPError:
            return False
        if call == "collect":
            self._reached.setdefault(order_id, time.monotonic())
        elif call == "verify" and answer.status_code == 200:
            self._found.add(order_id)
        if draw.kind == "dropped_connection":
            return False
        if draw.kind == "timeout_after_charge":
            await _gone_within(reader, 30.0)
            return False
        if draw.kind == "slow_answer" and await _gone_within(reader, draw.delay):
            return False
        await _respond(
            conn,
            writer,
            answer.status_code,
            answer.headers.get("content-type", "application/json"),
            answer.content,
            retry_after=answer.headers.get("retry-after"),
        )
        return True

    def _lagging(self, order_id: str) -> bool:
        reached = self._reached.get(order_id)
        return (
            reached is not None
            and order_id not in self._found
            and time.monotonic() - reached < VERIFY_LAG_S
        )

    async def _forward(self, request: _Request, reader: asyncio.StreamReader) -> httpx.Response:
        """Pass the request on; give up on it (and close) if the worker goes away meanwhile."""
        assert self._client is not None
        headers = [(k, v) for k, v in request.headers if k.lower() in _FORWARDED]
        upstream = asyncio.ensure_future(
            self._client.request(
                request.method, request.target, headers=headers, content=request.body
            )
        )
        gone = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({upstream, gone}, return_when=asyncio.FIRST_COMPLETED)
        if upstream in done:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await gone
            return upstream.result()
        upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await upstream
        raise _ClientGone

    def _land_later(self, request: _Request, order_id: str, delay: float) -> None:
        self.pending_landings += 1
        task = self._loop.create_task(self._land(request, order_id, time.monotonic(), delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _land(self, request: _Request, order_id: str, received: float, delay: float) -> None:
        assert self._client is not None
        try:
            await asyncio.sleep(delay)
            headers = [(k, v) for k, v in request.headers if k.lower() in _FORWARDED]
            with contextlib.suppress(httpx.HTTPError):
                await self._client.request(
                    request.method, request.target, headers=headers, content=request.body
                )
            if time.monotonic() - received > self.grace_s - 1.0:
                self.late_landings += 1
            self._reached.setdefault(order_id, time.monotonic())
        finally:
            self.pending_landings -= 1


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> _Request | None:
    """The next whole request on the connection, or None once the client has closed it."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return _Request(
                head.method.decode("ascii"),
                head.target.decode("ascii"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
                bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    *,
    retry_after: str | None = None,
) -> None:
    headers = [("content-type", content_type), ("content-length", str(len(body)))]
    if retry_after is not None:
        headers.append(("retry-after", retry_after))
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    writer.write(data)
    await writer.drain()


async def _gone_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait up to ``seconds`` for the client to close; True if it did."""
    try:
        await asyncio.wait_for(reader.read(1), timeout=seconds)
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def _order_id(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    return str(payload.get("order_id", "")) if isinstance(payload, dict) else ""


# -- worker processes ------------------------------------------------------------------------


class WorkerPool:
    """Real ``celery worker`` processes, each the leader of its own process group.

    ``supervise`` plays the process supervisor of production (the compose file's ``restart:
    unless-stopped``): a worker that exits on its own is started again after a moment, and its
    exit is counted in ``exits``. A worker killed on purpose stays down until started again."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self._specs: dict[str, tuple[str, int]] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._held_down: set[str] = set()
        self._started: list[subprocess.Popen[bytes]] = []  # every process ever started
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.exits: Counter[str] = Counter()
        self.host = os.uname().nodename

    def supervise(self, restart_after_s: float = 1.0) -> None:
        def watch() -> None:
            while not self._stopping.wait(0.5):
                with self._lock:
                    dead = [
                        (name, proc.returncode)
                        for name, proc in self._procs.items()
                        if proc.poll() is not None and name not in self._held_down
                    ]
                for name, code in dead:
                    self.exits[f"{name} (status {code})"] += 1
                    say(f"worker {name} exited on its own (status {code}): starting it again")
                    if self._stopping.wait(restart_after_s):
                        return
                    self.start(name)

        self._supervisor = threading.Thread(target=watch, name="supervisor", daemon=True)
        self._supervisor.start()

    def add(self, name: str, queues: str, concurrency: int) -> None:
        self._specs[name] = (queues, concurrency)
        self.start(name)

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def start(self, name: str) -> None:
        """Start the worker unless it runs already."""
        queues, concurrency = self._specs[name]
        with self._lock:
            self._held_down.discard(name)
            running = self._procs.get(name)
            if running is not None and running.poll() is None:
                return
            log = (self.logs / f"worker-{name}.log").open("ab")
            self._procs[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers.app",
                    "worker",
                    "-Q",
                    queues,
                    "-c",
                    str(concurrency),
                    "-n",
                    f"{name}@{self.host}",
                    "--loglevel=WARNING",
                    "--without-mingle",
                    "--without-gossip",
                ],
                cwd=ROOT,
                env=self.env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self._started.append(self._procs[name])
            log.close()

    def kill(self, name: str) -> int | None:
        """SIGKILL the worker and its pool children (it stays down until ``start``); the pid."""
        with self._lock:
            self._held_down.add(name)
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                return None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            return proc.pid

    def kill_child(self, name: str, rng: random.Random, pid: int | None = None) -> int | None:
        """SIGKILL one pool child of the worker (``pid``, else one at random); its parent
        starts another."""
        with self._lock:
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                return None
            try:
                children = [child.pid for child in psutil.Process(proc.pid).children()]
            except psutil.NoSuchProcess:
                return None
            if pid not in children:
                if not children:
                    return None
                pid = rng.choice(sorted(children))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return pid

    def holding(self, ports: set[int]) -> list[tuple[str, int]]:
        """(worker, pool process) of every pool process with a connection from one of these
        local ports: the ones holding invoice locks, given the ports of the lock connections."""
        if not ports:
            return []
        with self._lock:
            procs = dict(self._procs)
        found: list[tuple[str, int]] = []
        for name, proc in procs.items():
            try:
                children = psutil.Process(proc.pid).children()
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    conns = child.net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if any(c.laddr and c.laddr.port in ports for c in conns):
                    found.append((name, child.pid))
        return found

    def dead(self) -> list[str]:
        with self._lock:
            return [n for n, p in self._procs.items() if p.poll() is not None]

    def stop(self) -> None:
        """SIGTERM (warm shutdown: tasks under way finish), then SIGKILL what is left."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        with self._lock:
            procs = list(self._started)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


# -- the run ---------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    renewals: int
    periods: int
    seed: int
    workers: int
    concurrency: int
    fault_s: float
    settle_s: float
    keep: bool
    grace_s: float = GRACE_S

    @property
    def subscriptions(self) -> int:
        return max(1, self.renewals // self.periods)


@dataclass
class Outcome:
    report: dict[str, Any]
    failed: bool


class Chaos:
    """One chaos run: set up, faults, settle, verdict. ``run`` returns the report."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.s = settings
        self.tmp = tmp
        self.pg = TempPostgres(tmp / "postgres")
        self.redis = TempRedis(tmp / "redis")
        self.sandbox: Sandbox | None = None
        self.server: ServerHandle | None = None
        self.proxy: FaultProxy | None = None
        self.pool: WorkerPool | None = None
        self.engine: Engine | None = None
        self.token_key = ""
        self.subscribers: list[Subscriber] = []
        # The test time this process last set: the sandbox reads it (it must not need the
        # database, which is down now and then).
        self.moment = START
        self.happened: list[dict[str, Any]] = []
        self.beat_failures: Counter[str] = Counter()
        self.aged: set[int] = set()
        self._fault_threads: list[threading.Thread] = []
        self.faults_ended = time.monotonic()
        self.faults_ended_wall = datetime.now(UTC)
        self._rng = random.Random(f"chaos-run:{settings.seed}")

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        self.pg.init()
        self.pg.start()
        self.redis.start()
        admin = psycopg.connect(
            f"host=127.0.0.1 port={self.pg.port} user=postgres dbname=postgres", autocommit=True
        )
        with admin:
            admin.execute("CREATE DATABASE billing")
        url = self.pg.url("billing")
        self.sandbox = Sandbox(
            now=lambda: self.moment,
            land_delay_s=SANDBOX_LAND_S,
            verify_lag_s=SANDBOX_VERIFY_LAG_S,
            seed=self.s.seed,
        )
        self.server = _start_sandbox(self.sandbox)
        schedule = self.schedule
        self.proxy = FaultProxy(self.server.url, self.s.seed, schedule, self.s.grace_s)
        proxy_url = self.proxy.start()
        from billing.crypto import new_key

        env = {
            "BILLING_MODE": "test",
            "BILLING_DATABASE_URL": url,
            "BILLING_BROKER_URL": self.redis.url(0),
            "BILLING_TOKEN_KEY": new_key(),
            "BILLING_UNKNOWN_GRACE_S": str(self.s.grace_s),
            "BILLING_CHARGE_BATCH_SIZE": "20",
            "BILLING_CHARGE_CONCURRENCY": "10",
            "BILLING_METRICS_PORT": "0",
            "FATORA_BASE_URL": proxy_url + "/v1",
            "FATORA_MODE": "test",
            "FATORA_API_KEY": self.sandbox.api_key,
            "FATORA_TIMEOUT_S": str(FATORA_TIMEOUT_S),
            "FATORA_CONNECT_TIMEOUT_S": str(FATORA_TIMEOUT_S),
            "NO_PROXY": "127.0.0.1,localhost",
        }
        self.token_key = env["BILLING_TOKEN_KEY"]
        # This process is beat and the operator: the same settings as the workers.
        os.environ.update(env)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            os.environ.pop(name, None)
        from billing.config import reset_settings_cache
        from billing.db import make_engine
        from billing.migrate import upgrade

        reset_settings_cache()
        # What this process runs later is imported now, so that the settle phase runs the code
        # the run started with even if the tree changes meanwhile (workers started again during
        # the run import it as it is then: run on a tree that stays put).
        for module in ("schedules.renewal", "schedules.sweeps", "workers.tasks"):
            importlib.import_module(module)
        upgrade(url)
        self.engine = make_engine(url, pool_size=4)
        self.seed_world(env["BILLING_TOKEN_KEY"])
        self.pool = WorkerPool({**os.environ, **env}, self.tmp)
        for i in range(self.s.workers):
            self.pool.add(f"charges{i + 1}", "charges", self.s.concurrency)
        self.pool.add("maintenance", "maintenance", 2)
        self.wait_ready()
        self.pool.supervise()

    @property
    def worker_names(self) -> tuple[list[str], str]:
        return [f"charges{i + 1}" for i in range(self.s.workers)], "maintenance"

    @property
    def schedule(self) -> list[Fault]:
        charge, maintenance = self.worker_names
        return fault_schedule(self.s.seed, self.s.fault_s, self.s.periods, charge, maintenance)

    def seed_world(self, key: str) -> None:
        """Plans (one price changing after the first period), and one customer with one card
        and one subscription per subscriber, anchored a minute apart over a period's first
        part. Bulk SQL: the rows the services would write, without a round trip per row."""
        from billing.crypto import TokenVault
        from billing.db import session_factory
        from billing.dunning import STANDARD
        from billing.models import CardToken, PlanPrice, Subscription
        from billing.periods import Interval
        from billing.plans import PlansConfig, PlanSpec
        from billing.services.customers import TOKEN_LIFETIME
        from billing.services.plans_sync import sync_plans

        assert self.engine is not None and self.sandbox is not None
        vault = TokenVault(key)
        specs = {
            code: PlanSpec(
                code=code,
                name=code,
                amount=prices[0].amount,
                currency=prices[0].currency,
                interval=Interval.MONTH,
                interval_count=1,
                cron=None,
                trial_days=0,
                dunning=STANDARD.code,
            )
            for code, prices in PRICES.items()
        }
        sessions = session_factory(self.engine)
        with sessions() as session, session.begin():
            sync_plans(
                session,
                PlansConfig(plans=specs, dunning={STANDARD.code: STANDARD}),
                START - timedelta(days=1),
            )
        n = self.s.subscriptions
        behaviours = behaviours_for(self.s.seed, n)
        rounds = max(1, int(self.s.fault_s / self.s.periods / ROUND_S))
        spread = max(1, int(rounds * 0.6))
        codes = list(PRICES)
        with self.engine.begin() as conn:
            plan_ids: dict[str, int] = {
                str(code): int(plan_id)
                for code, plan_id in conn.execute(text("SELECT code, id FROM plans"))
            }
            for code, prices in PRICES.items():
                for price in prices[1:]:
                    conn.execute(
                        insert(PlanPrice).values(
                            plan_id=plan_ids[code],
                            amount_minor=to_minor(price.amount, price.currency),
                            currency=price.currency,
                            effective_from=price.effective_from,
                        )
                    )
            customer_ids = list(
                conn.execute(
                    text(
                        "INSERT INTO customers (external_id, name, email, created_at) "
                        "SELECT 'chaos-' || g, 'Chaos ' || g, 'chaos' || g || '@example.com', "
                        ":now FROM generate_series(1, :n) AS g ORDER BY g RETURNING id"
                    ),
                    {"n": n, "now": START},
                ).scalars()
            )
            cards = []
            for customer_id, behaviour in zip(customer_ids, behaviours, strict=True):
                token = self.sandbox.issue_token(behaviour, issued_at=START)
                cards.append(
                    {
                        "customer_id": customer_id,
                        "ciphertext": vault.encrypt(token),
                        "fingerprint": vault.fingerprint(token),
                        "issued_at": START,
                        "expires_at": START + TOKEN_LIFETIME,
                        "status": "active",
                        "created_at": START,
                    }
                )
            card_ids = list(
                conn.execute(
                    insert(CardToken).returning(CardToken.id, sort_by_parameter_order=True), cards
                ).scalars()
            )
            rows = []
            for i, (customer_id, card_id) in enumerate(zip(customer_ids, card_ids, strict=True)):
                anchor = START + timedelta(minutes=i % spread)
                rows.append(
                    {
                        "customer_id": customer_id,
                        "plan_id": plan_ids[codes[i % len(codes)]],
                        "card_token_id": card_id,
                        "status": "active",
                        "anchor_at": anchor,
                        "next_billing_at": anchor,
                        "cancel_at_period_end": False,
                        "created_at": START,
                        "updated_at": START,
                    }
                )
            sub_ids = list(
                conn.execute(
                    insert(Subscription).returning(Subscription.id, sort_by_parameter_order=True),
                    rows,
                ).scalars()
            )
            conn.execute(text("ANALYZE"))
        self.subscribers = [
            Subscriber(sub_id, codes[i % len(codes)], rows[i]["anchor_at"], behaviours[i])
            for i, sub_id in enumerate(sub_ids)
        ]
        self.set_clock(START)

    def wait_ready(self, timeout_s: float = 90.0, *, supervised: bool = False) -> None:
        """Every worker answers a ping. Before the supervisor runs, a worker that exits is a
        setup failure; once it runs, it is started again."""
        from workers.app import app

        assert self.pool is not None
        wanted = {f"{name}@{self.pool.host}" for name in self.pool.names}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pool.dead() and not supervised:
                raise ServerError(f"worker(s) {', '.join(self.pool.dead())} exited at start")
            try:
                replies = app.control.ping(destination=sorted(wanted), timeout=1.0)
            except Exception:
                replies = []  # the broker is still coming back
            if {name for reply in replies or [] for name in reply} >= wanted:
                return
        raise ServerError(f"workers not ready after {timeout_s:.0f} s")

    # -- beat ---------------------------------------------------------------------------------

    def set_clock(self, at: datetime) -> bool:
        from billing.clock import DatabaseClock

        assert self.engine is not None
        try:
            DatabaseClock(self.engine).set(at)
        except Exception:
            self.beat_failures["clock"] += 1
            return False
        self.moment = at
        return True

    def send(
        self,
        task: str,
        *,
        expires: float | None = None,
        args: list[int] | None = None,
        queue: str = "maintenance",
    ) -> None:
        from workers.app import app

        try:
            task_args = [args] if args is not None else []
            app.send_task(task, args=task_args, queue=queue, expires=expires)
        except Exception:
            self.beat_failures[task] += 1

    def fault_phase(self) -> None:
        """Beat rounds while the schedule's faults happen, period after period."""
        assert self.proxy is not None
        schedule = self.schedule
        period_s = self.s.fault_s / self.s.periods
        t0 = time.monotonic()
        self.proxy.begin_faults(t0)
        runner = threading.Thread(
            target=self._run_schedule, args=(schedule, t0), name="faults", daemon=True
        )
        runner.start()
        period, minute, rounds = -1, 0, 0
        while (elapsed := time.monotonic() - t0) < self.s.fault_s:
            now_period = min(int(elapsed // period_s), self.s.periods - 1)
            if now_period != period:
                period, minute = now_period, 0
                say(f"period {period + 1} of {self.s.periods} at {elapsed:.0f} s")
            self.set_clock(add_months(START, period) + timedelta(minutes=minute))
            minute += 1
            self.send("billing.renew", expires=30)
            self.send("billing.retry_due", expires=30)
            if rounds % JANITOR_EVERY == JANITOR_EVERY - 1:
                self.send("billing.janitor", expires=60)
            rounds += 1
            time.sleep(max(0.0, t0 + rounds * ROUND_S - time.monotonic()))
        self.proxy.end_faults()
        runner.join()
        for thread in self._fault_threads:
            thread.join()
        self.faults_ended = time.monotonic()
        self.faults_ended_wall = datetime.now(UTC)

    # -- faults -------------------------------------------------------------------------------

    def _run_schedule(self, schedule: list[Fault], t0: float) -> None:
        for fault in schedule:
            time.sleep(max(0.0, t0 + fault.at - time.monotonic()))
            if fault.kind.startswith("storm:"):
                continue  # the proxy reads the storms from the schedule
            thread = threading.Thread(
                target=self._inflict, args=(fault, t0), name=fault.kind, daemon=True
            )
            self._fault_threads.append(thread)
            thread.start()

    def _inflict(self, fault: Fault, t0: float) -> None:
        assert self.pool is not None
        started = time.monotonic() - t0
        note = ""
        try:
            if fault.kind in ("sigkill_worker", "sigkill_pool_child"):
                assert fault.target is not None
                name, child = self._victim(fault.target)
                when = "while it held invoice locks" if child else "(no worker held a lock)"
                if fault.kind == "sigkill_worker":
                    pid = self.pool.kill(name)
                    time.sleep(fault.lasts)
                    self.pool.start(name)
                else:
                    pid = self.pool.kill_child(name, self._rng, child)
                note = f"{name} pid {pid} {when}" if pid else f"{name} was not running"
            elif fault.kind == "redis_restart":
                self.redis.kill()
                time.sleep(fault.lasts)
                self.redis.start()
            elif fault.kind == "postgres_restart":
                self.pg.stop("immediate")
                time.sleep(fault.lasts)
                self.pg.start()
            elif fault.kind == "lock_cut":
                note = self._cut_a_lock()
        except Exception as exc:
            note = f"failed: {type(exc).__name__}: {exc}"
        happened = {**fault.as_dict(), "started": round(started, 2)}
        if note:
            happened["note"] = note
        self.happened.append(happened)
        say(f"{started:6.1f} s  {fault.kind}{': ' + note if note else ''}")

    def _victim(self, planned: str) -> tuple[str, int | None]:
        """The worker to kill: one whose pool process holds invoice locks (in the middle of a
        collection) if one does within a few seconds, else the planned one."""
        assert self.pool is not None
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            holders = self.pool.holding(self._lock_ports())
            if holders:
                return self._rng.choice(sorted(holders))
            time.sleep(0.05)
        return planned, None

    def _lock_ports(self) -> set[int]:
        """The client ports of the database connections that hold invoice locks now."""
        try:
            with psycopg.connect(
                f"host=127.0.0.1 port={self.pg.port} user=postgres dbname=billing",
                autocommit=True,
                connect_timeout=1,
            ) as conn:
                rows = conn.execute(
                    "SELECT DISTINCT a.client_port FROM pg_locks AS l "
                    "JOIN pg_stat_activity AS a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                    "AND l.granted AND l.classid = %s AND l.objsubid = 2",
                    (INVOICE_LOCK_SPACE,),
                ).fetchall()
        except psycopg.Error:
            return set()
        return {int(row[0]) for row in rows if row[0] is not None}

    def _cut_a_lock(self) -> str:
        """Terminate the backend of a connection that holds invoice locks, if one does now, and
        queue a charge of its invoices at once: a duplicate delivery meeting a lost lock."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(
                    f"host=127.0.0.1 port={self.pg.port} user=postgres dbname=billing",
                    autocommit=True,
                    connect_timeout=2,
                ) as conn:
                    holders = {
                        int(pid): [int(i) for i in ids]
                        for pid, ids in conn.execute(
                            "SELECT pid, array_agg(objid ORDER BY objid) FROM pg_locks "
                            "WHERE locktype = 'advisory' AND granted AND classid = %s "
                            "AND objsubid = 2 GROUP BY pid",
                            (INVOICE_LOCK_SPACE,),
                        ).fetchall()
                    }
                    if holders:
                        pid = self._rng.choice(sorted(holders))
                        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        self.send("billing.charge_invoices", args=holders[pid], queue="charges")
                        return (
                            f"backend {pid} of {len(holders)} holding invoice locks; its "
                            f"{len(holders[pid])} invoice(s) queued again"
                        )
            except psycopg.Error:
                pass
            time.sleep(0.1)
        return "no backend held an invoice lock"

    # -- healing and settling -----------------------------------------------------------------

    def heal(self) -> None:
        """Every server and worker up again (a fault thread restarts what it stopped)."""
        assert self.pool is not None
        if not self.pg.running():
            self.pg.start()
        if not self.redis.running():
            self.redis.start()
        self.wait_ready(supervised=True)

    def settle(self) -> tuple[bool, float]:
        """Let the janitor and retries finish. True once every attempt is resolved and every
        invoice of a good card paid; and the seconds it took."""
        from billing.runtime import get_runtime
        from schedules.renewal import run_renewal_pass
        from schedules.sweeps import JanitorIncomplete, due_retries, run_janitor
        from workers.tasks import enqueue_charges, enqueue_retries

        assert self.proxy is not None and self.engine is not None
        started = self.faults_ended
        deadline = time.monotonic() + self.s.settle_s
        rt = get_runtime()
        cap = add_months(START, self.s.periods - 1) + SETTLE_CLOCK_SPAN
        self._retrying(lambda: enqueue_charges(run_renewal_pass(rt).invoice_ids), deadline)
        quiet = 0
        while time.monotonic() < deadline:
            state = self._retrying(self._progress, deadline)
            if state is None:
                break
            unresolved, unpaid, in_flight, next_due = state
            queued = self._queued()
            if unresolved == 0 and unpaid == 0 and in_flight == 0 and queued == 0:
                quiet += 1
                if quiet >= 2:
                    return True, time.monotonic() - started
                time.sleep(ROUND_S)
                continue
            quiet = 0
            step = self.moment + timedelta(minutes=1)
            if unresolved == 0 and next_due is not None and next_due > step:
                step = next_due  # nothing to wait for but the next retry or dunning step
            self.set_clock(min(step, cap))
            self._age(self.faults_ended_wall)

            def sweep() -> None:
                try:
                    report = run_janitor(rt, everything=True)
                    enqueue_retries(report.retry_in)
                except JanitorIncomplete:
                    pass
                enqueue_charges(due_retries(rt))

            self._retrying(sweep, deadline)
            time.sleep(ROUND_S)
        return False, time.monotonic() - started

    def _last_verifies(self, within_s: float = 30.0) -> None:
        """With the workers stopped, verify whatever a task that ran until the last moment left
        unresolved (as ``billing reconcile`` would), so that the verdict reads a still picture."""
        from billing.runtime import get_runtime
        from schedules.sweeps import JanitorIncomplete, run_janitor

        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            state = self._retrying(self._progress, deadline)
            if state is None or state[0] == 0:
                return
            with contextlib.suppress(JanitorIncomplete):
                run_janitor(get_runtime(), everything=True)
            time.sleep(ROUND_S)

    def _progress(self) -> tuple[int, int, int, datetime | None]:
        """Unresolved attempts, unpaid invoices of good cards, attempts in flight, and the
        earliest time an open invoice is due for a charge."""
        from billing.models import ChargeAttempt, Invoice

        assert self.engine is not None
        good = [s.id for s in self.subscribers if s.good_card]
        with self.engine.connect() as conn:
            unresolved = conn.execute(
                select(ChargeAttempt.status).where(ChargeAttempt.status.in_(UNRESOLVED_VALUES))
            ).scalars()
            statuses = Counter(unresolved)
            unpaid = conn.execute(
                select(Invoice.id).where(
                    Invoice.status != "paid", Invoice.subscription_id.in_(good)
                )
            ).all()
            next_due = conn.execute(
                select(Invoice.next_attempt_at)
                .where(Invoice.status == "open", Invoice.next_attempt_at.is_not(None))
                .order_by(Invoice.next_attempt_at)
                .limit(1)
            ).scalar_one_or_none()
        return sum(statuses.values()), len(unpaid), statuses["in_flight"], next_due

    def _paid(self) -> int:
        assert self.engine is not None
        with self.engine.connect() as conn:
            paid = conn.execute(text("SELECT count(*) FROM invoices WHERE status = 'paid'"))
            return int(paid.scalar_one())

    def _queued(self) -> int:
        try:
            client = redis.Redis.from_url(self.redis.url(0))
            with contextlib.closing(client):
                return int(client.llen("charges")) + int(client.llen("maintenance"))
        except redis.RedisError:
            return -1

    def _age(self, faults_end_wall: datetime) -> None:
        """Move the written-at mark of attempts whose request may have left without the worker
        saying when (it died, or could not record) a send window into the past, once nothing
        sent before the faults ended can still land: what ``SEND_WINDOW`` of real time would do."""
        from billing.models import ChargeAttempt

        assert self.engine is not None and self.proxy is not None
        margin = timedelta(seconds=max(LAND_MAX_S, SANDBOX_LAND_S) + 1.0)
        if self.proxy.pending_landings or datetime.now(UTC) < faults_end_wall + margin:
            return
        shift = SEND_WINDOW + timedelta(seconds=self.s.grace_s)
        with self.engine.begin() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    select(ChargeAttempt.id).where(
                        ChargeAttempt.status.in_(UNRESOLVED_VALUES),
                        ChargeAttempt.sent_wall_at.is_(None),
                        ChargeAttempt.created_wall_at < faults_end_wall,
                    )
                )
                if row[0] not in self.aged
            ]
            if ids:
                conn.execute(
                    text(
                        "UPDATE charge_attempts SET created_wall_at = created_wall_at "
                        "- make_interval(secs => :shift) WHERE id = ANY(:ids)"
                    ),
                    {"shift": shift.total_seconds(), "ids": ids},
                )
        self.aged.update(ids)

    def _retrying(self, work: Callable[[], Any], deadline: float) -> Any:
        """``work()``, tried again while the database or the broker is still coming back."""
        while True:
            try:
                return work()
            except Exception as exc:
                if time.monotonic() > deadline:
                    say(f"gave up: {type(exc).__name__}: {exc}")
                    return None
                time.sleep(0.5)

    # -- verdict ------------------------------------------------------------------------------

    def snapshot(self) -> tuple[list[InvoiceRow], list[AttemptRow], dict[str, Any]]:
        from billing.db import session_factory
        from billing.models import ChargeAttempt, Event, Invoice
        from billing.services import control

        assert self.engine is not None
        with self.engine.connect() as conn:
            invoices = [
                InvoiceRow(*row)
                for row in conn.execute(
                    select(
                        Invoice.id,
                        Invoice.subscription_id,
                        Invoice.period_start,
                        Invoice.amount_minor,
                        Invoice.currency,
                        Invoice.status,
                        Invoice.failure_count,
                    )
                )
            ]
            attempts = [
                AttemptRow(*row)
                for row in conn.execute(
                    select(
                        ChargeAttempt.id,
                        ChargeAttempt.invoice_id,
                        ChargeAttempt.order_id,
                        ChargeAttempt.status,
                        ChargeAttempt.amount_minor,
                        ChargeAttempt.currency,
                    )
                )
            ]
            alerts = Counter(
                conn.execute(select(Event.kind).where(Event.kind.like("alert.%"))).scalars()
            )
        with session_factory(self.engine)() as session:
            paused = control.collection_paused(session)
        return invoices, attempts, {"alerts": dict(sorted(alerts.items())), "paused": paused}

    def scan_secrets(self) -> tuple[int, list[str], dict[str, Any]]:
        """Every card token the sandbox issued, its API key and the token key, looked for in
        clear in every log of the temporary directory, every key of the run's Redis and every
        column of every table of its database: the ``secrets_in_clear`` count, examples, and
        what was looked at and where secrets were found (never a secret's value)."""
        assert self.sandbox is not None and self.engine is not None
        secrets = Secrets(
            {
                "card token": self.sandbox.issued_tokens(),
                "API key": [self.sandbox.api_key],
                "token key": [key.strip() for key in self.token_key.split(",")],
            }
        )
        scan = scan_files(secrets, [self.tmp], prefix="log", pattern="*.log")
        scan += scan_redis(secrets, self.redis.url(0), all_databases=True)
        scan += scan_database(secrets, self.engine)
        found = scan.by_place()
        count = len({(hit.place, hit.secret) for hit in scan.hits})
        examples = [f"{place}: {', '.join(names)}" for place, names in found.items()][:5]
        summary = {
            "secrets": secrets.count,
            "places": dict(Counter(place.split(" ", 1)[0] for place in scan.places)),
            "found": found,
        }
        return count, examples, summary

    def run(self) -> Outcome:
        began = time.monotonic()
        say(f"setting up in {self.tmp}")
        self.setup()
        assert self.proxy is not None and self.sandbox is not None and self.pool is not None
        say(
            f"{len(self.subscribers)} subscriptions x {self.s.periods} periods, "
            f"{self.s.fault_s:.0f} s of faults (seed {self.s.seed})"
        )
        self.fault_phase()
        self.heal()
        paid_in_faults = self._retrying(self._paid, time.monotonic() + 30)
        say(f"faults stopped with {paid_in_faults} invoice(s) paid: settling")
        settled, settle_s = self.settle()
        self.pool.stop()
        self._last_verifies()
        invoices, attempts, info = self.snapshot()
        charges = self.sandbox.charges()
        counts, examples = judge(charges, self.subscribers, invoices, attempts, self.s.periods)
        counts["secrets_in_clear"], in_clear, secret_scan = self.scan_secrets()
        if in_clear:
            examples["secrets_in_clear"] = in_clear
        good = {s.id for s in self.subscribers if s.good_card}
        report: dict[str, Any] = {
            "seed": self.s.seed,
            "renewals": len(invoices),
            "renewals_expected": len(good) * self.s.periods,
            "subscriptions": len(self.subscribers),
            "periods": self.s.periods,
            "gateway_charges": sum(1 for c in charges if c["status"] == "SUCCESS"),
            "gateway_calls": dict(self.proxy.calls),
            **counts,
            "paid_during_faults": paid_in_faults,
            "settled": settled,
            "time_to_settle_s": round(settle_s, 1),
            "fault_s": self.s.fault_s,
            "wall_s": round(time.monotonic() - began, 1),
            "good_cards_dunned": sum(
                1 for i in invoices if i.subscription_id in good and i.failure_count > 0
            ),
            "collection_paused": info["paused"],
            "alerts": info["alerts"],
            "aged_attempts": len(self.aged),
            "late_landings": self.proxy.late_landings,
            "beat_failures": dict(self.beat_failures),
            "worker_exits": dict(self.pool.exits),
            "proxy_faults": dict(sorted(self.proxy.applied.items())),
            "card_behaviours": dict(Counter(s.behaviour for s in self.subscribers).most_common()),
            "secret_scan": secret_scan,
            "examples": examples,
            "schedule": sorted(
                self.happened + [f.as_dict() for f in self.schedule if f.kind.startswith("storm:")],
                key=lambda f: float(f["t"]),
            ),
        }
        return Outcome(report, failed=any(counts.values()))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            self.server.stop()
        if self.engine is not None:
            self.engine.dispose()
        self.redis.close()
        self.pg.close()


def _start_sandbox(sandbox: Sandbox) -> ServerHandle:
    from billing.fatora.sandbox import start_server_in_thread

    return start_server_in_thread(sandbox, latency_ms=SANDBOX_LATENCY_MS, hang_s=3.0)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--renewals", type=int, default=4000, help="invoices over all periods")
    parser.add_argument("--periods", type=int, default=3, help=f"billing periods (1-{MAX_PERIODS})")
    parser.add_argument("--seed", type=int, default=1, help="draws the faults and the cards")
    parser.add_argument("--workers", type=int, default=2, help="worker processes on 'charges'")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument(
        "--fault-seconds",
        type=float,
        default=None,
        help="length of the fault phase (default: one second per 20 renewals, 24 to 240)",
    )
    parser.add_argument(
        "--settle-seconds", type=float, default=180.0, help="give up settling after this long"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, data)"
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=GRACE_S,
        help=f"the workers' BILLING_UNKNOWN_GRACE_S (below {LAND_MAX_S} s, charges that land "
        "late are taken for never made: unsafe on purpose)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.periods <= MAX_PERIODS:
        parser.error(f"--periods must be between 1 and {MAX_PERIODS} (card tokens live 6 months)")
    if args.renewals < args.periods:
        parser.error("--renewals must be at least --periods")
    if args.workers < 1 or args.concurrency < 1:
        parser.error("--workers and --concurrency must be at least 1")
    fault_s = args.fault_seconds
    if fault_s is None:
        fault_s = min(240.0, max(24.0, args.renewals / 20))
    if fault_s < 2 * args.periods:
        parser.error("--fault-seconds must give each period two seconds at least")
    return Settings(
        renewals=args.renewals,
        periods=args.periods,
        seed=args.seed,
        workers=args.workers,
        concurrency=args.concurrency,
        fault_s=float(fault_s),
        settle_s=args.settle_seconds,
        keep=args.keep,
        grace_s=args.grace_seconds,
    )


def _terminate(signum: int, _frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="billing-chaos-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when this is root
    # This process's own billing work (the settle phase) logs there, as the workers do in theirs.
    logging.basicConfig(
        filename=tmp / "harness.log",
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    chaos = Chaos(settings, tmp)
    keep = settings.keep
    try:
        outcome = chaos.run()
    except Exception as exc:
        (tmp / "error.txt").write_text(traceback.format_exc())
        print(f"error: the chaos run stopped before its verdict: {exc}", file=sys.stderr)
        keep = True
        return 2
    finally:
        chaos.close()
        if keep:
            say(f"kept {tmp}")
    print(json.dumps(outcome.report), flush=True)
    if outcome.failed:
        say(f"INVARIANT VIOLATED; logs and data kept in {tmp}")
    elif not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
