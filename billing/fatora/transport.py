"""The gateway's default transport: HTTP/1.1 on the standard library's ``http.client``.

An ``httpx.BaseTransport``, so the client above it and the tests' transports (``MockTransport``,
``SandboxTransport``) are unchanged. It does one job, posting small JSON bodies to one host over
kept-alive connections, with about half the CPU of httpcore's general machinery (measured in
``docs/OPERATIONS.md``, "Throughput"): two calls per charge make it the largest cost of a charge.

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
from collections.abc import Mapping
from typing import cast

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
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        key = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        timeouts = cast(Mapping[str, float | None], request.extensions.get("timeout", {}))
        # Checked and laid out before any connection is made: an invalid request never leaves.
        head = _request_head(request)
        body = request.read()
        sock = self._take(key) or self._connect(key, timeouts, request)
        try:
            response = _exchange(sock, head + body, request, timeouts)
        except BaseException:
            sock.close()  # its state is unknown: never used again
            raise
        if response.will_close or self._closed:
            sock.close()
        else:
            self._give_back(key, sock)
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in response.getheaders()
        ]
        return httpx.Response(
            response.status,
            headers=headers,
            stream=httpx.ByteStream(response.content),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

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
        self, key: _Key, timeouts: Mapping[str, float | None], request: httpx.Request
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


class _Answer(http.client.HTTPResponse):
    """A response read whole (``content``) off the socket."""

    content: bytes = b""


def _request_head(request: httpx.Request) -> bytes:
    """The request line and headers, or ``LocalProtocolError`` (nothing sent) if a header could
    smuggle a line break into the request."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if _UNSAFE.search(name) or _UNSAFE.search(value) or not name:
            raise httpx.LocalProtocolError("invalid header in the request", request=request)
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _exchange(
    sock: socket.socket,
    data: bytes,
    request: httpx.Request,
    timeouts: Mapping[str, float | None],
) -> _Answer:
    """Write the request in one piece and read the whole answer."""
    try:
        sock.settimeout(_seconds(timeouts.get("write")))
        sock.sendall(data)
    except TimeoutError as exc:
        raise httpx.WriteTimeout(f"write timed out ({exc})", request=request) from exc
    except OSError as exc:
        raise httpx.WriteError(f"write failed ({exc})", request=request) from exc
    try:
        sock.settimeout(_seconds(timeouts.get("read")))
        response = _Answer(sock, method=request.method)
        try:
            response.begin()  # skips any 100 Continue
            if response.status < 200:
                # Another interim answer (102, 103): never asked for; read as not understood.
                raise http.client.HTTPException(f"interim answer {response.status}")
            _check_framing(response)
            response.content = response.read()
        finally:
            response.close()
    except TimeoutError as exc:
        raise httpx.ReadTimeout(f"read timed out ({exc})", request=request) from exc
    except http.client.HTTPException as exc:
        # A cut body (IncompleteRead), a closed connection (RemoteDisconnected), a status line or
        # header that is not HTTP: the gateway may have acted on the request all the same.
        why = type(exc).__name__
        raise httpx.RemoteProtocolError(f"malformed answer ({why})", request=request) from exc
    except OSError as exc:
        raise httpx.ReadError(f"read failed ({exc})", request=request) from exc
    return response


def _check_framing(response: http.client.HTTPResponse) -> None:
    """Where the body ends must be beyond doubt (RFC 9112, 6.3): two different lengths, or a
    length beside a transfer coding, make the answer unreadable, not the first length right."""
    lengths = {value.strip() for value in response.msg.get_all("Content-Length") or ()}
    codings = response.msg.get_all("Transfer-Encoding") or ()
    if len(lengths) > 1 or (lengths and codings):
        raise http.client.HTTPException("ambiguous message length")


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


__all__ = ["DirectTransport"]
