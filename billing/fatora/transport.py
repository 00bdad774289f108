"""The gateway's default transport: HTTP/1.1 on the standard library's ``http.client``.

An ``httpx.BaseTransport``, so the client above it and the tests' transports (``MockTransport``,
``SandboxTransport``) are unchanged. It does one job, posting small JSON bodies to one host over
kept-alive connections, with about half the CPU of httpcore's general machinery: two calls per
charge make it the largest cost of a charge. ``send`` is the same exchange without httpx's
request and response objects (``FatoraClient`` uses it); ``handle_request`` wraps it.

The answer is read strictly (``Answer``): a status line that is not ``HTTP/1.x`` and three
digits, a malformed or folded field line, an answer cut in its header, a chunk size that is not
hex or a chunk not ended by CRLF, two lengths, a length beside a transfer coding, or a body past
``MAX_BODY`` is a malformed answer, never a guess at one.

What the charge path depends on is the meaning of each failure, so it is kept exactly:

- nothing has left until the connection (TCP and TLS) is made: a failure there is
  ``httpx.ConnectError`` / ``ConnectTimeout``, a request that was never sent;
- an invalid request line or header is refused before any byte is written:
  ``httpx.LocalProtocolError``, never sent either;
- any failure once writing began (``WriteError``, ``WriteTimeout``), while waiting for or reading
  the answer (``ReadTimeout``, ``ReadError``), or a malformed or cut answer
  (``RemoteProtocolError``) may come after the gateway acted on the request: no answer.

A kept-alive connection the server has closed while idle is noticed before it is used (it reads
as readable: end of file or stray bytes) and replaced, so that a routine reconnect is not a
"no answer" (unless the server closes it just as the request goes out; then it is one, the safe
way). Proxies are left to ``httpx.HTTPTransport`` (see ``FatoraClient``).
"""

from __future__ import annotations

import http.client
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from typing import BinaryIO, cast

import httpx

_DEFAULT_PORTS = {"http": 80, "https": 443}
# How long a connection attempt may take when the request names no timeout.
_DEFAULT_TIMEOUT_S = 30.0
_Key = tuple[str, str, int]
# A connection idle this long is not used again (as httpx's own pool does): servers commonly
# close idle connections after 5 s or more, and one closed just as a request goes out would turn
# a routine reconnect into a "no answer".
KEEPALIVE_EXPIRY_S = 4.0
# A line break or NUL in a header name or value would end the header early.
_UNSAFE = re.compile(rb"[\r\n\0]")


