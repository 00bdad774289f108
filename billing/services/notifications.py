"""Delivering the outbox: customer email, operator alert email and merchant webhooks.

``deliver_due`` claims the events due for delivery one by one, in id order: on PostgreSQL with
``FOR UPDATE SKIP LOCKED``, held until that event's results are committed, so two deliverers
never take the same event. For each event it sends every channel in effect that has not been
sent yet (``billing/notify.py::channels_for``), then records how each went and what follows
(``notify.conclude``): delivered, skipped (no channel configured), tried again after a backoff,
or failed once the bound is reached. A channel that was sent is never sent again. Each event is
committed as soon as it is sent: a worker killed mid-run leaves at most the event it was
sending uncommitted, which the next run sends again with the same ``webhook-id`` and
``Message-ID`` for the receiver to recognise; every other event is sent once.

Within one run, an endpoint that cannot be reached (a timeout, a refused connection, an SMTP
server that is down) is not tried again for the rest of the run: the later events keep that
channel for the next run, without counting a try, so a dead endpoint costs one timeout a run.

The senders are thin: ``SmtpMailer`` (smtplib) and ``WebhookSender`` (httpx); what they send is
decided in ``billing/notify.py`` and written in ``billing/messages.py``. Error texts are stored
and logged only through ``notify.scrub``: no SMTP password, webhook secret or endpoint URL
reaches the database or a log line. The events themselves never carry a card token.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import httpx
from sqlalchemy import Select, or_, select, text
from sqlalchemy.orm import Session

from billing.config import BillingSettings, get_settings
from billing.messages import EmailContent, EmailFacts, MissingFacts, compose, compose_alert
from billing.models import Customer, Event, Invoice, Plan, Subscription
from billing.money import from_minor
from billing.notify import (
    FCM_SCOPE,
    FINAL_CHANNEL,
    BadWebhookSecret,
    Channel,
    ChannelStatus,
    DeliveryStatus,
    channels_for,
    conclude,
    iso,
    message_id,
    push_failure,
    push_message,
    scrub,
    webhook_body,
    webhook_headers,
)
from billing.runtime import Runtime

log = logging.getLogger("billing.notifications")


class DeliveryFailed(Exception):
    """A channel could not deliver. ``reason`` is stored (after ``scrub``); ``permanent``: no
    retry can help; ``unreachable``: the endpoint itself is down, skip it for this run."""

    def __init__(self, reason: str, *, permanent: bool = False, unreachable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.unreachable = unreachable


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _describe(exc: BaseException) -> str:
    words = str(exc).strip()
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


# -- email over SMTP -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpTarget:
    implicit_tls: bool
    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)


def parse_smtp_url(url: str) -> SmtpTarget:
    """``smtp://[user:pass@]host[:port]`` (STARTTLS when offered; port 25 by default) or
    ``smtps://[user:pass@]host[:port]`` (implicit TLS; port 465). The message never repeats the
    URL, which holds the password."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("BILLING_SMTP_URL must look like smtp://user:pass@host:587 or smtps://...")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("BILLING_SMTP_URL has a port that is not a number") from None
    implicit = parts.scheme == "smtps"
    return SmtpTarget(
        implicit_tls=implicit,
        host=parts.hostname,
        port=port or (465 if implicit else 25),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class SmtpMailer:
    """Sends messages over one SMTP connection, opened on the first message of a run."""

    def __init__(
        self, url: str, *, timeout_s: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._url = url
        self.target = parse_smtp_url(url)
        self.timeout_s = timeout_s
        self._ssl = ssl_context
        self._conn: smtplib.SMTP | None = None

    @property
    def secrets(self) -> list[str]:
        password = self.target.password
        extra = [password, quote(password, safe="")] if password else []
        return [self._url, *extra]

    @property
    def where(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _connect(self) -> smtplib.SMTP:
        t = self.target
        conn: smtplib.SMTP | None = None
        try:
            if t.implicit_tls:
                conn = smtplib.SMTP_SSL(
                    t.host, t.port, timeout=self.timeout_s, context=self._context()
                )
            else:
                conn = smtplib.SMTP(t.host, t.port, timeout=self.timeout_s)
            conn.ehlo()
            secure = t.implicit_tls
            if not secure and conn.has_extn("starttls"):
                conn.starttls(context=self._context())
                conn.ehlo()
                secure = True
            if t.username is not None:
                if not secure:
                    raise DeliveryFailed(
                        f"the SMTP server {self.where} offers no STARTTLS, and the password is "
                        "never sent over a plain connection: use smtps:// or a server with TLS",
                        unreachable=True,
                    )
                conn.login(t.username, t.password or "")
        except DeliveryFailed:
            _quietly_close(conn)
            raise
        except (smtplib.SMTPException, OSError) as exc:
            _quietly_close(conn)
            raise DeliveryFailed(
                f"cannot use the SMTP server {self.where}: {_describe(exc)}", unreachable=True
            ) from None
        return conn

    def send(self, message: EmailMessage) -> None:
        reused = self._conn is not None
        if self._conn is None:
            self._conn = self._connect()
        try:
            self._conn.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            replies = list(exc.recipients.values())
            codes = [code for code, _ in replies]
            answers = "; ".join(f"{c} {_text(r)}" for c, r in replies)
            raise DeliveryFailed(
                f"the SMTP server refused the recipient: {answers}",
                permanent=bool(codes) and all(500 <= code < 600 for code in codes),
            ) from None
        except smtplib.SMTPResponseException as exc:
            self._reset()
            answer = f"{exc.smtp_code} {_text(exc.smtp_error)}"
            raise DeliveryFailed(f"the SMTP server answered {answer}") from None
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            if reused:  # a kept connection the server has closed since: once more, afresh
                self.send(message)
                return
            raise DeliveryFailed(
                f"lost the SMTP server {self.where}: {_describe(exc)}", unreachable=True
            ) from None

    def _reset(self) -> None:
        try:
            if self._conn is not None:
                self._conn.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                _quietly_close(conn)


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _quietly_close(conn: smtplib.SMTP | None) -> None:
    if conn is not None:
        with suppress(OSError):
            conn.close()


# -- merchant webhooks ---------------------------------------------------------------------------


class WebhookSender:
    """POSTs signed JSON (Standard Webhooks 1.0) to the merchant's endpoint: 2xx is delivered,
    anything else (another status, a timeout, no connection) a failure. Redirects are not
    followed. ``webhook-timestamp`` is the real time of the send (receivers check it against
    their own clock), whatever clock the billing runs on."""

    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        wall: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._url = url
        self._secret = secret
        self.timeout_s = timeout_s
        self.wall = wall
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            transport=transport,
            follow_redirects=False,
            headers={"user-agent": "fatora-billing-webhooks"},
        )

    @property
    def secrets(self) -> list[str]:
        # The endpoint URL may carry a credential of its own: in its query, its path or its
        # user info.
        parts = urlsplit(self._url)
        found = [self._url, parts.query, parts.path, parts.password or ""]
        found += [value for _, value in parse_qsl(parts.query)]
        if self._secret:
            found += [self._secret, self._secret.removeprefix("whsec_")]
        return found

    def post(self, msg_id: str, body: bytes) -> None:
        if not self._secret:
            raise DeliveryFailed(
                "BILLING_WEBHOOK_SECRET is not set: webhooks are never sent unsigned"
            )
        try:
            headers = webhook_headers(self._secret, msg_id, int(self.wall().timestamp()), body)
        except BadWebhookSecret as exc:
            raise DeliveryFailed(str(exc)) from None
        try:
            response = self.client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryFailed(
                f"no answer from the webhook endpoint within {self.timeout_s:g} s "
                f"({type(exc).__name__})",
                unreachable=True,
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DeliveryFailed(
                f"cannot reach the webhook endpoint: {_describe(exc)}", unreachable=True
            ) from None
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"the webhook endpoint answered HTTP {response.status_code}")

    def close(self) -> None:
        self.client.close()


# -- the channels of a process -------------------------------------------------------------------


class FcmSender:
    """Sends push messages through Firebase Cloud Messaging's HTTP v1 API with a service
    account: a JWT signed with its private key buys an OAuth access token at its ``token_uri``
    (kept until a minute before it expires), which authorises ``messages:send`` on
    ``{endpoint}/v1/projects/{project}``. Both URLs come from the settings and the credentials
    file, so tests point them at a local receiver."""

    def __init__(
        self,
        credentials: dict[str, Any],
        *,
        endpoint: str = "https://fcm.googleapis.com",
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        missing = [
            key
            for key in ("project_id", "private_key", "client_email", "token_uri")
            if not isinstance(credentials.get(key), str) or not credentials[key]
        ]
        if missing:
            raise ValueError(f"the FCM credentials file lacks {', '.join(missing)}")
        self._credentials = credentials
        self._send_url = (
            f"{endpoint.rstrip('/')}/v1/projects/{quote(credentials['project_id'], safe='')}"
            "/messages:send"
        )
        self.timeout_s = timeout_s
        self._access: tuple[str, float] | None = None
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            transport=transport,
            follow_redirects=False,
            headers={"user-agent": "fatora-billing-push"},
        )

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> FcmSender:
        import json
        from pathlib import Path

        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot read the FCM credentials file (BILLING_FCM_CREDENTIALS_FILE): "
                f"{type(exc).__name__}"
            ) from None
        if not isinstance(document, dict):
            raise ValueError("the FCM credentials file is not a service account JSON object")
        return cls(document, **kwargs)

    @property
    def secrets(self) -> list[str]:
        found = [self._credentials["private_key"]]
        if self._access is not None:
            found.append(self._access[0])
        return found

    def _token(self) -> str:
        import time

        import jwt

        if self._access is not None and self._access[1] > time.time() + 60:
            return self._access[0]
        issued = int(time.time())
        claims = {
            "iss": self._credentials["client_email"],
            "scope": FCM_SCOPE,
            "aud": self._credentials["token_uri"],
            "iat": issued,
            "exp": issued + 3600,
        }
        headers = (
            {"kid": self._credentials["private_key_id"]}
            if self._credentials.get("private_key_id")
            else None
        )
        try:
            assertion = jwt.encode(
                claims, self._credentials["private_key"], algorithm="RS256", headers=headers
            )
        except (ValueError, TypeError, jwt.PyJWTError):
            raise DeliveryFailed("the FCM private key cannot sign", permanent=False) from None
        response = self._post(
            self._credentials["token_uri"],
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": assertion,
            },
            what="the FCM token endpoint",
        )
        if response.status_code != 200:
            raise DeliveryFailed(f"the FCM token endpoint answered HTTP {response.status_code}")
        try:
            answer = response.json()
            token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise DeliveryFailed("the FCM token endpoint gave no access token") from None
        self._access = (token, issued + lifetime)
        return token

    def _post(self, url: str, *, what: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.client.post(url, **kwargs)
        except httpx.TimeoutException as exc:
            raise DeliveryFailed(
                f"no answer from {what} within {self.timeout_s:g} s ({type(exc).__name__})",
                unreachable=True,
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DeliveryFailed(
                f"cannot reach {what}: {_describe(exc)}", unreachable=True
            ) from None

    def send(self, message: dict[str, Any]) -> None:
        token = self._token()
        response = self._post(
            self._send_url,
            json=message,
            headers={"authorization": f"Bearer {token}"},
            what="FCM",
        )
        if 200 <= response.status_code < 300:
            return
        if response.status_code in (401, 403):
            self._access = None  # a fresh access token on the next try
        reason, permanent = push_failure(response.status_code, response.content)
        raise DeliveryFailed(reason, permanent=permanent)

    def close(self) -> None:
        self.client.close()


@dataclass
class Channels:
    """The senders in effect (``None``: that channel is not configured, and skipped)."""

    mailer: SmtpMailer | None = None
    webhook: WebhookSender | None = None
    push: FcmSender | None = None
    email_from: str = "billing@localhost"
    alert_to: str | None = None
    # Why a configured channel cannot work (a malformed URL): reported as its error.
    problems: dict[Channel, str] = field(default_factory=dict)

    @property
    def secrets(self) -> list[str]:
        found: list[str] = []
        if self.mailer is not None:
            found += self.mailer.secrets
        if self.webhook is not None:
            found += self.webhook.secrets
        if self.push is not None:
            found += self.push.secrets
        return found

    @property
    def merchant(self) -> str | None:
        return parseaddr(self.email_from)[0] or None

    @property
    def domain(self) -> str:
        return parseaddr(self.email_from)[1].rpartition("@")[2] or "localhost"

    def close(self) -> None:
        if self.mailer is not None:
            self.mailer.close()
        if self.webhook is not None:
            self.webhook.close()
        if self.push is not None:
            self.push.close()

    def __enter__(self) -> Channels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def channels_from_settings(settings: BillingSettings | None = None) -> Channels:
    """The channels ``BILLING_SMTP_URL``, ``BILLING_EMAIL_FROM``, ``BILLING_ALERT_EMAIL``,
    ``BILLING_WEBHOOK_URL`` and ``BILLING_WEBHOOK_SECRET`` configure (empty means unset)."""
    s = settings or get_settings()
    channels = Channels(email_from=s.email_from, alert_to=s.alert_email or None)
    smtp_url = s.smtp_url.get_secret_value() if s.smtp_url is not None else ""
    if smtp_url:
        try:
            channels.mailer = SmtpMailer(smtp_url, timeout_s=s.smtp_timeout_s)
        except ValueError as exc:
            channels.problems[Channel.EMAIL] = str(exc)
            channels.problems[Channel.ALERT_EMAIL] = str(exc)
    webhook_url = s.webhook_url.get_secret_value() if s.webhook_url is not None else ""
    if webhook_url:
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret is not None else None
        channels.webhook = WebhookSender(webhook_url, secret, timeout_s=s.webhook_timeout_s)
    if s.fcm_credentials_file:
        try:
            channels.push = FcmSender.from_file(
                s.fcm_credentials_file, endpoint=s.fcm_endpoint, timeout_s=s.webhook_timeout_s
            )
        except ValueError as exc:
            channels.problems[Channel.PUSH] = str(exc)
    return channels


# -- delivery ------------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    delivered: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)  # not tried: an endpoint was down

    def as_dict(self) -> dict[str, int]:
        return {
            "delivered": len(self.delivered),
            "retrying": len(self.retrying),
            "failed": len(self.failed),
            "skipped": len(self.skipped),
            "deferred": len(self.deferred),
        }


# SQLite has no SKIP LOCKED: deliverers in one process take turns (a worker on SQLite runs a
# single process, see billing/runtime.py::unlocked_worker_problem).
_sqlite_turn = threading.Lock()


@contextmanager
def _turn(rt: Runtime) -> Iterator[bool]:
    if rt.engine.dialect.name != "sqlite":
        yield True
        return
    if not _sqlite_turn.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        _sqlite_turn.release()


def due_query(now: datetime, after_id: int, limit: int) -> Select[Event]:
    """Events still to deliver whose time has come, oldest first, over ``ix_events_undelivered``
    (whose predicate this repeats)."""
    return (
        select(Event)
        .where(
            Event.delivery_status == DeliveryStatus.PENDING.value,
            or_(Event.next_delivery_at.is_(None), Event.next_delivery_at <= now),
            Event.id > after_id,
        )
        .order_by(Event.id)
        .limit(limit)
    )


def deliver_due(
    rt: Runtime,
    channels: Channels,
    *,
    batch_size: int | None = None,
    max_batches: int = 100,
) -> DeliveryReport:
    """Deliver every event that is due, batch by batch; each batch commits its results."""
    size = batch_size or get_settings().notification_batch_size
    report = DeliveryReport()
    unreachable: set[Channel] = set()
    after_id = 0
    with _turn(rt) as mine:
        if not mine:
            return report
        try:
            for _ in range(max_batches):
                claimed = _deliver_batch(rt, channels, size, after_id, unreachable, report)
                if len(claimed) < size:
                    break
                after_id = claimed[-1]
        finally:
            if channels.mailer is not None:
                channels.mailer.close()  # one SMTP connection per run
    summary = report.as_dict()
    if any(summary.values()):
        log.info("events delivered: %s", summary)
    return report


def _deliver_batch(
    rt: Runtime,
    channels: Channels,
    size: int,
    after_id: int,
    unreachable: set[Channel],
    report: DeliveryReport,
) -> list[int]:
    """Up to ``size`` events, each claimed, sent and recorded in a transaction of its own: a
    worker killed mid-run sends again at most the one event it was sending (with the same
    ``Message-ID`` and ``webhook-id``), never the ones it had already sent."""
    claimed: list[int] = []
    for _ in range(size):
        now = rt.clock.now()
        with rt.sessions() as session, session.begin():
            query = due_query(now, after_id, 1)
            if session.get_bind().dialect.name == "postgresql":
                # The row stays locked while it is sent: a server-wide idle timeout must not
                # end the transaction (and send the event again on the next run).
                session.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
                query = query.with_for_update(skip_locked=True)
            event = session.execute(query).scalar_one_or_none()
            if event is None:
                break
            _deliver_event(session, event, channels, now, unreachable, report)
            claimed.append(event.id)
            after_id = event.id
    return claimed


@dataclass
class _Loaded:
    customer: Customer | None
    subscription: Subscription | None
    invoice: Invoice | None
    plan: Plan | None


def _load(session: Session, event: Event) -> _Loaded:
    invoice_id = event.invoice_id or _int(event.payload.get("invoice_id"))
    invoice = session.get(Invoice, invoice_id) if invoice_id is not None else None
    sub_id = event.subscription_id or (invoice.subscription_id if invoice is not None else None)
    subscription = session.get(Subscription, sub_id) if sub_id is not None else None
    customer_id = event.customer_id or (
        subscription.customer_id if subscription is not None else None
    )
    customer = session.get(Customer, customer_id) if customer_id is not None else None
    plan = session.get(Plan, subscription.plan_id) if subscription is not None else None
    return _Loaded(customer, subscription, invoice, plan)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _deliver_event(
    session: Session,
    event: Event,
    channels: Channels,
    now: datetime,
    unreachable: set[Channel],
    report: DeliveryReport,
) -> None:
    loaded = _load(session, event)
    states: dict[str, Any] = dict(event.delivery_channels or {})
    statuses: dict[str, ChannelStatus] = {}
    errors: list[str] = []
    tried = changed = False
    for channel in channels_for(event.kind, event.payload):
        before = states.get(channel.value) or {}
        if before.get("status") in FINAL_CHANNEL:
            statuses[channel.value] = ChannelStatus(before["status"])
            continue
        if channel in unreachable:
            statuses[channel.value] = ChannelStatus.DEFERRED
            continue
        changed = True
        tries = int(before.get("tries", 0))
        try:
            skipped = _guarded_send(channel, event, loaded, channels)
        except DeliveryFailed as exc:
            tried = True
            reason = scrub(exc.reason, channels.secrets)
            errors.append(f"{channel.value}: {reason}")
            if exc.unreachable:
                unreachable.add(channel)
            status = ChannelStatus.FAILED if exc.permanent else ChannelStatus.RETRY
            states[channel.value] = {
                "status": status.value,
                "tries": tries + 1,
                "at": iso(now),
                "error": reason,
            }
            statuses[channel.value] = status
            continue
        if skipped is not None:
            statuses[channel.value] = ChannelStatus.SKIPPED
            states[channel.value] = {"status": ChannelStatus.SKIPPED.value, "why": skipped}
        else:
            tried = True
            statuses[channel.value] = ChannelStatus.SENT
            states[channel.value] = {
                "status": ChannelStatus.SENT.value,
                "tries": tries + 1,
                "at": iso(now),
            }
    if not changed and ChannelStatus.DEFERRED in statuses.values():
        report.deferred.append(event.id)  # nothing tried: left as it is for the next run
        return
    if tried:
        event.delivery_attempts += 1
    outcome = conclude(statuses, event.delivery_attempts)
    for name, status in outcome.channels.items():
        if status is ChannelStatus.FAILED and states.get(name, {}).get("status") != "failed":
            states[name] = {**states.get(name, {}), "status": ChannelStatus.FAILED.value}
    event.delivery_channels = states
    event.delivery_status = outcome.status.value
    if errors:
        event.last_error = scrub("; ".join(errors), ())
    event.next_delivery_at = now + outcome.retry_in if outcome.retry_in is not None else None
    if outcome.status is DeliveryStatus.DELIVERED:
        event.delivered_at = now
        report.delivered.append(event.id)
    elif outcome.status is DeliveryStatus.FAILED:
        event.failed_at = now
        report.failed.append(event.id)
        log.warning(
            "event %s (%s) failed after %s tries: %s",
            event.id,
            event.kind,
            event.delivery_attempts,
            event.last_error,
        )
    elif outcome.status is DeliveryStatus.SKIPPED:
        report.skipped.append(event.id)
    elif outcome.retry_in is not None:
        report.retrying.append(event.id)
        log.info(
            "event %s (%s) try %s failed, next at %s: %s",
            event.id,
            event.kind,
            event.delivery_attempts,
            iso(event.next_delivery_at),
            "; ".join(errors),
        )
    else:
        report.deferred.append(event.id)


def _guarded_send(
    channel: Channel, event: Event, loaded: _Loaded, channels: Channels
) -> str | None:
    """``_send``, where any other exception (a bug, a template that cannot be filled) is a
    failed try like the others: bounded by the retry schedule, and never a poison event whose
    exception would roll back its whole batch (and send the batch again) every minute."""
    try:
        return _send(channel, event, loaded, channels)
    except DeliveryFailed:
        raise
    except Exception as exc:
        reason = scrub(f"internal error: {_describe(exc)}", channels.secrets)
        log.error("event %s (%s), %s: %s", event.id, event.kind, channel.value, reason)
        raise DeliveryFailed(reason) from None


def _send(channel: Channel, event: Event, loaded: _Loaded, channels: Channels) -> str | None:
    """Send ``event`` on ``channel``: ``None`` once sent, a reason if the channel is skipped;
    :class:`DeliveryFailed` if it fails."""
    if channel in channels.problems:
        raise DeliveryFailed(channels.problems[channel])
    if channel is Channel.WEBHOOK:
        if channels.webhook is None:
            return "BILLING_WEBHOOK_URL is not set"
        channels.webhook.post(str(event.id), _webhook_body(event, loaded))
        return None
    if channel is Channel.PUSH:
        return _push(event, loaded, channels)
    if channels.mailer is None:
        return "BILLING_SMTP_URL is not set"
    if channel is Channel.ALERT_EMAIL:
        if not channels.alert_to:
            return "BILLING_ALERT_EMAIL is not set"
        content = compose_alert(
            event_id=event.id,
            kind=event.kind,
            occurred_at=event.created_at,
            customer_id=event.customer_id,
            subscription_id=event.subscription_id,
            invoice_id=event.invoice_id,
            payload=event.payload,
        )
        to = parseaddr(channels.alert_to)
    else:
        customer = loaded.customer
        if customer is None or not customer.email:
            return "no customer email address"
        try:
            content = compose(_facts(event, loaded, customer, channels))
        except MissingFacts as exc:
            raise DeliveryFailed(str(exc), permanent=True) from None
        to = (customer.name, customer.email)
    channels.mailer.send(_message(event, channel, content, to, channels))
    return None


def _push(event: Event, loaded: _Loaded, channels: Channels) -> str | None:
    customer = loaded.customer
    if customer is None or not customer.fcm_token:
        return "no device token"
    if channels.push is None:
        return "BILLING_FCM_CREDENTIALS_FILE is not set"
    try:
        facts = _facts(event, loaded, customer, channels)
        content = compose(facts)
    except MissingFacts as exc:
        raise DeliveryFailed(str(exc), permanent=True) from None
    data = {
        "event_id": str(event.id),
        "kind": event.kind,
        "invoice_id": str(facts.invoice_id) if facts.invoice_id is not None else None,
        "pay_url": _text_or_none(facts.payload.get("pay_url")),
    }
    channels.push.send(push_message(customer.fcm_token, content.subject, content.text, data))
    return None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _facts(event: Event, loaded: _Loaded, customer: Customer, channels: Channels) -> EmailFacts:
    invoice, sub = loaded.invoice, loaded.subscription
    return EmailFacts(
        event_id=event.id,
        kind=event.kind,
        occurred_at=event.created_at,
        language=customer.language,
        timezone=customer.timezone,
        customer_name=customer.name,
        merchant=channels.merchant,
        plan_name=loaded.plan.name if loaded.plan is not None else None,
        invoice_id=invoice.id if invoice is not None else None,
        amount_minor=invoice.amount_minor if invoice is not None else None,
        currency=invoice.currency if invoice is not None else None,
        period_start=invoice.period_start if invoice is not None else None,
        period_end=invoice.period_end if invoice is not None else None,
        paid_at=invoice.paid_at if invoice is not None else None,
        next_billing_at=sub.next_billing_at if sub is not None else None,
        canceled_at=sub.canceled_at if sub is not None else None,
        payload={**event.payload, **_pay_link(invoice), **_renew_link(event, sub)},
    )


def _pay_link(invoice: Invoice | None) -> dict[str, str]:
    """The pay-and-update link for an invoice still open when the message goes out (made at
    delivery: a link is only a signed invoice reference, the hosted page is made on a click)."""
    from billing.services.paylink import PAYABLE

    if invoice is None or invoice.status not in PAYABLE:
        return {}
    from billing.crypto import vault_from_settings
    from billing.services.paylink import link_for

    try:
        return {"pay_url": link_for(vault_from_settings(), invoice.id)}
    except Exception:  # no token key here: the message asks the customer to contact the merchant
        log.warning("no pay link for invoice %s", invoice.id, exc_info=True)
        return {}


def _renew_link(event: Event, sub: Subscription | None) -> dict[str, str]:
    """Before a token dies: the link that pays the coming renewal now with a new card."""
    if event.kind != "card.expiring" or sub is None or sub.next_billing_at is None:
        return {}
    from billing.crypto import vault_from_settings
    from billing.services.paylink import renew_link_for

    try:
        return {"pay_url": renew_link_for(vault_from_settings(), sub.id, sub.next_billing_at)}
    except Exception:  # no token key here: the message asks the customer to contact the merchant
        log.warning("no renew link for subscription %s", sub.id, exc_info=True)
        return {}


def _message(
    event: Event,
    channel: Channel,
    content: EmailContent,
    to: tuple[str, str],
    channels: Channels,
) -> EmailMessage:
    """The email, or a permanent failure if it cannot be written (an address that is not one,
    a line break in a header)."""
    try:
        msg = EmailMessage()
        msg["Subject"] = " ".join(content.subject.split())
        msg["From"] = channels.email_from
        msg["To"] = Address(display_name=" ".join(to[0].split()), addr_spec=to[1])
        msg["Date"] = format_datetime(_utcnow())
        msg["Message-ID"] = message_id(event.id, channel, channels.domain)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Billing-Event"] = f"{event.id} {event.kind}"
        msg.set_content(content.text)
        msg.add_alternative(content.html, subtype="html")
        msg["Content-Language"] = content.language  # after the body: set_content drops it
    except (ValueError, TypeError, IndexError, MessageError) as exc:
        raise DeliveryFailed(f"cannot write the email: {_describe(exc)}", permanent=True) from None
    return msg


def _webhook_body(event: Event, loaded: _Loaded) -> bytes:
    customer = loaded.customer
    invoice = loaded.invoice
    return webhook_body(
        event_id=event.id,
        kind=event.kind,
        created_at=event.created_at,
        customer=(
            {"id": customer.id, "external_id": customer.external_id}
            if customer is not None
            else None
        ),
        subscription_id=loaded.subscription.id if loaded.subscription is not None else None,
        invoice_id=invoice.id if invoice is not None else None,
        invoice=(
            {
                "id": invoice.id,
                "amount": str(from_minor(invoice.amount_minor, invoice.currency)),
                "currency": invoice.currency,
                "period_start": iso(invoice.period_start),
                "period_end": iso(invoice.period_end),
            }
            if invoice is not None
            else None
        ),
        payload=event.payload,
    )


# -- reading and retrying ------------------------------------------------------------------------


def list_events(
    session: Session, *, status: DeliveryStatus | None = None, limit: int = 100
) -> list[Event]:
    """The latest events (newest first), optionally of one delivery status."""
    query = select(Event).order_by(Event.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Event.delivery_status == status.value)
    return list(session.execute(query).scalars())


def describe_event(event: Event) -> dict[str, Any]:
    """An event as ``billing events list --json`` shows it."""
    return {
        "id": event.id,
        "kind": event.kind,
        "created_at": iso(event.created_at),
        "customer_id": event.customer_id,
        "subscription_id": event.subscription_id,
        "invoice_id": event.invoice_id,
        "payload": event.payload,
        "status": event.delivery_status,
        "attempts": event.delivery_attempts,
        "channels": event.delivery_channels or {},
        "next_delivery_at": iso(event.next_delivery_at),
        "delivered_at": iso(event.delivered_at),
        "failed_at": iso(event.failed_at),
        "last_error": event.last_error,
    }


def retry_failed(session: Session, event_ids: list[int] | None, now: datetime) -> list[int]:
    """Put failed events back to deliver at once with a fresh retry schedule (all failed ones
    when ``event_ids`` is ``None``). Channels already sent stay sent: only the failed ones are
    tried again."""
    query = (
        select(Event)
        .where(Event.delivery_status == DeliveryStatus.FAILED.value)
        .order_by(Event.id)
        .with_for_update()
    )
    if event_ids is not None:
        query = query.where(Event.id.in_(event_ids))
    retried: list[int] = []
    for event in session.execute(query).scalars():
        event.delivery_channels = {
            name: state
            for name, state in (event.delivery_channels or {}).items()
            if state.get("status") != ChannelStatus.FAILED.value
        }
        event.delivery_status = DeliveryStatus.PENDING.value
        event.delivery_attempts = 0
        event.next_delivery_at = None
        event.failed_at = None
        retried.append(event.id)
    if retried:
        log.info("events put back for delivery at %s: %s", iso(now), retried)
    return retried
