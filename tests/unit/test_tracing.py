"""Tracing: with LORAPLEX_OTLP_ENDPOINT set, a span per request reaches an OTLP/HTTP receiver started here (the SDK's
own exporter talking to it), and the engine request carries the span's context."""

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from loadtest.stub_engine import USAGE, StubEngine
from server.engine_process import free_port
from tests.helpers import gateway_over, ready, wait_for


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent, with its attributes as a dict."""

    def __init__(self):
        self.port, self.spans = free_port(), []

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            for scope in resource.scope_spans:
                for span in scope.spans:
                    values = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                       "span_id": span.span_id.hex(), "service": service, **values})
        return web.Response(status=200)


async def test_a_span_per_request_with_its_context_passed_to_the_engine(tmp_path, base):
    receiver = await Receiver().start()
    engine = await StubEngine(tokens=3).start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path,
                                otlp_endpoint=f"http://127.0.0.1:{receiver.port}") as client:
            assert await wait_for(lambda: ready(client), 30)
            r = await client.post("/v1/completions", json={"prompt": "Ada", "max_tokens": 3, "stream": True},
                                  headers={"x-request-id": "trace-me-1"})
            assert r.status_code == 200
        # Leaving the app sends what was batched.
        assert await wait_for(lambda: receiver.spans, 10)
    finally:
        await engine.stop()
        await receiver.runner.cleanup()
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
            assert client.app.state.gateway.tracer is None
    finally:
        await engine.stop()
    assert engine.traceparents == [None]
