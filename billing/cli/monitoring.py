"""Monitoring: ``billing metrics``, a standalone Prometheus exporter."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from billing.cli.base import USER_ERRORS, app, fail, out


@app.command("metrics")
def metrics_serve(
    port: Annotated[
        int | None,
        typer.Option("--port", help="Port to serve on. Default: BILLING_METRICS_PORT (9464)."),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address to listen on. Default: BILLING_METRICS_HOST."),
    ] = None,
) -> None:
    """Serve Prometheus metrics at /metrics until stopped (Ctrl-C or SIGTERM).

    Database and Redis figures are read at each scrape, without a worker.
    With PROMETHEUS_MULTIPROC_DIR set, the counts of the workers writing there too.
    """
    from billing import metrics
    from billing.config import get_settings

    try:
        settings = get_settings()
        chosen_port = settings.metrics_port if port is None else port
        chosen_host = settings.metrics_host if host is None else host
        if not 0 < chosen_port < 65536:
            raise ValueError(f"the port must be between 1 and 65535 (got {chosen_port})")
        registry = metrics.exporter_registry()
    except USER_ERRORS as exc:
        raise fail(str(exc)) from None
    try:
        server, _thread = metrics.serve(registry, chosen_port, chosen_host)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise fail(f"cannot listen on {chosen_host}:{chosen_port} ({reason})") from None
    bound = server.server_address[1]
    out.print(f"serving metrics on http://{chosen_host}:{bound}/metrics", highlight=False)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
