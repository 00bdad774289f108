"""A cap on Fatora calls in flight across every worker, shared through Redis.

Celery's ``rate_limit`` counts per worker, so ten workers with a limit each send ten times as
much: it does not protect the gateway. This cap is a counting semaphore every worker process
shares: ``BILLING_GATEWAY_MAX_IN_FLIGHT`` slots (0 or unset: no cap, and no Redis call at all).

A slot is a lease: a member of a Redis sorted set, scored by the moment it expires. Acquiring
is one Lua script that first drops the expired leases, then adds one if fewer than the limit
remain, all on Redis's own clock (workers' clocks may disagree). A worker killed in the middle
of a call never returns its slot: its lease expires, after longer than any call can last
(``lease_for``), and the slot is free again. Releasing removes the lease.

Money comes first: a call that gets no slot within ``BILLING_GATEWAY_CAP_WAIT_S``, or that
cannot reach Redis to ask for one, is **not sent**. It fails with ``GatewayBusy``, whose answer
is ``Answer.NOT_SENT``: for a charge, nothing can have moved and it is tried again later
(``billing.services.charging``); for a verify, the attempt stays unresolved.

``LocalLeases`` has the same rules inside one process: the embedded default (a ``memory://``
broker runs every task in one process) and the unit tests use it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from billing import metrics
from billing.fatora.answers import Answer
from billing.fatora.errors import GatewayConnectionError

if TYPE_CHECKING:
    import redis

__all__ = [
    "CAP_KEY",
    "GatewayBusy",
    "InFlightCap",
    "Leases",
    "LocalLeases",
    "RedisLeases",
    "cap_from_settings",
    "lease_for",
]

log = logging.getLogger("billing.gateway_cap")

# The sorted set of leases, in the broker's Redis database.
CAP_KEY = "billing:gateway:in-flight"
# Waiting for a slot: polls start this far apart and double up to the ceiling (with jitter).
FIRST_POLL_S = 0.005
MAX_POLL_S = 0.25
# Redis must answer the cap quickly: a call waits for it, and a slow Redis means not sent.
REDIS_TIMEOUT_S = 2.0
# Connections to Redis per process for taking slots, at least (a worker process: one per call
# thread and a few more; ``billing web``: its request threads).
DEFAULT_REDIS_CONNECTIONS = 64
# Connections per process for giving slots back, apart from those that take them.
RELEASE_CONNECTIONS = 4


class GatewayBusy(GatewayConnectionError):
    """The call was not sent: no slot under the gateway cap (all busy, or Redis unreachable).
    Nothing reached the gateway, so nothing can have moved."""

    answer = Answer.NOT_SENT

    def __init__(self, description: str, *, reason: str) -> None:
        super().__init__(description, answer=Answer.NOT_SENT)
        self.reason = reason  # "busy" or "unavailable"


class Leases(Protocol):
    """Where the leases live. Both methods may raise: the cap treats that as no slot."""

    def try_acquire(self, lease_id: str, limit: int, lease_ms: int) -> bool:
        """Drop expired leases; add ``lease_id`` for ``lease_ms`` if fewer than ``limit``
        remain. True when it was added. Atomic."""
        ...

    def release(self, lease_id: str) -> None:
        """Remove ``lease_id`` (nothing if it has expired or was never added)."""
        ...

    def in_use(self) -> int:
        """How many leases have not expired."""
        ...


# KEYS[1]: the sorted set. ARGV: limit, lease in milliseconds, lease id. Redis's own clock.
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return 1
"""