class DirectTransport(httpx.BaseTransport):
    """Kept-alive HTTP/1.1 connections without a proxy; safe to share between threads (each
    request takes an idle connection of its host, or opens one, and gives it back after)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    ) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry_s = keepalive_expiry_s
        # Idle connections by host, each with the moment it was given back.
        self._idle: dict[_Key, list[tuple[socket.socket, float]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = cast(Mapping[str, float | None], request.extensions.get("timeout", {}))
        # Checked and laid out before any connection is made: an invalid request never leaves.
        head = request_head(request.method, request.url, request.headers.raw, request=request)
        answer = self.send(
            request.url,
            head + b"\r\n",
            request.read(),
            timeouts,
            method=request.method,
            request=request,
        )
        return answer.as_response()

    def send(
        self,
        url: httpx.URL,
        head: bytes,
        body: bytes,
        timeouts: Mapping[str, float | None],
        *,
        method: str = "POST",
        request: httpx.Request | None = None,
    ) -> Answer:
        """Send ``head`` (the request line and header lines laid out by ``request_head``, with
        the blank line that ends them) and ``body`` to ``url``'s host; the whole answer. The
        lean path of ``FatoraClient``: no ``httpx.Request`` or ``httpx.Response`` is built, and
        the errors are those of ``handle_request`` (``request`` is only named in them)."""
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        key = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        sock = self._take(key) or self._connect(key, timeouts, request)
        try:
            answer = _exchange(sock, head + body, method, timeouts, request)
        except BaseException:
            sock.close()  # its state is unknown: never used again
            raise
        if answer.will_close or self._closed:
            sock.close()
        else:
            self._give_back(key, sock)
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock, _ in socks:
                sock.close()

    # -- connections --------------------------------------------------------------------------

    def _take(self, key: _Key) -> socket.socket | None:
        """An idle connection to ``key``, idle for less than the keep-alive expiry and still
        open at the other end, or None."""
        while True:
            with self._lock:
                socks = self._idle.get(key)
                if not socks:
                    return None
                sock, since = socks.pop()
            fresh = time.monotonic() - since < self._keepalive_expiry_s
            if fresh and _still_open(sock):
                return sock
            # Closed by the server while idle, or idle so long that the server may close it
            # just as a request goes out (a "no answer"): nothing was sent on it.
            sock.close()

    def _give_back(self, key: _Key, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(key, []).append((sock, time.monotonic()))
                return
        sock.close()

    def _connect(
        self, key: _Key, timeouts: Mapping[str, float | None], request: httpx.Request | None
    ) -> socket.socket:
        """A new connection, made (TCP, then TLS) before anything of the request is written."""
        if self._closed:
            raise RuntimeError("the transport has been closed")
        scheme, host, port = key
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=_seconds(timeouts.get("connect")))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                context = self._ssl_context or _default_ssl_context()
                sock = context.wrap_socket(sock, server_hostname=host)
        except TimeoutError as exc:
            if sock is not None:
                sock.close()
            raise httpx.ConnectTimeout(f"connect timed out ({exc})", request=request) from exc
        except OSError as exc:  # refused, unreachable, unknown host, TLS handshake refused
            if sock is not None:
                sock.close()
            raise httpx.ConnectError(f"cannot connect ({exc})", request=request) from exc
        return sock


class Fields:
    """An answer's header fields: ``get`` (by name, any case; repeated fields joined by ", ",
    as httpx does), ``get_all`` and ``items`` in the order received."""

    __slots__ = ("_by_name", "_items")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._by_name: dict[str, list[str]] = {}
        for name, value in items:
            self._by_name.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._by_name.get(name.lower())
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._by_name.get(name.lower(), ()))

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


class Answer(http.client.HTTPResponse):
    """An answer read whole (``content``) off the socket.

    The status line and body are read by ``http.client``; the header fields are read here, more
    strictly and at a fraction of the cost of its e-mail parser: a field line that is not
    ``name: value`` (a folded line, a space before the colon) and any doubt about where the body
    ends (two different lengths, a length beside a transfer coding, a coding other than chunked,
    a length that is not a number; RFC 9112, 6.3) make the answer malformed, never guessed at.
    """

    content: bytes = b""
    msg: Fields  # type: ignore[assignment]
    headers: Fields  # type: ignore[assignment]

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_fields(self.fp)  # a 100 Continue's own fields, if any
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = _read_fields(self.fp)
        codings = self.msg.get("transfer-encoding")
        lengths = {value.strip() for value in self.msg.get_all("content-length")}
        if len(lengths) > 1 or (lengths and codings):
            raise http.client.HTTPException("ambiguous message length")
        self.chunked = codings is not None
        if self.chunked and codings.strip().lower() != "chunked":
            raise http.client.HTTPException("unsupported transfer coding")
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        if lengths:
            (length,) = lengths
            if not (length.isascii() and length.isdigit()):
                raise http.client.HTTPException("invalid Content-Length")
            if len(length.lstrip("0")) > _MAX_BODY_DIGITS or int(length) > MAX_BODY:
                raise http.client.HTTPException("answer too large")
            self.length = int(length)
        if status in (204, 304) or status < 200 or self._method == "HEAD":
            self.length = 0
        if self.length is None and not self.chunked:
            self.will_close = True  # the body ends when the connection does

    def _read_status(self) -> tuple[str, int, str]:
        """The status line, strictly ``HTTP/1.x`` and three digits (http.client would take
        ``+200`` or ``2_00``: a mangled status is not a status)."""
        line = self.fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("status line")
        if not line:
            raise http.client.RemoteDisconnected("closed before an answer")
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise http.client.BadStatusLine("not an HTTP/1.x status line")
        return match[1].decode("ascii"), int(match[2]), (match[3] or b"").decode("latin-1")

    def _read_next_chunk_size(self) -> int:
        """A chunk's size: hex digits only (not ``0x10`` or ``1_0``), at most ``MAX_BODY``."""
        line = self.fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("chunk size")
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None or int(match[1], 16) > MAX_BODY:
            raise ValueError("invalid chunk size")
        return int(match[1], 16)

    def _get_chunk_left(self) -> int | None:
        """As http.client reads chunks, but a chunk's data must end with CRLF (it would drop
        any two bytes there): anything else means the body's end is in doubt."""
        chunk_left: int | None = self.chunk_left
        if not chunk_left:
            if chunk_left is not None and self._safe_read(2) != b"\r\n":  # type: ignore[attr-defined]
                raise http.client.HTTPException("chunk data not followed by CRLF")
            try:
                chunk_left = self._read_next_chunk_size()
            except ValueError:
                raise http.client.IncompleteRead(b"") from None
            if chunk_left == 0:
                self._read_and_discard_trailer()  # type: ignore[attr-defined]
                self._close_conn()  # type: ignore[attr-defined]
                chunk_left = None
            self.chunk_left = chunk_left
        return chunk_left

    def as_response(self) -> httpx.Response:
        """The answer as an ``httpx.Response`` (its body decoded as httpx decodes it, on
        ``read``)."""
        return httpx.Response(
            self.status,
            headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.msg.items()],
            stream=httpx.ByteStream(self.content),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (self.reason or "").encode("latin-1", "replace"),
            },
        )


