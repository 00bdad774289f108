"""A Celery prefork child inherits its parent's objects: what it calls the gateway with must be
its own. An inherited thread pool has no threads (a call submitted to it would wait forever,
holding its invoice locks), and an inherited connection is a socket shared with the parent."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime

import pytest

from billing.clock import FixedClock
from billing.db import make_engine, session_factory
from billing.fatora.client import FatoraClient
from billing.fatora.errors import PaymentNotFound
from billing.fatora.sandbox import Sandbox, start_server_in_thread
from billing.locks import LocalLocker
from billing.runtime import Runtime


def test_a_forked_worker_gets_its_own_call_threads_and_connections() -> None:
    sandbox = Sandbox()
    with start_server_in_thread(sandbox) as server:
        client = FatoraClient(
            server.url + "/v1", sandbox.api_key, mode="test", timeout_s=5, connect_timeout_s=5
        )
        engine = make_engine("sqlite://")
        rt = Runtime(
            engine=engine,
            sessions=session_factory(engine),
            clock=FixedClock(datetime(2026, 1, 1, tzinfo=UTC)),
            gateway=client,
            locker=LocalLocker(),
            live_gateway=False,
            charge_concurrency=2,
        )
        # The parent has used both before the fork: a pool with idle threads, an open connection.
        assert rt.gateway_calls.submit(lambda: 41 + 1).result(5) == 42
        with pytest.raises(PaymentNotFound):
            client.verify("PARENT-1")

        ctx = multiprocessing.get_context("fork")
        answers = ctx.Queue()

        def child() -> None:
            try:
                rt.gateway_calls.submit(client.verify, "CHILD-1").result(10)
            except PaymentNotFound:
                answers.put("the gateway answered the child")
            except BaseException as exc:
                answers.put(f"failed: {exc!r}")

        proc = ctx.Process(target=child)
        proc.start()
        proc.join(30)
        assert answers.get(timeout=5) == "the gateway answered the child"
        # And the parent's own threads and connection still work.
        with pytest.raises(PaymentNotFound):
            rt.gateway_calls.submit(client.verify, "PARENT-2").result(10)
        rt.close()
        client.close()
        engine.dispose()
