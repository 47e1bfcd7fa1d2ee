"""Overload, client disconnects and graceful shutdown, on a second gateway in front of the session's engine."""

import asyncio
import signal
import threading

import httpx
import pytest

from tests.helpers.calls import series
from tests.helpers.e2e import ENGINE_AUTH, start_gateway
from tests.helpers.polling import wait_until

LONG = {"prompt": "Ada and", "max_tokens": 900, "temperature": 0, "ignore_eos": True}


def running_in_engine(server) -> float:
    return sum(series(httpx.get(f"{server.engine_url()}/metrics", headers=ENGINE_AUTH).text,
                      "vllm:num_requests_running"))


def generated_by_engine(server) -> float:
    return sum(series(httpx.get(f"{server.engine_url()}/metrics", headers=ENGINE_AUTH).text,
                      "vllm:generation_tokens_total"))


@pytest.fixture
def second_gateway(server, tmp_path):
    proc, url = start_gateway(server, tmp_path, LORAPLEX_MAX_IN_FLIGHT_PER_ENGINE="2")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_disconnected_clients_abort_engine_work(server):
    """The engine stops generating soon after the client leaves, counted in the engine's own tokens.

    Sixteen sequences of 1,000 tokens would be 16,000 tokens; the bound is on what the engine generates after the client
    left, a share of that, so it holds however fast the engine or the machine is (a bound in seconds did not)."""
    # Long enough that a fast engine is still generating when the non-streamed client gives up after 1 s.
    work = {**LONG, "max_tokens": 1000, "n": 16, "temperature": 1.0, "seed": 0}  # n > 1 needs sampling
    whole = work["n"] * work["max_tokens"]
    assert wait_until(lambda: running_in_engine(server) == 0, 30)
    before = generated_by_engine(server)
    assert httpx.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 8}, timeout=60).status_code == 200
    assert wait_until(lambda: generated_by_engine(server) >= before + 8, 10), "the token counter must count"
    after_leaving = {}
    for stream in (False, True):
        if stream:
            with httpx.Client(timeout=60) as c:
                with c.stream("POST", f"{server.url}/v1/completions", json={**work, "stream": True}) as r:
                    assert r.status_code == 200
                    # The first event means the engine is generating. Leaving the block then closes the connection
                    # mid-stream; polling the engine's metrics per event instead could outlast a fast engine's
                    # whole generation, and then walk thousands of buffered events.
                    assert any(line.startswith("data: {") for line in r.iter_lines())
        else:
            with httpx.Client(timeout=1.0) as c, pytest.raises(httpx.TimeoutException):
                c.post(f"{server.url}/v1/completions", json=work)  # the client gives up after 1 s
        left_at = generated_by_engine(server)
        assert wait_until(lambda: running_in_engine(server) == 0, 60), f"stream={stream}: engine still generating"
        after_leaving[stream] = generated_by_engine(server) - left_at
    print(f"tokens generated after the client left: {after_leaving} of {whole}")
    assert all(n < whole / 4 for n in after_leaving.values()), (after_leaving, whole)


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
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        streaming.set()
        result["lines"] = lines

    def refused() -> bool:
        try:
            httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            return True
        return False

    streaming = threading.Event()
    t = threading.Thread(target=long_request)
    t.start()
    assert streaming.wait(60), "the stream never started"
    proc.send_signal(signal.SIGTERM)
    assert wait_until(refused, 10)  # no longer accepting
    t.join(60)
    assert result["lines"][-1] == "data: [DONE]" and len(result["lines"]) == 301
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
