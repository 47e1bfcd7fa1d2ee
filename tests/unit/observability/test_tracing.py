"""Tracing: with LORAPLEX_OTLP_ENDPOINT set, a span per request reaches an OTLP/HTTP receiver started here (the SDK's
own exporter talking to it), and the engine request carries the span's context."""

from loadtest.stub_engine import USAGE, StubEngine
from tests.helpers.in_process import gateway_over, ready
from tests.helpers.otlp import OtlpReceiver
from tests.helpers.polling import wait_for


async def test_a_span_per_request_with_its_context_passed_to_the_engine(tmp_path, base):
    receiver = OtlpReceiver()
    engine = await StubEngine(tokens=3).start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path, otlp_endpoint=receiver.url) as client:
            assert await wait_for(lambda: ready(client), 30)
            r = await client.post("/v1/completions", json={"prompt": "Ada", "max_tokens": 3, "stream": True},
                                  headers={"x-request-id": "trace-me-1"})
            assert r.status_code == 200
        # Leaving the app sends what was batched.
        assert await wait_for(lambda: receiver.spans, 10)
    finally:
        await engine.stop()
        receiver.close()
    [span] = receiver.spans
    assert span["name"] == "POST /v1/completions" and span["service"] == "loraplex-gateway"
    assert span["loraplex.request_id"] == "trace-me-1" and span["loraplex.engine"] == engine.url
    assert span["http.response.status_code"] == 200
    assert (span["gen_ai.usage.input_tokens"], span["gen_ai.usage.output_tokens"]) == (
        USAGE["prompt_tokens"], USAGE["completion_tokens"])
    version, trace_id, parent, flags = engine.traceparents[-1].split("-")
    assert (trace_id, parent) == (span["trace_id"], span["span_id"]), "the engine continues the gateway's trace"


async def test_no_endpoint_no_tracing(tmp_path, base):
    engine = await StubEngine().start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path) as client:
            assert await wait_for(lambda: ready(client), 30)
            assert (await client.post("/v1/completions", json={"prompt": "Ada", "max_tokens": 1})).status_code == 200
            assert client.app.state.serving.tracer is None
    finally:
        await engine.stop()
    assert engine.traceparents == [None]
