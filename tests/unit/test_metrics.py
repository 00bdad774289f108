"""Metrics: the scrape-time collector, what is counted and when, bounded labels, and the
dashboard and alert rules under deploy/ naming only figures the exporter exposes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from billing import metrics
from billing.fatora import FatoraClient, GatewayTimeout
from billing.metrics import BillingCollector, BrokerFigures, DatabaseFigures, UnresolvedGroup

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def value(name: str, **labels: str) -> float:
    """The current value of a sample of prometheus_client's default registry (0 if absent)."""
    from prometheus_client import REGISTRY

    found = REGISTRY.get_sample_value(name, labels)
    return found or 0.0


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``registry`` as its text exposition reads back."""
    text_ = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text_)
        for sample in family.samples
    }


FIGURES = DatabaseFigures(
    open_by_step={0: 5, 1: 2, 3: 1, 12: 4, 15: 1},
    unresolved=(
        UnresolvedGroup("collect", "unknown", 2, NOW - timedelta(minutes=90)),
        UnresolvedGroup("collect", "in_flight", 1, NOW - timedelta(minutes=2)),
        UnresolvedGroup("checkout", "pending", 3, NOW - timedelta(hours=5)),
    ),
    paused=True,
)


def registry_with(readers: dict[str, Any]) -> tuple[CollectorRegistry, BillingCollector]:
    collector = BillingCollector(readers)
    registry = CollectorRegistry()
    registry.register(collector)
    return registry, collector


# -- the collector --------------------------------------------------------------------------


def test_database_figures_become_gauges_with_bounded_labels() -> None:
    registry, _ = registry_with({"database": lambda: metrics.database_families(FIGURES, NOW)})
    got = scrape(registry)
    step = {
        dict(labels)["dunning_step"]: v
        for (name, labels), v in got.items()
        if name == "billing_invoices_open"
    }
    # Steps past MAX_STEP are one label: a runaway count cannot make new series.
    assert step == {"0": 5, "1": 2, "3": 1, "10+": 5}
    unresolved = {
        (dict(labels)["kind"], dict(labels)["status"]): v
        for (name, labels), v in got.items()
        if name == "billing_attempts_unresolved"
    }
    assert unresolved[("collect", "unknown")] == 2
    assert unresolved[("collect", "in_flight")] == 1
    assert unresolved[("checkout", "pending")] == 3
    assert unresolved[("collect", "pending")] == 0  # every kind and status, zero when none
    assert len(unresolved) == 6
    oldest = {
        dict(labels)["kind"]: v
        for (name, labels), v in got.items()
        if name == "billing_attempts_unresolved_oldest_seconds"
    }
    assert oldest == {"collect": 90 * 60, "checkout": 5 * 3600}
    assert got[("billing_collection_paused", ())] == 1
    assert got[("billing_scrape_source_up", (("source", "database"),))] == 1
    assert got[("billing_scrape_errors_total", (("source", "database"),))] == 0


def test_nothing_unresolved_reads_zero_not_absent() -> None:
    empty = DatabaseFigures(open_by_step={}, unresolved=(), paused=False)
    registry, _ = registry_with({"database": lambda: metrics.database_families(empty, NOW)})
    got = scrape(registry)
    assert got[("billing_attempts_unresolved_oldest_seconds", (("kind", "collect"),))] == 0
    assert got[("billing_invoices_open", (("dunning_step", "0"),))] == 0
    assert got[("billing_collection_paused", ())] == 0


def test_a_source_that_fails_is_reported_and_never_fails_the_scrape() -> None:
    def broken() -> list[Metric]:
        raise OSError("connection refused by db.internal for user billing")

    def broker() -> list[Metric]:
        return metrics.broker_families(BrokerFigures({"charges": 7}))

    registry, _ = registry_with({"database": broken, "redis": broker})
    first = scrape(registry)
    second = scrape(registry)
    assert ("billing_collection_paused", ()) not in second  # no made-up zero
    assert second[("billing_queue_depth", (("queue", "charges"),))] == 7
    assert second[("billing_scrape_source_up", (("source", "database"),))] == 0
    assert second[("billing_scrape_source_up", (("source", "redis"),))] == 1
    assert first[("billing_scrape_errors_total", (("source", "database"),))] == 1
    assert second[("billing_scrape_errors_total", (("source", "database"),))] == 2
    assert "db.internal" not in generate_latest(registry).decode()


def test_registering_the_collector_reads_nothing() -> None:
    calls: list[str] = []

    def database() -> list[Metric]:
        calls.append("read")
        return []

    registry = CollectorRegistry(auto_describe=True)
    registry.register(BillingCollector({"database": database}))
    assert calls == []


def test_queue_depth_adds_every_priority_list_of_a_queue() -> None:
    @dataclass
    class Pipe:
        client: FakeRedis
        keys: list[str] = field(default_factory=list)

        def llen(self, key: str) -> None:
            self.keys.append(key)

        def execute(self) -> list[int]:
            return [self.client.lists.get(k, 0) for k in self.keys]

    @dataclass
    class FakeRedis:
        lists: dict[str, int]

        def pipeline(self, transaction: bool) -> Pipe:
            return Pipe(self)

    client = FakeRedis({"charges": 4, "charges\x06\x169": 2, "maintenance\x06\x163": 1})
    figures = metrics.read_broker(client, slots=lambda: 3, limit=8)
    assert figures.queue_depth == {"charges": 6, "notifications": 0, "maintenance": 1}
    assert (figures.slots_in_use, figures.slots_limit) == (3, 8)
    assert metrics.read_broker(client, slots=None, limit=None).slots_in_use is None


def test_the_queues_read_are_the_celery_queues() -> None:
    from workers.app import app

    assert set(metrics.QUEUES) == {q.name for q in app.conf.task_queues}


# -- counting -------------------------------------------------------------------------------


@pytest.fixture()
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_charges_are_counted_when_their_transaction_commits(session: Session) -> None:
    before = value("billing_charges_total", outcome="succeeded", currency="KWD")
    money = value("billing_collected_amount_total", currency="KWD")
    with session.begin():
        session.execute(text("SELECT 1"))
        metrics.charge_recorded(session, "succeeded", "kwd", Decimal("12.345"))
        metrics.charge_recorded(session, "declined", "KWD", Decimal("5"))
        assert value("billing_charges_total", outcome="succeeded", currency="KWD") == before
    assert value("billing_charges_total", outcome="succeeded", currency="KWD") == before + 1
    # The decline counts as an outcome and takes no money.
    assert value("billing_charges_total", outcome="declined", currency="KWD") >= 1
    assert value("billing_collected_amount_total", currency="KWD") == pytest.approx(money + 12.345)


def test_charges_of_a_rolled_back_transaction_are_not_counted(session: Session) -> None:
    before = value("billing_charges_total", outcome="succeeded", currency="BHD")
    with pytest.raises(RuntimeError), session.begin():
        session.execute(text("SELECT 1"))
        metrics.charge_recorded(session, "succeeded", "BHD", Decimal("1"))
        raise RuntimeError("the record failed")
    with session.begin():
        session.execute(text("SELECT 1"))
    assert value("billing_charges_total", outcome="succeeded", currency="BHD") == before


def test_label_values_are_bounded() -> None:
    assert metrics.currency_label(" qar ") == "QAR"
    assert metrics.currency_label("4111 1111 1111 1111") == "other"
    assert metrics.currency_label("jane@example.com") == "other"
    assert metrics.word_label("soft_declined") == "soft_declined"
    assert metrics.word_label("tok_9f8e7d6c5b4a") == "other"
    assert metrics.word_label("Jane Doe") == "other"
    assert metrics.step_label(3) == "3"
    assert metrics.step_label(99) == "10+"
    assert metrics.http_result(402) == "4xx"
    assert metrics.http_result(99) == "error"


def test_outcomes_and_calls_outside_the_known_sets_are_other(session: Session) -> None:
    before = value("billing_charges_total", outcome="other", currency="QAR")
    with session.begin():
        session.execute(text("SELECT 1"))
        metrics.charge_recorded(session, "card 4111111111111111", "QAR", Decimal("1"))
    assert value("billing_charges_total", outcome="other", currency="QAR") == before + 1
    metrics.gateway_request("/payments/tok_secret", "2xx", 0.1)
    assert value("billing_gateway_requests_total", call="other", result="2xx") >= 1


def test_every_gateway_request_is_timed_and_counted_by_call_and_result() -> None:
    answers = iter(
        [
            httpx.Response(200, json={"status": "SUCCESS", "result": {"status": "SUCCESS"}}),
            httpx.Response(503, text="busy"),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers, None)
        if answer is None:
            raise httpx.ReadTimeout("slow", request=request)
        return answer

    client = FatoraClient(
        "https://api.fatora.io/v1", "K3Y", transport=httpx.MockTransport(handler), cap=None
    )
    count = value("billing_gateway_request_duration_seconds_count", call="deactivate")
    ok = value("billing_gateway_requests_total", call="deactivate", result="2xx")
    failed = value("billing_gateway_requests_total", call="deactivate", result="5xx")
    slow = value("billing_gateway_requests_total", call="deactivate", result="timeout")
    client.deactivate_token("tok_1")
    with pytest.raises(Exception, match="GatewayServerError"):
        client.deactivate_token("tok_1")
    with pytest.raises(GatewayTimeout):
        client.deactivate_token("tok_1")
    assert value("billing_gateway_request_duration_seconds_count", call="deactivate") == count + 3
    assert value("billing_gateway_requests_total", call="deactivate", result="2xx") == ok + 1
    assert value("billing_gateway_requests_total", call="deactivate", result="5xx") == failed + 1
    assert value("billing_gateway_requests_total", call="deactivate", result="timeout") == slow + 1


def test_janitor_results_are_counted_by_word() -> None:
    @dataclass
    class Report:
        settled: dict[int, str]
        alerted: list[int]
        failed: list[int]

    paid = value("billing_janitor_results_total", result="paid")
    alerted = value("billing_janitor_results_total", result="alerted")
    incomplete = value("billing_janitor_runs_total", status="incomplete")
    metrics.janitor_finished(Report({1: "paid", 2: "paid", 3: "unknown"}, [7], [4]))
    assert value("billing_janitor_results_total", result="paid") == paid + 2
    assert value("billing_janitor_results_total", result="alerted") == alerted + 1
    assert value("billing_janitor_runs_total", status="incomplete") == incomplete + 1


# -- deploy/: the dashboard and the alert rules ---------------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
# Made by Prometheus itself for every target, not by an exporter.
PROMETHEUS_OWN = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr
    )  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, call) (rate(billing_x_bucket{call="a b"}[5m])))'
        " / clamp_min(sum without (instance) (billing_y_total offset 1h), 1e-9) > bool 2"
        ' and on (queue) absent(up{job="w"} == 1)'
    )
    assert metric_names(expr) == {"billing_x_bucket", "billing_y_total", "up"}


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/billing.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _everything_exposed() -> set[str]:
    """The sample names an exporter shows once each figure has a value."""
    engine = create_engine("sqlite://")
    with Session(engine) as s, s.begin():
        s.execute(text("SELECT 1"))
        metrics.charge_recorded(s, "succeeded", "QAR", Decimal("1"))
    engine.dispose()
    metrics.gateway_request("verify", "2xx", 0.2)
    metrics.gateway_cap_waited("collect", 0.01)
    metrics.gateway_cap_refused("collect", "busy")

    @dataclass
    class Report:
        settled: dict[int, str] = field(default_factory=lambda: {1: "paid"})
        alerted: list[int] = field(default_factory=list)
        failed: list[int] = field(default_factory=list)

    metrics.janitor_finished(Report())
    collector = BillingCollector(
        {
            "database": lambda: metrics.database_families(FIGURES, NOW),
            "redis": lambda: metrics.broker_families(BrokerFigures({"charges": 1}, 2, 4)),
        }
    )
    registry = metrics.serving_registry(collector, None)
    return set(metrics.sample_names(registry))


def test_alerts_and_dashboard_use_only_figures_the_exporter_exposes() -> None:
    exposed = _everything_exposed() | PROMETHEUS_OWN
    alerts = set().union(*(metric_names(e) for e in _alert_exprs()))
    panels = set().union(*(metric_names(e) for e in _dashboard_exprs()))
    assert alerts - exposed == set()
    assert panels - exposed == set()
    # The figures that page someone all have a rule.
    for name in (
        "billing_collection_paused",
        "billing_attempts_unresolved_oldest_seconds",
        "billing_gateway_requests_total",
        "billing_queue_depth",
        "up",
    ):
        assert name in alerts, name
    # And the dashboard shows every figure.
    assert {
        "billing_charges_total",
        "billing_collected_amount_total",
        "billing_gateway_request_duration_seconds_bucket",
        "billing_invoices_open",
        "billing_attempts_unresolved",
        "billing_janitor_results_total",
        "billing_queue_depth",
        "billing_collection_paused",
    } <= panels


def test_prometheus_config_loads_the_rules_and_scrapes_the_job_the_alerts_name() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    named = set().union(*(re.findall(r'job="([^"]+)"', e) for e in _alert_exprs()))
    assert named and named <= jobs
    ports = {sd["port"] for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])}
    assert ports == {9464}


def test_every_alert_has_a_severity_and_a_summary() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_directories_of_workers_that_died_are_removed(tmp_path: Path) -> None:
    mine = tmp_path / f"billing-metrics-{os.getpid()}"
    dead = tmp_path / "billing-metrics-999999999"
    other = tmp_path / "billing-metrics-notes"
    for path in (mine, dead, other):
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"")
    assert metrics.remove_dead_workers_dirs(tmp_path) == [dead]
    assert mine.is_dir() and other.is_dir() and not dead.exists()
