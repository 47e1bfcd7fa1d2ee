"""The real gateway app over stand-in engines on real sockets: faulty engines, big answers, hostile numbers."""

import asyncio
import time

from loadtest.stub_engine import StubEngine
from server.engine.process import free_port
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.polling import wait_for
from tests.helpers.tls import self_signed

PROMPT = {"prompt": "x", "max_tokens": 4}


async def malformed_http_server(port: int, hits: list[int]) -> asyncio.AbstractServer:
    """Answers every connection with a status line no HTTP client can parse."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        await reader.read(1024)
        writer.write(b"HTTP/1.1 abc\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port)


async def test_a_malformed_health_answer_is_a_failed_probe_and_the_supervisor_carries_on(base, tmp_path):
    """Finding 3: aiohttp's ClientResponseError escaped the probe and ended the supervisor for good."""
    hits: list[int] = []
    bad = await malformed_http_server(free_port(), hits)
    bad_url = f"http://127.0.0.1:{bad.sockets[0].getsockname()[1]}"
    later = StubEngine()  # not yet listening: only a supervisor still alive will ever see it come up
    async with gateway_over([bad_url, later.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: len(hits) >= 2, 10), "the malformed engine is probed again and again"
        await later.start()
        assert await wait_for(lambda: ready(client), 10), "the supervisor died: the healthy engine never came up"
        assert (await client.get("/ready")).json()["engines"] == [False, True]
        assert (await client.post("/v1/completions", json=PROMPT)).status_code == 200
        await later.stop()
    bad.close()


async def test_a_refusing_engine_loses_its_traffic_at_once(base, tmp_path):
    """Finding 4: a killed engine kept every request (503s) for ~6 s while the healthy one sat idle."""
    doomed, healthy = await StubEngine().start(), await StubEngine().start()
    async with gateway_over([doomed.url, healthy.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client, 2), 10)
        await doomed.stop()
        codes = [(await client.post("/v1/completions", json=PROMPT)).status_code for _ in range(10)]
        assert codes == [200] * 10
        assert healthy.requests == 10
        assert (await client.get("/ready")).json()["engines"] == [False, True]
    await healthy.stop()


async def test_a_large_streamed_event_relays_in_linear_time(base, tmp_path):
    """Finding 9: one 20 MB event took 18.9 s through the gateway (0.12 s direct); /health waited meanwhile."""
    engine = await StubEngine(event_bytes=20 << 20).start()
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client), 10)
        started = time.monotonic()
        r = await client.post("/v1/completions", json={**PROMPT, "stream": True})
        elapsed = time.monotonic() - started
        assert r.status_code == 200 and len(r.content) > 20 << 20 and r.text.endswith("data: [DONE]\n\n")
        assert elapsed < 5, f"{elapsed:.1f} s for one 20 MB event"
    await engine.stop()


async def test_answers_over_the_size_bound_get_a_clear_error(base, tmp_path):
    engine = await StubEngine(event_bytes=2 << 20).start()
    async with gateway_over([engine.url], str(base.path), tmp_path, max_response_bytes=1 << 20) as client:
        assert await wait_for(lambda: ready(client), 10)
        r = await client.post("/v1/completions", json=PROMPT)
        assert r.status_code == 502 and r.json()["error"]["code"] == "response_too_large"
        r = await client.post("/v1/completions", json={**PROMPT, "stream": True})
        assert r.status_code == 200 and '"code": "response_too_large"' in r.text and len(r.content) < 1 << 20
    await engine.stop()


async def test_non_streamed_usage_is_counted_without_parsing_the_answer(base, tmp_path):
    engine = await StubEngine(event_bytes=1 << 20).start()
    async with gateway_over([engine.url], str(base.path), tmp_path, metrics_token="m") as client:
        assert await wait_for(lambda: ready(client), 10)
        r = await client.post("/v1/completions", json=PROMPT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        metrics = (await client.get("/metrics", headers={"Authorization": "Bearer m"})).text
        assert 'loraplex_completion_tokens_total{adapter="(base)"} 5.0' in metrics
    await engine.stop()


async def test_non_finite_numbers_and_odd_versions_are_400s_naming_the_field(base, tmp_path):
    """Finding 7: NaN in a passed-through field, and "x@²", were 500s outside OpenAI's error shape."""
    engine = await StubEngine().start()
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client), 10)
        for raw, param in ((b'{"prompt": "x", "min_p": NaN}', "min_p"),
                           (b'{"prompt": "x", "logit_bias": {"5": -Infinity}}', "logit_bias.5"),
                           (b'{"prompt": "x", "temperature": NaN}', "temperature")):
            r = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        for body, status in (({"adapter": "x@\u00b2"}, 400), ({"model": "x@\u00b2"}, 404),
                             ({"adapter": "x@\uff11"}, 400), ({"adapter": "acme\n"}, 400)):
            r = await client.post("/v1/completions", json={**PROMPT, **body})
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0"), r.text
    await engine.stop()


async def test_an_engine_load_error_names_no_server_path(base, tmp_path, adapter_factory):
    """Finding 5: the engine's load error, with the registry's absolute path, went to the tenant as it was."""
    from server.registry.directory import DirectoryRegistry

    DirectoryRegistry(tmp_path / "registry").register("acme", adapter_factory(), base=base, max_rank=16)
    engine = await StubEngine().start()
    async with gateway_over([engine.url], str(base.path), tmp_path) as client:
        assert await wait_for(lambda: ready(client), 10)
        r = await client.post("/v1/completions", json={**PROMPT, "adapter": "acme"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed", r.text
        assert str(tmp_path) not in r.text and "/registry" not in r.text
    await engine.stop()


async def test_engines_over_tls_are_verified(base, tmp_path):
    """Gateway-to-engine TLS: with the engine's CA the gateway serves through it; without, the engine stays out."""
    import ssl

    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    engine = await StubEngine(tls=tls).start()
    async with gateway_over([engine.url], str(base.path), tmp_path / "trusting", engine_ca=cert) as client:
        assert await wait_for(lambda: ready(client), 10)
        assert (await client.post("/v1/completions", json=PROMPT)).status_code == 200
    async with gateway_over([engine.url], str(base.path), tmp_path / "doubting") as client:
        assert not await wait_for(lambda: ready(client), 3), "an engine with an unknown certificate must stay out"
        assert (await client.post("/v1/completions", json=PROMPT)).status_code == 503
    assert engine.requests == 1
    await engine.stop()
