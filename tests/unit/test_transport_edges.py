"""``DirectTransport`` at the edges, over real sockets and TLS: no failure after the request
may have left reads as "never sent", and no answer is ever read as another request's (a success
for another order); and the log redactor under reconfiguration and overlapping secrets.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
from pathlib import Path

import httpx
import pytest

from billing.fatora import transport as transport_module
from billing.fatora.answers import Answer
from billing.fatora.client import FatoraClient, _transport_answer
from billing.fatora.transport import DirectTransport
from tests.unit.test_direct_transport import (
    TIMEOUT,
    Handler,
    _answer,
    _certificate,
    _read_request,
    keep_alive,
    post,
    serving,
)

# Bytes the client's buffered reader takes off the connection in one read.
_READ_AHEAD = 8192


def _stray_layout() -> bytes:
    """An answer, filler to the end of the first 8 KiB read, then a whole second answer that
    nobody asked for (a server or an edge that frames a body shorter than it sends)."""
    first = _answer(b'{"status":"SUCCESS","result":{"order_id":"A"}}')
    filler = b"x" * (_READ_AHEAD - len(first))
    stray = _answer(b'{"status":"SUCCESS","result":{"order_id":"STRAY"}}')
    return first + filler + stray


def _stray_then_honest(conn: socket.socket, n: int, layout: bytes | None = None) -> None:
    """The first request on the first connection gets ``layout`` (default: the stray layout) in
    one write (one TLS record); every other request an honest answer naming order B."""
    if n == 1:
        _read_request(conn)
        conn.sendall(_stray_layout() if layout is None else layout)
    while _read_request(conn):
        conn.sendall(_answer(b'{"status":"SUCCESS","result":{"order_id":"B"}}'))


def _no_filler(conn: socket.socket, n: int) -> None:
    """The same, with the stray answer right after the first (no filler)."""
    first = _answer(b'{"status":"SUCCESS","result":{"order_id":"A"}}')
    stray = _answer(b'{"status":"SUCCESS","result":{"order_id":"STRAY"}}')
    _stray_then_honest(conn, n, first + stray)


def _tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = _certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def _order_of(response: httpx.Response) -> bytes:
    return response.content.split(b'"order_id":"')[1].split(b'"')[0]


# -- an answer never read for another request ------------------------------------------------------


@pytest.mark.parametrize("layout", ["filler", "adjacent"])
def test_stray_bytes_after_an_answer_are_never_the_next_answer(layout: str) -> None:
    """A server (or an edge) that sends more than the answer it framed: the extra answer must
    never be read as the next request's (it names another order)."""
    handler = _stray_then_honest if layout == "filler" else _no_filler
    with serving(handler) as server:
        transport = DirectTransport()
        first = post(transport, server.url())
        threading.Event().wait(0.2)
        second = post(transport, server.url())
        transport.close()
    assert (_order_of(first), _order_of(second)) == (b"A", b"B")


def test_tls_stray_bytes_are_never_the_next_answer(tmp_path: Path) -> None:
    """The same over TLS, where bytes already decrypted wait in the TLS layer, invisible to a
    poll of the socket."""
    server_tls, client_tls = _tls(tmp_path)
    with serving(_stray_then_honest, tls=server_tls) as server:
        transport = DirectTransport(ssl_context=client_tls)
        first = post(transport, server.url("https"))
        threading.Event().wait(0.2)
        second = post(transport, server.url("https"))
        transport.close()
    assert (_order_of(first), _order_of(second)) == (b"A", b"B")


# -- failures after the request may have left: no answer ------------------------------------------


def test_a_request_read_then_reset_is_no_answer() -> None:
    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        # An abortive close: the client reads a reset, not an end of file.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    _assert_no_answer(handle)


