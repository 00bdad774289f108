"""A real ``celery worker`` command refuses SQLite with a real broker and several processes.

The worker stops at ``worker_init``: before it forks a pool process or connects to the broker
(which here does not even exist), so the test starts nothing that lasts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_celery_worker_on_sqlite_with_two_processes_exits_with_one_clear_line(
    tmp_path: Path,
) -> None:
    """No invoice charged twice: `celery -A workers.app worker -c 2` on the SQLite default with
    a Redis broker exits 1 with the cause and the fix, instead of running two processes that
    the process-local SQLite lock cannot keep apart."""
    env = {
        **os.environ,
        "BILLING_DATABASE_URL": f"sqlite:///{tmp_path / 'billing.sqlite3'}",
        # Nothing listens on port 1: a worker that got past the check would retry forever.
        "BILLING_BROKER_URL": "redis://127.0.0.1:1/0",
    }
    command = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-c", "2"]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired as still_running:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        message = "the worker started instead of refusing SQLite with 2 processes"
        raise AssertionError(message) from still_running
    assert proc.returncode == 1, err
    # Celery may warn first (e.g. about running as root); the refusal is one line, the last.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert errors[0].startswith("error: refusing to start")
    for expected in ("SQLite", "PostgreSQL", "--concurrency 1", "--pool solo"):
        assert expected in errors[0]
