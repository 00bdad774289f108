"""Benchmark: the due finder's cost grows with the number due, not with the table.

For each table size T (default 10 000 and 1 000 000 subscriptions) with the same D due (default
1 000), it times the claim of all D due subscriptions in batches of 500 through the production
code path, ``schedules.renewal.claim_due`` (``FOR UPDATE SKIP LOCKED`` over the partial index
``ix_subscriptions_due``), and prints one JSON line with the best and median times, their
ratios, and the query plans. The sizes are timed in turn, round after round, so that a slow
spell of the machine weighs on every size alike.

Each size has a dedicated database (``billing_bench_10k``, ``billing_bench_1m``, created if
missing) on the PostgreSQL server named by ``BILLING_BENCH_DATABASE_URL``; that URL is only used
to create them, and their contents are replaced on every run. Each repeat runs in one
transaction that is rolled back, so every repeat sees the same data.

    .venv/bin/python bench/due_scan.py [--due 1000] [--totals 10000,1000000] [--repeat 9]
        [--layout spread|clustered] [--database billing_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

# Run from a checkout without installing: the project root is the parent of bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billing.db import normalize_url
from billing.migrate import upgrade
from billing.models import Subscription
from schedules.renewal import claim_due, due_query

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 500
TARGET_RATIO = 1.2
# One in this many subscriptions that are not due has no next billing time (canceled).
NULL_EVERY = 5


def label(total: int) -> str:
    if total % 1_000_000 == 0:
        return f"{total // 1_000_000}m"
    if total % 1_000 == 0:
        return f"{total // 1_000}k"
    return str(total)


def bench_url(admin_url: str, database: str) -> str:
    """Create ``database`` on the server of ``admin_url`` if missing; its URL."""
    admin = make_url(normalize_url(admin_url))
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
            ).scalar()
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote_identifier(database)
                conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
    finally:
        engine.dispose()
    return admin.set(database=database).render_as_string(hide_password=False)


# Where the due rows sit in the table. ``spread``: evenly through it, one in total/due, as on a
# live table where every renewal's UPDATE has moved the row (its indexed column changes, so the
# new version goes wherever there is room). ``clustered``: one contiguous run, as if they had
# all been inserted together and never updated: the same rows on the fewest heap pages.
LAYOUTS = {
    "spread": "g % :stride = 0 AND g / :stride <= :due",
    "clustered": "g > :start AND g <= :start + :due",
}


def load_fixtures(
    engine: Engine, total: int, due: int, now: datetime, layout: str = "spread"
) -> None:
    """Replace the benchmark data: one customer, one priced plan, ``total`` subscriptions.

    ``due`` of them are due (in the past, placed as ``layout`` says); one in ``NULL_EVERY`` of
    the others is canceled (no next billing time); the rest fall due over the next 30 days.
    """
    stride = total // due
    is_due = LAYOUTS[layout]
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE customers, dunning_policies RESTART IDENTITY CASCADE"))
        conn.execute(
            text(
                "INSERT INTO dunning_policies (code, retry_after_days, final_action) "
                "VALUES ('standard', '[1, 3, 5, 7]', 'cancel')"
            )
        )
        customer_id = conn.execute(
            text(
                "INSERT INTO customers (external_id, name, email, created_at) "
                "VALUES ('bench-1', 'Bench Customer', 'bench@example.com', :now) RETURNING id"
            ),
            {"now": now},
        ).scalar_one()
        plan_id = conn.execute(
            text(
                "INSERT INTO plans (code, name, currency, interval, interval_count, "
                "dunning_code, created_at, updated_at) "
                "VALUES ('bench-monthly', 'Bench monthly', 'QAR', 'month', 1, 'standard', "
                ":now, :now) RETURNING id"
            ),
            {"now": now},
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO plan_prices (plan_id, amount_minor, currency, effective_from) "
                "VALUES (:plan, 9900, 'QAR', :now - interval '1 year')"
            ),
            {"plan": plan_id, "now": now},
        )
        conn.execute(
            text(
                f"""
                INSERT INTO subscriptions (
                    customer_id, plan_id, status, anchor_at, current_period_start,
                    current_period_end, next_billing_at, canceled_at, created_at, updated_at
                )
                SELECT :customer, :plan, s.status, :now - interval '200 days',
                       s.next_at - interval '30 days', s.next_at,
                       s.next_at, s.canceled_at, :now - interval '200 days', :now
                FROM (
                    SELECT
                        CASE WHEN d.is_due THEN 'active'
                             WHEN g % :null_every = 1 THEN 'canceled'
                             ELSE 'active' END AS status,
                        CASE WHEN d.is_due
                                 THEN :now - make_interval(secs => 1 + (g::bigint * 7919) % 86400)
                             WHEN g % :null_every = 1 THEN NULL
                             ELSE :now + make_interval(secs => 3600 + (g::bigint * 7919) % 2592000)
                        END AS next_at,
                        CASE WHEN NOT d.is_due AND g % :null_every = 1
                             THEN :now - interval '10 days' END AS canceled_at
                    FROM generate_series(1, :total) AS g,
                         LATERAL (SELECT {is_due} AS is_due) AS d
                ) AS s
                """
            ),
            {
                "customer": customer_id,
                "plan": plan_id,
                "now": now,
                "total": total,
                "due": due,
                "stride": stride,
                "start": (total - due) // 2,
                "null_every": NULL_EVERY,
            },
        )
    # Statistics as autovacuum would keep them on a live table.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) subscriptions")


def claim_all(engine: Engine, now: datetime) -> tuple[float, int, int]:
    """Claim every due subscription, batch by batch, in one rolled-back transaction.

    Only the claims are timed. Between batches the claimed rows are moved to their next period
    (as ``renew_one`` does) so that the next claim finds the next batch. Returns the claim time
    in milliseconds, the number of claim calls (the last one finds nothing) and rows claimed.
    """
    elapsed = 0.0
    batches = 0
    claimed = 0
    with Session(engine) as session:
        session.begin()
        try:
            while True:
                started = time.perf_counter()
                due = claim_due(session, now, BATCH)
                elapsed += time.perf_counter() - started
                batches += 1
                if not due:
                    break
                claimed += len(due)
                session.execute(
                    update(Subscription)
                    .where(Subscription.id.in_([sub.id for sub in due]))
                    .values(next_billing_at=text("next_billing_at + interval '30 days'")),
                    execution_options={"synchronize_session": False},
                )
                session.expunge_all()
        finally:
            session.rollback()
    return elapsed * 1000.0, batches, claimed


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def explain(engine: Engine, now: datetime) -> dict[str, Any]:
    """The plan of one claim batch, executed (EXPLAIN ANALYZE) in a rolled-back transaction."""
    query = due_query(now, BATCH).with_for_update(skip_locked=True)
    compiled = query.compile(dialect=engine.dialect)
    sql = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + str(compiled)
    with engine.connect() as conn:
        try:
            raw = conn.exec_driver_sql(sql, compiled.params).scalar_one()
        finally:
            conn.rollback()
    document = json.loads(raw) if isinstance(raw, str) else raw
    top = document[0]["Plan"]
    nodes = list(walk(top))
    # The node that reads the table: the one naming an index, else the first scan.
    indexed = [node for node in nodes if node.get("Index Name")]
    scans = indexed or [node for node in nodes if "Scan" in node["Node Type"]]
    scan = scans[0] if scans else {}
    return {
        "top": top["Node Type"],
        "nodes": [node["Node Type"] for node in nodes],
        "scan": scan.get("Node Type"),
        "index": scan.get("Index Name"),
        "relation": scan.get("Relation Name"),
        "seq_scan": any(node["Node Type"] == "Seq Scan" for node in nodes),
        "batch_ms": round(float(document[0].get("Execution Time", 0.0)), 3),
        "shared_hit": top.get("Shared Hit Blocks"),
        "shared_read": top.get("Shared Read Blocks"),
        "shared_dirtied": top.get("Shared Dirtied Blocks"),
    }


def table_size(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT pg_relation_size('subscriptions'), "
                "pg_relation_size('ix_subscriptions_due'), "
                "(SELECT count(*) FROM subscriptions WHERE next_billing_at IS NULL)"
            )
        ).one()
    return {"heap_bytes": int(row[0]), "index_bytes": int(row[1]), "null_next": int(row[2])}


def run(urls: dict[int, str], due: int, repeat: int, layout: str = "spread") -> dict[str, Any]:
    """Load every size into its own database, then time the sizes in turn, ``repeat`` rounds:
    a slow spell of the machine falls on all sizes alike instead of on whichever ran then."""
    totals = sorted(urls)
    engines = {total: create_engine(urls[total]) for total in totals}
    now = datetime.now(UTC).replace(microsecond=0)
    result: dict[str, Any] = {"due": due, "layout": layout}
    times: dict[int, list[float]] = {total: [] for total in totals}
    details: dict[str, Any] = {}
    batches = 0
    try:
        for total in totals:
            if due > total:
                raise SystemExit(f"--due {due} is more than the table of {total}")
            upgrade(urls[total])
            load_fixtures(engines[total], total, due, now, layout)
            claim_all(engines[total], now)  # warm-up: caches, hint bits, statement cache
        for _ in range(repeat):
            for total in totals:
                elapsed, batches, claimed = claim_all(engines[total], now)
                if claimed != due:
                    raise SystemExit(f"claimed {claimed} of {due} due at T={total}")
                times[total].append(elapsed)
        for total in totals:
            name = label(total)
            result[f"t_{name}_ms"] = round(min(times[total]), 3)
            details[name] = {
                "best_ms": round(min(times[total]), 3),
                "median_ms": round(statistics.median(times[total]), 3),
                "plan": explain(engines[total], now),
                **table_size(engines[total]),
            }
    finally:
        for engine in engines.values():
            engine.dispose()
    small, large = totals[0], totals[-1]
    result["ratio"] = round(min(times[large]) / min(times[small]), 3)
    result["median_ratio"] = round(
        statistics.median(times[large]) / statistics.median(times[small]), 3
    )
    result["target_ratio"] = TARGET_RATIO
    result["batches"] = batches
    result["batch_size"] = BATCH
    result["repeat"] = repeat
    result["plan_top"] = details[label(large)]["plan"]["top"]
    result["uses_due_index"] = all(
        entry["plan"]["index"] == "ix_subscriptions_due" and not entry["plan"]["seq_scan"]
        for entry in details.values()
    )
    result["runs"] = details
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--due", type=int, default=1000, help="due subscriptions (D)")
    parser.add_argument(
        "--totals",
        default="10000,1000000",
        help="comma-separated table sizes, smallest first (the ratio is last / first)",
    )
    parser.add_argument("--repeat", type=int, default=9, help="timed rounds over the sizes")
    parser.add_argument(
        "--database",
        default="billing_bench",
        help="benchmark database name prefix (one database per size, created if missing)",
    )
    parser.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="spread", help="where the due rows sit"
    )
    args = parser.parse_args(argv)
    totals = sorted(int(part) for part in args.totals.split(",") if part.strip())
    if len(totals) < 2 or args.due < 1 or args.repeat < 1:
        parser.error("need two or more --totals, --due >= 1 and --repeat >= 1")
    admin_url = os.environ.get("BILLING_BENCH_DATABASE_URL", DEFAULT_URL)
    urls = {total: bench_url(admin_url, f"{args.database}_{label(total)}") for total in totals}
    print(json.dumps(run(urls, args.due, args.repeat, args.layout)))


if __name__ == "__main__":
    main()