def test_a_kept_alive_connection_closed_as_the_request_goes_out_is_no_answer() -> None:
    """The server reads the second request on a kept-alive connection and closes it without an
    answer: the request may have been acted on, so it is no answer, never "not sent"."""

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(_answer())
        _read_request(conn)

    with serving(handle) as server:
        transport = DirectTransport()
        post(transport, server.url())
        with pytest.raises(httpx.TransportError) as info:
            post(transport, server.url())
        transport.close()
    assert _transport_answer(info.value) is Answer.NO_ANSWER


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(101)) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n  folded\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\0c\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A b\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9000000000\r\n\r\n{}",
        b"HTTP/1.1 +200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 2_00 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFF\r\n{}\r\n0\r\n\r\n",
    ],
    ids=[
        "bad-length",
        "bad-chunk",
        "huge-header",
        "101-headers",
        "length-and-chunked",
        "folded-line",
        "space-before-colon",
        "nul-in-value",
        "no-colon",
        "coding-not-chunked",
        "non-ascii-digit-length",
        "cut-in-header",
        "length-too-long-to-convert",
        "length-too-large",
        "signed-status",
        "underscored-status",
        "hex-prefixed-chunk-size",
        "chunk-without-crlf",
        "chunk-too-large",
    ],
)
def test_a_malformed_answer_is_no_answer(reply: bytes) -> None:
    """Where a field line or the body's end is in doubt, the answer is not guessed at: it is
    no answer (the gateway may have acted; verify settles it), never a reading of it."""

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(reply)
        threading.Event().wait(1.5)

    _assert_no_answer(handle)


def _assert_no_answer(handle: Handler) -> None:
    """The transport reads what ``handle`` answers as no answer (the gateway may have acted)."""
    with serving(handle) as server:
        transport = DirectTransport()
        with pytest.raises(httpx.TransportError) as info:
            post(transport, server.url())
        transport.close()
    assert _transport_answer(info.value) is Answer.NO_ANSWER


def test_an_answer_with_conflicting_lengths_is_no_answer() -> None:
    """RFC 9112 (6.3): differing Content-Length values are an unrecoverable framing error;
    httpcore refuses the answer (no answer, verify settles it). http.client takes the first
    value, returns the answer as good and keeps the connection: whatever the other framing
    covered is left for the next request to read."""

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
        threading.Event().wait(1.5)

    with serving(handle) as server:
        transport = DirectTransport()
        try:
            response = post(transport, server.url())
        except httpx.TransportError as exc:
            assert _transport_answer(exc) is Answer.NO_ANSWER
        else:
            raise AssertionError(f"taken as a good answer: {response.status_code}")
        finally:
            transport.close()


def test_a_body_sent_with_a_204_is_never_the_next_answer() -> None:
    """A 204 (or 304) carries no body by definition; one sent all the same must not become the
    next request's answer: dropped with the reader, or seen by the idle check."""

    def handle(conn: socket.socket, n: int) -> None:
        if n == 1:
            _read_request(conn)
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            threading.Event().wait(0.05)
            conn.sendall(_answer(b'{"order_id":"STRAY"}'))
        while _read_request(conn):
            conn.sendall(_answer(b'{"order_id":"B"}'))

    with serving(handle) as server:
        transport = DirectTransport()
        assert post(transport, server.url()).status_code == 204
        threading.Event().wait(0.2)
        second = post(transport, server.url())
        transport.close()
    assert b'"B"' in second.content
    assert server.accepted == 2


# -- sharing ------------------------------------------------------------------------------------


def test_threads_sharing_one_transport_each_get_their_own_answer() -> None:
    """Eight threads on one transport: every answer names the request that asked for it."""

    def echo(conn: socket.socket, n: int) -> None:
        while True:
            head = _read_request(conn)
            if not head:
                return
            ident = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"x-id:")
            )
            conn.sendall(_answer(b'{"id":"' + ident + b'"}'))

    wrong: list[str] = []
    with serving(echo) as server:
        transport = DirectTransport()

        def run(thread: int) -> None:
            for i in range(40):
                ident = f"{thread}-{i}"
                request = httpx.Request(
                    "POST",
                    server.url(),
                    headers={"x-id": ident},
                    content=b"{}",
                    extensions={"timeout": TIMEOUT},
                )
                response = transport.handle_request(request)
                response.read()
                if response.content != b'{"id":"' + ident.encode() + b'"}':
                    wrong.append(ident)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        transport.close()
    assert wrong == []
    assert server.accepted <= 8


