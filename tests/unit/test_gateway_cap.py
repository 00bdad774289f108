"""The gateway cap's rules on in-process leases and a fake clock: the limit, expiry, waiting,
and a call that cannot get a slot is never sent (and says so as a request that never left)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from billing.config import reset_settings_cache
from billing.fatora import FatoraClient
from billing.fatora.answers import Answer, Call, Money, Then, verdict
from billing.fatora.retry import retry_decision
from billing.gateway_cap import (
    MAX_POLL_S,
    GatewayBusy,
    InFlightCap,
    LocalLeases,
    RedisLeases,
    cap_from_settings,
    lease_for,
    leases_for,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def cap_on(
    leases: LocalLeases, clock: FakeClock, limit: int = 2, *, wait_s: float = 0, lease_s: float = 60
) -> InFlightCap:
    return InFlightCap(
        leases, limit, lease_s=lease_s, wait_s=wait_s, clock=clock, sleep=clock.sleep
    )


def test_at_most_limit_slots_are_held(clock: FakeClock) -> None:
    leases = LocalLeases(clock)
    cap = cap_on(leases, clock, limit=2)
    first, second = cap.acquire(), cap.acquire()
    with pytest.raises(GatewayBusy) as refused:
        cap.acquire()
    assert refused.value.reason == "busy"
    assert leases.in_use() == 2
    cap.release(first)
    third = cap.acquire()
    assert len({first, second, third}) == 3
    assert leases.in_use() == 2


def test_a_lease_never_released_expires(clock: FakeClock) -> None:
    """A worker killed mid-call keeps its slot only until its lease runs out."""
    leases = LocalLeases(clock)
    cap = cap_on(leases, clock, limit=1, lease_s=100)
    cap.acquire()  # never released: its holder died
    clock.now += 99.9
    with pytest.raises(GatewayBusy):
        cap.acquire()
    clock.now += 0.2
    cap.acquire()
    assert leases.in_use() == 1


def test_a_waiting_call_gets_the_slot_freed_meanwhile(clock: FakeClock) -> None:
    leases = LocalLeases(clock)
    cap = cap_on(leases, clock, limit=1, wait_s=5)
    held = cap.acquire()
    freed_at = clock.now + 1.0

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now >= freed_at and leases.in_use():
            cap.release(held)

    cap._sleep = sleep
    cap.acquire()
    assert freed_at <= clock.now < freed_at + MAX_POLL_S + 1e-9
    assert max(clock.sleeps) <= MAX_POLL_S  # polls back off, up to a ceiling


def test_a_call_waits_no_longer_than_the_bound(clock: FakeClock) -> None:
    leases = LocalLeases(clock)
    cap = cap_on(leases, clock, limit=1, wait_s=3)
    cap.acquire()
    started = clock.now
    with pytest.raises(GatewayBusy, match="busy for 3 s") as refused:
        cap.acquire()
    assert clock.now - started == pytest.approx(3.0)
    assert refused.value.answer is Answer.NOT_SENT
    # Polls grow from milliseconds: the first ones are quick, the later ones spaced out.
    assert clock.sleeps[0] < 0.01 and len(clock.sleeps) < 3 / 0.1


class Broken:
    """Leases whose store cannot be reached."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def try_acquire(self, lease_id: str, limit: int, lease_ms: int) -> bool:
        raise ConnectionError("Error 111 connecting to redis.internal:6379")

    def release(self, lease_id: str) -> None:
        self.released.append(lease_id)
        raise ConnectionError("still down")

    def in_use(self) -> int:
        raise ConnectionError("still down")


def test_an_unreachable_store_means_not_sent(clock: FakeClock) -> None:
    broken = Broken()
    cap = InFlightCap(broken, 5, lease_s=60, wait_s=10, clock=clock, sleep=clock.sleep)
    with pytest.raises(GatewayBusy) as refused:
        cap.acquire()
    assert refused.value.reason == "unavailable"
    assert refused.value.answer is Answer.NOT_SENT
    assert clock.sleeps == []  # no waiting on a store that is down
    # The acquire may have landed before the answer was lost: it is given back (best effort).
    assert len(broken.released) == 1
    assert "redis.internal" not in str(refused.value)


