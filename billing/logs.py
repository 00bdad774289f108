"""Logging for the worker, beat and the daemons: one line per record, as text or JSON, carrying
the ids of the charge it is about, and never a secret.

``configure_logging`` installs one handler on the root logger (standard error, or a file), and
gives it, and any other handler already on the root logger, two filters:

- ``ContextFilter`` adds the ids bound in the current context: ``invoice_id``,
  ``subscription_id``, ``order_id`` and ``attempt_id`` around each invoice's work on the charge
  path (``billing/services/charging.py``), ``task`` and ``task_id`` in a Celery task. Ids are
  bound with ``log_context`` (a block) or ``bind_ids`` (until the enclosing block ends). Gateway
  calls run on pool threads: they are submitted in a copy of the submitting thread's context.
- ``RedactingFilter`` takes secrets out of the message and its arguments, the extra fields, and
  the exception and stack text (see ``Redactor``).

``BILLING_LOG_FORMAT=json`` writes one JSON object per line (``JsonFormatter``); the default is
text, with the bound ids at the end of the line (``TextFormatter``).

Celery's worker and beat log through here (``celery_setup_logging``, connected to the
``setup_logging`` signal in ``workers/app.py``), and so do ``billing web`` and
``billing sandbox``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from billing.config import SettingsError, get_fatora_settings, get_settings

MASK = "[redacted]"

# -- the ids bound to the current context ------------------------------------------------------

# The ids of the charge path, in the order a text line shows them.
CHARGE_IDS = ("invoice_id", "subscription_id", "order_id", "attempt_id")
_EMPTY: Mapping[str, object] = MappingProxyType({})
_IDS: ContextVar[Mapping[str, object]] = ContextVar("billing_log_ids", default=_EMPTY)
# Order ids begin with the subscription's id (billing.attempts.order_prefix: S<id>-<period>-).
_ORDER_SUBSCRIPTION = re.compile(r"S(\d+)-")


def _merged(ids: Mapping[str, object]) -> Mapping[str, object]:
    merged = dict(_IDS.get())
    for key, value in ids.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    order_id = ids.get("order_id")
    if isinstance(order_id, str) and "subscription_id" not in ids:
        match = _ORDER_SUBSCRIPTION.match(order_id)
        if match:
            merged["subscription_id"] = int(match.group(1))
    return MappingProxyType(merged)


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Bind ``ids`` to every record logged in the block, on top of the ids bound around it
    (``None`` unbinds one). What ``bind_ids`` binds inside the block ends with it too."""
    token = _IDS.set(_merged(ids))
    try:
        yield
    finally:
        _IDS.reset(token)


def bind_ids(**ids: object) -> None:
    """Bind ``ids`` until the enclosing ``log_context`` ends (or the context the code runs in,
    such as a ``contextvars.copy_context().run``): in a loop over a batch's invoices, each
    invoice's ids replace the previous one's. An order id also binds the subscription id it
    begins with, unless one is given."""
    _IDS.set(_merged(ids))


def current_ids() -> dict[str, object]:
    return dict(_IDS.get())


# -- secrets -----------------------------------------------------------------------------------

