"""The OpenAI-compatible /v1 routes: resolve the adapter version, choose its engine, forward, stream back."""

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial
from typing import NamedTuple

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.tenancy.keys import bearer, caller_tenant, hash_key
from server.gateway.client_watch import ClientLeft, ClientWatch, client_left
from server.engine.client import EngineAnswer, Unreachable, refusal, too_large
from server.gateway.parts import Gateway
from server.observability.metrics import RequestTimer
from server.core.protocol import (
    STREAM_OR_JSON,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIRequest,
)
from server.registry.directory import LATEST, InvalidReference, NotFound, Version, parse_ref
from server.engine.routing import Backend

log = logging.getLogger("loraplex.api")

router = APIRouter(prefix="/v1")


def visible(manifest: dict, tenant: str | None) -> bool:
    return tenant is None or manifest.get("tenant") == tenant or bool(manifest.get("public"))


def sticky_key(caller: Request, body: OpenAIRequest) -> str | None:
    """What keeps a caller on one side of a canary: its API key (hashed) and the OpenAI `user` field; None (chance)
    when it sends neither."""
    token = bearer(caller)
    if token is None and body.user is None:
        return None
    return f"{hash_key(token) if token else ''}:{body.user or ''}"


def resolve_target(gw: Gateway, body: OpenAIRequest, tenant: str | None, sticky: str | None = None) -> Version | None:
    """The adapter version a request names in `adapter`, or else in `model`; None for the base model. An alias
    under a canary answers with the version `sticky` falls on.

    Another tenant's adapter is answered exactly like a missing one, after the same registry reads, so neither the
    answer nor its time tells that it exists."""
    if body.adapter:
        ref, param = body.adapter, "adapter"
    elif body.model and body.model != gw.settings.model_name:
        ref, param = body.model, "model"
    else:
        return None
    try:
        version = gw.registry.resolve(ref, sticky, tenant)
    except InvalidReference as e:
        if param == "adapter":
            raise APIError(400, str(e), param=param, code="invalid_adapter") from None
        raise APIError(404, f"model {ref!r} not found", param=param, code="model_not_found") from None
    except NotFound:
        raise APIError(404, f"adapter {ref!r} not found", param=param, code="adapter_not_found") from None
    manifest = version.manifest
    if manifest.get("base_fingerprint") != gw.base.fingerprint:
        raise APIError(400, f"adapter {version.key} was registered for another base model "
                            f"({manifest.get('base_model')}); this server runs {gw.settings.base_model}",
                       param=param, code="adapter_incompatible")
    if manifest.get("rank", 0) > gw.settings.max_lora_rank:
        raise APIError(400, f"adapter {version.key} has rank {manifest['rank']}, above the engine's "
                            f"limit of {gw.settings.max_lora_rank}", param=param, code="adapter_incompatible")
    return version


def check_budget(gw: Gateway, body: OpenAIRequest) -> None:
    """Refuses an output budget no request could use: more tokens than the model's whole context."""
    context = gw.settings.max_model_len or gw.base.context_len
    for param in ("max_tokens", "max_completion_tokens"):
        wanted = getattr(body, param, None)
        if context and wanted is not None and wanted > context:
            raise APIError(400, f"{param}: {wanted} is more than the model's context length of {context} tokens",
                           param=param, code="invalid_value")


def token_bound(gw: Gateway, body: OpenAIRequest, size: int) -> int:
    """The most tokens a request can cost: n completions of its output limit per prompt, plus the request's size in
    bytes, which bounds its prompts' tokens. Without a limit vLLM stops a completion at 16 tokens and a chat answer
    at the context's end."""
    if isinstance(body, ChatCompletionRequest):
        most = body.max_completion_tokens or body.max_tokens or gw.settings.max_model_len or gw.base.context_len or 0
        prompts = 1
    else:
        most = body.max_tokens or COMPLETION_DEFAULT_TOKENS
        prompts = len(body.prompt) if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else 1
    return (body.n or 1) * prompts * most + size


# vLLM's max_tokens for a /v1/completions request that sets none (OpenAI's default too).
COMPLETION_DEFAULT_TOKENS = 16