# The most field lines an answer may carry, and the longest line (as http.client allows).
_MAX_FIELDS = 100
_MAX_LINE = 65536
# The largest answer body read (a gateway answer is a few hundred bytes): a larger length is a
# malformed answer, not an allocation of gigabytes on a call thread.
MAX_BODY = 64 * 1024 * 1024
_MAX_BODY_DIGITS = len(str(MAX_BODY))
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([^\r\n]*))?\r?\n")
_CHUNK_SIZE = re.compile(rb"0*([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")


def _read_fields(fp: BinaryIO) -> Fields:
    """The field lines up to the blank line that ends them, checked and split by two regular
    expressions over the whole block (not line by line in Python: this runs twice per charge).
    An answer cut before that blank line is malformed."""
    lines: list[bytes] = []
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise http.client.IncompleteRead(b"", None)  # the connection closed mid-header
        lines.append(line)
        if len(lines) > _MAX_FIELDS:
            raise http.client.HTTPException(f"got more than {_MAX_FIELDS} headers")
    block = b"".join(lines)
    if not _FIELD_LINES.fullmatch(block):
        raise http.client.HTTPException("malformed header line")
    return Fields([(n.decode("latin-1"), v.decode("latin-1")) for n, v in _FIELD.findall(block)])


# A field line (RFC 9112, 5): a token, a colon, a value without CR, LF or NUL, with optional
# spaces or tabs around it. No space before the colon, no folded line (it starts with a space).
_NAME = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_LINES = re.compile(rb"(?:" + _NAME + rb":[^\r\n\0]*\r?\n)*")
_FIELD = re.compile(rb"(" + _NAME + rb"):[ \t]*([^\r\n\0]*?)[ \t]*\r?\n")


