"""The gateway cap on real Redis (db 11): processes share it, a dead holder's slot comes back,
and with Redis unreachable nothing is sent and the charge is recorded as never sent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from billing.attempts import AttemptStatus, CallEnding
from billing.clock import FixedClock
from billing.fatora import FatoraClient
from billing.fatora.answers import Answer
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.gateway_cap import GatewayBusy, InFlightCap, RedisLeases
from billing.lifecycle import InvoiceStatus
from billing.runtime import Runtime
from billing.services.charging import collect_invoices
from tests.factories import attempts_of, invoice_of, renew, seed_plans, subscriber

pytestmark = pytest.mark.redis


def _db11(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/11"))


REDIS_URL = _db11(os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
UNREACHABLE = "redis://:s3cret-pass@127.0.0.1:1/11"


@pytest.fixture()
def key() -> Iterator[str]:
    """A key of this test's own in db 11, removed afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}", pytrace=False)
    name = f"billing:test:in-flight:{uuid.uuid4().hex}"
    yield name
    client.delete(name)
    client.close()


def _leases(key: str) -> RedisLeases:
    return RedisLeases.from_url(REDIS_URL, key)


def test_the_script_holds_the_limit_and_expires_the_key(key: str) -> None:
    leases = _leases(key)
    assert leases.try_acquire("a", 2, 5000)
    assert leases.try_acquire("b", 2, 5000)
    assert not leases.try_acquire("c", 2, 5000)
    assert leases.in_use() == 2
    leases.release("a")
    assert leases.try_acquire("c", 2, 5000)
    ttl = redis.Redis.from_url(REDIS_URL).pttl(key)
    assert 0 < ttl <= 5000  # the set disappears with its last lease


# -- two processes, one cap ----------------------------------------------------------------


def _hammer(
    redis_url: str,
    key: str,
    limit: int,
    threads: int,
    calls: int,
    inside: Any,
    peak: Any,
    lock: Any,
) -> None:
    """One worker process: ``threads`` call threads making ``calls`` gateway calls in all,
    each inside a 'gateway' that measures how many requests it holds at once, across
    processes."""
    cap = InFlightCap(RedisLeases.from_url(redis_url, key), limit, lease_s=30, wait_s=30)

    def gateway(request: httpx.Request) -> httpx.Response:
        with lock:
            inside.value += 1
            peak.value = max(peak.value, inside.value)
        time.sleep(0.01)
        with lock:
            inside.value -= 1
        return httpx.Response(200, json={"status": "SUCCESS", "result": {}})

    client = FatoraClient(
        "https://api.fatora.io/v1", "K3Y", transport=httpx.MockTransport(gateway), cap=cap
    )
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: client.deactivate_token("tok_x"), range(calls)))


def _run_two_processes(key: str, limit: int, calls: int = 24) -> tuple[int, float]:
    """Two processes of three call threads each through one cap: the most requests the
    gateway held at once, and the time it took."""
    ctx = multiprocessing.get_context("spawn")
    inside, peak, lock = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Lock()
    procs = [
        ctx.Process(target=_hammer, args=(REDIS_URL, key, limit, 3, calls, inside, peak, lock))
        for _ in range(2)
    ]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0, "a worker process failed"
    return peak.value, time.monotonic() - started


def test_two_processes_with_a_cap_of_one_never_overlap(key: str) -> None:
    peak, _elapsed = _run_two_processes(key, limit=1)
    assert peak == 1
    assert _leases(key).in_use() == 0  # every slot given back


def test_the_measure_sees_overlap_when_the_cap_allows_it(key: str) -> None:
    """The control: with two slots the same run does hold two requests at once, so the test
    above would have seen an overlap had the cap let one through."""
    peak, _elapsed = _run_two_processes(key, limit=2)
    assert peak == 2


# -- a holder that dies --------------------------------------------------------------------


def _hold_forever(redis_url: str, key: str, ready: Any) -> None:
    cap = InFlightCap(RedisLeases.from_url(redis_url, key), 1, lease_s=1.0, wait_s=5)
    cap.acquire("collect")
    ready.set()
    time.sleep(600)  # in the middle of a call, until killed