_IN_USE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class RedisLeases:
    """Leases in a Redis sorted set, shared by every process that uses the same key."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        key: str = CAP_KEY,
        *,
        releaser: redis.Redis[bytes] | None = None,
    ) -> None:
        """``releaser``: the client that gives leases back (default: ``client``); a pool of its
        own, so that a slot is given back at once even while every connection of ``client``
        is taken by threads waiting to acquire."""
        self._client = client
        self._releaser = releaser or client
        self._key = key
        self._acquire = client.register_script(_ACQUIRE)
        self._in_use = client.register_script(_IN_USE)

    @classmethod
    def from_url(
        cls, url: str, key: str = CAP_KEY, *, max_connections: int = DEFAULT_REDIS_CONNECTIONS
    ) -> RedisLeases:
        """Leases through a pool of at most ``max_connections`` connections that every call
        thread of the process shares: a thread that finds them all in use waits for one (up to
        ``REDIS_TIMEOUT_S``, on top of the cap's own wait) instead of failing at once, as a
        plain pool does past its size (100 by default, fewer than a worker's call threads can
        be). Leases are given back through a small pool of their own."""
        import redis

        def client(size: int) -> redis.Redis[bytes]:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=size,
                timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            return redis.Redis(connection_pool=pool)

        return cls(client(max_connections), key, releaser=client(RELEASE_CONNECTIONS))

    def try_acquire(self, lease_id: str, limit: int, lease_ms: int) -> bool:
        return bool(self._acquire(keys=[self._key], args=[limit, lease_ms, lease_id]))

    def release(self, lease_id: str) -> None:
        self._releaser.zrem(self._key, lease_id)

    def in_use(self) -> int:
        return int(self._in_use(keys=[self._key]))


class LocalLeases:
    """The same leases in this process's memory (``clock`` in seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiries: dict[str, float] = {}

    def _drop_expired(self, now: float) -> None:
        for lease_id in [k for k, expiry in self._expiries.items() if expiry <= now]:
            del self._expiries[lease_id]

    def try_acquire(self, lease_id: str, limit: int, lease_ms: int) -> bool:
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            if len(self._expiries) >= limit:
                return False
            self._expiries[lease_id] = now + lease_ms / 1000
            return True

    def release(self, lease_id: str) -> None:
        with self._lock:
            self._expiries.pop(lease_id, None)

    def in_use(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._expiries)


def lease_for(timeout_s: float, connect_timeout_s: float) -> float:
    """How long a slot is held at most: longer than any call with these timeouts can last
    (connecting, then a write and a read each up to the timeout), with a margin."""
    return connect_timeout_s + 2 * timeout_s + 30


class InFlightCap:
    """At most ``limit`` slots held at once among everyone sharing ``leases``."""

    def __init__(
        self,
        leases: Leases,
        limit: int,
        *,
        lease_s: float,
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError("the gateway cap needs at least one slot")
        if lease_s <= 0 or wait_s < 0:
            raise ValueError("the lease must be positive and the wait not negative")
        self.leases = leases
        self.limit = limit
        self.lease_ms = max(1, round(lease_s * 1000))
        self.wait_s = wait_s
        self._clock = clock
        self._sleep = sleep
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    def __repr__(self) -> str:
        return f"InFlightCap(limit={self.limit}, wait_s={self.wait_s})"

    def acquire(self, call: str = "call") -> str:
        """A lease id, once a slot is held; ``GatewayBusy`` when none can be had in time."""
        lease_id = f"{self._owner}:{uuid.uuid4().hex}"
        started = self._clock()
        deadline = started + self.wait_s
        pause = FIRST_POLL_S
        while True:
            try:
                held = self.leases.try_acquire(lease_id, self.limit, self.lease_ms)
            except Exception as exc:
                # The script may have run before the answer was lost: give the lease back.
                self._release_quietly(lease_id)
                metrics.gateway_cap_refused(call, "unavailable")
                log.error(
                    "gateway call not sent: the cap cannot be reached (%s)", type(exc).__name__
                )
                raise GatewayBusy(
                    f"not sent: the gateway cap cannot be reached ({type(exc).__name__})",
                    reason="unavailable",
                ) from exc
            now = self._clock()
            if held:
                metrics.gateway_cap_waited(call, now - started)
                return lease_id
            if now >= deadline:
                metrics.gateway_cap_refused(call, "busy")
                log.warning(
                    "gateway call not sent: all %d slots busy for %.1f s", self.limit, self.wait_s
                )
                raise GatewayBusy(
                    f"not sent: all {self.limit} gateway slots busy for {self.wait_s:g} s",
                    reason="busy",
                )
            self._sleep(min(deadline - now, random.uniform(pause / 2, pause)))
            pause = min(pause * 2, MAX_POLL_S)

    def release(self, lease_id: str) -> None:
        """Give the slot back; if Redis cannot be reached, the lease expires on its own."""
        self._release_quietly(lease_id)

    def _release_quietly(self, lease_id: str) -> None:
        try:
            self.leases.release(lease_id)
        except Exception as exc:
            log.warning("gateway slot not released, it expires on its own (%s)", type(exc).__name__)

    @contextmanager
    def slot(self, call: str = "call") -> Iterator[None]:
        """Hold a slot for the body: ``GatewayBusy`` (not sent) if none can be had."""
        lease_id = self.acquire(call)
        try:
            yield
        finally:
            self.release(lease_id)


def cap_from_settings() -> InFlightCap | None:
    """The cap the settings ask for, or None when there is none
    (``BILLING_GATEWAY_MAX_IN_FLIGHT`` 0 or unset): then the client asks nothing of anyone."""
    from billing.config import get_fatora_settings, get_settings

    settings = get_settings()
    if settings.gateway_max_in_flight <= 0:
        return None
    fatora = get_fatora_settings()
    return InFlightCap(
        # One connection per call thread (and a few for the rest): none waits for another's.
        leases_for(
            settings.broker_url,
            connections=max(DEFAULT_REDIS_CONNECTIONS, settings.charge_concurrency + 8),
        ),
        settings.gateway_max_in_flight,
        lease_s=lease_for(fatora.timeout_s, fatora.connect_timeout_s),
        wait_s=settings.gateway_cap_wait_s,
    )


_local_leases = LocalLeases()


def leases_for(broker_url: str, *, connections: int = DEFAULT_REDIS_CONNECTIONS) -> Leases:
    """Leases in the broker's Redis, or in this process for the ``memory://`` broker (which runs
    every task in the process that sends it)."""
    if broker_url.startswith("memory://"):
        return _local_leases
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisLeases.from_url(broker_url, max_connections=connections)
    raise ValueError(
        "BILLING_GATEWAY_MAX_IN_FLIGHT needs a Redis broker (BILLING_BROKER_URL=redis://...)"
    )