def request_head(
    method: str,
    url: httpx.URL,
    fields: Iterable[tuple[bytes, bytes]],
    *,
    request: httpx.Request | None = None,
) -> bytes:
    """The request line and header lines, each ending in CRLF (the blank line that ends the
    head is the caller's), or ``LocalProtocolError`` (nothing sent) if a field could smuggle a
    line break into the request."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), url.raw_path)]
    for name, value in fields:
        if _UNSAFE.search(name) or _UNSAFE.search(value) or not name:
            raise httpx.LocalProtocolError("invalid header in the request", request=request)
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


def _exchange(
    sock: socket.socket,
    data: bytes,
    method: str,
    timeouts: Mapping[str, float | None],
    request: httpx.Request | None,
) -> Answer:
    """Write the request in one piece and read the whole answer."""
    try:
        _set_timeout(sock, timeouts.get("write"))
        sock.sendall(data)
    except TimeoutError as exc:
        raise httpx.WriteTimeout(f"write timed out ({exc})", request=request) from exc
    except OSError as exc:
        raise httpx.WriteError(f"write failed ({exc})", request=request) from exc
    try:
        _set_timeout(sock, timeouts.get("read"))
        answer = Answer(sock, method=method)
        try:
            answer.begin()  # skips any 100 Continue
            if answer.status < 200:
                # Another interim answer (102, 103): never asked for; read as not understood.
                raise http.client.HTTPException(f"interim answer {answer.status}")
            answer.content = _body(answer)
        finally:
            answer.close()
    except TimeoutError as exc:
        raise httpx.ReadTimeout(f"read timed out ({exc})", request=request) from exc
    except (http.client.HTTPException, ValueError, OverflowError, MemoryError) as exc:
        # A cut body (IncompleteRead), a closed connection (RemoteDisconnected), a status line or
        # header that is not HTTP, a length nothing can hold: the gateway may have acted on the
        # request all the same.
        why = type(exc).__name__
        raise httpx.RemoteProtocolError(f"malformed answer ({why})", request=request) from exc
    except OSError as exc:
        raise httpx.ReadError(f"read failed ({exc})", request=request) from exc
    return answer


def _body(answer: Answer) -> bytes:
    """The whole body. One whose end is its length is read whole (a cut one raises); a chunked
    or close-delimited one is read up to ``MAX_BODY`` at most: past it, the answer is too large
    (not gigabytes held on a call thread)."""
    if answer.length is not None:
        return answer.read()
    content = answer.read(MAX_BODY + 1)
    if len(content) > MAX_BODY:
        raise http.client.HTTPException("answer too large")
    return content


def _still_open(sock: socket.socket) -> bool:
    """An idle kept-alive connection is usable only if nothing is waiting to be read on it: a
    closed one reads as end of file, and bytes nobody asked for mean the exchange is broken
    (over TLS, bytes already decrypted wait in the TLS layer, not in the socket)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        poller = select.poll()  # not select.select: a busy worker's descriptors pass 1024
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _seconds(value: float | None) -> float:
    return _DEFAULT_TIMEOUT_S if value is None else float(value)


def _set_timeout(sock: socket.socket, value: float | None) -> None:
    """Set the socket's timeout unless it has it already (a system call saved per request:
    the read and write timeouts are commonly the same)."""
    seconds = _seconds(value)
    if sock.gettimeout() != seconds:
        sock.settimeout(seconds)


_ssl_lock = threading.Lock()
_ssl_default: ssl.SSLContext | None = None


def _reset_after_fork() -> None:
    """A child forked while another thread held the lock must not inherit it held."""
    global _ssl_lock
    _ssl_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _default_ssl_context() -> ssl.SSLContext:
    """Verified TLS with the certificates httpx trusts (certifi, or SSL_CERT_FILE/_DIR), built
    once per process."""
    global _ssl_default
    with _ssl_lock:
        if _ssl_default is None:
            _ssl_default = httpx.create_ssl_context()
        return _ssl_default


__all__ = ["Answer", "DirectTransport", "Fields", "request_head"]
