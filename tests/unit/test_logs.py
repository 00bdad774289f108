"""Log lines: the bound ids on every line, text and JSON formats, and no secret ever written."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from contextvars import copy_context

import pytest

from billing import logs
from billing.config import reset_settings_cache
from billing.crypto import TokenVault, new_key
from billing.fatora.sandbox import Sandbox
from billing.logs import (
    MASK,
    Redactor,
    bind_ids,
    celery_setup_logging,
    celery_task_ended,
    celery_task_started,
    conceal,
    configure_logging,
    current_ids,
    log_context,
)

API_KEY = "merchant-live-key-6f1d2c9a77e04b"
WEBHOOK_SECRET = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LTEyMzQ1Njc4"
DB_PASSWORD = "s3cr3t-db-pass"


@pytest.fixture()
def root_restored() -> Iterator[None]:
    """The root logger as it was: handlers, their filters and its level."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    filters = {h: list(h.filters) for h in handlers}
    level = root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        handler.filters = filters[handler]
    root.setLevel(level)


@pytest.fixture()
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    keys = [new_key(), new_key()]  # a rotation: both keys are secrets
    monkeypatch.setenv("FATORA_API_KEY", API_KEY)
    monkeypatch.setenv("BILLING_TOKEN_KEY", ",".join(keys))
    monkeypatch.setenv("BILLING_WEBHOOK_SECRET", WEBHOOK_SECRET)
    reset_settings_cache()
    yield {"api_key": API_KEY, "old_key": keys[1], "new_key": keys[0]}
    reset_settings_cache()


def _capture(log_format: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level=logging.DEBUG, log_format=log_format, stream=stream)
    return stream


def _vault_token() -> str:
    """A card token as the charge path has it: issued by the sandbox, stored encrypted, read
    back from the vault."""
    vault = TokenVault(new_key())
    return vault.decrypt(vault.encrypt(Sandbox().issue_token("success")))


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_secret_reaches_the_output(
    log_format: str, secrets_env: dict[str, str], root_restored: None
) -> None:
    """A card token from the vault, the API key, both token keys and a database password, put in
    the message, its arguments, extra fields and an exception, never reach the output."""
    token = _vault_token()
    plain_token = "tok4a7Bq9Zr2Lm8Xc5Vn1Jh6"  # no + / | \: only its registration hides it
    conceal(plain_token)
    stream = _capture(log_format)
    log = logging.getLogger("billing.test")
    url = f"postgresql+psycopg://billing:{DB_PASSWORD}@db:5432/billing"
    secrets = [token, plain_token, secrets_env["api_key"], secrets_env["old_key"], DB_PASSWORD]
    secrets += [secrets_env["new_key"], WEBHOOK_SECRET]

    log.warning("collect with %s failed (key %s)", token, secrets_env["api_key"])
    log.warning("message itself: %s " + plain_token, "x")
    log.warning("mapping %(card)s at %(url)s", {"card": token, "url": url})
    log.warning(
        "with extras",
        extra={
            "detail": f"token {token}",
            "card_token": plain_token,
            "nested": {"api_key": secrets_env["api_key"], "keys": [secrets_env["old_key"]]},
            "obj": RuntimeError(secrets_env["new_key"]),
        },
    )
    try:
        raise RuntimeError(f"gateway refused {token} with api_key={secrets_env['api_key']}")
    except RuntimeError:
        log.exception("while charging %s", plain_token)
    log.error("hook signed with %s", WEBHOOK_SECRET, stack_info=True)

    output = stream.getvalue()
    for secret in secrets:
        assert secret not in output
    assert output.count(MASK) >= 8  # masked where they were, not dropped with their line
    lines = output.splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert len(records) == 6
        assert records[3]["card_token"] == MASK
        assert records[3]["nested"]["api_key"] == MASK
        assert "RuntimeError: gateway refused" in records[4]["exception"]
        assert "stack" in records[5]
    else:
        assert "Traceback (most recent call last)" in output
        assert "RuntimeError: gateway refused" in output


def test_ids_and_ordinary_words_survive_redaction() -> None:
    redact = Redactor([API_KEY])
    kept = [
        "attempt S12-20260131090000-3 of invoice 7: paid",
        "deactivated tokens: 3 card_token_id=123456",
        "/srv/app/.venv/lib/python3.11/site-packages/httpx/_client.py",
        'HTTP Request: POST http://sandbox.test/v1/payments/verify "HTTP/1.1 200 OK"',
        "transaction 712345678901 settled",
    ]
    for text in kept:
        assert redact(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:hunter22@redis:6379/0", f"redis://:{MASK}@redis:6379/0"),
        ("smtp://mailer:pa55word@smtp:587", f"smtp://mailer:{MASK}@smtp:587"),
        (
            "/pay/success?orderId=S1-x-1&token=Zm9vYmFyYmF6cXV4",
            f"/pay/success?orderId=S1-x-1&token={MASK}",
        ),
        ('{"card_token": "abcdefgh12345"}', f'{{"card_token": "{MASK}"}}'),
        ("headers {'api_key': 'abcdef123456'}", f"headers {{'api_key': '{MASK}'}}"),
        ("Authorization: Bearer ya29.a0AfH6SMBx", f"Authorization: Bearer {MASK}"),
        ("BILLING_TOKEN_KEY=c2VjcmV0a2V5", f"BILLING_TOKEN_KEY={MASK}"),
        (f"key {API_KEY} refused", f"key {MASK} refused"),
        ("stored gAAAAABn" + "x" * 60 + "== as is", f"stored {MASK} as is"),
        ("token: [redacted]", "token: [redacted]"),  # cleaning twice changes nothing
    ],
)
def test_what_is_redacted(text: str, expected: str) -> None:
    assert Redactor([API_KEY])(text) == expected


