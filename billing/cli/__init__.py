"""The ``billing`` command line (Typer + Rich).

Every read command has ``--json``; a command that creates something prints its id (the whole
record with ``--json``). Errors are one clear line on standard error and a non-zero exit;
``--debug`` (or ``BILLING_DEBUG=1``) shows the traceback of an unexpected one instead.

The commands live in one module per group; importing them registers them on ``app``.
"""

from __future__ import annotations

import os
import sys

from billing.cli import monitoring, operations, ops_status, people, plans, schema, subscriptions
from billing.cli.base import app, error_line, fail

__all__ = [
    "app",
    "main",
    "monitoring",
    "operations",
    "ops_status",
    "people",
    "plans",
    "schema",
    "subscriptions",
]


def main() -> None:
    """The ``billing`` script. ``BillingGroup`` words every error a command raises; this catches
    what could escape it still (an error while the command line itself is read)."""
    try:
        app()
    except Exception as exc:
        if "--debug" in sys.argv[1:] or os.environ.get("BILLING_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(fail(error_line(exc)).exit_code) from None