# user:password@ in any URL (database, broker, SMTP, proxy).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^\s:/@]*:)[^\s@/]+@", re.IGNORECASE)
# The value of a field named like a credential: card_token=..., "api_key": "...", cardToken: ...
# (at least 6 characters, so that counts and flags stay readable).
_CREDENTIAL_FIELD = re.compile(
    r"(?P<head>\b[\w.\-]*?(?:token|api[_\-]?key|_key|secret|password|passwd)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"'&,;()\[\]{}]{6,})",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(?P<head>(?:bearer|basic)\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)
# Fatora card tokens mix letters and digits with + / | \ and base64 padding: a long run of those
# characters holding a | or a \ is taken for one.
_TOKEN_SHAPED = re.compile(r"(?<![\w+/=|\\\-])[A-Za-z0-9+/=|\\_\-]{16,}(?![\w+/=|\\\-])")
# A Fernet ciphertext (an encrypted card token).
_FERNET_TOKEN = re.compile(r"\bgAAAAA[A-Za-z0-9_\-]{40,}={0,2}")
# Fields whose whole value is a secret, whatever it looks like.
_SENSITIVE_NAME = re.compile(
    r"(?:token|api[_\-]?key|_key|secret|password|passwd|authorization)$", re.IGNORECASE
)
# Shorter configured values are not looked for: they would mask ordinary words.
MIN_SECRET = 8
# How many registered card tokens are remembered (the most recent).
REGISTERED_MAX = 1024


def _token_shaped(match: re.Match[str]) -> str:
    word = match.group(0)
    if ("|" in word or "\\" in word) and any(c.isdigit() for c in word):
        return MASK if any(c.isalpha() for c in word) else word
    return word


class Redactor:
    """Removes secrets from text. In order:

    1. the configured secrets (``configured_secrets``: Fatora's API key, each
       ``BILLING_TOKEN_KEY``, the webhook secret and URL) and the card tokens registered with
       ``conceal`` (the most recent ``REGISTERED_MAX``; the process can decrypt every stored
       token anyway, so remembering a few it used adds nothing to what it holds);
    2. passwords in URLs (``scheme://user:PASSWORD@host``), ``Bearer``/``Basic`` credentials;
    3. the value of any field named like a credential (``card_token=``, ``"api_key": ``...);
    4. anything shaped like a Fatora card token, and Fernet ciphertexts.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._configured: frozenset[str] = frozenset()
        self._registered: OrderedDict[str, None] = OrderedDict()
        # The secrets by length: a line is checked one window per length and position, whatever
        # the number of secrets.
        self._by_length: dict[int, set[str]] = {}
        self._lengths: tuple[int, ...] = ()
        self.configure(secrets)

    def configure(self, secrets: Iterable[str]) -> None:
        """Replace the configured secrets (the registered tokens stay)."""
        with self._lock:
            old, new = self._configured, frozenset(s for s in secrets if len(s) >= MIN_SECRET)
            for secret in new:  # the new ones first: a line written meanwhile masks both
                self._remember(secret)
            self._configured = new
            for secret in old - new - set(self._registered):
                self._forget(secret)

    def register(self, *secrets: str) -> None:
        with self._lock:
            for secret in secrets:
                if len(secret) < MIN_SECRET:
                    continue
                if secret in self._registered:
                    self._registered.move_to_end(secret)
                    continue
                self._registered[secret] = None
                self._remember(secret)
            while len(self._registered) > REGISTERED_MAX:
                oldest, _ = self._registered.popitem(last=False)
                if oldest not in self._configured:
                    self._forget(oldest)

    def _remember(self, secret: str) -> None:
        bucket = self._by_length.get(len(secret))
        if bucket is None:
            self._by_length[len(secret)] = {secret}
            self._lengths = tuple(sorted(self._by_length, reverse=True))  # swapped whole
        else:
            bucket.add(secret)

    def _forget(self, secret: str) -> None:
        bucket = self._by_length.get(len(secret))
        if bucket is not None:
            bucket.discard(secret)

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Where known secrets stand in ``text``: overlapping and adjoining spans merged, so that
        two secrets sharing characters are masked whole, as one."""
        found: list[tuple[int, int]] = []
        size = len(text)
        for length in self._lengths:
            bucket = self._by_length.get(length)
            if length > size or not bucket:
                continue
            found.extend(
                (start, start + length)
                for start in range(size - length + 1)
                if text[start : start + length] in bucket
            )
        merged: list[tuple[int, int]] = []
        for start, end in sorted(found):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def __call__(self, text: str) -> str:
        spans = self._spans(text)
        if spans:
            parts: list[str] = []
            cut = 0
            for start, end in spans:
                parts += (text[cut:start], MASK)
                cut = end
            text = "".join(parts) + text[cut:]
        text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)
        text = _BEARER.sub(lambda m: f"{m.group('head')}{MASK}", text)
        text = _CREDENTIAL_FIELD.sub(lambda m: f"{m.group('head')}{MASK}", text)
        text = _FERNET_TOKEN.sub(MASK, text)
        return _TOKEN_SHAPED.sub(_token_shaped, text)

    def value(self, name: str, value: Any) -> Any:
        """An extra field's value, safe to write: masked whole if its name is a credential's,
        strings cleaned, containers cleaned item by item, anything else as cleaned text."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if _SENSITIVE_NAME.search(name):
            return MASK
        if isinstance(value, str):
            return self(value)
        if isinstance(value, Mapping):
            return {str(k): self.value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(name, v) for v in value]
        return self(str(value))


def configured_secrets() -> list[str]:
    """The secrets the settings hold: ``FATORA_API_KEY``, each key in ``BILLING_TOKEN_KEY``,
    ``BILLING_WEBHOOK_SECRET`` and ``BILLING_WEBHOOK_URL`` (it may carry a token). Read from the
    environment as is when the settings cannot be read (a logger must still start)."""
    found: list[str | None] = []
    try:
        found.append(get_fatora_settings().api_key.get_secret_value())
    except SettingsError:
        found.append(os.environ.get("FATORA_API_KEY"))
    try:
        settings = get_settings()
        token_key = settings.token_key.get_secret_value() if settings.token_key else None
        found += [
            token_key,
            settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
            settings.webhook_url.get_secret_value() if settings.webhook_url else None,
        ]
    except SettingsError:
        token_key = os.environ.get("BILLING_TOKEN_KEY")
        found += [token_key, os.environ.get("BILLING_WEBHOOK_SECRET")]
        found.append(os.environ.get("BILLING_WEBHOOK_URL"))
    found += [part.strip() for part in (token_key or "").split(",")]
    return [s for s in found if s]


REDACTOR = Redactor()


def conceal(*secrets: str) -> None:
    """Never write these (card tokens this process has in hand) in a log line."""
    REDACTOR.register(*secrets)


# -- filters -----------------------------------------------------------------------------------

IDS_ATTR = "billing_ids"
# What every LogRecord carries by itself: anything else on a record came with ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    IDS_ATTR,
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class ContextFilter(logging.Filter):
    """Puts the ids bound in the logging thread's context on the record (``billing_ids``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, IDS_ATTR):
            setattr(record, IDS_ATTR, dict(_IDS.get()))
        return True


