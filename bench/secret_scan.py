"""Secrets in clear in what a run leaves behind: log and report files, every key of a Redis
server, every column of every table of a database (PostgreSQL or SQLite).

A secret (a card token, an API key, a token encryption key) is in clear where its exact string
appears, or one of its encodings that anyone can undo without a key: JSON string escaping (a
token's backslash doubled), percent-encoding (a URL's query), and the base64 of a Celery
message's body (a task's arguments as the broker holds them). A Fernet ciphertext of a token is
not the token: the ``card_tokens`` table holds those, as it should.

A hit names the place and the secret's kind and number (``card token #3``), never its value, so
that a report of hits can be printed and kept.

    secrets = Secrets({"card token": tokens, "API key": [api_key], "token key": [key]})
    scan = scan_files(secrets, [log_dir], prefix="log")
    scan += scan_redis(secrets, redis_url)
    scan += scan_database(secrets, engine_or_url)
    assert scan.hits == [], scan.by_place()

Used by ``bench/chaos.py`` (its ``secrets_in_clear`` invariant) and by the end-to-end tests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from sqlalchemy import Engine, create_engine, inspect, text

# A shorter value would be found in ordinary text: it cannot be told apart from a secret.
MIN_SECRET = 8
# Files are read this much at a time (with an overlap of the longest form, less one byte).
CHUNK = 1 << 22
# Rows are read from a table this many at a time.
ROWS_PER_BATCH = 1000
# Schemas of the database server itself, not of the application.
_SYSTEM_SCHEMAS = re.compile(r"^(?:information_schema|pg_.*)$")
# Column values that cannot hold a string.
_NOT_TEXT = (bool, int, float, Decimal, datetime, date, time, timedelta)


@dataclass(frozen=True, order=True)
class Hit:
    place: str
    secret: str  # its kind and number, "card token #3": never its value
    form: str  # "as is", "JSON-escaped", "percent-encoded"


@dataclass
class Scan:
    """What was looked at (``places``) and what was found there (``hits``)."""

    places: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)

    def __iadd__(self, other: Scan) -> Scan:
        self.places.extend(other.places)
        self.hits.extend(other.hits)
        return self

    def by_place(self) -> dict[str, list[str]]:
        """Each place with hits: the secrets found there, as ``card token #3 (as is)``."""
        found: dict[str, set[str]] = {}
        for hit in self.hits:
            found.setdefault(hit.place, set()).add(f"{hit.secret} ({hit.form})")
        return {place: sorted(secrets) for place, secrets in sorted(found.items())}


def _forms(value: str) -> dict[bytes, str]:
    """The secret as is, and each plain encoding of it that differs (bytes -> its name)."""
    candidates = [
        ("as is", value),
        ("JSON-escaped", json.dumps(value)[1:-1]),
        ("JSON-escaped", json.dumps(value, ensure_ascii=False)[1:-1]),
        ("percent-encoded", quote(value, safe="")),
        ("percent-encoded", quote(value)),
    ]
    lower_hex = [
        (name, re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), form))
        for name, form in candidates
        if name == "percent-encoded"
    ]
    forms: dict[bytes, str] = {}
    for name, form in [*candidates, *lower_hex]:
        forms.setdefault(form.encode("utf-8"), name)
    return forms


