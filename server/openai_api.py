"""The OpenAI-compatible /v1 routes: resolve the adapter, lease it on an engine, forward, stream back."""

import asyncio
import json
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from .auth import caller_tenant
from .engine import EngineError
from .metrics import RequestTimer
from .protocol import (
    STREAM_OR_JSON,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_response,
)
from .registry import InvalidReference, NotFound, Version

if TYPE_CHECKING:
    from .app import Gateway

router = APIRouter(prefix="/v1")


def visible(manifest: dict, tenant: str | None) -> bool:
    return tenant is None or manifest.get("tenant") == tenant or bool(manifest.get("public"))


def resolve_target(gw: "Gateway", body, tenant: str | None) -> Version | None:
    """The adapter version a request names in `adapter`, or else in `model`; None for the base model.

    Another tenant's adapter is answered exactly like a missing one, so its existence does not leak."""
    if body.adapter:
        ref, param = body.adapter, "adapter"
    elif body.model and body.model != gw.settings.model_name:
        ref, param = body.model, "model"
    else:
        return None
    try:
        version = gw.registry.resolve(ref)
    except InvalidReference as e:
        if param == "adapter":
            raise APIError(400, str(e), param=param, code="invalid_adapter") from None
        raise APIError(404, f"model {ref!r} not found", param=param, code="model_not_found") from None
    except NotFound:
        version = None
    if version is None or not visible(version.manifest, tenant):
        raise APIError(404, f"adapter {ref!r} not found", param=param, code="adapter_not_found")
    manifest = version.manifest
    if manifest.get("base_fingerprint") != gw.base.fingerprint:
        raise APIError(400, f"adapter {version.key} was registered for another base model "
                            f"({manifest.get('base_model')}); this server runs {gw.settings.base_model}",
                       param=param, code="adapter_incompatible")
    if manifest.get("rank", 0) > gw.settings.max_lora_rank:
        raise APIError(400, f"adapter {version.key} has rank {manifest['rank']}, above the engine's "
                            f"limit of {gw.settings.max_lora_rank}", param=param, code="adapter_incompatible")
    return version


def check_budget(gw: "Gateway", body) -> None:
    """Refuses an output budget no request could use: more tokens than the model's whole context."""
    context = gw.settings.max_model_len or gw.base.context_len
    for param in ("max_tokens", "max_completion_tokens"):
        wanted = getattr(body, param, None)
        if context and wanted is not None and wanted > context:
            raise APIError(400, f"{param}: {wanted} is more than the model's context length of {context} tokens",
                           param=param, code="invalid_value")


async def forward(gw: "Gateway", body, path: str, tenant: str | None, request: Request) -> Response:
    route = path.removeprefix("/v1/")
    gw.metrics.in_flight.labels(route).inc()
    timer = None
    try:
        check_budget(gw, body)
        version = resolve_target(gw, body, tenant)
        timer = RequestTimer(gw.metrics, route, gw.metrics.adapter_label(version.name if version else None))
        response = await _send(gw, body, path, version, timer, tenant, request)
    except BaseException as e:
        gw.metrics.in_flight.labels(route).dec()
        (timer or RequestTimer(gw.metrics, route, "(unresolved)")).done(e.status if isinstance(e, APIError) else 500)
        raise
    if not isinstance(response, StreamingResponse):
        gw.metrics.in_flight.labels(route).dec()
        timer.done(response.status_code)
    return response


async def _send(gw: "Gateway", body, path: str, version: Version | None, timer: RequestTimer,
                tenant: str | None, client: Request) -> Response:
    key = version.key if version else None
    payload = body.model_dump(exclude_unset=True, exclude={"adapter"})
    payload["model"] = key or gw.settings.model_name
    client_wants_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    if body.stream:
        # Token counts for metrics come from the engine's usage chunk, which is dropped again if not asked for.
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    backend = gw.router.choose(key)
    if backend is None:
        raise APIError(503, "no engine is ready", type="server_error", code="engine_unavailable")
    engine = backend.engine
    stack = AsyncExitStack()
    stack.enter_context(gw.admission.admit(tenant, backend))
    try:
        if version is not None:
            await stack.enter_async_context(backend.residency.lease(key, str(version.path)))
        request = engine.client.build_request("POST", f"{engine.url}{path}", json=payload)
        # vLLM sends a non-streamed answer's headers only once it is complete, so watch the client meanwhile.
        upstream = await _unless_client_leaves(engine.client.send(request, stream=True), client)
        stack.push_async_callback(upstream.aclose)
    except EngineError as e:
        await stack.aclose()
        raise APIError(502 if e.status >= 500 else 400, f"loading adapter {key} failed: {e.message}",
                       type="server_error" if e.status >= 500 else "invalid_request_error",
                       code="adapter_load_failed") from None
    except httpx.TransportError as e:
        await stack.aclose()
        raise APIError(503, f"engine unavailable: {type(e).__name__}", type="server_error",
                       code="engine_unavailable") from None
    except BaseException:
        await stack.aclose()
        raise
    headers = {"content-type": upstream.headers.get("content-type", "application/json")}
    if not body.stream or upstream.status_code != 200:
        try:
            content = await _unless_client_leaves(upstream.aread(), client)
        finally:
            await stack.aclose()  # closing the upstream connection early is what makes vLLM abort the request
        if upstream.status_code != 200:
            return engine_error(upstream.status_code, content)
        timer.usage(json.loads(content).get("usage"))
        return Response(content, status_code=upstream.status_code, headers=headers)
    stack.callback(lambda: (gw.metrics.in_flight.labels(timer.route).dec(), timer.done(200)))
    return EngineStream(_relay(upstream, timer, client_wants_usage), stack, headers=headers)