def test_sandbox_tokens_are_recognised_by_their_shape() -> None:
    sandbox = Sandbox()
    redact = Redactor()
    for behaviour in ("success", "insufficient_funds", "expired_token"):
        token = sandbox.issue_token(behaviour)
        assert token not in redact(f"charging {token} now")


def test_registered_tokens_are_bounded() -> None:
    redact = Redactor()
    redact.register(*(f"plaintoken{i:08d}" for i in range(logs.REGISTERED_MAX + 10)))
    assert redact("plaintoken00000000") == "plaintoken00000000"  # the oldest were forgotten
    last = f"plaintoken{logs.REGISTERED_MAX + 9:08d}"
    assert redact(last) == MASK


def test_bound_ids_nest_and_end_with_their_block() -> None:
    assert current_ids() == {}
    with log_context(task="billing.charge_invoices", task_id="t-1"):
        with log_context():
            bind_ids(invoice_id=7, order_id="S12-20260131090000-3", attempt_id=40)
            assert current_ids() == {
                "task": "billing.charge_invoices",
                "task_id": "t-1",
                "invoice_id": 7,
                "order_id": "S12-20260131090000-3",
                "subscription_id": 12,  # read from the order id
                "attempt_id": 40,
            }
            bind_ids(invoice_id=8, subscription_id=13, attempt_id=None, order_id=None)
            assert current_ids() == {
                "task": "billing.charge_invoices",
                "task_id": "t-1",
                "invoice_id": 8,
                "subscription_id": 13,
            }
        assert current_ids() == {"task": "billing.charge_invoices", "task_id": "t-1"}
    assert current_ids() == {}


def test_ids_follow_work_into_a_pool_thread(root_restored: None) -> None:
    """As the charge path submits gateway calls: in a copy of the submitting context, with the
    call's own ids bound there only."""
    stream = _capture("json")
    seen: list[dict[str, object]] = []

    def call() -> None:
        bind_ids(invoice_id=5, attempt_id=9, order_id="S3-20260131090000-1")
        logging.getLogger("billing.charging").warning("no answer")
        seen.append(current_ids())

    with log_context(task_id="t-2"):
        worker = threading.Thread(target=copy_context().run, args=(call,))
        worker.start()
        worker.join()
        assert current_ids() == {"task_id": "t-2"}  # the thread's binding stayed in its copy
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["task_id"] == "t-2"
    assert (record["invoice_id"], record["subscription_id"]) == (5, 3)
    assert (record["order_id"], record["attempt_id"]) == ("S3-20260131090000-1", 9)
    assert record["message"] == "no answer" and record["level"] == "warning"
    assert record["logger"] == "billing.charging" and record["time"].endswith("Z")
    assert seen[0]["invoice_id"] == 5


def test_text_lines_end_with_the_ids(root_restored: None) -> None:
    stream = _capture("text")
    with log_context(task_id="t-3"):
        bind_ids(attempt_id=2, invoice_id=1, subscription_id=4)
        logging.getLogger("billing.charging").warning("declined")
    line = stream.getvalue().strip()
    assert line.endswith(
        "billing.charging: declined [invoice_id=1 subscription_id=4 attempt_id=2 task_id=t-3]"
    )


def test_celery_tasks_bind_their_name_and_id(root_restored: None) -> None:
    class Task:
        name = "billing.charge_invoices"

    stream = _capture("json")
    celery_task_started(task_id="abc", task=Task())
    logging.getLogger("billing.tasks").warning("inside")
    celery_task_ended(task_id="abc", task=Task())
    logging.getLogger("billing.tasks").warning("after")
    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["task"], inside["task_id"]) == ("billing.charge_invoices", "abc")
    assert "task_id" not in after


def test_celery_setup_logging_installs_the_format_and_filters(
    monkeypatch: pytest.MonkeyPatch, root_restored: None
) -> None:
    """What the worker and beat get from the setup_logging signal: BILLING_LOG_FORMAT, their
    --loglevel, both filters, and one handler however often it is called."""
    monkeypatch.setenv("BILLING_LOG_FORMAT", "json")
    reset_settings_cache()
    try:
        celery_setup_logging(loglevel=logging.INFO, logfile=None)
        celery_setup_logging(loglevel=logging.INFO, logfile=None)
    finally:
        reset_settings_cache()
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_billing_handler", False)]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, logs.JsonFormatter)
    kinds = {type(f) for f in ours[0].filters}
    assert {logs.ContextFilter, logs.RedactingFilter} <= kinds
    assert root.level == logging.INFO
