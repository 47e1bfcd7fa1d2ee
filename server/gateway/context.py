"""One /v1 request's state from admission to relay, carried in one object instead of a long parameter list."""

from dataclasses import dataclass

from fastapi import Request

from server.core.protocol import OpenAIRequest
from server.engine.routing import Backend
from server.gateway.relay import Usage
from server.observability.metrics import RequestTimer
from server.registry.view import Target


@dataclass
class RequestContext:
    """Who asked (the HTTP request and its tenant), what for (body and path), what the adapter reference resolved
    to (target: version and shadow), the engine chosen and the timer that books it all."""

    body: OpenAIRequest
    path: str
    request: Request
    tenant: str | None
    timer: RequestTimer
    target: Target | None = None
    backend: Backend | None = None

    @property
    def request_id(self) -> str:
        return self.request.state.request_id

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
