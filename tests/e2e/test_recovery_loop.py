"""End to end, the recovery loop as a merchant's customers live it: real worker processes on
Redis and PostgreSQL, the sandbox over HTTP, ``billing web`` serving the links, a local SMTP
server (aiosmtpd) and a webhook receiver; the test clock moves day by day and the periodic
tasks are sent as beat would send them.

Invariants: every invoice is paid at most once (against the sandbox's own charges); every
customer email and merchant webhook arrives once per event; the link recovers an invoice and
replaces the card; a redirect proves nothing; and a worker killed mid-delivery sends again at
most the message it was sending, under the same Message-ID.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select, update

from bench.secret_scan import Secrets, scan_database, scan_files, scan_redis, scan_text
from billing.clock import DatabaseClock
from billing.dunning import DunningPolicy, FinalAction
from billing.fatora.sandbox import ServerHandle
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import CardStatus, CardToken, ChargeAttempt, Customer, Event, Invoice
from billing.periods import Interval
from billing.plans import PlansConfig, PlanSpec
from billing.runtime import Runtime
from billing.services.events import record_event
from tests.e2e.test_workers import REDIS_URL, ROOT, _runtime, broker, gateway_server, token_key
from tests.factories import seed_plans, subscriber, subscription_of
from tests.receivers import Endpoint, Inbox, free_port, http_endpoint, smtp_server

__all__ = ["broker", "gateway_server", "token_key"]

pytestmark = pytest.mark.e2e

START = datetime(2027, 3, 1, 7, 0, tzinfo=UTC)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
QUEUES = ("charges", "maintenance", "notifications")
SHORT = DunningPolicy("short", (1, 2), FinalAction.UNPAID)


def _plans() -> PlansConfig:
    monthly = PlanSpec(
        code="monthly",
        name="Monthly",
        amount=Decimal("50.00"),
        currency="QAR",
        interval=Interval.MONTH,
        interval_count=1,
        cron=None,
        trial_days=0,
        dunning="short",
    )
    return PlansConfig(plans={"monthly": monthly}, dunning={"short": SHORT})


class Services:
    """Worker processes on every queue, and ``billing web``; what they print goes to files in
    ``log_dir`` (when given), for the secret scan."""

    def __init__(self, env: dict[str, str], log_dir: Path | None = None) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        output: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            output = (self.log_dir / f"{len(self.procs)}-{args[0]}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def worker(self, name: str, queues: tuple[str, ...] = QUEUES) -> subprocess.Popen[bytes]:
        return self._start(
            "celery",
            "-A",
            "workers.app",
            "worker",
            "-Q",
            ",".join(queues),
            "-c",
            "2",
            "-n",
            f"{name}@%h",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
        )

    def web(self, port: int) -> None:
        self._start("billing.cli", "web", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("billing web did not start")

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


class World:
    def __init__(
        self,
        rt: Runtime,
        broker: Celery,
        services: Services,
        inbox: Inbox,
        hooks: Endpoint,
        server: ServerHandle,
        web_url: str,
    ) -> None:
        self.rt = rt
        self.broker = broker
        self.services = services
        self.inbox = inbox
        self.hooks = hooks
        self.server = server
        self.web_url = web_url
        self.clock = DatabaseClock(rt.engine)

    def beat(self, *tasks: str) -> None:
        """Send the periodic tasks as beat would, then wait until everything they started
        (charges, retries, deliveries) has run."""
        for task in tasks or ("billing.renew", "billing.retry_due"):
            queue = "notifications" if task == "billing.deliver_events" else "maintenance"
            self.broker.send_task(task, queue=queue)
        self.idle()

    def idle(self, deadline_s: float = 60.0) -> None:
        client = redis.Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + deadline_s
        quiet = 0
        while time.monotonic() < deadline:
            with self.rt.sessions() as session:
                busy = session.execute(
                    select(ChargeAttempt.id).where(ChargeAttempt.status == "in_flight")
                ).first()
            queued = sum(client.llen(q) for q in QUEUES) + client.hlen("unacked")
            quiet = quiet + 1 if busy is None and queued == 0 else 0
            if quiet >= 4:
                return
            time.sleep(0.25)
        raise AssertionError("the workers did not settle down")

    def day(self, at: datetime) -> None:
        self.clock.set(at)
        self.beat()
        self.beat()  # what the first pass queued for now (a card switched after a hard decline)
        self.deliver()

    def deliver(self) -> None:
        self.beat("billing.deliver_events")

    # -- what the customer sees ------------------------------------------------------------

    def emails_to(self, name: str) -> list[EmailMessage]:
        return [m for m in self.inbox.messages if f"{name}@example.com" in str(m["To"])]

    def last_link(self, name: str) -> str:
        for message in reversed(self.emails_to(name)):
            body = message.get_body(preferencelist=("plain",))
            assert body is not None
            found = re.search(r"(https?://\S+/(?:pay|renew)/\S+)", str(body.get_content()))
            if found:
                return found.group(1).rstrip(".")
        raise AssertionError(f"no link in any email to {name}")

    def pay_through(self, link: str, card: str = "4111111111111111") -> str:
        """Open the link on `billing web`, pay on the hosted page; the return URL."""
        opened = httpx.get(link, follow_redirects=False, timeout=10)
        assert opened.status_code == 303, opened.text
        payment_id = parse_qs(urlsplit(opened.headers["location"]).query)["paymentID"][0]
        return self.server.sandbox.pay(payment_id, card)

    def back(self, return_url: str) -> httpx.Response:
        return httpx.get(return_url, timeout=10)

    # -- the ground truth ------------------------------------------------------------------

    def assert_each_invoice_paid_at_most_once(self) -> None:
        taken = [c for c in self.server.sandbox.charges() if c["status"] == "SUCCESS"]
        per_invoice = Counter(str(c["order_id"]).rsplit("-", 1)[0] for c in taken)
        assert max(per_invoice.values(), default=0) == 1, per_invoice
        with self.rt.sessions() as session:
            on_record = set(
                session.execute(
                    select(ChargeAttempt.order_id).where(ChargeAttempt.status == "succeeded")
                ).scalars()
            )
        assert {str(c["order_id"]) for c in taken} == on_record, "a charge is not on record"

    def assert_no_secret_anywhere(self) -> None:
        """No card token, API key or token key in clear: not in what the workers and the web
        app logged, not in Redis (task messages, results), not in any table (the encrypted
        tokens aside), not in an email or a webhook body."""
        token_keys = self.services.env["BILLING_TOKEN_KEY"].split(",")
        secrets = Secrets(
            {
                "card token": self.server.sandbox.issued_tokens(),
                "API key": [self.server.sandbox.api_key],
                "token key": [key.strip() for key in token_keys],
            }
        )
        assert secrets.count > 6
        assert self.services.log_dir is not None
        scan = scan_files(secrets, [self.services.log_dir], prefix="log")
        scan += scan_redis(secrets, REDIS_URL)
        scan += scan_database(secrets, self.rt.engine)
        for i, message in enumerate(self.inbox.messages):
            scan += scan_text(secrets, f"email {i}", message.as_string())
        for i, request in enumerate(self.hooks.requests):
            scan += scan_text(secrets, f"webhook {i}", request.body)
        assert any("celery-task-meta" in p for p in scan.places)  # results were there to scan
        assert any(p.startswith("table card_tokens.") for p in scan.places)
        assert scan.hits == [], scan.by_place()

    def assert_every_message_once(self) -> None:
        """Each event that concerns a customer reached their inbox exactly once, and each
        event the merchant gets reached the webhook exactly once."""
        with self.rt.sessions() as session:
            events = list(session.execute(select(Event)).scalars())
        for event in events:
            channels = event.delivery_channels or {}
            if event.delivery_status == "pending":
                raise AssertionError(f"event {event.id} ({event.kind}) still pending")
            assert "failed" not in {c.get("status") for c in channels.values()}, channels
        mailed = Counter(str(m["X-Billing-Event"]).split()[0] for m in self.inbox.messages)
        assert max(mailed.values(), default=0) == 1, mailed
        sent_email = {
            str(e.id)
            for e in events
            if (e.delivery_channels or {}).get("email", {}).get("status") == "sent"
        }
        assert set(mailed) == sent_email
        hooked = Counter(self.hooks.ids())
        assert max(hooked.values(), default=0) == 1, hooked
        sent_hook = {
            str(e.id)
            for e in events
            if (e.delivery_channels or {}).get("webhook", {}).get("status") == "sent"
        }
        assert set(hooked) == sent_hook


@pytest.fixture()
def world(
    clean_db: Engine,
    pg_url: str,
    gateway_server: ServerHandle,
    token_key: str,
    broker: Celery,
    tmp_path: Path,
) -> Iterator[World]:
    web_port = free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with smtp_server() as (inbox, smtp_port), http_endpoint(Endpoint()) as hooks:
        env = {
            **os.environ,
            "BILLING_MODE": "test",
            "BILLING_DATABASE_URL": pg_url,
            "BILLING_BROKER_URL": REDIS_URL,
            "BILLING_TOKEN_KEY": token_key,
            "BILLING_UNKNOWN_GRACE_S": "2",
            "BILLING_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
            "BILLING_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
            "BILLING_EMAIL_FROM": "Shop <billing@shop.example>",
            "BILLING_WEBHOOK_URL": hooks.url,
            "BILLING_WEBHOOK_SECRET": SECRET,
            "BILLING_CARD_EXPIRY_NOTICE_DAYS": "14",
            "BILLING_METRICS_PORT": "0",
            "FATORA_BASE_URL": gateway_server.url.rstrip("/") + "/v1",
            "FATORA_MODE": "test",
            "FATORA_TIMEOUT_S": "2",
        }
        services = Services(env, log_dir)
        rt = _runtime(clean_db, gateway_server, token_key)
        DatabaseClock(clean_db).set(START - timedelta(hours=1))
        seed_plans(rt, _plans())
        try:
            services.web(web_port)
            services.worker("all")
            yield World(
                rt, broker, services, inbox, hooks, gateway_server, f"http://127.0.0.1:{web_port}"
            )
        finally:
            services.stop_all()


def _customer(world: World, name: str, cards: list[str], language: str = "en") -> int:
    sub_id = subscriber(world.rt, world.server.sandbox, cards, name=name, start=START)
    with world.rt.sessions() as session, session.begin():
        session.execute(
            update(Customer).where(Customer.external_id == name).values(language=language)
        )
    return sub_id


def _invoices(world: World, sub_id: int) -> list[Invoice]:
    with world.rt.sessions() as session:
        return list(
            session.execute(
                select(Invoice).where(Invoice.subscription_id == sub_id).order_by(Invoice.id)
            ).scalars()
        )


def _snapshot(world: World) -> tuple[int, int, int]:
    """Cards stored, events recorded, charges at the gateway."""
    with world.rt.sessions() as session:
        cards = len(session.execute(select(CardToken.id)).all())
        events = len(session.execute(select(Event.id)).all())
    return cards, events, len(world.server.sandbox.charges())


def _card(world: World, card_id: int | None) -> CardToken:
    with world.rt.sessions() as session:
        card = session.get(CardToken, card_id)
        assert card is not None
        return card


def test_the_ladder_the_link_and_the_final_action_with_real_workers(world: World) -> None:
    soft = _customer(world, "soft", ["insufficient_funds"])
    lost = _customer(world, "lost", ["insufficient_funds"], language="ar")
    hard = _customer(world, "hard", ["card_cannot_recur", "success"])
    expiring = _customer(world, "expiring", ["success"])
    dead_card = subscription_of(world.rt, hard).card_token_id
    with world.rt.sessions() as session, session.begin():
        card = session.get(CardToken, subscription_of(world.rt, expiring).card_token_id)
        assert card is not None
        card.expires_at = START + timedelta(days=20)  # dies before the next renewal

    # Day 0: the first renewal.
    world.day(START)
    assert [i.status for i in _invoices(world, soft)] == ["open"]
    assert [i.status for i in _invoices(world, lost)] == ["open"]
    assert subscription_of(world.rt, soft).status == SubscriptionStatus.PAST_DUE.value
    # The hard decline fell back to the customer's other card at once.
    assert [i.status for i in _invoices(world, hard)] == ["paid"]
    assert _card(world, dead_card).status == CardStatus.DEAD.value
    assert subscription_of(world.rt, hard).card_token_id != dead_card
    assert [i.status for i in _invoices(world, expiring)] == ["paid"]
    assert len(world.emails_to("soft")) == 1 and "/pay/" in world.last_link("soft")
    assert "Receipt" in str(world.emails_to("hard")[0]["Subject"])

    # Day 1: the policy's first retry declines again; the customer pays through the link.
    world.day(START + timedelta(days=1, minutes=1))
    assert _invoices(world, soft)[0].attempt_count == 2
    back = world.pay_through(world.last_link("soft"))
    page = world.back(back)
    assert page.status_code == 200 and "Thank you" in page.text
    (soft_invoice,) = _invoices(world, soft)
    assert soft_invoice.status == InvoiceStatus.PAID.value
    recovered = subscription_of(world.rt, soft)
    assert recovered.status == SubscriptionStatus.ACTIVE.value
    token = parse_qs(urlsplit(back).query)["card_token"][0]
    assert world.rt.vault.decrypt(_card(world, recovered.card_token_id).ciphertext) == token
    # A replayed success page and a forged one change nothing: no card, no event, no charge.
    before = _snapshot(world)
    assert "Thank you" in world.back(back).text
    ref = urlsplit(world.last_link("soft")).path.rsplit("/", 1)[1]
    forged = world.back(f"{world.web_url}/return/{ref}?order_id=X&card_token=Fake%2BToken")
    assert forged.status_code == 200  # the page tells the invoice's truth: it is paid
    bad = world.back(f"{world.web_url}/return/{soft_invoice.id}-AAAAAAAAAAAAAAAAAAAAAAAA")
    assert bad.status_code == 400 and "not valid" in bad.text
    assert _snapshot(world) == before
    world.deliver()
    receipts = [m for m in world.emails_to("soft") if "Receipt" in str(m["Subject"])]
    assert len(receipts) == 1

    # Day 2: the ladder ends for the customer who never paid: written off, unpaid, told so.
    world.day(START + timedelta(days=2, minutes=1))
    (lost_invoice,) = _invoices(world, lost)
    assert lost_invoice.status == InvoiceStatus.UNCOLLECTIBLE.value
    assert subscription_of(world.rt, lost).status == SubscriptionStatus.UNPAID.value
    final = world.emails_to("lost")[-1]
    assert str(final["Content-Language"]) == "ar"
    # ... and the way back: the final notice's link pays it and restores the subscription.
    back = world.pay_through(world.last_link("lost"))
    assert "شكرًا" in world.back(back).text
    assert _invoices(world, lost)[0].status == InvoiceStatus.PAID.value
    assert subscription_of(world.rt, lost).status == SubscriptionStatus.ACTIVE.value

    # Before the expiring token's renewal: the notice, with the link that pays it ahead.
    renewal = subscription_of(world.rt, expiring).next_billing_at
    assert renewal is not None
    world.clock.set(renewal - timedelta(days=13))
    world.beat("billing.token_expiry_sweep")
    world.deliver()
    link = world.last_link("expiring")
    assert "/renew/" in link
    assert "Thank you" in world.back(world.pay_through(link)).text
    ahead = _invoices(world, expiring)
    assert [i.status for i in ahead] == ["paid", "paid"] and ahead[1].period_start == renewal
    new_card = subscription_of(world.rt, expiring).card_token_id
    assert _card(world, new_card).expires_at > renewal

    # The renewal: everyone is charged once for the new period; the one paid ahead is not.
    charges_before = len(world.server.sandbox.charges())
    world.day(renewal + timedelta(minutes=1))
    for sub_id in (soft, lost, hard):
        assert [i.status for i in _invoices(world, sub_id)][-1] == "paid"
    assert len(_invoices(world, expiring)) == 2
    assert len(world.server.sandbox.charges()) == charges_before + 3
    world.deliver()
    world.assert_each_invoice_paid_at_most_once()
    world.assert_every_message_once()
    world.assert_no_secret_anywhere()


class SlowInbox(Inbox):
    """Takes a while over each message: room to kill the worker between two of them."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.25)
        return await super().handle_DATA(server, session, envelope)


