"""OpenTelemetry tracing of the gateway, when LORAPLEX_OTLP_ENDPOINT is set: a span per /v1 request with its adapter,
version, engine and tokens, exported over OTLP/HTTP, its context passed to the engine (W3C traceparent), which
continues the trace when started with --otlp-traces-endpoint. OpenTelemetry is imported only then."""

from typing import Any, Protocol

SERVICE = "loraplex-gateway"


class Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...

    def end(self) -> None: ...


class Tracer:
    """Starts request spans and gives the headers that carry one's context to the engine."""

    def __init__(self, endpoint: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagate import inject
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, set_span_in_context

        # The gateway's own provider, not the global one: two apps in one process (tests) keep their own.
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
        # Spans leave in batches, from the processor's thread: the request path never waits on the collector.
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{endpoint.rstrip('/')}/v1/traces")))
        self._tracer = self.provider.get_tracer("loraplex")
        self._inject, self._context, self._server = inject, set_span_in_context, SpanKind.SERVER

    def start(self, route: str) -> Span:
        return self._tracer.start_span(f"POST /v1/{route}", kind=self._server)

    def headers(self, span: Span) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self._inject(carrier, context=self._context(span))
        return carrier

    def shutdown(self) -> None:
        """Sends what is still batched."""
        self.provider.shutdown()


def tracer(endpoint: str | None) -> Tracer | None:
    return Tracer(endpoint) if endpoint else None
