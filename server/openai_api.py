"""The OpenAI-compatible /v1 routes: resolve the adapter, lease it on an engine, forward, stream back."""

import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .engine import EngineError
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .registry import InvalidReference, NotFound, Version

if TYPE_CHECKING:
    from .app import Gateway

router = APIRouter(prefix="/v1")


def resolve_target(gw: "Gateway", body) -> Version | None:
    """The adapter version a request names in `adapter`, or else in `model`; None for the base model."""
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
    except NotFound as e:
        raise APIError(404, str(e), param=param, code="adapter_not_found") from None
    manifest = version.manifest
    if manifest.get("base_fingerprint") != gw.base.fingerprint:
        raise APIError(400, f"adapter {version.key} was registered for another base model "
                            f"({manifest.get('base_model')}); this server runs {gw.settings.base_model}",
                       param=param, code="adapter_incompatible")
    if manifest.get("rank", 0) > gw.settings.max_lora_rank:
        raise APIError(400, f"adapter {version.key} has rank {manifest['rank']}, above the engine's "
                            f"limit of {gw.settings.max_lora_rank}", param=param, code="adapter_incompatible")
    return version


async def forward(gw: "Gateway", body, path: str) -> Response:
    if not gw.ready:
        raise APIError(503, "the engine is not ready yet", type="server_error", code="engine_unavailable")
    version = resolve_target(gw, body)
    key = version.key if version else None
    payload = body.model_dump(exclude_unset=True, exclude={"adapter"})
    payload["model"] = key or gw.settings.model_name
    backend = gw.router.choose(key)
    engine = backend.engine
    stack = AsyncExitStack()
    backend.in_flight += 1
    stack.callback(lambda: setattr(backend, "in_flight", backend.in_flight - 1))
    try:
        if version is not None:
            await stack.enter_async_context(backend.residency.lease(key, str(version.path.resolve())))
        request = engine.client.build_request("POST", f"{engine.url}{path}", json=payload)
        upstream = await engine.client.send(request, stream=True)
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
            content = await upstream.aread()
        finally:
            await stack.aclose()
        return Response(content, status_code=upstream.status_code, headers=headers)
    return StreamingResponse(_relay(upstream, stack), status_code=200, headers=headers)


async def _relay(upstream: httpx.Response, stack: AsyncExitStack):
    """Passes engine chunks through as they come; the lease and upstream connection end with the stream."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        # A client disconnect cancels this generator; the shield lets the lease release and the upstream close,
        # and closing the upstream connection is what makes vLLM abort the request.
        with anyio.CancelScope(shield=True):
            await stack.aclose()


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await forward(request.app.state.gateway, body, "/v1/completions")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await forward(request.app.state.gateway, body, "/v1/chat/completions")


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    gw: Gateway = request.app.state.gateway
    base = gw.settings.model_name
    cards = [ModelCard(id=base, created=int(gw.started), owned_by="loraplex", root=gw.settings.base_model)]
    for name in gw.registry.names():
        try:
            aliases = gw.registry.aliases(name)
            latest = gw.registry.get(name, aliases["latest"]).manifest
        except NotFound:
            continue  # deleted while listing
        cards.append(ModelCard(
            id=name, created=int(latest.get("created", time.time())), owned_by=latest.get("tenant", "default"),
            root=name, parent=base, versions=gw.registry.versions(name), aliases=aliases,
        ))
    return ModelList(data=cards)
