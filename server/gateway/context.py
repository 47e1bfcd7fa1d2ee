"""One /v1 request's state from admission to relay, carried in one object instead of a long parameter list."""

from dataclasses import dataclass, field

from fastapi import Request

from server.core.protocol import OpenAIRequest
from server.data.records import new_answer_id
from server.engine.routing import Backend
from server.gateway.relay import Tap, Usage
from server.observability.metrics import RequestTimer
from server.registry.view import Target


@dataclass
class RequestContext:
    """Who asked (the HTTP request, its tenant and key), what for (body and path), what the adapter reference
    resolved to (target: version and shadow), the engine chosen, the answer being noted and the timer that books it
    all."""

    body: OpenAIRequest
    path: str
    request: Request
    tenant: str | None
    timer: RequestTimer
    key_id: str | None = None
    target: Target | None = None
    backend: Backend | None = None
    answer: Tap | None = None  # the gateway's Answer (server/gateway/capture.py)
    # The answer's id (after "chatcmpl-"/"cmpl-"): the engine names its answer after it, never after the caller's.
    answer_id: str = field(default_factory=new_answer_id)

    @property
    def request_id(self) -> str:
        return self.request.state.request_id

    @property
    def named(self) -> str:
        """What the caller named: its adapter reference, a composition's version, or the model."""
        adapter = self.body.adapter
        if isinstance(adapter, list):
            return self.target.version.name if self.target else ""
        return adapter or self.body.model or ""

    @property
    def engine_model(self) -> str | None:
        """The name the engine serves the resolved version as; None for the base model."""
        return self.target.version.key if self.target else None

    @property
    def wants(self) -> Usage:
        """The usage events the caller asked for in a stream."""
        options = self.body.stream_options
        return Usage(final=bool(options and options.include_usage),
                     running=bool(options and options.include_usage and options.continuous_usage_stats))
