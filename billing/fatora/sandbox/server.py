"""Run the sandbox behind uvicorn: in the foreground (CLI) or in a background thread (tests)."""

from __future__ import annotations

import os
import socket
import threading
import time
from types import TracebackType

import uvicorn

from billing.config import FATORA_SAMPLE_API_KEY
from billing.fatora.sandbox.asgi import create_app
from billing.fatora.sandbox.core import DeclineStyle, Sandbox


def run_server(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    api_key: str | None = None,
    latency_ms: float = 0,
    decline_style: DeclineStyle = "http200",
    mode: str = "test",
    hang_s: float = 120.0,
    land_delay_s: float = 1.0,
    verify_lag_s: float = 1.0,
) -> None:
    """Serve a fresh sandbox until interrupted. The key: ``api_key``, else $FATORA_API_KEY,
    else Fatora's public sample key."""
    key = api_key or os.environ.get("FATORA_API_KEY") or FATORA_SAMPLE_API_KEY
    sandbox = Sandbox(
        api_key=key,
        decline_style=decline_style,
        mode=mode,
        land_delay_s=land_delay_s,
        verify_lag_s=verify_lag_s,
    )
    app = create_app(sandbox, latency_ms=latency_ms, hang_s=hang_s)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


class ServerHandle:
    """A sandbox server running in a daemon thread. Use ``.url``; call ``.stop()`` (or use it
    as a context manager) when done."""

    def __init__(
        self, sandbox: Sandbox, server: uvicorn.Server, thread: threading.Thread, url: str
    ):
        self.sandbox = sandbox
        self.url = url
        self._server = server
        self._thread = thread

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # Held (hanging) connections can delay a graceful exit; force it.
            self._server.force_exit = True
            self._thread.join(timeout_s)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server_in_thread(
    sandbox: Sandbox,
    host: str = "127.0.0.1",
    port: int = 0,
    latency_ms: float = 0,
    *,
    hang_s: float = 120.0,
    startup_timeout_s: float = 10.0,
) -> ServerHandle:
    """Start uvicorn serving ``sandbox`` in a background thread. ``port=0`` picks a free port
    (the socket is bound here, so the URL is known before the server starts)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    app = create_app(sandbox, latency_ms=latency_ms, hang_s=hang_s)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
        # Benchmarks open many connections at once.
        backlog=2048,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="fatora-sandbox", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the sandbox server did not start")
        time.sleep(0.01)
    url_host = f"[{host}]" if ":" in host else host
    return ServerHandle(sandbox, server, thread, f"http://{url_host}:{bound_port}")
