"""An OTLP/HTTP trace receiver: the spans the gateway exports, as the tests read them."""


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on a thread of its own: keeps every span it is sent, attributes as a dict."""

    def __init__(self):
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans = self.spans = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                export = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["content-length"])))
                for resource in export.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            values = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                            spans.append({"name": span.name, "trace_id": span.trace_id.hex(), "service": service,
                                          "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                          **values})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