def test_a_worker_killed_mid_delivery_sends_each_message_once(
    clean_db: Engine, pg_url: str, gateway_server: ServerHandle, token_key: str, broker: Celery
) -> None:
    """Invariant: a SIGKILL in the middle of a delivery run costs at most the one message that
    was being sent, sent again with the same Message-ID; every other event is sent once."""
    rt = _runtime(clean_db, gateway_server, token_key)
    DatabaseClock(clean_db).set(START)
    seed_plans(rt, _plans())
    sub_id = subscriber(rt, gateway_server.sandbox, ["success"], name="many", start=START)
    with rt.sessions() as session, session.begin():
        sub = subscription_of(rt, sub_id)
        for _ in range(16):
            record_event(session, "subscription.canceled", subscription=sub, now=START)
    inbox = SlowInbox()
    with smtp_server(inbox) as (_, port), http_endpoint(Endpoint()) as hooks:
        env = {
            **os.environ,
            "BILLING_MODE": "test",
            "BILLING_DATABASE_URL": pg_url,
            "BILLING_BROKER_URL": REDIS_URL,
            "BILLING_TOKEN_KEY": token_key,
            "BILLING_SMTP_URL": f"smtp://127.0.0.1:{port}",
            "BILLING_WEBHOOK_URL": hooks.url,
            "BILLING_WEBHOOK_SECRET": SECRET,
            "BILLING_METRICS_PORT": "0",
            "FATORA_BASE_URL": gateway_server.url.rstrip("/") + "/v1",
        }
        services = Services(env)
        try:
            first = services.worker("first", ("notifications",))
            broker.send_task("billing.deliver_events", queue="notifications")
            deadline = time.monotonic() + 30
            while len(inbox.messages) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(inbox.messages) >= 5, "the delivery did not start"
            services.kill(first)
            killed_at = len(inbox.messages)
            assert killed_at < 16, "the run finished before it could be killed"
            services.worker("second", ("notifications",))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                broker.send_task("billing.deliver_events", queue="notifications")
                time.sleep(1.0)
                with rt.sessions() as session:
                    pending = session.execute(
                        select(Event.id).where(Event.delivery_status == "pending")
                    ).all()
                if not pending:
                    break
            assert not pending, "events still pending"
        finally:
            services.stop_all()
    per_event = Counter(str(m["X-Billing-Event"]).split()[0] for m in inbox.messages)
    assert len(per_event) == 16
    assert sum(per_event.values()) - 16 <= 1, per_event
    for event_id, count in per_event.items():
        if count > 1:
            ids = {
                str(m["Message-ID"])
                for m in inbox.messages
                if str(m["X-Billing-Event"]).split()[0] == event_id
            }
            assert len(ids) == 1, "a message sent again must carry the same Message-ID"
    with rt.sessions() as session:
        events = len(session.execute(select(Event.id)).all())  # the 16, and subscription.created
    hooked = Counter(hooks.ids())
    assert len(hooked) == events and sum(hooked.values()) - events <= 1, hooked
