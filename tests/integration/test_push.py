"""Push messages through FCM's HTTP v1 API, against a local receiver that plays both Google's
token endpoint and FCM (real PostgreSQL for the outbox): the service account's signed request
buys an access token, each message reaches the customer's device once, in their language, with
the pay link; a dead device token fails the push alone, and no key reaches a stored error."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import update

from billing.fatora.sandbox import Sandbox
from billing.models import Customer, Event
from billing.notify import FCM_SCOPE
from billing.runtime import Runtime
from billing.services.events import record_event
from billing.services.notifications import Channels, FcmSender, deliver_due
from tests.factories import renew, seed_plans, subscriber

DEVICE = "fcm-device-token:APA91b+x/y"


@dataclass
class FakeFcm:
    public_key: Any
    dead_devices: set[str] = field(default_factory=set)
    tokens_issued: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        assertion = form["assertion"][0]
        claims = jwt.decode(
            assertion, self.public_key, algorithms=["RS256"], audience=f"{self.url}/token"
        )
        assert claims["scope"] == FCM_SCOPE and claims["iss"] == "billing@proj.iam.example"
        self.tokens_issued += 1
        return 200, {"access_token": f"ya29.access-{self.tokens_issued}", "expires_in": 3600}

    def send(self, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not auth.startswith("Bearer ya29.access-"):
            return 401, {"error": {"status": "UNAUTHENTICATED"}}
        device = body["message"]["token"]
        if device in self.dead_devices:
            return 404, {
                "error": {
                    "status": "NOT_FOUND",
                    "details": [{"errorCode": "UNREGISTERED"}],
                }
            }
        self.messages.append(body["message"])
        return 200, {"name": f"projects/proj/messages/{len(self.messages)}"}


@pytest.fixture()
def key_pair() -> tuple[str, Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, private.public_key()


@pytest.fixture()
def fcm(key_pair: tuple[str, Any]) -> Iterator[FakeFcm]:
    fake = FakeFcm(public_key=key_pair[1])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path == "/token":
                status, answer = fake.token(parse_qs(body.decode()))
            elif self.path == "/v1/projects/proj/messages:send":
                status, answer = fake.send(self.headers.get("authorization", ""), json.loads(body))
            else:
                status, answer = 404, {}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()


def _credentials(tmp_path: Path, pem: str, fcm: FakeFcm) -> Path:
    path = tmp_path / "service-account.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "proj",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "billing@proj.iam.example",
                "token_uri": f"{fcm.url}/token",
            }
        )
    )
    return path


def _world(rt: Runtime, sandbox: Sandbox, name: str, language: str, device: str | None) -> int:
    subscriber(rt, sandbox, ["success"], name=name)
    with rt.sessions() as session, session.begin():
        session.execute(
            update(Customer)
            .where(Customer.external_id == name)
            .values(language=language, fcm_token=device)
        )
    (invoice_id,) = renew(rt)
    return invoice_id


def _failed(rt: Runtime, invoice_id: int) -> int:
    from billing.models import Invoice

    with rt.sessions() as session, session.begin():
        invoice = session.get(Invoice, invoice_id)
        record_event(
            session,
            "invoice.payment_failed",
            invoice=invoice,
            now=rt.clock.now(),
            payload={"reason": "hard_decline", "needs_new_card": True, "step": 1, "steps": 3},
        )
    with rt.sessions() as session:
        return max(e.id for e in session.query(Event).where(Event.invoice_id == invoice_id))


def test_a_push_reaches_the_device_once_in_the_customers_language_with_the_link(
    rt: Runtime,
    sandbox: Sandbox,
    fcm: FakeFcm,
    key_pair: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Protects: a customer with a device gets the failed-payment message on their phone, in
    Arabic, with the pay link; one access token serves several messages; a second delivery
    run sends nothing again."""
    from billing.config import reset_settings_cache
    from billing.crypto import new_key

    monkeypatch.setenv("BILLING_TOKEN_KEY", new_key())  # the links are signed at delivery
    reset_settings_cache()
    seed_plans(rt)
    first = _world(rt, sandbox, "amal", "ar", DEVICE)
    second = _world(rt, sandbox, "omar", "en", DEVICE + "2")
    ids = [_failed(rt, first), _failed(rt, second)]
    sender = FcmSender.from_file(str(_credentials(tmp_path, key_pair[0], fcm)), endpoint=fcm.url)
    with Channels(push=sender) as channels:
        deliver_due(rt, channels)
        deliver_due(rt, channels)
    assert fcm.tokens_issued == 1
    by_device = {m["token"]: m for m in fcm.messages}
    assert sorted(by_device) == sorted([DEVICE, DEVICE + "2"]) and len(fcm.messages) == 2
    arabic = by_device[DEVICE]
    assert any("\u0600" <= ch <= "\u06ff" for ch in arabic["notification"]["title"])
    assert arabic["data"]["kind"] == "invoice.payment_failed"
    assert arabic["data"]["invoice_id"] == str(first)
    assert f"/pay/{first}-" in arabic["data"]["pay_url"]
    with rt.sessions() as session:
        for event_id in ids:
            event = session.get(Event, event_id)
            assert event is not None
            assert (event.delivery_channels or {})["push"]["status"] == "sent"


def test_a_dead_device_fails_the_push_alone_and_no_key_is_stored(
    rt: Runtime,
    sandbox: Sandbox,
    fcm: FakeFcm,
    key_pair: tuple[str, Any],
    tmp_path: Path,
) -> None:
    """Protects: FCM's UNREGISTERED is permanent (no retry storm); the event's other channels
    are unaffected; the stored error names the cause and carries no key or access token."""
    seed_plans(rt)
    invoice_id = _world(rt, sandbox, "amal", "en", DEVICE)
    fcm.dead_devices.add(DEVICE)
    event_id = _failed(rt, invoice_id)
    sender = FcmSender.from_file(str(_credentials(tmp_path, key_pair[0], fcm)), endpoint=fcm.url)
    with Channels(push=sender) as channels:
        deliver_due(rt, channels)
    with rt.sessions() as session:
        event = session.get(Event, event_id)
        assert event is not None
        push = (event.delivery_channels or {})["push"]
        assert push["status"] == "failed" and "UNREGISTERED" in push["error"]
        assert (event.delivery_channels or {})["email"]["status"] == "skipped"
        stored = json.dumps(event.delivery_channels) + (event.last_error or "")
        assert "PRIVATE KEY" not in stored and "ya29." not in stored


def test_a_credentials_file_that_cannot_serve_is_one_clear_reason(tmp_path: Path) -> None:
    """Protects: a broken credentials file is named as the cause, without its content."""
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({"project_id": "p", "private_key": "secret-pem"}))
    with pytest.raises(ValueError, match="lacks client_email, token_uri") as caught:
        FcmSender.from_file(str(path))
    assert "secret-pem" not in str(caught.value)