def test_a_forked_child_never_uses_its_parents_connection() -> None:
    """Celery prefork: the parent's kept-alive connection is never written by a child."""
    with serving(keep_alive()) as server:
        client = FatoraClient(
            server.url().removesuffix("/payments/verify"), "k" * 24, mode="test", cap=None
        )
        client._post("/payments/verify", {"order_id": "P1"}, call="verify", order_id="P1")
        assert server.accepted == 1
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                client._post("/payments/verify", {"order_id": "C1"}, call="verify", order_id="C1")
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        client._post("/payments/verify", {"order_id": "P2"}, call="verify", order_id="P2")
        client.close()
        accepted = server.accepted
    assert os.waitstatus_to_exitcode(status) == 0
    assert accepted == 2  # the parent's connection, reused by the parent; one for the child


# -- the log Redactor -------------------------------------------------------------------------


_KEY = "sk-live-0123456789abcdef"  # masked only as a configured secret (no other rule fits it)


def test_a_key_configured_again_stays_masked_while_lines_are_written() -> None:
    """``configure_logging`` called again with the same API key (the demo, a second handler,
    a reload): between ``_forget`` and ``_remember`` a line written on another thread keeps the
    key in clear."""
    import sys

    from billing.logs import Redactor

    redactor = Redactor([_KEY])
    assert _KEY not in redactor(f"calling with {_KEY} now")
    done = threading.Event()
    leaked: list[str] = []

    def reconfigure() -> None:
        for _ in range(20_000):
            if done.is_set():
                return
            redactor.configure([_KEY])

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=reconfigure)
    try:
        thread.start()
        for _ in range(200_000):
            line = redactor(f"calling with {_KEY} now")
            if _KEY in line:
                leaked.append(line)
                break
            if not thread.is_alive():
                break
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(before)
    assert leaked == []


def test_a_registered_token_that_is_also_configured_survives_eviction() -> None:
    from billing.logs import REGISTERED_MAX, Redactor

    redactor = Redactor([_KEY])
    redactor.register(_KEY)
    redactor.register(*(f"tok-{n:012d}" for n in range(REGISTERED_MAX + 5)))
    assert _KEY not in redactor(f"a {_KEY} b")
    assert "tok-000000000000" in redactor("a tok-000000000000 b")  # evicted: expected
    assert f"tok-{REGISTERED_MAX + 4:012d}" not in redactor(f"a tok-{REGISTERED_MAX + 4:012d} b")
    redactor.configure([])  # the key is no longer configured, and no longer registered
    assert _KEY in redactor(f"a {_KEY} b")
    redactor.register(_KEY)
    redactor.configure([])
    assert _KEY not in redactor(f"a {_KEY} b")  # registered again: kept through configure


def test_a_secret_twice_in_a_line_and_one_inside_another_are_masked() -> None:
    from billing.logs import Redactor

    short, long = "inner-secret-1", "outer-inner-secret-1-tail"
    redactor = Redactor([short, long])
    line = redactor(f"{short} and {long} and {short}")
    assert short not in line and "tail" not in line


def test_two_overlapping_secrets_are_masked_whole() -> None:
    from billing.logs import Redactor

    longer, shorter = "abcdefgh1234", "1234wxyz"
    redactor = Redactor([longer, shorter])
    line = redactor(f"x {longer}wxyz y")  # the two share "1234"
    assert "wxyz" not in line, line


def test_leading_zeros_in_a_length_or_chunk_size_are_still_a_good_answer() -> None:
    """Strict is not picky: zeros in front of a length or a chunk size change nothing."""
    body = b'{"status":"SUCCESS"}'
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 000000000000%d\r\n\r\n" % len(body) + body,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"00000000000000000000%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n",
    ]
    for reply in answers:

        def handle(conn: socket.socket, n: int, reply: bytes = reply) -> None:
            _read_request(conn)
            conn.sendall(reply)

        with serving(handle) as server:
            transport = DirectTransport()
            assert post(transport, server.url()).content == body
            transport.close()


@pytest.mark.parametrize("framing", ["chunked", "close-delimited"])
def test_a_body_past_the_largest_read_is_no_answer(
    framing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunked or close-delimited body has no length to refuse up front: it is read up to
    MAX_BODY and no further (no call thread holds gigabytes for an edge that never stops)."""
    monkeypatch.setattr(transport_module, "MAX_BODY", 1000)
    big = b"x" * 600
    if framing == "chunked":
        reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        reply += (b"%x\r\n%s\r\n" % (len(big), big)) * 2 + b"0\r\n\r\n"
    else:
        reply = b"HTTP/1.0 200 OK\r\n\r\n" + big * 2

    def handle(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(reply)

    _assert_no_answer(handle)