def engine_error(status: int, content: bytes) -> Response:
    """The engine's refusal in OpenAI's error shape (vLLM's own has an integer code and exception names as type)."""
    try:
        error = json.loads(content)["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = content.decode(errors="replace")[:500] or f"engine answered {status}", None
    if status >= 500:
        return error_response(502, f"engine failed: {message}", type="server_error", code="engine_error")
    return error_response(status, message, param=param if isinstance(param, str) else None, code="engine_rejected")


async def _unless_client_leaves(awaitable, client: Request):
    """Awaits an engine call, abandoning it if the client disconnects first (FastAPI would not notice)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await client.is_disconnected():
                raise APIError(499, "client closed the request", code="client_closed_request")
        return task.result()
    finally:
        task.cancel()


class EngineStream(StreamingResponse):
    """A stream from the engine that owns the request's lease and upstream connection until it ends."""

    def __init__(self, content, stack: AsyncExitStack, headers: dict):
        super().__init__(content, status_code=200, headers=headers)
        self.stack = stack

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Also when the client went away, even before the first chunk: the shield lets the lease release and
            # the upstream connection close, and closing that connection is what makes vLLM abort the request.
            with anyio.CancelScope(shield=True):
                await self.stack.aclose()


async def _relay(upstream: httpx.Response, timer: RequestTimer, keep_usage: bool):
    """Passes engine events through one by one as they come, timing them and reading the usage event."""
    pending = b""
    async for chunk in upstream.aiter_raw():
        pending += chunk
        *events, pending = pending.split(b"\n\n")
        out = []
        for event in events:
            if event.startswith(b"data: {"):
                if b'"usage":{' in event and b'"choices":[]' in event:
                    timer.usage(json.loads(event[6:]).get("usage"))
                    if not keep_usage:
                        continue
                else:
                    timer.chunk()
            out.append(event + b"\n\n")
        if out:
            yield b"".join(out)
    if pending:
        yield pending


@router.post("/completions", responses=STREAM_OR_JSON)
async def completions(body: CompletionRequest, request: Request,
                      tenant: str | None = Depends(caller_tenant)) -> Response:
    return await forward(request.app.state.gateway, body, "/v1/completions", tenant, request)


@router.post("/chat/completions", responses=STREAM_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           tenant: str | None = Depends(caller_tenant)) -> Response:
    return await forward(request.app.state.gateway, body, "/v1/chat/completions", tenant, request)


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)
async def models(request: Request, tenant: str | None = Depends(caller_tenant)) -> ModelList:
    """The base model and the adapters the caller may use, with only the versions and aliases it may use."""
    gw: Gateway = request.app.state.gateway
    base = gw.settings.model_name
    cards = [ModelCard(id=base, created=int(gw.started), owned_by="loraplex", root=gw.settings.base_model)]
    for name in gw.registry.names():
        try:
            manifests = {v: gw.registry.get(name, v).manifest for v in gw.registry.versions(name)}
            aliases = gw.registry.aliases(name)
        except NotFound:
            continue  # deleted while listing
        usable = {v: m for v, m in manifests.items() if visible(m, tenant)}
        if not usable:
            continue
        newest = usable[max(usable)]
        cards.append(ModelCard(
            id=name, created=int(newest["created"]), owned_by=newest["tenant"], root=name, parent=base,
            versions=sorted(usable), aliases={a: v for a, v in aliases.items() if v in usable},
        ))
    return ModelList(data=cards)