def test_the_slot_of_a_killed_process_comes_back_when_its_lease_expires(key: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_forever, args=(REDIS_URL, key, ready))
    holder.start()
    try:
        assert ready.wait(30), "the holder did not get its slot"
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        killed_at = time.monotonic()
        leases = _leases(key)
        assert leases.in_use() == 1  # still held by the dead process
        with pytest.raises(GatewayBusy):
            InFlightCap(leases, 1, lease_s=30, wait_s=0).acquire()
        waiter = InFlightCap(leases, 1, lease_s=30, wait_s=5)
        waiter.acquire()
        # Not before the dead holder's lease (1 s from its acquire) ran out.
        assert time.monotonic() - killed_at < 2.0
        assert leases.in_use() == 1
    finally:
        if holder.is_alive():
            holder.kill()


# -- Redis unreachable ---------------------------------------------------------------------


def test_with_redis_unreachable_nothing_is_sent() -> None:
    sent: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"status": "SUCCESS", "result": {}})

    cap = InFlightCap(RedisLeases.from_url(UNREACHABLE), 4, lease_s=30, wait_s=5)
    client = FatoraClient(
        "https://api.fatora.io/v1", "K3Y", transport=httpx.MockTransport(gateway), cap=cap
    )
    started = time.monotonic()
    with pytest.raises(GatewayBusy) as refused:
        client.deactivate_token("tok_x")
    assert sent == []
    assert refused.value.answer is Answer.NOT_SENT
    assert refused.value.reason == "unavailable"
    assert time.monotonic() - started < 5  # no waiting out the bound on a dead store
    assert "s3cret" not in repr(refused.value) and "s3cret" not in str(refused.value)


def test_a_charge_without_redis_is_recorded_never_sent_and_charged_once_redis_is_back(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock, key: str
) -> None:
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    gateway = rt.gateway
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1",
        sandbox.api_key,
        mode="test",
        timeout_s=5,
        transport=SandboxTransport(sandbox),
        cap=InFlightCap(RedisLeases.from_url(UNREACHABLE), 4, lease_s=30, wait_s=1),
    )
    report = collect_invoices(rt, [invoice_id])
    assert report.results == {invoice_id: "retry"}
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.FAILED.value
    assert attempt.call_ending == CallEnding.NOT_SENT.value  # nothing can have moved
    assert sandbox.charges() == []
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.OPEN.value and invoice.next_attempt_at is not None
    # Our own cap held it back: it counts toward no dunning step, however long it lasts.
    assert (invoice.transient_count, invoice.failure_count) == (0, 0)

    # Redis is back: the retry charges it, once.
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1",
        sandbox.api_key,
        mode="test",
        timeout_s=5,
        transport=SandboxTransport(sandbox),
        cap=InFlightCap(_leases(key), 1, lease_s=30, wait_s=5),
    )
    gateway.close()
    clock.advance(timedelta(hours=1))
    assert collect_invoices(rt, [invoice_id]).results == {invoice_id: "paid"}
    assert [c["status"] for c in sandbox.charges()] == ["SUCCESS"]
    assert _leases(key).in_use() == 0


def test_more_call_threads_than_redis_connections_all_get_their_slots(key: str) -> None:
    """A worker process with more call threads than its Redis pool has connections (a month-start
    spike on a slow gateway: 250 threads): a thread that finds every connection in use waits for
    one; none is refused its slot (and its charge reported "not sent") for want of a connection
    while slots are free."""
    cap = InFlightCap(
        RedisLeases.from_url(REDIS_URL, key, max_connections=16), 1000, lease_s=30, wait_s=5
    )
    threads, calls = 200, 10

    def call(_: int) -> int:
        taken = 0
        for _ in range(calls):
            with cap.slot("collect"):
                taken += 1
        return taken

    with ThreadPoolExecutor(threads) as pool:
        taken = sum(pool.map(call, range(threads)))
    assert taken == threads * calls
