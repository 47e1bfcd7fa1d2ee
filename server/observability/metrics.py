"""Gateway metrics for Prometheus: per-adapter latency, time to first token, tokens; per-tenant requests and tokens;
per-engine requests and loads."""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from server.observability.tracing import Span

# LLM requests take milliseconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BASE_LABEL = "(base)"
OTHER_LABEL = "other"
NO_TENANT = "(none)"  # an operator, or /v1 open to all


class Labels:
    """Names as label values, the first `limit` distinct ones each their own, the rest 'other': bounded series."""

    def __init__(self, limit: int):
        self.limit, self.seen = limit, set()

    def __call__(self, name: str) -> str:
        if name in self.seen:
            return name
        if len(self.seen) < self.limit:
            self.seen.add(name)
            return name
        return OTHER_LABEL


class Metrics:
    """One registry per app, so that several apps (tests) never share series."""

    def __init__(self, max_adapter_labels: int, max_tenant_labels: int = 100):
        self.registry = CollectorRegistry()
        self._adapters, self.tenant_label = Labels(max_adapter_labels), Labels(max_tenant_labels)
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
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens charged (README: Usage).", ["adapter"],
                                     registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens", "Completion tokens charged.", ["adapter"],
                                         registry=r)
        self.tenant_requests = Counter("loraplex_tenant_requests", "Requests answered, by the caller's tenant.",
                                       ["tenant", "status"], registry=r)
        self.tenant_prompt_tokens = Counter("loraplex_tenant_prompt_tokens", "Prompt tokens, by the caller's tenant.",
                                            ["tenant"], registry=r)
        self.tenant_completion_tokens = Counter("loraplex_tenant_completion_tokens",
                                                "Completion tokens, by the caller's tenant.", ["tenant"], registry=r)
        self._shadow_series(r)
        self._data_series(r)
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

    def _shadow_series(self, r: CollectorRegistry) -> None:
        self.shadow_requests = Counter("loraplex_shadow_requests", "Copies of requests sent to a shadow version, by "
                                       "result: completed, shed (under load), failed.", ["adapter", "result"],
                                       registry=r)
        self.shadow_exact = Counter("loraplex_shadow_exact_matches", "Shadow answers identical to the served one.",
                                    ["adapter"], registry=r)
        self.shadow_length_ratio = Histogram("loraplex_shadow_length_ratio", "A shadow answer's completion tokens "
                                             "over the served answer's.", ["adapter"], registry=r,
                                             buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0))
        self.shadow_latency = Histogram("loraplex_shadow_duration_seconds", "Latency of shadow requests.",
                                        ["adapter"], buckets=LATENCY_BUCKETS, registry=r)

    def _data_series(self, r: CollectorRegistry) -> None:
        self.stored_dropped = Counter("loraplex_stored_completions_dropped", "Stored completions dropped because the "
                                      "record writer fell behind (or storage failed); the requests were not delayed.",
                                      registry=r)
        self.feedback = Counter("loraplex_feedback", "Feedback posted on answers, by the version that answered and "
                                "rating: up (above 0), down (below 0), neutral.", ["adapter", "version", "rating"],
                                registry=r)

    def adapter_label(self, name: str | None) -> str:
        """The adapter's name (not version) as a label, with distinct names capped to bound cardinality."""
        return BASE_LABEL if name is None else self._adapters(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Where a finished request is counted for its tenant: (tenant, prompt tokens, completion tokens, tokens its budget
# held, requests: 0 for one refused).
UsageSink = Callable[[str, int, int, int, int], None]


class RequestTimer:
    """One request's bookkeeping from arrival to `done()`: in flight, end to end, first chunk, between chunks, and
    the caller's tenant's requests and the tokens charged to it (see `charged`)."""

    def __init__(self, metrics: Metrics, route: str, adapter: str = "(unresolved)", tenant: str | None = None,
                 usage_sink: UsageSink | None = None, span: "Span | None" = None):
        self.m, self.route, self.adapter = metrics, route, adapter
        self.tenant, self.usage_sink, self.span = tenant, usage_sink, span
        self._final: tuple[int, int] | None = None  # the engine's count for the whole request
        self.bound = 0  # the most the request can cost (what it is charged when the engine counted nothing)
        self.held = 0  # tokens its tenant's budget reserved at admission: the bound, or 0 without a budget
        self.choices_per_prompt = 1
        self._running: dict[int, tuple[int, int]] = {}  # a stream's running (prompt, completion) by choice index
        # A version under rollout: told each outcome (failed, seconds); the engine refusing the adapter is a failure.
        self.outcome_sink: Callable[[bool, float], None] | None = None
        self.load_failed = False
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

    def trace(self, key: str, value: str | int) -> None:
        """An attribute of the request's span, when tracing is on."""
        if self.span is not None:
            self.span.set_attribute(key, value)

    def usage(self, usage: dict | None) -> None:
        """The engine's count for the whole request (a complete answer, or a stream's final usage event)."""
        if usage:
            self._final = (usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)

    def running(self, choice: int, usage: dict) -> None:
        """A stream event's running count of its choice (summed only when asked for: this runs for every event)."""
        self._running[choice] = (usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)

    @property
    def tokens(self) -> tuple[int, int] | None:
        """The engine's last count: its whole-request count, else the running counts summed (choices of one prompt
        share its prompt tokens); None until it reports one."""
        if self._final is not None or not self._running:
            return self._final
        prompts = {index // self.choices_per_prompt: prompt for index, (prompt, _) in self._running.items()}
        return sum(prompts.values()), sum(c for _, c in self._running.values())

    def charged(self, status: int) -> tuple[int, int]:
        """What the request costs its tenant: the engine's last count; the reservation when the engine reported
        none for a request it took on (200, or its caller left: vLLM counts nothing it aborts); else nothing."""
        tokens = self.tokens
        if tokens is not None:
            return max(tokens[0], 0), max(tokens[1], 0)
        return (self.bound, 0) if status in (200, 499) else (0, 0)

    def done(self, status: int) -> None:
        if self._finished:
            return
        self._finished = True
        tokens = self.charged(status)
        if self.tenant and self.usage_sink:  # first: what the request reserved is released whatever follows
            self.usage_sink(self.tenant, *tokens, self.held, int(status == 200 or any(tokens)))
        self.m.in_flight.labels(self.route).dec()
        elapsed = time.perf_counter() - self.start
        self.m.latency.labels(self.route, self.adapter).observe(elapsed)
        if self.outcome_sink is not None:
            self.outcome_sink(status >= 500 or self.load_failed, elapsed)
        self.m.requests.labels(self.route, self.adapter, str(status)).inc()
        self.m.prompt_tokens.labels(self.adapter).inc(tokens[0])
        self.m.completion_tokens.labels(self.adapter).inc(tokens[1])
        self._count_tenant(status, tokens)
        if self.span is not None:
            for key, value in (("http.response.status_code", status), ("loraplex.tenant", self.tenant or NO_TENANT),
                               ("gen_ai.usage.input_tokens", tokens[0]), ("gen_ai.usage.output_tokens", tokens[1])):
                self.span.set_attribute(key, value)
            self.span.end()

    def _count_tenant(self, status: int, tokens: tuple[int, int]) -> None:
        tenant = self.m.tenant_label(self.tenant) if self.tenant else NO_TENANT
        self.m.tenant_requests.labels(tenant, str(status)).inc()
        self.m.tenant_prompt_tokens.labels(tenant).inc(tokens[0])
        self.m.tenant_completion_tokens.labels(tenant).inc(tokens[1])
