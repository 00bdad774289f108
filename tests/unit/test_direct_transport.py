"""The gateway's default transport over real sockets: what each failure means for money.

The charge path reads a failure before the request could leave as "never sent" (the invoice is
simply charged again) and any later one as "no answer" (verify must settle it). These tests hold
the transport to that line with servers that refuse, hang, cut answers short and close kept-alive
connections, and check that HTTP itself (keep-alive, chunked and gzip bodies, TLS) works.
"""

from __future__ import annotations

import datetime as dt
import gzip
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from billing.fatora.answers import Answer
from billing.fatora.client import FatoraClient
from billing.fatora.errors import (
    GatewayConnectionError,
    GatewayTimeout,
    MalformedResponse,
    OutcomeUnknown,
    RequestRejected,
)
from billing.fatora.transport import DirectTransport

Handler = Callable[[socket.socket, int], None]
OK_BODY = b'{"status":"SUCCESS","result":{"ok":true}}'
TIMEOUT = {"connect": 2.0, "read": 1.0, "write": 2.0, "pool": 2.0}


def _read_request(conn: socket.socket) -> bytes:
    """One request off the connection (headers and a Content-Length body); b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head


def _answer(body: bytes = OK_BODY, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Server:
    """A TCP server on a spare port; ``handler(conn, n)`` serves the n-th connection."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._tls = tls
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._loop = threading.Thread(target=self._accept, daemon=True)
        self._loop.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn, self.accepted), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, n: int) -> None:
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            self.handler(conn, n)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1/payments/verify"

    def close(self) -> None:
        self._stop = True
        self._sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


@contextmanager
def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    server = Server(handler, tls)
    try:
        yield server
    finally:
        server.close()


def keep_alive(answer: bytes = _answer()) -> Handler:
    def handle(conn: socket.socket, n: int) -> None:
        while True:
            request = _read_request(conn)
            if not request:
                return
            conn.sendall(answer)

    return handle


def post(transport: httpx.BaseTransport, url: str, body: bytes = b"{}") -> httpx.Response:
    request = httpx.Request(
        "POST", url, headers={"api_key": "k" * 20}, content=body, extensions={"timeout": TIMEOUT}
    )
    response = transport.handle_request(request)
    response.read()
    return response


# -- HTTP that works -------------------------------------------------------------------------------


def test_one_connection_serves_many_requests() -> None:
    with serving(keep_alive()) as server:
        transport = DirectTransport()
        bodies = [post(transport, server.url()).content for _ in range(5)]
        transport.close()
    assert bodies == [OK_BODY] * 5
    assert server.accepted == 1


def test_the_request_carries_its_headers_and_body_as_given() -> None:
    seen: list[bytes] = []

    def handle(conn: socket.socket, n: int) -> None:
        data = b""
        while not data.endswith(b'{"order_id":"S1-1"}'):
            data += conn.recv(65536)
        seen.append(data)
        conn.sendall(_answer())

    with serving(handle) as server:
        transport = DirectTransport()
        post(transport, server.url(), b'{"order_id":"S1-1"}')
        transport.close()
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/payments/verify HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"api_key: " + b"k" * 20 in lines
    assert b"Content-Length: 19" in lines
    assert body == b'{"order_id":"S1-1"}'


def test_a_connection_the_server_closed_while_idle_is_replaced_without_error() -> None:
    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(_answer())  # kept alive as far as the client knows, then closed

    with serving(handle) as server:
        transport = DirectTransport()
        first = post(transport, server.url())
        threading.Event().wait(0.2)  # the server's close arrives before the next request
        second = post(transport, server.url())
        transport.close()
    assert (first.status_code, second.status_code) == (200, 200)
    assert server.accepted == 2


def test_connection_close_is_honoured() -> None:
    answer = _answer(extra=b"Connection: close\r\n")

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(answer)

    with serving(handle) as server:
        transport = DirectTransport()
        assert [post(transport, server.url()).status_code for _ in range(3)] == [200] * 3
        transport.close()
    assert server.accepted == 3


