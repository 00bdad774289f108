"""Shared test configuration.

Suites that need PostgreSQL or Redis use the real servers. When a server cannot be reached the
fixture fails with a clear message: these suites are never skipped silently.
"""

from __future__ import annotations

import os

os.environ.setdefault("BILLING_MODE", "test")
os.environ.setdefault("FATORA_MODE", "test")