async def forward(gw: Gateway, body: OpenAIRequest, path: str, tenant: str | None, caller: Request) -> Response:
    """The request path: resolve the adapter, send it to an engine, relay the answer; the timer sees it all."""
    route = path.removeprefix("/v1/")
    timer = RequestTimer(gw.metrics, route, tenant=tenant, usage_sink=gw.usage.add,
                         span=gw.tracer.start(route) if gw.tracer else None)
    timer.trace("loraplex.request_id", caller.state.request_id)
    try:
        check_budget(gw, body)
        timer.bound = token_bound(gw, body, len(await caller.body()))
        timer.held = gw.usage.admit(tenant, timer.bound)
        timer.choices_per_prompt = body.n or 1
        version = resolve_target(gw, body, tenant, sticky_key(caller, body))
        timer.adapter = gw.metrics.adapter_label(version.name if version else None)
        if version:
            timer.trace("loraplex.adapter", version.name)
            timer.trace("loraplex.version", version.version)
            rollout = gw.rollouts.watch.get((version.name, version.version))
            if rollout is not None:  # both sides' series apart, as NAME@VERSION (within the same label cap)
                timer.adapter = gw.metrics.adapter_label(version.key)
                timer.outcome_sink = partial(gw.rollouts.observe, rollout, version.version)
        shadow = shadow_of(gw, body, version)
        response = await _send(gw, body, path, version, timer, tenant, caller)  # a stream calls timer.done at its end
        if shadow is not None and type(response) is Response:  # a complete answer, read whole
            gw.shadows.copy(shadow[0], path, _payload(gw, body, version), shadow[1], response.body,
                            caller.state.request_id)
        return response
    except BaseException as e:
        timer.done(e.status if isinstance(e, APIError) else 500)
        raise


def shadow_of(gw: Gateway, body: OpenAIRequest, version: Version | None) -> tuple[float, Version] | None:
    """(percent, version) when the request named an alias with a shadow other than the version serving it; streamed
    requests are not copied."""
    if body.stream or version is None:
        return None
    ref = parse_ref(body.adapter or body.model)  # resolve_target has parsed it once already
    if ref.version is not None:
        return None
    shadow = gw.registry.shadows(ref.name).get(ref.alias or LATEST)
    if shadow is None or shadow["version"] == version.version:
        return None
    try:
        return shadow["percent"], gw.registry.get(ref.name, shadow["version"])
    except NotFound:  # the shadow's version was deleted: nothing to copy to
        return None


class Usage(NamedTuple):
    """The usage events a streaming caller asked for: the final count, and a running count in every event."""

    final: bool
    running: bool


def _payload(gw: Gateway, body: OpenAIRequest, version: Version | None) -> dict:
    payload = body.model_dump(exclude_unset=True, exclude={"adapter"})
    payload["model"] = version.key if version else gw.settings.model_name
    if body.stream:
        # A stream is charged the engine's running count in each event, so that a caller who leaves pays what the
        # engine did until then; the counts the caller did not ask for are taken out again.
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True,
                                     "continuous_usage_stats": True}
    return payload


async def _send(gw: Gateway, body: OpenAIRequest, path: str, version: Version | None, timer: RequestTimer,
                tenant: str | None, caller: Request) -> Response:
    """Sends to the chosen engine; a request that could not reach it is sent once more, to another engine."""
    options = body.stream_options
    wants = Usage(final=bool(options and options.include_usage),
                  running=bool(options and options.include_usage and options.continuous_usage_stats))
    payload, tried = _payload(gw, body, version), ()
    while True:
        backend = gw.router.choose(version.key if version else None, exclude=tried)
        if backend is None:
            raise APIError(503, "no engine is ready", type="server_error", code="engine_unavailable")
        try:
            return await _attempt(gw, backend, path, payload, version, timer, tenant, caller, wants)
        except Unreachable as e:
            backend.unreachable()
            log.warning("engine %s unreachable (%s)%s", backend.engine.url, e, "" if tried else "; retrying")
            tried = (*tried, backend)
            if len(tried) > 1:
                raise APIError(503, "engine unavailable", type="server_error", code="engine_unavailable") from None