class RedactingFilter(logging.Filter):
    """Takes secrets out of a record before any formatter sees it: the message is rendered with
    its arguments and cleaned (the arguments are dropped), extra fields are cleaned, and the
    exception and stack are rendered to text and cleaned."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or REDACTOR

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the message: keep both, cleaned
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in extra_fields(record).items():
            setattr(record, name, redact.value(name, value))
        return True


# -- formats -----------------------------------------------------------------------------------

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"


def _ordered_ids(record: logging.LogRecord) -> list[tuple[str, object]]:
    ids: dict[str, object] = dict(getattr(record, IDS_ATTR, None) or {})
    first = [(key, ids.pop(key)) for key in CHARGE_IDS if key in ids]
    return first + sorted(ids.items())


class TextFormatter(logging.Formatter):
    """The ``fmt`` line with the bound ids at its end: ``... [invoice_id=12 attempt_id=7]``."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = _ordered_ids(record)
        if not ids:
            return line
        return f"{line} [{' '.join(f'{key}={value}' for key, value in ids)}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC), ``level``, ``logger``, ``message``, ``process``,
    ``thread``, the bound ids, the extra fields, and ``exception``/``stack`` when there are
    any."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        document: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "process_name": record.processName,
            "thread": record.threadName,
        }
        for key, value in _ordered_ids(record):
            document.setdefault(key, value)
        for key, value in extra_fields(record).items():
            document.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def formatter_for(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}: use text or json")


# -- installing it -----------------------------------------------------------------------------

_OURS = "_billing_handler"


def settings_log_format() -> str:
    """``BILLING_LOG_FORMAT``; ``text`` when the settings cannot be read (the daemon then refuses
    to start, with a line that says why, which must be readable)."""
    try:
        return get_settings().log_format
    except SettingsError:
        return "text"


def configure_logging(
    *,
    level: int | str = logging.INFO,
    log_format: str | None = None,
    logfile: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to standard error (or ``stream``,
    or ``logfile``) in ``log_format`` (default: ``BILLING_LOG_FORMAT``), with the bound ids and
    without secrets. Called again, it replaces the handler it installed; other handlers on the
    root logger keep theirs but get the two filters too. Returns the handler."""
    REDACTOR.configure(configured_secrets())
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(log_format or settings_log_format()))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    for each in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in each.filters):
            each.addFilter(ContextFilter())
        if not any(isinstance(f, RedactingFilter) for f in each.filters):
            each.addFilter(RedactingFilter())
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # warnings are log lines too, in the same format
    return handler


# -- Celery ------------------------------------------------------------------------------------


def celery_setup_logging(
    loglevel: int | str | None = None, logfile: str | None = None, **_: Any
) -> None:
    """Receiver of Celery's ``setup_logging`` signal: the worker and beat log through
    ``configure_logging`` at their ``--loglevel`` (to their ``--logfile`` if given), and Celery
    leaves the root logger alone."""
    configure_logging(level=loglevel or logging.WARNING, logfile=logfile or None)


def celery_worker_starting(options: Mapping[str, Any] | None = None, **_: Any) -> None:
    """Receiver of ``celeryd_init``: a worker logs through ``configure_logging`` from its first
    line on (Celery warns about privileges before it sets up logging); ``setup_logging`` then
    sets it up again, the same way."""
    options = options or {}
    level = options.get("loglevel") or logging.WARNING
    configure_logging(level=level, logfile=options.get("logfile") or None)


_task_tokens: dict[str, Token[Mapping[str, object]]] = {}


def celery_task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Receiver of ``task_prerun``: the task's name and id on every line it logs."""
    if task_id is not None:
        name = getattr(task, "name", None)
        _task_tokens[task_id] = _IDS.set(_merged({"task": name, "task_id": task_id}))


def celery_task_ended(task_id: str | None = None, **_: Any) -> None:
    """Receiver of ``task_postrun``: the ids bound for the task end with it."""
    token = _task_tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        # (ended in another context than it started in: nothing to undo here)
        with suppress(ValueError):
            _IDS.reset(token)
