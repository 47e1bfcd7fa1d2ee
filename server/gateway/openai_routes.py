"""The OpenAI-compatible /v1 routes; the request path itself is `Serving` (server/gateway/serving.py)."""

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.core.protocol import STREAM_OR_JSON, ChatCompletionRequest, CompletionRequest, ModelList
from server.gateway.auth import caller_tenant, v1_caller
from server.tenancy.keys import Caller
from server.gateway.model_cards import model_list

router = APIRouter(prefix="/v1")


@router.post("/completions", responses=STREAM_OR_JSON)
async def completions(body: CompletionRequest, request: Request,
                      caller: Caller | None = Depends(v1_caller)) -> Response:
    return await request.app.state.serving.forward(body, "/v1/completions", caller, request)


@router.post("/chat/completions", responses=STREAM_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           caller: Caller | None = Depends(v1_caller)) -> Response:
    return await request.app.state.serving.forward(body, "/v1/chat/completions", caller, request)


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)
async def models(request: Request, tenant: str | None = Depends(caller_tenant)) -> ModelList:
    """The base model and the adapters the caller may use, with only the versions and aliases it may use."""
    state = request.app.state
    # Reading thousands of manifests takes hundreds of milliseconds: not on the event loop.
    return await asyncio.to_thread(model_list, state.registry, state.settings.model_name, state.started, tenant)
