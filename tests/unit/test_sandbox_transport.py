"""The sandbox's wrappers: the httpx transports, the ASGI app and the threaded server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from billing.config import FATORA_SAMPLE_API_KEY
from billing.fatora.sandbox import (
    AsyncSandboxTransport,
    Sandbox,
    SandboxTransport,
    create_app,
    start_server_in_thread,
)

HEADERS = {"api_key": FATORA_SAMPLE_API_KEY, "Accept": "application/json"}
CHECKOUT: dict[str, Any] = {
    "amount": 10,
    "currency": "QAR",
    "order_id": "T-1",
    "client": {"name": "A", "email": "a@example.com"},
}


def test_sync_transport_round_trip_uses_the_request_host() -> None:
    sandbox = Sandbox()
    with httpx.Client(transport=SandboxTransport(sandbox), headers=HEADERS) as http:
        response = http.post("https://api.fatora.test:8443/v1/payments/checkout", json=CHECKOUT)
    assert response.status_code == 200
    url = response.json()["result"]["checkout_url"]
    assert url.startswith("https://api.fatora.test:8443/pay/MCPaymentPage?paymentID=")


def test_sync_transport_hang_raises_read_timeout_after_the_effect() -> None:
    sandbox = Sandbox()
    token = sandbox.issue_token("timeout_after_charge")
    with (
        httpx.Client(transport=SandboxTransport(sandbox), headers=HEADERS) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(
            "http://gw/v1/payments/collect-payment",
            json={"card_token": token, "order_id": "H-1", "amount": 5},
        )
    assert [c["status"] for c in sandbox.charges()] == ["SUCCESS"]


def test_sync_transport_latency() -> None:
    with httpx.Client(transport=SandboxTransport(Sandbox(), latency_ms=50)) as http:
        started = time.perf_counter()
        assert http.get("http://gw/__sandbox/health").status_code == 200
    assert time.perf_counter() - started >= 0.05


def test_async_transport_latency_overlaps() -> None:
    async def run() -> float:
        transport = AsyncSandboxTransport(Sandbox(), latency_ms=200)
        async with httpx.AsyncClient(transport=transport) as http:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(http.get("http://gw/__sandbox/health") for _ in range(20))
            )
            assert all(a.status_code == 200 for a in answers)
            return time.perf_counter() - started

    assert asyncio.run(run()) < 1.5


def test_asgi_app_latency_overlaps_and_serves_the_api() -> None:
    sandbox = Sandbox()
    app = create_app(sandbox, latency_ms=200)

    async def run() -> float:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sandbox.local", headers=HEADERS
        ) as http:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(
                    http.post("/v1/payments/verify", json={"order_id": f"none-{i}"})
                    for i in range(20)
                )
            )
            assert all(a.status_code == 404 for a in answers)
            checkout = await http.post("/v1/payments/checkout", json=CHECKOUT)
            url = checkout.json()["result"]["checkout_url"]
            assert url.startswith("http://sandbox.local/pay/MCPaymentPage?paymentID=")
            page = await http.get(url)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            return time.perf_counter() - started

    assert asyncio.run(run()) < 2.0


def test_asgi_app_holds_a_hanging_answer() -> None:
    sandbox = Sandbox()
    token = sandbox.issue_token("timeout_after_charge")
    app = create_app(sandbox, hang_s=0.3)

    async def run() -> tuple[int, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://s", headers=HEADERS
        ) as http:
            started = time.perf_counter()
            answer = await http.post(
                "/v1/payments/collect-payment",
                json={"card_token": token, "order_id": "H-2", "amount": 5},
            )
            return answer.status_code, time.perf_counter() - started

    status, elapsed = asyncio.run(run())
    assert status == 200
    assert elapsed >= 0.3
    assert len(sandbox.charges()) == 1


def test_server_in_thread_times_out_a_hanging_charge_and_stops() -> None:
    sandbox = Sandbox()
    token = sandbox.issue_token("timeout_after_charge")
    with start_server_in_thread(sandbox, hang_s=30) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=server.url, headers=HEADERS, timeout=0.5) as http:
            assert http.get("/__sandbox/health").json()["status"] == "ok"
            with pytest.raises(httpx.ReadTimeout):
                http.post(
                    "/v1/payments/collect-payment",
                    json={"card_token": token, "order_id": "H-3", "amount": 5},
                )
            assert http.get("/__sandbox/charges").json()["charges"][0]["order_id"] == "H-3"
        started = time.perf_counter()
    # The client gave up, so the held answer does not delay shutdown.
    assert time.perf_counter() - started < 5


def test_run_server_picks_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from billing.fatora.sandbox import server as server_module

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen["app"], seen["kwargs"] = app, kwargs

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("FATORA_API_KEY", "ENV-KEY")
    server_module.run_server(port=9999, decline_style="http4xx")
    assert seen["kwargs"]["port"] == 9999

    async def probe(key: str) -> int:
        transport = httpx.ASGITransport(app=seen["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
            answer = await http.post(
                "/v1/payments/verify", json={"order_id": "x"}, headers={"api_key": key}
            )
            return answer.status_code

    assert asyncio.run(probe("ENV-KEY")) == 404
    assert asyncio.run(probe(FATORA_SAMPLE_API_KEY)) == 401


def test_concurrent_collects_are_consistent() -> None:
    import threading

    sandbox = Sandbox()
    tokens = [sandbox.issue_token() for _ in range(8)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with httpx.Client(transport=SandboxTransport(sandbox), headers=HEADERS) as http:
                for n in range(25):
                    answer = http.post(
                        "http://gw/v1/payments/collect-payment",
                        json={
                            "card_token": tokens[index],
                            "order_id": f"C-{index}-{n}",
                            "amount": 1,
                        },
                    )
                    assert answer.status_code == 200
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    charges = sandbox.charges()
    assert len(charges) == 200
    assert len({c["transaction_id"] for c in charges}) == 200
