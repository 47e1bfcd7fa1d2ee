"""Operations routes: Prometheus metrics (the gateway's and each engine's), liveness and readiness."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.core.errors import APIError

router = APIRouter()
PROMETHEUS_TEXT = {200: {"content": {"text/plain": {}}}}


@router.get("/metrics", responses=PROMETHEUS_TEXT)
async def metrics(request: Request) -> Response:
    """Needs the admin or metrics token (checked by the Credentials middleware): series name every adapter."""
    state = request.app.state
    for b in state.router.backends:
        state.metrics.engine_up.labels(b.label).set(1 if b.up else 0)
    # Listing thousands of adapter folders takes tens of milliseconds: not on the event loop.
    state.metrics.registered.set(len(await asyncio.to_thread(state.registry.names)))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/engine/{index}", responses=PROMETHEUS_TEXT)
async def engine_metrics(index: int, request: Request) -> Response:
    """The engine's own vLLM metrics (KV cache, queue), so one scrape target reaches spawned engines too."""
    backends = request.app.state.router.backends
    if not 0 <= index < len(backends):
        raise APIError(404, f"no engine {index}", type="not_found_error", code="engine_not_found")
    status, text = await backends[index].engine.metrics()
    return Response(text, status_code=status, media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    engines = [b.up for b in state.router.backends]
    ok = any(engines)
    return JSONResponse({"ready": ok, "engines": engines, "auth": "keys" if state.access.keys.enabled() else "open"},
                        status_code=200 if ok else 503)
