"""The gateway cap's pool of Redis connections on real Redis (the test Redis database): a call
that cannot get a connection is not sent, within the bounds the cap documents; a slot is given
back even when every connection was busy at that moment; a wait for a connection counts against
the send window; a forked child never shares its parent's connections."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis

from billing.fatora import FatoraClient
from billing.fatora.answers import Answer
from billing.fatora.errors import FatoraError
from billing.gateway_cap import REDIS_TIMEOUT_S, GatewayBusy, InFlightCap, RedisLeases

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
# Scheduling noise allowed on top of a documented bound.
MARGIN_S = 0.5


@pytest.fixture()
def key() -> Iterator[str]:
    """A key of this test's own, removed afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}", pytrace=False)
    name = f"billing:test:cap-pool:{uuid.uuid4().hex}"
    yield name
    client.delete(name)
    client.close()


def _one_connection_cap(key: str, *, wait_s: float = 0.3) -> tuple[InFlightCap, Any]:
    """A cap whose process has a single Redis connection, and that connection's pool."""
    leases = RedisLeases.from_url(REDIS_URL, key, max_connections=1)
    cap = InFlightCap(leases, 10, lease_s=30, wait_s=wait_s)
    return cap, leases._client.connection_pool


def test_a_call_that_gets_no_redis_connection_is_refused_as_not_sent(key: str) -> None:
    """Every connection of the process busy (a stalled Redis): the call is refused before
    anything is sent, as a GatewayBusy whose answer is NOT_SENT, never a no-answer."""
    cap, pool = _one_connection_cap(key)
    busy = pool.get_connection()
    try:
        with pytest.raises(GatewayBusy) as refused:
            cap.acquire("collect")
    finally:
        pool.release(busy)
    assert refused.value.answer is Answer.NOT_SENT
    assert refused.value.reason == "unavailable"
    assert cap.leases.in_use() == 0


def test_a_call_that_gets_no_redis_connection_is_refused_within_one_redis_timeout(
    key: str,
) -> None:
    """A thread that finds every Redis connection in use waits for one at most
    ``REDIS_TIMEOUT_S`` (the pool's documented bound), then is refused: it is not held a second
    time to give back a lease its script never added."""
    cap, pool = _one_connection_cap(key, wait_s=0.3)
    busy = pool.get_connection()
    started = time.monotonic()
    try:
        with pytest.raises(GatewayBusy):
            cap.acquire("collect")
    finally:
        waited = time.monotonic() - started
        pool.release(busy)
    assert waited <= REDIS_TIMEOUT_S + MARGIN_S, f"refused after {waited:.1f} s"


def test_a_slot_is_given_back_even_when_every_connection_is_busy_at_that_moment(
    key: str,
) -> None:
    """A call ends while the process's Redis connections are all in use for a moment: its slot
    is still given back once one is free, not held until its lease expires (tens of seconds
    in which other calls find the cap busy and are reported not sent)."""
    cap, pool = _one_connection_cap(key)
    lease_id = cap.acquire("collect")
    busy = pool.get_connection()
    freed = threading.Timer(REDIS_TIMEOUT_S + 0.5, pool.release, args=(busy,))
    freed.start()
    try:
        cap.release(lease_id)
    finally:
        freed.join()
    deadline = time.monotonic() + 2 * REDIS_TIMEOUT_S
    while cap.leases.in_use() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cap.leases.in_use() == 0


class _Counting(httpx.BaseTransport):
    """Answers every collect with SUCCESS, counting the requests that reached it."""

    def __init__(self) -> None:
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(
            200,
            json={
                "status": "SUCCESS",
                "result": {"status": "SUCCESS", "order_id": "o-1", "transaction_id": "t-1"},
            },
        )


def test_a_wait_for_a_redis_connection_counts_against_the_send_window(key: str) -> None:
    """The wait for a Redis connection comes before the slot is held: a collect whose send
    window ended during that wait is not sent (NOT_SENT), and nothing reaches the gateway."""
    leases = RedisLeases.from_url(REDIS_URL, key, max_connections=1)
    cap = InFlightCap(leases, 10, lease_s=30, wait_s=5)
    gateway = _Counting()
    client = FatoraClient(
        "http://gateway.test/v1", "test-key", mode="test", transport=gateway, cap=cap
    )
    pool = leases._client.connection_pool
    busy = pool.get_connection()
    freed = threading.Timer(1.0, pool.release, args=(busy,))
    freed.start()
    try:
        with pytest.raises(FatoraError) as refused:
            client.collect_payment(
                "tok_" + uuid.uuid4().hex,
                "o-1",
                Decimal("50.00"),
                "QAR",
                send_by=datetime.now(UTC) + timedelta(seconds=0.3),
            )
    finally:
        freed.join()
    assert refused.value.answer is Answer.NOT_SENT
    assert gateway.requests == 0
    assert leases.in_use() == 0


def _child_calls(key: str, leases: RedisLeases, out: Any) -> None:
    try:
        cap = InFlightCap(leases, 10, lease_s=30, wait_s=1)
        for _ in range(20):
            with cap.slot("collect"):
                pass
        out.put(("ok", leases.in_use()))
    except Exception as exc:  # reported to the parent, which fails the test
        out.put(("error", repr(exc)))


def test_a_forked_child_uses_connections_of_its_own(key: str) -> None:
    """A pool built before a fork (a prefork child inheriting it, even while a parent thread
    holds a connection) gives the child fresh connections: its slots are taken and given back,
    and the parent's go on working."""
    leases = RedisLeases.from_url(REDIS_URL, key, max_connections=2)
    cap = InFlightCap(leases, 10, lease_s=30, wait_s=1)
    with cap.slot("collect"):
        pass
    pool = leases._client.connection_pool
    held = pool.get_connection()  # a parent thread in the middle of a Redis call
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_child_calls, args=(key, leases, out))
    child.start()
    child.join(20)
    pool.release(held)
    assert child.exitcode == 0
    assert out.get(timeout=1) == ("ok", 0)
    with cap.slot("collect"):
        assert leases.in_use() == 1
    assert leases.in_use() == 0
