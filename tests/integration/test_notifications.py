"""Delivering the outbox on real PostgreSQL, to a real SMTP server (aiosmtpd) and a real HTTP
endpoint on 127.0.0.1: every event reaches each channel in effect once (again only after a
failure, with the same id), failures back off and end visibly, and no secret is ever stored."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select, update
from standardwebhooks import Webhook

from billing.clock import FixedClock
from billing.fatora.sandbox import Sandbox
from billing.models import Customer, Event, Invoice, Subscription
from billing.money import format_money
from billing.notify import DeliveryStatus, max_tries
from billing.runtime import Runtime
from billing.services.events import record_event
from billing.services.notifications import (
    Channels,
    DeliveryFailed,
    SmtpMailer,
    WebhookSender,
    deliver_due,
    list_events,
    retry_failed,
)
from tests.factories import renew, seed_plans, subscriber
from tests.receivers import (
    Endpoint,
    Inbox,
    free_port,
    http_endpoint,
    self_signed,
    smtp_server,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FROM = "Fatora Shop <billing@shop.example>"
PAY_URL = "https://shop.example/pay?invoice=7&sig=abc"


@pytest.fixture()
def smtp() -> Iterator[tuple[Inbox, int]]:
    with smtp_server() as server:
        yield server


@pytest.fixture()
def endpoint() -> Iterator[Endpoint]:
    with http_endpoint(Endpoint()) as ep:
        yield ep


def _customer_world(rt: Runtime, sandbox: Sandbox, name: str, language: str) -> tuple[int, int]:
    """A customer with a subscription and its first (open) invoice: (subscription, invoice)."""
    sub_id = subscriber(rt, sandbox, ["success"], name=name)
    with rt.sessions() as session, session.begin():
        session.execute(
            update(Customer).where(Customer.external_id == name).values(language=language)
        )
    renew(rt)
    with rt.sessions() as session:
        invoice_id = session.execute(
            select(Invoice.id).where(Invoice.subscription_id == sub_id)
        ).scalar_one()
    return sub_id, invoice_id


def _clear_events(rt: Runtime) -> None:
    with rt.sessions() as session, session.begin():
        session.execute(delete(Event))


def _record(
    rt: Runtime,
    kind: str,
    *,
    sub_id: int | None = None,
    invoice_id: int | None = None,
    payload: dict[str, Any] | None = None,
) -> int:
    with rt.sessions() as session, session.begin():
        invoice = session.get(Invoice, invoice_id) if invoice_id is not None else None
        sub = session.get(Subscription, sub_id) if sub_id is not None else None
        record_event(
            session, kind, now=rt.clock.now(), invoice=invoice, subscription=sub, payload=payload
        )
    with rt.sessions() as session:
        return session.execute(select(func.max(Event.id))).scalar_one()


def _event(rt: Runtime, event_id: int) -> Event:
    with rt.sessions() as session:
        event = session.get(Event, event_id)
        assert event is not None
        return event


def _mailer(port: int) -> SmtpMailer:
    return SmtpMailer(f"smtp://127.0.0.1:{port}", timeout_s=5)


def _webhook(url: str, **kwargs: Any) -> WebhookSender:
    return WebhookSender(url, SECRET, timeout_s=5, **kwargs)


def _parts(message: EmailMessage) -> tuple[str, str]:
    plain = message.get_body(preferencelist=("plain",))
    rich = message.get_body(preferencelist=("html",))
    assert plain is not None and rich is not None
    return str(plain.get_content()), str(rich.get_content())


def _five_kinds(rt: Runtime, clock: FixedClock, sub_id: int, invoice_id: int) -> dict[str, int]:
    now = clock.now()
    return {
        "invoice.paid": _record(
            rt,
            "invoice.paid",
            sub_id=sub_id,
            invoice_id=invoice_id,
            payload={"attempt_id": 1, "order_id": "o-1"},
        ),
        "invoice.payment_failed": _record(
            rt,
            "invoice.payment_failed",
            sub_id=sub_id,
            invoice_id=invoice_id,
            payload={
                "reason": "soft_decline",
                "step": 1,
                "steps": 3,
                "needs_new_card": False,
                "attempt_id": 1,
                "retry_at": (now + timedelta(days=3)).isoformat(),
                "pay_url": PAY_URL,
            },
        ),
        "card.expiring": _record(
            rt,
            "card.expiring",
            sub_id=sub_id,
            payload={"card_id": 1, "expires_at": (now + timedelta(days=20)).isoformat()},
        ),
        "invoice.dunning_exhausted": _record(
            rt,
            "invoice.dunning_exhausted",
            sub_id=sub_id,
            invoice_id=invoice_id,
            payload={
                "reason": "soft_decline",
                "step": 3,
                "steps": 3,
                "final_action": "cancel",
                "subscription_status": "canceled",
            },
        ),
        "subscription.canceled": _record(rt, "subscription.canceled", sub_id=sub_id),
    }


EXPECTED = {
    "en": {
        "invoice.paid": ["Receipt for Monthly", "We received your payment of"],
        "invoice.payment_failed": ["did not go through", "declined", "We will try again on"],
        "card.expiring": ["expires soon", "expires on"],
        "invoice.dunning_exhausted": ["Final notice", "will not try again", "has been canceled"],
        "subscription.canceled": ["has been canceled", "will not be charged"],
    },
    "ar": {
        "invoice.paid": ["إيصال دفع", "استلمنا دفعتك"],
        "invoice.payment_failed": ["لم تتم عملية الدفع", "رفض البنك", "سنحاول مرة أخرى"],
        "card.expiring": ["تنتهي صلاحية"],
        "invoice.dunning_exhausted": ["إشعار نهائي", "لن نحاول مرة أخرى", "تم إلغاء اشتراكك"],
        "subscription.canceled": ["تم إلغاء اشتراكك", "لن يتم الخصم"],
    },
}


def test_each_customer_email_arrives_once_in_the_customers_language(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, smtp: tuple[Inbox, int]
) -> None:
    """Each of the five customer kinds is emailed exactly once, to the customer, in their
    language (Arabic HTML right to left), with the amount formatted for that language, the next
    try and the pay link where they belong, and a Message-ID derived from the event; a second
    run sends nothing more."""
    inbox, port = smtp
    seed_plans(rt)
    worlds = {
        "en": _customer_world(rt, sandbox, "amal", "en"),
        "ar": _customer_world(rt, sandbox, "hind", "ar"),
    }
    _clear_events(rt)
    ids = {lang: _five_kinds(rt, clock, *world) for lang, world in worlds.items()}
    channels = Channels(mailer=_mailer(port), email_from=FROM)

    report = deliver_due(rt, channels)
    again = deliver_due(rt, channels)

    assert len(report.delivered) == 10 and again.as_dict() == dict.fromkeys(again.as_dict(), 0)
    assert len(inbox.messages) == 10
    by_event = {int(str(m["X-Billing-Event"]).split()[0]): m for m in inbox.messages}
    for lang, kinds in ids.items():
        address = "amal@example.com" if lang == "en" else "hind@example.com"
        amount = format_money(Decimal("50.00"), "QAR", lang)
        for kind, event_id in kinds.items():
            message = by_event[event_id]
            text, html = _parts(message)
            assert address in str(message["To"])
            assert str(message["Content-Language"]) == lang
            assert str(message["Message-ID"]) == f"<billing-event-{event_id}.email@shop.example>"
            for words in EXPECTED[lang][kind]:
                assert words in text or words in str(message["Subject"]), (lang, kind, words)
            assert f'lang="{lang}" dir="{"rtl" if lang == "ar" else "ltr"}"' in html
            if kind.startswith("invoice."):
                assert amount in text, (lang, kind)
            if kind == "invoice.payment_failed":
                assert (
                    PAY_URL in text
                    and 'href="https://shop.example/pay?invoice=7&amp;sig=abc"' in html
                )
            if kind in ("invoice.dunning_exhausted", "card.expiring"):
                assert "Fatora Shop" in text  # no link: contact the merchant, by name
        assert all(_event(rt, i).delivery_status == "delivered" for i in kinds.values())


def test_a_cancel_by_dunning_is_announced_once_by_the_final_notice(
    rt: Runtime, sandbox: Sandbox, smtp: tuple[Inbox, int]
) -> None:
    """The final notice says the subscription is canceled; the subscription.canceled event that
    dunning records with it does not send the customer a second email."""
    inbox, port = smtp
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    _record(
        rt,
        "subscription.canceled",
        sub_id=sub_id,
        payload={"reason": "dunning_exhausted"},
    )
    _record(
        rt,
        "invoice.dunning_exhausted",
        sub_id=sub_id,
        invoice_id=invoice_id,
        payload={"final_action": "cancel", "subscription_status": "canceled"},
    )
    deliver_due(rt, Channels(mailer=_mailer(port), email_from=FROM))
    assert [str(m["Subject"]) for m in inbox.messages] == ["Final notice: your payment for Monthly"]


def test_a_webhook_arrives_signed_and_verifies_with_the_standard_library(
    rt: Runtime, sandbox: Sandbox, endpoint: Endpoint
) -> None:
    """Every event reaches the merchant once, as JSON whose Standard Webhooks signature verifies
    with the `standardwebhooks` package and the merchant's secret; webhook-id is the event id."""
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    with rt.sessions() as session:
        event_ids = list(session.execute(select(Event.id).order_by(Event.id)).scalars())
    assert len(event_ids) == 2  # subscription.created, invoice.created

    report = deliver_due(rt, Channels(webhook=_webhook(endpoint.url)))

    assert sorted(report.delivered) == event_ids
    assert endpoint.ids() == [str(i) for i in event_ids]
    verifier = Webhook(SECRET)
    bodies = [verifier.verify(r.body, r.headers) for r in endpoint.requests]
    assert [b["type"] for b in bodies] == ["subscription.created", "invoice.created"]
    created = bodies[1]["data"]
    assert created["event_id"] == event_ids[1] and created["subscription_id"] == sub_id
    assert created["customer"]["external_id"] == "amal"
    assert created["invoice"] == {
        "id": invoice_id,
        "amount": "50.00",
        "currency": "QAR",
        "period_start": created["invoice"]["period_start"],
        "period_end": created["invoice"]["period_end"],
    }
    assert endpoint.requests[0].headers["content-type"] == "application/json"
    with pytest.raises(Exception, match="signature"):  # a tampered body does not verify
        verifier.verify(endpoint.requests[0].body + b" ", endpoint.requests[0].headers)