def test_chunked_gzip_and_close_delimited_bodies_are_read_whole() -> None:
    zipped = gzip.compress(OK_BODY)

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        if n == 1:
            half = len(zipped) // 2
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n"
                + b"%x\r\n%s\r\n" % (half, zipped[:half])
                + b"%x\r\n%s\r\n" % (len(zipped) - half, zipped[half:])
                + b"0\r\n\r\n"
            )
        else:
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY)

    with serving(handle) as server:
        transport = DirectTransport()
        chunked = post(transport, server.url())
        delimited = post(transport, server.url())
        transport.close()
    assert chunked.content == OK_BODY
    assert delimited.content == OK_BODY


def test_a_five_megabyte_answer_is_read_whole() -> None:
    big = b'{"status":"SUCCESS","pad":"' + b"x" * 5_000_000 + b'"}'
    with serving(keep_alive(_answer(big))) as server:
        transport = DirectTransport()
        response = post(transport, server.url())
        transport.close()
    assert response.content == big


# -- failures: never sent --------------------------------------------------------------------------


def test_a_refused_connection_is_a_request_never_sent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nobody listens here once the probe closes
    client = FatoraClient(
        f"http://127.0.0.1:{port}/v1", "key-" + "k" * 20, mode="test", timeout_s=1, cap=None
    )
    with pytest.raises(GatewayConnectionError) as info:
        client.verify("S1-20270101000000-1")
    client.close()
    assert info.value.answer is Answer.NOT_SENT
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_a_header_with_a_line_break_is_refused_before_connecting() -> None:
    with serving(keep_alive()) as server:
        transport = DirectTransport()
        request = httpx.Request(
            "POST",
            server.url(),
            headers={"x-note": "a"},
            content=b"{}",
            extensions={"timeout": TIMEOUT},
        )
        # httpx lets a header be set from raw bytes; the transport is the last check.
        request.headers = httpx.Headers([(b"x-note", b"a\r\nX-Smuggled: 1")])
        with pytest.raises(httpx.LocalProtocolError):
            transport.handle_request(request)
        transport.close()
    assert server.accepted == 0


def _certificate(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_is_verified_and_an_untrusted_certificate_is_a_request_never_sent(
    tmp_path: Path,
) -> None:
    cert, key = _certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with serving(keep_alive(), tls=tls) as server:
        untrusting = DirectTransport()  # the default trust store does not know this certificate
        with pytest.raises(httpx.ConnectError):
            post(untrusting, server.url("https"))
        untrusting.close()
        trusted = ssl.create_default_context(cafile=str(cert))
        trusting = DirectTransport(ssl_context=trusted)
        bodies = [post(trusting, server.url("https")).content for _ in range(3)]
        trusting.close()
    assert bodies == [OK_BODY] * 3
    assert server.accepted == 2  # the refused handshake, then one kept-alive connection


# -- failures: no answer (verify settles them) -----------------------------------------------------


def _client_of(server: Server, *, timeout_s: float, **options: object) -> FatoraClient:
    """A client of ``server`` (no gateway cap), on the default transport unless ``options``
    name another."""
    return FatoraClient(
        server.url().removesuffix("/payments/verify"),
        "key-" + "k" * 20,
        mode="test",
        timeout_s=timeout_s,
        cap=None,
        **options,  # type: ignore[arg-type]
    )


def _no_answer(handler: Handler) -> tuple[BaseException, Server]:
    with serving(handler) as server:
        client = _client_of(server, timeout_s=1)
        with pytest.raises((GatewayConnectionError, GatewayTimeout, RequestRejected)) as info:
            client.verify("S1-20270101000000-1")
        client.close()
    return info.value, server


def test_a_server_that_never_answers_is_no_answer() -> None:
    def hang(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        threading.Event().wait(3)

    error, _ = _no_answer(hang)
    assert isinstance(error, GatewayTimeout)
    assert error.answer is Answer.NO_ANSWER


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closed after reading the request
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + OK_BODY,  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # cut inside a chunk
        b"<html>504 Gateway Time-out</html>",  # not HTTP at all
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + _answer(),  # never asked for
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",  # cut in its header
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n c\r\n\r\n{}",  # folded line
    ],
    ids=["closed", "cut-body", "cut-chunk", "not-http", "interim", "cut-header", "folded"],
)
def test_an_answer_cut_or_garbled_after_the_request_left_is_no_answer(reply: bytes) -> None:
    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(reply)

    error, server = _no_answer(handle)
    assert isinstance(error, GatewayConnectionError)
    assert error.answer is Answer.NO_ANSWER
    assert server.accepted == 1