class Secrets:
    """The secrets to look for, by kind: ``{"card token": [...], "API key": [...]}``.

    Any number of secrets costs about the same: the text is cut into the runs of characters
    that secrets are made of (one regular expression), and only runs as long as a secret are
    looked at, one window per secret length and position, each a dictionary lookup."""

    def __init__(self, named: Mapping[str, Iterable[str]]) -> None:
        self._by_length: dict[int, dict[bytes, tuple[str, str]]] = {}
        self.count = 0
        for kind, values in named.items():
            for number, value in enumerate(dict.fromkeys(values), 1):
                if len(value) < MIN_SECRET:
                    raise ValueError(
                        f"a {kind} shorter than {MIN_SECRET} characters cannot be looked for"
                    )
                if any(c.isspace() for c in value):
                    # Places are cut at line ends: a secret must fit in one line.
                    raise ValueError(f"a {kind} with a space or a line end cannot be looked for")
                self.count += 1
                for encoded, form in _forms(value).items():
                    table = self._by_length.setdefault(len(encoded), {})
                    table.setdefault(encoded, (f"{kind} #{number}", form))
        if not self._by_length:
            raise ValueError("no secret to look for")
        self._lengths = sorted(self._by_length)
        self.longest = self._lengths[-1]
        alphabet = sorted({byte for table in self._by_length.values() for s in table for byte in s})
        char_class = b"".join(re.escape(bytes([byte])) for byte in alphabet)
        self._runs = re.compile(b"[" + char_class + b"]{%d,}" % self._lengths[0])

    def find(self, content: bytes | str) -> set[tuple[str, str]]:
        """The (secret, form) pairs found in ``content``."""
        data = content.encode("utf-8", "replace") if isinstance(content, str) else content
        found: set[tuple[str, str]] = set()
        for match in self._runs.finditer(data):
            run = match.group(0)
            for length in self._lengths:
                if length > len(run):
                    break
                table = self._by_length[length]
                for start in range(len(run) - length + 1):
                    hit = table.get(run[start : start + length])
                    if hit is not None:
                        found.add(hit)
        return found

    def scan(self, place: str, content: bytes | str) -> Scan:
        """One place: its name (withheld if it holds a secret itself) and its hits."""
        found = self.find(content)
        named = self.find(place)
        if named:
            place = "<a name holding a secret>"
            found |= named
        return Scan([place], [Hit(place, secret, form) for secret, form in sorted(found)])


# -- files ---------------------------------------------------------------------------------------


def _files(paths: Iterable[Path], pattern: str) -> Iterator[tuple[Path, Path]]:
    """Each file, with the folder it was found under (for its name in a report)."""
    for path in paths:
        if path.is_dir():
            for found in sorted(path.rglob(pattern)):
                if found.is_file() and not found.is_symlink():
                    yield found, path
        elif path.is_file():
            yield path, path.parent


def scan_files(
    secrets: Secrets, paths: Iterable[Path], *, prefix: str = "file", pattern: str = "*"
) -> Scan:
    """Every file in ``paths`` (a folder: every file under it whose name matches ``pattern``),
    read as bytes: logs, reports, and a database file too (a deleted row's text may still be on
    one of its pages). A file is named by its path under the folder given."""
    scan = Scan()
    overlap = secrets.longest - 1
    for path, root in _files(paths, pattern):
        place = f"{prefix} {path.relative_to(root)}"
        found = Scan([place])
        tail = b""
        with path.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                found.hits.extend(secrets.scan(place, tail + chunk).hits)
                tail = chunk[-overlap:] if overlap else b""
        found.hits = sorted(set(found.hits))
        scan += found
    return scan


def scan_text(secrets: Secrets, place: str, content: bytes | str) -> Scan:
    """One piece of text from elsewhere: an email, a webhook's body, a program's output."""
    return secrets.scan(place, content)


# -- Redis ---------------------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON document, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _message_bodies(value: Any) -> Iterator[bytes]:
    """The base64 bodies of the broker messages (kombu's envelope) in a JSON document."""
    if isinstance(value, dict):
        properties = value.get("properties")
        body = value.get("body")
        if (
            isinstance(body, str)
            and isinstance(properties, dict)
            and properties.get("body_encoding") == "base64"
        ):
            with contextlib.suppress(binascii.Error, ValueError):
                yield base64.b64decode(body, validate=True)
        for item in value.values():
            yield from _message_bodies(item)
    elif isinstance(value, list):
        for item in value:
            yield from _message_bodies(item)


def readable(raw: bytes) -> bytes:
    """``raw``, and when it is JSON, its strings unescaped and the decoded bodies of the broker
    messages it holds (with their strings): what a reader of the value can see at once."""
    if raw.lstrip()[:1] not in (b"{", b"["):
        return raw
    try:
        document = json.loads(raw)
    except ValueError:
        return raw
    parts = [raw, *(s.encode("utf-8", "replace") for s in _strings(document))]
    for body in _message_bodies(document):
        parts.append(body)
        with contextlib.suppress(ValueError):
            parts.extend(s.encode("utf-8", "replace") for s in _strings(json.loads(body)))
    # A line end is in no secret's form: nothing is found across two parts.
    return b"\n".join(parts)


