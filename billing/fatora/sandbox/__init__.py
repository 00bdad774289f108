"""A local stand-in for the documented Fatora v1 payment API.

``Sandbox`` is the in-memory gateway; ``create_app`` serves it over ASGI, ``SandboxTransport``
plugs it into an ``httpx.Client`` in-process, and ``run_server`` / ``start_server_in_thread``
run it behind uvicorn.
"""

from __future__ import annotations

from billing.fatora.sandbox.asgi import create_app
from billing.fatora.sandbox.core import (
    BEHAVIOURS,
    TEST_CARDS,
    ManualClock,
    Sandbox,
    SandboxResponse,
    add_months,
)
from billing.fatora.sandbox.server import ServerHandle, run_server, start_server_in_thread
from billing.fatora.sandbox.transport import AsyncSandboxTransport, SandboxTransport

__all__ = [
    "BEHAVIOURS",
    "TEST_CARDS",
    "AsyncSandboxTransport",
    "ManualClock",
    "Sandbox",
    "SandboxResponse",
    "SandboxTransport",
    "ServerHandle",
    "add_months",
    "create_app",
    "run_server",
    "start_server_in_thread",
]