def test_a_connection_idle_past_the_keepalive_expiry_is_not_used_again() -> None:
    """Servers close idle connections after a few seconds; one closed just as a request goes out
    would make a routine reconnect a "no answer" (an unknown charge): an old idle connection is
    replaced before anything is sent on it, even if the server still keeps it open."""
    with serving(keep_alive()) as server:
        transport = DirectTransport(keepalive_expiry_s=0.2)
        post(transport, server.url())
        post(transport, server.url())  # at once: the same connection
        threading.Event().wait(0.3)
        post(transport, server.url())  # idle too long: a new one
        transport.close()
    assert server.accepted == 2


# -- the client's lean path ------------------------------------------------------------------------


def _recording(answer: bytes) -> tuple[Handler, list[bytes]]:
    """A keep-alive handler that keeps every request whole (head and body) and answers each."""
    seen: list[bytes] = []

    def handle(conn: socket.socket, n: int) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(rest) < length:
                rest += conn.recv(65536)
            seen.append(head + b"\r\n\r\n" + rest[:length])
            data = rest[length:]
            conn.sendall(answer)

    return handle, seen


def test_the_lean_path_sends_what_httpx_would_send() -> None:
    """The client lays a request out itself on the direct transport: byte for byte what an
    ``httpx.Request`` of the same call puts on the wire (request line, Host, the client's
    headers, Content-Length, body)."""
    handle, seen = _recording(_answer())
    with serving(handle) as server:
        lean = _client_of(server, timeout_s=2)
        generic = _client_of(server, timeout_s=2, transport=httpx.HTTPTransport())
        for client in (lean, generic):
            with pytest.raises(MalformedResponse):  # OK_BODY is no payment: the request matters
                client.verify("S1-20270101000000-1", "T-9")
            client.close()
    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert seen[0].startswith(b"POST /v1/payments/verify HTTP/1.1\r\nHost: 127.0.0.1:")
    assert seen[0].endswith(b'\r\n\r\n{"order_id":"S1-20270101000000-1","transaction_id":"T-9"}')


def test_the_lean_path_decodes_a_compressed_answer_and_reads_retry_after() -> None:
    """An edge may compress an answer nobody asked to be compressed, and a refusal carries its
    Retry-After: the lean path reads both as the httpx path does."""
    body = b'{"status":"SUCCESS","result":{"order_id":"S1-20270101000000-1",' + (
        b'"transaction_id":"T-1","payment_status":"SUCCESS","amount":"50.00","currency":"QAR"}}'
    )
    zipped = gzip.compress(body)
    compressed = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(zipped)
        + zipped
    )
    busy = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n"
    for answer, check in ((compressed, "paid"), (busy, "retry")):
        handle, _ = _recording(answer)
        with serving(handle) as server:
            client = _client_of(server, timeout_s=2)
            try:
                if check == "paid":
                    payment = client.verify("S1-20270101000000-1")
                    assert payment.transaction_id == "T-1"
                else:
                    with pytest.raises(OutcomeUnknown) as info:
                        client.verify("S1-20270101000000-1")
                    assert info.value.retry_after_s == 7
            finally:
                client.close()