def test_a_receiver_that_fails_twice_gets_the_event_once_more_after_each_backoff(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """A 500, a 500, then a 200: each try comes only once its backoff (1 min, then 2 min) has
    passed, with the same webhook-id; once accepted, the event is never sent again."""
    seed_plans(rt)
    _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    event_id = _record(rt, "collection.resumed_by_test", payload={"n": 1})
    with http_endpoint(Endpoint(script=[500, 500])) as ep:
        channels = Channels(webhook=_webhook(ep.url))
        deliver_due(rt, channels)
        assert len(ep.requests) == 1
        event = _event(rt, event_id)
        assert event.delivery_status == "pending" and event.delivery_attempts == 1
        assert event.next_delivery_at == clock.now() + timedelta(minutes=1)
        assert event.last_error == "webhook: the webhook endpoint answered HTTP 500"

        clock.advance(timedelta(seconds=59))
        deliver_due(rt, channels)
        assert len(ep.requests) == 1  # not before its time
        clock.advance(timedelta(seconds=1))
        deliver_due(rt, channels)
        assert len(ep.requests) == 2
        assert _event(rt, event_id).next_delivery_at == clock.now() + timedelta(minutes=2)

        clock.advance(timedelta(minutes=1))
        deliver_due(rt, channels)
        assert len(ep.requests) == 2
        clock.advance(timedelta(minutes=1))
        deliver_due(rt, channels)
        assert len(ep.requests) == 3

        for _ in range(3):
            clock.advance(timedelta(hours=7))
            deliver_due(rt, channels)
        assert ep.ids() == [str(event_id)] * 3
        event = _event(rt, event_id)
        assert event.delivery_status == "delivered" and event.delivered_at == clock.now() - (
            timedelta(hours=21)
        )
        assert event.delivery_attempts == 3 and event.next_delivery_at is None


def test_a_channel_that_was_sent_is_not_sent_again_when_another_retries(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, smtp: tuple[Inbox, int]
) -> None:
    """At most once per channel: the receipt email went out on the first try, the webhook
    failed; the retry sends the webhook only."""
    inbox, port = smtp
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    event_id = _record(rt, "invoice.paid", sub_id=sub_id, invoice_id=invoice_id, payload={})
    with http_endpoint(Endpoint(script=[503])) as ep:
        channels = Channels(mailer=_mailer(port), webhook=_webhook(ep.url), email_from=FROM)
        deliver_due(rt, channels)
        assert _event(rt, event_id).delivery_channels["email"]["status"] == "sent"  # type: ignore[index]
        clock.advance(timedelta(minutes=1))
        deliver_due(rt, channels)
    assert len(inbox.messages) == 1 and len(ep.requests) == 2
    event = _event(rt, event_id)
    assert event.delivery_status == "delivered"
    assert {k: v["status"] for k, v in (event.delivery_channels or {}).items()} == {
        "email": "sent",
        "push": "skipped",  # the customer has no device token
        "webhook": "sent",
    }


def test_two_deliverers_racing_send_each_event_once(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """FOR UPDATE SKIP LOCKED: two deliverers started together on the same 40 events, in small
    batches against a slow endpoint, share them out; every event is POSTed exactly once."""
    seed_plans(rt)
    _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    event_ids = [_record(rt, "test.raced", payload={"n": n}) for n in range(40)]
    with http_endpoint(Endpoint(delay_s=0.01)) as ep:
        start = threading.Barrier(2)
        reports: list[dict[str, int]] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with Channels(webhook=_webhook(ep.url)) as channels:
                    start.wait()
                    reports.append(deliver_due(rt, channels, batch_size=4).as_dict())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert Counter(ep.ids()) == Counter(str(i) for i in event_ids)
    assert sorted(r["delivered"] for r in reports)[0] > 0  # both took a share
    assert sum(r["delivered"] for r in reports) == 40


def test_an_event_that_keeps_failing_ends_failed_after_the_bound_and_is_listed(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """An endpoint that always fails gets 13 tries over exactly 24 hours (1 min doubling, at
    most 6 h apart); then the event is failed, with its time and the reason, and it is listed
    among the failed ones. Retrying it by hand starts a fresh schedule."""
    seed_plans(rt)
    _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    event_id = _record(rt, "test.doomed", payload={})
    first = clock.now()
    with http_endpoint(Endpoint(default=502)) as ep:
        channels = Channels(webhook=_webhook(ep.url))
        gaps: list[timedelta] = []
        while True:
            deliver_due(rt, channels)
            event = _event(rt, event_id)
            if event.delivery_status != "pending":
                break
            assert event.next_delivery_at is not None
            gaps.append(event.next_delivery_at - clock.now())
            clock.at = event.next_delivery_at
        assert len(ep.requests) == max_tries() == 13
    assert gaps[:3] == [timedelta(minutes=1), timedelta(minutes=2), timedelta(minutes=4)]
    assert max(gaps) == timedelta(hours=6)
    assert clock.now() - first == timedelta(hours=24)
    assert event.delivery_status == "failed" and event.failed_at == clock.now()
    assert event.delivery_attempts == 13 and event.next_delivery_at is None
    assert event.last_error == "webhook: the webhook endpoint answered HTTP 502"
    assert (event.delivery_channels or {})["webhook"]["status"] == "failed"
    with rt.sessions() as session:
        failed = list_events(session, status=DeliveryStatus.FAILED)
        assert [e.id for e in failed] == [event_id]
    # Nothing more is tried, however late.
    clock.advance(timedelta(days=3))
    with http_endpoint(Endpoint()) as ok:
        deliver_due(rt, Channels(webhook=_webhook(ok.url)))
        assert ok.requests == []
        with rt.sessions() as session, session.begin():
            assert retry_failed(session, [event_id], clock.now()) == [event_id]
        deliver_due(rt, Channels(webhook=_webhook(ok.url)))
        assert ok.ids() == [str(event_id)]
    assert _event(rt, event_id).delivery_status == "delivered"


def test_unconfigured_channels_are_skipped_not_failed(rt: Runtime, sandbox: Sandbox) -> None:
    """No SMTP URL and no webhook URL: the events are `skipped` with the reason per channel, no
    error, no retry; nothing is left pending."""
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    paid = _record(rt, "invoice.paid", sub_id=sub_id, invoice_id=invoice_id, payload={})
    alert = _record(rt, "alert.collection_paused", payload={"reason": "authentication failed"})
    report = deliver_due(rt, Channels())
    assert report.as_dict()["skipped"] == 4 and report.as_dict()["failed"] == 0
    event = _event(rt, paid)
    assert event.delivery_status == "skipped" and event.last_error is None
    assert event.delivery_channels == {
        "email": {"status": "skipped", "why": "BILLING_SMTP_URL is not set"},
        "push": {"status": "skipped", "why": "no device token"},
        "webhook": {"status": "skipped", "why": "BILLING_WEBHOOK_URL is not set"},
    }
    assert _event(rt, alert).delivery_channels == {
        "alert_email": {"status": "skipped", "why": "BILLING_SMTP_URL is not set"}
    }
    with rt.sessions() as session:
        assert list_events(session, status=DeliveryStatus.PENDING) == []


def test_alerts_are_emailed_to_the_operator_and_not_to_the_merchant(
    rt: Runtime, smtp: tuple[Inbox, int], endpoint: Endpoint
) -> None:
    """An alert.* event goes to BILLING_ALERT_EMAIL only (with its payload), never to the
    merchant's webhook; without BILLING_ALERT_EMAIL it is skipped."""
    inbox, port = smtp
    alert = _record(rt, "alert.collection_paused", payload={"reason": "authentication failed"})
    channels = Channels(
        mailer=_mailer(port),
        webhook=_webhook(endpoint.url),
        email_from=FROM,
        alert_to="ops@shop.example",
    )
    deliver_due(rt, channels)
    assert endpoint.requests == []
    assert inbox.recipients == [["ops@shop.example"]]
    message = inbox.messages[0]
    assert "alert.collection_paused" in str(message["Subject"])
    assert "authentication failed" in _parts(message)[0]
    assert str(message["Message-ID"]) == f"<billing-event-{alert}.alert_email@shop.example>"
    assert _event(rt, alert).delivery_status == "delivered"


def test_an_smtp_server_that_is_down_costs_one_try_a_run(rt: Runtime, sandbox: Sandbox) -> None:
    """Nothing listens on the SMTP port: the first email event fails (and backs off); the
    others are not tried in that run and count no try, so they keep their full schedule."""
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    ids = [
        _record(rt, "invoice.paid", sub_id=sub_id, invoice_id=invoice_id, payload={})
        for _ in range(3)
    ]
    report = deliver_due(rt, Channels(mailer=_mailer(free_port()), email_from=FROM))
    assert report.retrying == ids[:1] and report.deferred == ids[1:]
    first = _event(rt, ids[0])
    assert first.delivery_attempts == 1 and "cannot use the SMTP server" in (first.last_error or "")
    assert [_event(rt, i).delivery_attempts for i in ids[1:]] == [0, 0]
    assert all(_event(rt, i).delivery_status == "pending" for i in ids)


def test_no_secret_reaches_a_stored_error_or_a_log_line(
    rt: Runtime, sandbox: Sandbox, smtp: tuple[Inbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    """The SMTP password, the webhook secret and a token in the webhook URL never appear in
    `last_error`, the per-channel errors or the log, even when an error message quotes them;
    and the password is never sent to a server that offers no TLS."""
    inbox, port = smtp
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    event_id = _record(rt, "invoice.paid", sub_id=sub_id, invoice_id=invoice_id, payload={})
    password = "pa55-w0rd/secret"
    url_token = "tok_hook_9f8e7d6c"
    hook_url = f"https://merchant.example/hooks?token={url_token}"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url} ({SECRET}, {url_token})")

    channels = Channels(
        mailer=SmtpMailer(f"smtp://billing:{password.replace('/', '%2F')}@127.0.0.1:{port}"),
        webhook=WebhookSender(hook_url, SECRET, transport=httpx.MockTransport(refuse)),
        email_from=FROM,
    )
    with caplog.at_level(logging.DEBUG):
        deliver_due(rt, channels)
    event = _event(rt, event_id)
    stored = (event.last_error or "") + json.dumps(event.delivery_channels)
    assert "offers no STARTTLS" in stored and "cannot reach the webhook endpoint" in stored
    for secret in (password, "pa55-w0rd%2Fsecret", SECRET, SECRET[6:], url_token, hook_url):
        assert secret not in stored
        assert secret not in caplog.text
    assert inbox.messages == []


def test_the_task_takes_no_arguments_and_is_routed_to_notifications() -> None:
    """No secret or address can travel as a task argument: the task has none, and it runs on
    the notifications queue, every minute."""
    import inspect

    from schedules.beat import BEAT_SCHEDULE
    from workers.app import app
    from workers.tasks import deliver_events

    assert inspect.signature(deliver_events.run).parameters == {}
    route = app.amqp.router.route({}, "billing.deliver_events")
    assert route["queue"].name == "notifications"
    beat = BEAT_SCHEDULE["deliver-events"]
    assert beat["task"] == "billing.deliver_events" and beat["schedule"] == 60.0
    assert beat["options"]["queue"] == "notifications"


def test_an_event_that_cannot_be_written_fails_alone_and_the_batch_goes_on(
    rt: Runtime,
    sandbox: Sandbox,
    smtp: tuple[Inbox, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receipt without its invoice fails at once (no retry can supply it), visibly; an
    unexpected exception while writing another email is a failed try like any other. Neither
    rolls back the batch: the events around them are delivered once, and are not sent again."""
    import billing.services.notifications as notifications

    inbox, port = smtp
    seed_plans(rt)
    sub_id, invoice_id = _customer_world(rt, sandbox, "amal", "en")
    _clear_events(rt)
    before = _record(rt, "invoice.paid", sub_id=sub_id, invoice_id=invoice_id, payload={})
    orphan = _record(rt, "invoice.paid", sub_id=sub_id, payload={})
    broken = _record(rt, "card.expiring", sub_id=sub_id, payload={"expires_at": "soon"})
    after = _record(rt, "invoice.paid", sub_id=sub_id, invoice_id=invoice_id, payload={})
    real_compose = notifications.compose

    def compose(facts: Any) -> Any:
        if facts.kind == "card.expiring":
            raise RuntimeError("template bug")
        return real_compose(facts)

    monkeypatch.setattr(notifications, "compose", compose)
    channels = Channels(mailer=_mailer(port), email_from=FROM)
    report = deliver_due(rt, channels, batch_size=10)
    deliver_due(rt, channels, batch_size=10)

    assert report.delivered == [before, after] and report.failed == [orphan]
    assert report.retrying == [broken]
    assert len(inbox.messages) == 2
    assert _event(rt, orphan).last_error == (
        f"email: invoice.paid event {orphan} has no invoice amount"
    )
    assert _event(rt, broken).last_error == "email: internal error: RuntimeError: template bug"
    assert _event(rt, broken).delivery_status == "pending"


# -- the SMTP sender on its own --------------------------------------------------------------


def _plain_message(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "billing@shop.example"
    message["To"] = "amal@example.com"
    message["Subject"] = subject
    message.set_content("hello")
    return message


class _Logins:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult

        self.seen.append((data.login, session.ssl is not None))
        return AuthResult(success=(data.login, data.password) == (b"billing", b"pa:ss/w"))


def test_smtp_uses_starttls_when_offered_and_logs_in_only_over_tls(tmp_path: Path) -> None:
    """smtp://user:pass@host upgrades with STARTTLS (certificate verified) before it sends the
    password; the percent-encoded password is decoded."""
    certificate = self_signed(tmp_path)
    logins = _Logins()
    with smtp_server(
        tls_context=certificate.server, require_starttls=True, authenticator=logins
    ) as (inbox, port):
        mailer = SmtpMailer(
            f"smtp://billing:pa%3Ass%2Fw@127.0.0.1:{port}", ssl_context=certificate.client
        )
        mailer.send(_plain_message("over STARTTLS"))
        mailer.close()
    assert logins.seen == [(b"billing", True)]
    assert [str(m["Subject"]) for m in inbox.messages] == ["over STARTTLS"]


def test_smtps_is_implicit_tls(tmp_path: Path) -> None:
    """smtps:// speaks TLS from the first byte."""
    certificate = self_signed(tmp_path)
    logins = _Logins()
    # (aiosmtpd does not count implicit TLS as TLS for AUTH: the server is TLS-only anyway)
    with smtp_server(
        ssl_context=certificate.server, authenticator=logins, auth_require_tls=False
    ) as (inbox, port):
        mailer = SmtpMailer(
            f"smtps://billing:pa%3Ass%2Fw@127.0.0.1:{port}", ssl_context=certificate.client
        )
        mailer.send(_plain_message("over TLS"))
        mailer.close()
    assert [login for login, _ in logins.seen] == [b"billing"]
    assert [str(m["Subject"]) for m in inbox.messages] == ["over TLS"]


def test_an_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    """TLS is verified: a server whose certificate nobody vouches for gets no message (and no
    password)."""
    certificate = self_signed(tmp_path)
    with smtp_server(tls_context=certificate.server, require_starttls=True) as (inbox, port):
        mailer = SmtpMailer(f"smtp://billing:secret-pw@127.0.0.1:{port}")
        with pytest.raises(DeliveryFailed) as failure:
            mailer.send(_plain_message("never"))
    assert failure.value.unreachable and "CERTIFICATE_VERIFY_FAILED" in failure.value.reason
    assert "secret-pw" not in failure.value.reason
    assert inbox.messages == []


def test_a_kept_connection_the_server_dropped_is_reopened_once() -> None:
    """The SMTP connection of a run is reused; if the server closed it meanwhile, the message
    goes out on a fresh one instead of failing."""
    inbox = Inbox()
    port = free_port()
    mailer = SmtpMailer(f"smtp://127.0.0.1:{port}", timeout_s=5)
    with smtp_server(inbox, port):
        mailer.send(_plain_message("first"))
    with smtp_server(inbox, port):  # restarted: the kept connection is dead
        mailer.send(_plain_message("second"))
        mailer.close()
    assert [str(m["Subject"]) for m in inbox.messages] == ["first", "second"]
