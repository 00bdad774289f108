"""A raw ASGI app serving a ``Sandbox`` (no framework: every path goes to the sandbox)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from billing.fatora.sandbox.core import Sandbox

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(sandbox: Sandbox, latency_ms: float = 0, hang_s: float = 120.0) -> ASGIApp:
    """Wrap ``sandbox``. ``latency_ms`` delays each answer (without blocking other requests);
    a hanging answer is held for ``hang_s`` seconds, or until the client gives up."""
    latency_s = latency_ms / 1000

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is None and scope.get("server"):
            server_host, server_port = scope["server"]
            host = f"{server_host}:{server_port}"
        base = f"{scope.get('scheme', 'http')}://{host or 'localhost'}"
        if latency_s:
            await asyncio.sleep(latency_s)
        answer = sandbox.handle(
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            headers,
            bytes(body),
            base,
        )
        if answer.hang and not await _hold(receive, hang_s):
            return  # the client went away before the answer would have arrived
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": _framed(answer.headers, len(answer.body)),
            }
        )
        await send({"type": "http.response.body", "body": answer.body})

    return app


def _framed(headers: Mapping[str, str], length: int) -> list[tuple[bytes, bytes]]:
    """The answer's headers, with its length unless it frames itself (as a JSON API behind an
    ordinary web server does; uvicorn would otherwise send every answer chunked)."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if not any(name in (b"content-length", b"transfer-encoding") for name, _ in raw):
        raw.append((b"content-length", str(length).encode("ascii")))
    return raw


async def _hold(receive: Receive, hang_s: float) -> bool:
    """Wait ``hang_s`` seconds; False if the client disconnected first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait_for(asyncio.shield(watcher), timeout=hang_s)
    except TimeoutError:
        return True
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return False


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