def _values(client: redis.Redis[bytes], key: bytes) -> list[bytes]:
    answer: Any = client.type(key)  # type: ignore[no-untyped-call]
    kind = answer.decode() if isinstance(answer, bytes) else str(answer)
    if kind == "string":
        value = client.get(key)
        return [value] if value is not None else []
    if kind == "list":
        return list(client.lrange(key, 0, -1))
    if kind == "hash":
        return [part for pair in client.hgetall(key).items() for part in pair]
    if kind == "set":
        return list(client.smembers(key))
    if kind == "zset":
        return list(client.zrange(key, 0, -1))
    if kind == "stream":
        entries = client.xrange(key)
        return [
            part
            for entry_id, fields in entries
            for part in (entry_id, *(x for pair in fields.items() for x in pair))
        ]
    return []


def scan_redis(
    secrets: Secrets, where: redis.Redis[bytes] | str, *, all_databases: bool = False
) -> Scan:
    """Every key of the client's database (or, with ``all_databases``, of every database of
    the server that holds keys): its name and every value of a string, list, hash, set, sorted
    set or stream, JSON strings unescaped and broker message bodies decoded (``readable``)."""
    client = redis.Redis.from_url(where) if isinstance(where, str) else where
    scan = Scan()
    try:
        if all_databases:
            pool = client.connection_pool
            for db in sorted(int(name[2:]) for name in client.info("keyspace")):
                other: redis.Redis[bytes] = redis.Redis(
                    connection_pool=redis.ConnectionPool(
                        connection_class=pool.connection_class,
                        **{**pool.connection_kwargs, "db": db},
                    )
                )
                try:
                    scan += _scan_keys(secrets, other, db)
                finally:
                    other.close()
                    other.connection_pool.disconnect()
        else:
            db = int(client.connection_pool.connection_kwargs.get("db", 0))
            scan += _scan_keys(secrets, client, db)
    finally:
        if isinstance(where, str):
            client.close()
    return scan


def _scan_keys(secrets: Secrets, client: redis.Redis[bytes], db: int) -> Scan:
    scan = Scan()
    for key in client.scan_iter(count=1000):
        raw_key = key if isinstance(key, bytes) else str(key).encode()
        values = [v if isinstance(v, bytes) else str(v).encode() for v in _values(client, key)]
        content = b"\n".join([raw_key, *(readable(value) for value in values)])
        scan += secrets.scan(f"redis db{db} {raw_key.decode('utf-8', 'replace')}", content)
    return scan


# -- databases -----------------------------------------------------------------------------------


def _cell(value: Any) -> bytes | None:
    """A column's value as the bytes to look in (None: a number, a date, a NULL)."""
    if value is None or isinstance(value, _NOT_TEXT):
        return None
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict | list):  # a JSON column, as the driver decoded it
        return "\n".join(_strings(value)).encode("utf-8", "replace")
    return str(value).encode("utf-8", "replace")


def scan_database(secrets: Secrets, where: Engine | str) -> Scan:
    """Every column of every table, in every schema of the application (PostgreSQL's own
    aside), read as the driver gives it (no type of the models in between): text and bytes
    as they are, JSON's strings unescaped. One place per column: ``table invoices.status``."""
    engine = create_engine(where) if isinstance(where, str) else where
    scan = Scan()
    try:
        inspector = inspect(engine)
        default = inspector.default_schema_name
        quote_name = engine.dialect.identifier_preparer.quote
        for schema in inspector.get_schema_names():
            if _SYSTEM_SCHEMAS.match(schema):
                continue
            for table in sorted(inspector.get_table_names(schema=schema)):
                name = table if schema == default else f"{schema}.{table}"
                query = f"SELECT * FROM {quote_name(schema)}.{quote_name(table)}"
                scan += _scan_table(secrets, engine, name, text(query))
    finally:
        if isinstance(where, str):
            engine.dispose()
    return scan


def _scan_table(secrets: Secrets, engine: Engine, name: str, query: Any) -> Scan:
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True).execute(query)
        columns = list(result.keys())
        places = [secrets.scan(f"table {name}.{column}", b"").places[0] for column in columns]
        found: list[set[Hit]] = [set() for _ in places]
        for rows in result.partitions(ROWS_PER_BATCH):
            for index, place in enumerate(places):
                cells = [cell for row in rows if (cell := _cell(row[index])) is not None]
                if cells:
                    # A line end is in no secret's form: nothing is found across two rows.
                    found[index].update(secrets.scan(place, b"\n".join(cells)).hits)
    scan = Scan()
    for place, hits in zip(places, found, strict=True):
        scan += Scan([place], sorted(hits))
    return scan