def test_a_client_without_a_slot_sends_nothing_and_the_charge_is_not_sent() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"status": "SUCCESS", "result": {}})

    cap = InFlightCap(Broken(), 5, lease_s=60, wait_s=1)
    client = FatoraClient(
        "https://api.fatora.io/v1", "K3Y", transport=httpx.MockTransport(handler), cap=cap
    )
    with pytest.raises(GatewayBusy) as refused:
        client.collect_payment("tok_live_abc", "S1-20270101000000-1", Decimal("50.00"), "QAR")
    assert sent == []
    # What the charging service reads: no money can have moved, try again later.
    judged = verdict(Call.COLLECT, refused.value.answer)
    assert (judged.money, judged.then) == (Money.NO, Then.RETRY)
    assert retry_decision(refused.value, 1).retry
    assert "tok_live_abc" not in repr(refused.value)
    # A verify without a slot asks nothing: the attempt stays unresolved.
    with pytest.raises(GatewayBusy) as unasked:
        client.verify("S1-20270101000000-1")
    assert verdict(Call.VERIFY, unasked.value.answer).then is Then.VERIFY_LATER
    assert sent == []


def test_a_slot_is_held_for_the_call_and_given_back() -> None:
    leases = LocalLeases()
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(leases.in_use())
        return httpx.Response(503, text="busy")

    cap = InFlightCap(leases, 1, lease_s=60, wait_s=0)
    client = FatoraClient(
        "https://api.fatora.io/v1", "K3Y", transport=httpx.MockTransport(handler), cap=cap
    )
    for _ in range(3):
        with pytest.raises(Exception, match="GatewayServerError"):
            client.verify("S1-20270101000000-1")
    assert seen == [1, 1, 1]
    assert leases.in_use() == 0


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    reset_settings_cache()
    yield monkeypatch
    monkeypatch.undo()
    reset_settings_cache()


def test_no_cap_by_default_so_no_redis_is_ever_asked(env: pytest.MonkeyPatch) -> None:
    env.delenv("BILLING_GATEWAY_MAX_IN_FLIGHT", raising=False)
    env.setenv("BILLING_BROKER_URL", "redis://127.0.0.1:1/11")
    assert cap_from_settings() is None
    assert FatoraClient("https://api.fatora.io/v1", "K3Y")._cap is None
    env.setenv("BILLING_GATEWAY_MAX_IN_FLIGHT", "0")
    reset_settings_cache()
    assert cap_from_settings() is None


def test_the_settings_cap_uses_the_brokers_redis_and_outlasts_a_call(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("BILLING_GATEWAY_MAX_IN_FLIGHT", "7")
    env.setenv("BILLING_GATEWAY_CAP_WAIT_S", "2.5")
    env.setenv("BILLING_BROKER_URL", "redis://127.0.0.1:1/11")  # nothing listens: not asked yet
    env.setenv("FATORA_TIMEOUT_S", "20")
    env.setenv("FATORA_CONNECT_TIMEOUT_S", "5")
    cap = cap_from_settings()
    assert cap is not None
    assert isinstance(cap.leases, RedisLeases)
    assert (cap.limit, cap.wait_s) == (7, 2.5)
    assert cap.lease_ms / 1000 > 5 + 20 + 20  # longer than connecting, writing and reading
    assert FatoraClient("https://api.fatora.io/v1", "K3Y")._cap is not None


def test_the_embedded_broker_caps_within_its_one_process() -> None:
    assert isinstance(leases_for("memory://"), LocalLeases)
    with pytest.raises(ValueError, match="needs a Redis broker"):
        leases_for("amqp://guest@localhost//")


def test_the_lease_outlasts_the_client_timeouts() -> None:
    assert lease_for(30, 10) > 30 + 30 + 10
