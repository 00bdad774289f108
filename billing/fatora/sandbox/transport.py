"""httpx transports that answer from a ``Sandbox`` in-process, with no sockets."""

from __future__ import annotations

import asyncio
import time

import httpx

from billing.fatora.sandbox.core import Sandbox, SandboxResponse


def _call(sandbox: Sandbox, request: httpx.Request, body: bytes) -> SandboxResponse:
    url = request.url
    # Links in checkout_url point back at whatever host the client used.
    port = f":{url.port}" if url.port is not None else ""
    base = f"{url.scheme}://{url.host}{port}"
    return sandbox.handle(
        request.method,
        url.path,
        url.query.decode("ascii", "replace"),
        dict(request.headers.items()),
        body,
        base,
    )


def _to_httpx(answer: SandboxResponse) -> httpx.Response:
    return httpx.Response(answer.status, headers=answer.headers, content=answer.body)


class SandboxTransport(httpx.BaseTransport):
    """For a sync ``httpx.Client``. A hanging answer raises ``httpx.ReadTimeout`` at once,
    after the sandbox has recorded the effect (as a real client timeout would look)."""

    def __init__(self, sandbox: Sandbox, latency_ms: float = 0) -> None:
        self.sandbox = sandbox
        self.latency_s = latency_ms / 1000

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        if self.latency_s:
            time.sleep(self.latency_s)
        answer = _call(self.sandbox, request, body)
        if answer.hang:
            raise httpx.ReadTimeout("sandbox: the response never arrived", request=request)
        return _to_httpx(answer)


class AsyncSandboxTransport(httpx.AsyncBaseTransport):
    """The same for an ``httpx.AsyncClient``; latency overlaps across concurrent requests."""

    def __init__(self, sandbox: Sandbox, latency_ms: float = 0) -> None:
        self.sandbox = sandbox
        self.latency_s = latency_ms / 1000

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        answer = _call(self.sandbox, request, body)
        if answer.hang:
            raise httpx.ReadTimeout("sandbox: the response never arrived", request=request)
        return _to_httpx(answer)
