"""Overload, client disconnects and graceful shutdown, on a second gateway in front of the session's engine."""

import asyncio
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import start_gateway, wait_until
from tests.e2e.test_monitoring import series

LONG = {"prompt": "Ada and", "max_tokens": 900, "temperature": 0, "ignore_eos": True}


def running_in_engine(server) -> float:
    return sum(series(httpx.get(f"{server.engine_url()}/metrics").text, "vllm:num_requests_running"))


@pytest.fixture
def second_gateway(server, tmp_path):
    proc, url = start_gateway(server, tmp_path, LORAPLEX_MAX_IN_FLIGHT_PER_ENGINE="2")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_disconnected_clients_abort_engine_work(server):
    """The engine's running count falls back long before the work would have finished by itself.

    Eight sequences of 900 tokens keep it busy for many seconds; its /metrics answers slowly while busy,
    so the bound is relative to how long the same request takes when nobody leaves."""
    work = {**LONG, "n": 8, "temperature": 1.0, "seed": 0}  # vLLM refuses n > 1 with greedy sampling
    assert wait_until(lambda: running_in_engine(server) == 0, 30)
    idle_after = {}
    for stream in (False, True):
        with httpx.Client(timeout=1.0) as c:
            if stream:
                with c.stream("POST", f"{server.url}/v1/completions", json={**work, "stream": True}) as r:
                    assert r.status_code == 200
                    # The first event means the engine is generating. Leaving the block then closes the connection
                    # mid-stream; polling the engine's metrics per event instead could outlast a fast engine's
                    # whole generation, and then walk thousands of buffered events.
                    assert any(line.startswith("data: {") for line in r.iter_lines())
            else:
                with pytest.raises(httpx.TimeoutException):  # the client gives up after 1 s
                    c.post(f"{server.url}/v1/completions", json=work)
        t0 = time.monotonic()
        assert wait_until(lambda: running_in_engine(server) == 0, 60), f"stream={stream}: engine still generating"
        idle_after[stream] = time.monotonic() - t0
    started = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", json=work, timeout=300)
    assert r.status_code == 200, r.text
    full = time.monotonic() - started
    print(f"engine idle {idle_after} s after the client left; the whole request takes {full:.1f} s")
    assert all(t < full / 2 for t in idle_after.values()), (idle_after, full)


async def _race(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def one():
            return await c.post("/v1/completions", json={**LONG, "max_tokens": 200})
        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_gets_429_with_retry_after(second_gateway):
    _, url = second_gateway
    responses = asyncio.run(_race(url, 6))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "too_many_requests"


def test_sigterm_lets_requests_finish(second_gateway):
    proc, url = second_gateway
    result = {}

    def long_request():
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", f"{url}/v1/completions", json={**LONG, "max_tokens": 300, "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        result["lines"] = lines

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)  # no longer accepting
    t.join(60)
    assert result["lines"][-1] == "data: [DONE]" and len(result["lines"]) == 301
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