async def _attempt(gw: Gateway, backend: Backend, path: str, payload: dict, version: Version | None,
                   timer: RequestTimer, tenant: str | None, caller: Request, wants: Usage) -> Response:
    """One engine's try: admission and the upstream request; the stream takes them over. The engine fetches and
    loads the adapter version itself (its resolver) if it does not hold it."""
    async with AsyncExitStack() as stack:
        stack.enter_context(gw.admission.admit(tenant, backend))
        gw.metrics.engine_requests.labels(backend.label).inc()
        stream = bool(payload.get("stream"))
        timer.trace("loraplex.engine", backend.engine.url)
        context = gw.tracer.headers(timer.span) if gw.tracer and timer.span else {}
        # vLLM sends a non-streamed answer's headers only once it is complete, so the client is watched meanwhile.
        watch = ClientWatch(caller.receive)
        async with watch(leaving=client_left):
            upstream = await backend.engine.send(path, payload, caller.state.request_id, context)
            # Closing the upstream connection early is what makes vLLM abort the request.
            stack.push_async_callback(upstream.close)
            limit = gw.settings.max_response_bytes
            if upstream.status != 200:
                raise await _refusal(gw, backend, upstream, timer, version, limit)
            if upstream.length is not None and upstream.length > limit:
                raise too_large(limit)
            headers = {"content-type": upstream.content_type}
            if not stream and upstream.length is not None and upstream.length <= WHOLE_BYTES:
                content = await upstream.read(limit)  # a read that fails answers with its own status, not 200
                timer.usage(_usage(content))
                stack.callback(timer.done, 200)
                return Response(content, headers=headers)
        stack.callback(timer.done, 200)
        chunks = upstream.chunks()
        relay = _relay(chunks, timer, wants, limit) if stream else _relay_body(chunks, timer, limit)
        return EngineStream(relay, stack.pop_all(), watch, headers=headers)


async def _refusal(gw: Gateway, backend: Backend, upstream: EngineAnswer, timer: RequestTimer,
                   version: Version | None, limit: int) -> APIError:
    """The engine's refusal as the caller's error; a failure of the engine's own counts against it."""
    if upstream.status >= 500:
        backend.failed()
    error = refusal(upstream.status, await upstream.read(limit), version.key if version else None)
    if error.code == "adapter_load_failed":
        gw.metrics.load_failures.labels(timer.adapter).inc()
        timer.load_failed = True
    return error


class EngineStream(StreamingResponse):
    """An engine answer relayed as it arrives; it owns the request's admission and upstream connection until it
    ends.

    The request's ClientWatch ends it when the client leaves, in place of the task group and cancel scope that
    Starlette's StreamingResponse spends on every stream."""

    def __init__(self, content: AsyncIterator[bytes], stack: AsyncExitStack, watch: ClientWatch, headers: dict):
        super().__init__(content, status_code=200, headers=headers)
        self.stack, self.watch = stack, watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.watch():
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientLeft:
            pass  # nobody to send the rest to
        finally:
            # Also when the client went away, even before the first chunk: the admission is released and the upstream
            # connection closed, which is what makes vLLM abort the request. Nothing in the stack waits on I/O, so a
            # cancellation cannot cut it short.
            await self.stack.aclose()


def _event_too_large(limit: int) -> bytes:
    error = {"error": {"message": f"an engine event is larger than {limit} bytes (LORAPLEX_MAX_RESPONSE_BYTES)",
                       "type": "server_error", "param": None, "code": "response_too_large"}}
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"


async def _relay(chunks: AsyncIterator[bytes], timer: RequestTimer, wants: Usage,
                 limit: int) -> AsyncIterator[bytes]:
    """Passes engine events through as they come, timing them and reading their usage.

    Each byte is searched for the event boundary once, so a large event costs time in proportion to its size."""
    pending = bytearray()
    async for chunk in chunks:
        if not pending and chunk.endswith(b"\n\n"):
            complete = chunk[:-2]  # the usual case: whole events, nothing held back
        else:
            searched = max(len(pending) - 1, 0)
            pending += chunk
            end = pending.rfind(b"\n\n", searched)
            complete = bytes(pending[:end]) if end >= 0 else None
            if end >= 0:
                del pending[:end + 2]
        if complete is not None:
            out, fits = _events(complete.split(b"\n\n"), timer, wants, limit if len(complete) > limit else 0)
            if out:
                yield out
            if not fits:
                yield _event_too_large(limit)
                return
        if len(pending) > limit:
            yield _event_too_large(limit)
            return
    if pending:
        yield bytes(pending)


# An event's own usage: vLLM writes it after `choices`, where no other key is followed by an object (a completion's
# top_logprobs are keyed by token text, but their values are numbers, and quotes inside strings are escaped).
EVENT_USAGE = re.compile(rb',"usage":(\{(?:[^{}]|\{[^{}]*\})*\})')
CHOICE_INDEX = re.compile(rb'"choices":\[\{"index":(\d+)')


