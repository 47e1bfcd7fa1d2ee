"""Gateway metrics for Prometheus: per-adapter latency, time to first token, tokens; per-engine requests and loads."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# LLM requests take milliseconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BASE_LABEL = "(base)"
OTHER_LABEL = "other"


class Metrics:
    """One registry per app, so that several apps (tests) never share series."""

    def __init__(self, max_adapter_labels: int):
        self.registry = CollectorRegistry()
        self.max_adapter_labels = max_adapter_labels
        self._labelled: set[str] = set()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Requests answered, by route, adapter and HTTP status.",
                                ["route", "adapter", "status"], registry=r)
        self.in_flight = Gauge("loraplex_requests_in_flight", "Requests being answered.", ["route"], registry=r)
        self.latency = Histogram("loraplex_request_duration_seconds", "End-to-end request latency at the gateway.",
                                 ["route", "adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to the first streamed chunk.",
                              ["route", "adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between streamed chunks.",
                             ["route", "adapter"], buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens", "Completion tokens generated.", ["adapter"],
                                         registry=r)
        self.engine_requests = Counter("loraplex_engine_requests", "Requests sent to each engine.", ["engine"],
                                       registry=r)
        self.adapter_loads = Counter("loraplex_engine_adapter_loads", "Adapter versions an engine took up between "
                                     "two probes (it fetched or reloaded them).", ["engine"], registry=r)
        self.load_failures = Counter("loraplex_adapter_load_failures", "Requests for an adapter version the engine "
                                     "found but could not load.", ["adapter"], registry=r)
        self.resident = Gauge("loraplex_adapters_resident", "Adapter versions an engine holds.", ["engine"],
                              registry=r)
        self.registered = Gauge("loraplex_adapters_registered", "Adapters in the registry.", registry=r)
        self.engine_up = Gauge("loraplex_engine_up", "1 if the engine answered its last health check.", ["engine"],
                               registry=r)
        self.engine_restarts = Counter("loraplex_engine_restarts", "Times a local engine was restarted.", ["engine"],
                                       registry=r)

    def adapter_label(self, name: str | None) -> str:
        """The adapter's name (not version) as a label, with distinct names capped to bound cardinality."""
        if name is None:
            return BASE_LABEL
        if name in self._labelled:
            return name
        if len(self._labelled) < self.max_adapter_labels:
            self._labelled.add(name)
            return name
        return OTHER_LABEL

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's bookkeeping from arrival to `done()`: in flight, end to end, first chunk, between chunks."""

    def __init__(self, metrics: Metrics, route: str, adapter: str = "(unresolved)"):
        self.m, self.route, self.adapter = metrics, route, adapter
        self.start = self.last = time.perf_counter()
        self.first = True
        self._itl = None  # looked up once per stream, not per chunk
        self._finished = False
        metrics.in_flight.labels(route).inc()

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.first:
            self.m.ttft.labels(self.route, self.adapter).observe(now - self.start)
            self._itl = self.m.itl.labels(self.route, self.adapter)
            self.first = False
        else:
            self._itl.observe(now - self.last)
        self.last = now

    def usage(self, usage: dict | None) -> None:
        if usage:
            self.m.prompt_tokens.labels(self.adapter).inc(usage.get("prompt_tokens") or 0)
            self.m.completion_tokens.labels(self.adapter).inc(usage.get("completion_tokens") or 0)

    def done(self, status: int) -> None:
        if self._finished:
            return
        self._finished = True
        self.m.in_flight.labels(self.route).dec()
        self.m.latency.labels(self.route, self.adapter).observe(time.perf_counter() - self.start)
        self.m.requests.labels(self.route, self.adapter, str(status)).inc()