def _events(events: list[bytes], timer: RequestTimer, wants: Usage, limit: int) -> tuple[bytes, bool]:
    """The events to pass on, and whether all of them were within `limit` (0: known to be) and so passed on."""
    out = []
    for event in events:
        if limit and len(event) > limit:
            return b"".join(out), False
        if event.startswith(b"data: {"):
            found = EVENT_USAGE.search(event)
            if b'"choices":[]' in event:  # the final usage event
                if found:
                    timer.usage(json.loads(found[1]))
                if not wants.final:
                    continue
            else:
                timer.chunk()
                if found:
                    index = CHOICE_INDEX.search(event)
                    timer.running(int(index[1]) if index else 0, json.loads(found[1]))
                    if not wants.running:
                        event = event[:found.start()] + event[found.end():]
        out.append(event + b"\n\n")
    return b"".join(out), True


USAGE_KEY = b'"usage":'
USAGE_BYTES = 1024
# A non-streamed answer up to this size is read whole and sent as one response: streaming it through costs a task
# group and a generator per request. Larger ones (logprobs of long answers) stream, so memory stays bounded.
WHOLE_BYTES = 1 << 20


async def _relay_body(chunks: AsyncIterator[bytes], timer: RequestTimer, limit: int) -> AsyncIterator[bytes]:
    """Passes a large non-streamed answer through as it comes, noting its usage without holding the document."""
    size, tail = 0, UsageTail()
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            log.warning("engine answer over %d bytes cut short (LORAPLEX_MAX_RESPONSE_BYTES)", limit)
            return  # the headers are out: the client sees the answer end early
        tail.feed(chunk)
        yield chunk
    timer.usage(tail.usage())


class UsageTail:
    """The answer's own usage from a document read in chunks. Logprobs are keyed by token text, so `"usage":` also
    appears inside `choices` (a token spelled "usage"); vLLM writes the answer's `usage` after `choices`, and no later
    field has such a key, so the last occurrence is the answer's."""

    def __init__(self) -> None:
        self.found, self.edge = b"", b""  # the text from the last key so far; the end of the chunk before

    def feed(self, chunk: bytes) -> None:
        joined = self.edge + chunk  # a key cut by the chunks' boundary is whole here
        at = joined.rfind(USAGE_KEY)
        if at >= 0:
            self.found = joined[at:at + USAGE_BYTES]
        elif self.found:
            self.found += chunk[:USAGE_BYTES - len(self.found)]
        self.edge = joined[-(len(USAGE_KEY) - 1):]

    def usage(self) -> dict | None:
        try:
            usage, _ = json.JSONDecoder().raw_decode(self.found[len(USAGE_KEY):].decode(errors="replace").lstrip())
        except ValueError:
            return None
        return usage if isinstance(usage, dict) else None


def _usage(content: bytes) -> dict | None:
    """The usage object of a whole non-streamed answer, from the parsed document."""
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


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
    # Reading thousands of manifests takes hundreds of milliseconds: not on the event loop.
    return await asyncio.to_thread(_model_list, gw, tenant)


def _model_list(gw: Gateway, tenant: str | None) -> ModelList:
    base = gw.settings.model_name
    cards = [ModelCard(id=base, created=int(gw.started), owned_by="loraplex", root=base)]
    for name in gw.registry.names():
        try:
            manifests = {v: gw.registry.get(name, v).manifest for v in gw.registry.versions(name)}
            aliases, canaries = gw.registry.alias_table(name)
        except NotFound:
            continue  # deleted while listing
        usable = {v: m for v, m in manifests.items() if visible(m, tenant)}
        if not usable:
            continue
        newest = usable[max(usable)]
        # A public adapter is listed to every tenant, but its owner only to the owner itself.
        owner = newest["tenant"] if tenant in (None, newest["tenant"]) else "loraplex"
        cards.append(ModelCard(
            id=name, created=int(newest["created"]), owned_by=owner, root=name, parent=base,
            versions=sorted(usable), aliases={a: v for a, v in aliases.items() if v in usable},
            canaries={a: c for a, c in canaries.items() if c["version"] in usable and aliases.get(a) in usable} or None,
        ))
    return ModelList(data=cards)
