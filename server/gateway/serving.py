"""The /v1 request path: admit, resolve the adapter version, choose its engine, send, relay; the timer sees it all."""

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial

from fastapi import Request
from fastapi.responses import Response

from server.core.base_model import BaseModelInfo
from server.core.config import Settings
from server.core.errors import APIError
from server.core.protocol import ChatCompletionRequest, OpenAIRequest
from server.engine.client import EngineAnswer, Unreachable, refusal, too_large
from server.engine.routing import Router
from server.gateway.auth import bearer
from server.gateway.capture import Capture
from server.gateway.client_watch import ClientWatch, client_left
from server.gateway.compositions import Caller as Composer
from server.gateway.compositions import Compositions
from server.gateway.context import RequestContext
from server.gateway.errors import registry_error
from server.gateway.relay import WHOLE_BYTES, EngineStream, WholeAnswer, relay_body, relay_events, whole_usage
from server.observability.metrics import Metrics, RequestTimer
from server.observability.tracing import Tracer
from server.registry import InvalidReference, NotFound, Unavailable
from server.registry.view import RegistryView, Target
from server.rollout.rollouts import Rollouts
from server.rollout.shadow import Shadows
from server.tenancy.admission import Admission
from server.tenancy.keys import Caller, hash_key
from server.tenancy.usage import UsageLedger

log = logging.getLogger("loraplex.api")

# vLLM's max_tokens for a /v1/completions request that sets none (OpenAI's default too).
COMPLETION_DEFAULT_TOKENS = 16


@dataclass(kw_only=True)
class Serving:
    """The parts a /v1 request passes through."""

    settings: Settings
    base: BaseModelInfo
    view: RegistryView
    router: Router
    admission: Admission
    usage: UsageLedger
    metrics: Metrics
    tracer: Tracer | None
    rollouts: Rollouts
    shadows: Shadows
    compositions: Compositions
    capture: Capture

    async def forward(self, body: OpenAIRequest, path: str, caller: Caller | None, request: Request) -> Response:
        """Admits the request against its tenant's budget, resolves its adapter, sends it and relays the answer."""
        route = path.removeprefix("/v1/")
        tenant = caller.tenant if caller else None
        timer = RequestTimer(self.metrics, route, tenant=tenant, usage_sink=self.usage.add,
                             span=self.tracer.start(route) if self.tracer else None)
        ctx = RequestContext(body=body, path=path, request=request, tenant=tenant, timer=timer,
                             key_id=caller.key_id if caller else None)
        timer.trace("loraplex.request_id", ctx.request_id)
        request.state.answer_id = ctx.answer_id
        try:
            check_budget(self, body)
            raw = await request.body()
            timer.bound = token_bound(self, body, len(raw))
            timer.held = self.usage.admit(tenant, timer.bound)
            timer.choices_per_prompt = body.n or 1
            ctx.target = await self.resolve(ctx)
            ctx.answer = self.capture.begin(ctx, raw)
            self._label(ctx)
            response = await self.send(ctx)  # a stream calls timer.done at its end
            self._copy_to_shadow(ctx, response)
            return response
        except BaseException as e:
            timer.done(e.status if isinstance(e, APIError) else 500)
            raise

    async def resolve(self, ctx: RequestContext) -> Target | None:
        """The adapter version the request names in `adapter`, or else in `model`; None for the base model. One call
        to the registry view, which parses the reference once and answers with the version and its shadow."""
        body = ctx.body
        if body.adapter:
            ref, param = body.adapter, "adapter"
        elif body.model and body.model != self.settings.model_name:
            ref, param = body.model, "model"
        else:
            return None
        try:
            if isinstance(ref, list):
                target = await self.compositions.resolve(ref, Composer(ctx.tenant, ctx.key_id,
                                                                       sticky_key(ctx.request, body)))
            else:
                target = await self.view.resolve(ref, sticky_key(ctx.request, body), ctx.tenant)
        except InvalidReference as e:
            if param == "adapter":
                raise APIError(400, str(e), param=param, code="invalid_adapter") from None
            raise APIError(404, f"model {ref!r} not found", param=param, code="model_not_found") from None
        except NotFound as e:
            if isinstance(ref, list):  # a recipe's NotFound names its missing source, and where it is
                raise APIError(404, f"adapter {str(e)!r} not found", param=e.param, code="adapter_not_found") from None
            raise APIError(404, f"adapter {ref!r} not found", param=param, code="adapter_not_found") from None
        except Unavailable as e:
            raise registry_error(e) from None
        check_compatible(self, target, param)
        return target

    def _label(self, ctx: RequestContext) -> None:
        """Names the request's adapter in metrics and traces; a version under rollout is told its outcome."""
        version = ctx.target.version if ctx.target else None
        ctx.timer.adapter = self.metrics.adapter_label(version.name if version else None)
        if version is None:
            return
        ctx.timer.trace("loraplex.adapter", version.name)
        ctx.timer.trace("loraplex.version", version.version)
        rollout = self.rollouts.watch.get((version.name, version.version))
        if rollout is not None:  # both sides' series apart, as NAME@VERSION (within the same label cap)
            ctx.timer.adapter = self.metrics.adapter_label(version.key)
            ctx.timer.outcome_sink = partial(self.rollouts.observe, rollout, version.version)

    def _copy_to_shadow(self, ctx: RequestContext, response: Response) -> None:
        """Sends a copy to the alias's shadow version: only a complete answer, read whole, is compared."""
        shadow = ctx.target.shadow if ctx.target else None
        if shadow is not None and isinstance(response, WholeAnswer):
            self.shadows.copy(shadow[0], ctx.path, payload(self, ctx), shadow[1], response.body, ctx.request_id)

    async def send(self, ctx: RequestContext) -> Response:
        """Sends to the chosen engine; a request that could not reach it is sent once more, to another engine."""
        body, tried = payload(self, ctx), ()
        while True:
            ctx.backend = self.router.choose(ctx.engine_model, exclude=tried)
            if ctx.backend is None:
                raise APIError(503, "no engine is ready", type="server_error", code="engine_unavailable")
            try:
                return await self.attempt(ctx, body)
            except Unreachable as e:
                ctx.backend.unreachable()
                log.warning("engine %s unreachable (%s)%s", ctx.backend.engine.url, e, "" if tried else "; retrying")
                tried = (*tried, ctx.backend)
                if len(tried) > 1:
                    raise APIError(503, "engine unavailable", type="server_error", code="engine_unavailable") from None

    async def attempt(self, ctx: RequestContext, body: dict) -> Response:
        """One engine's try: admission and the upstream request; the stream takes them over. The engine fetches and
        loads the adapter version itself (its resolver) if it does not hold it."""
        backend, timer = ctx.backend, ctx.timer
        async with AsyncExitStack() as stack:
            stack.enter_context(self.admission.admit(ctx.tenant, backend))
            self.metrics.engine_requests.labels(backend.label).inc()
            timer.trace("loraplex.engine", backend.engine.url)
            context = self.tracer.headers(timer.span) if self.tracer and timer.span else {}
            # vLLM sends a non-streamed answer's headers only once it is complete, so the client is watched meanwhile.
            watch = ClientWatch(ctx.request.receive)
            async with watch(leaving=client_left):
                upstream = await backend.engine.send(ctx.path, body, ctx.answer_id, context)
                # Closing the upstream connection early is what makes vLLM abort the request.
                stack.push_async_callback(upstream.close)
                limit = self.settings.max_response_bytes
                if upstream.status != 200:
                    raise await self.refused(ctx, upstream, limit)
                if upstream.length is not None and upstream.length > limit:
                    raise too_large(limit)
                headers = {"content-type": upstream.content_type}
                if not ctx.body.stream and upstream.length is not None and upstream.length <= WHOLE_BYTES:
                    content = await upstream.read(limit)  # a read that fails answers with its own status, not 200
                    timer.usage(whole_usage(content))
                    ctx.answer.whole(content)
                    stack.callback(ctx.answer.finish)
                    stack.callback(timer.done, 200)
                    return WholeAnswer(content, stack.pop_all(), headers=headers)
            stack.callback(ctx.answer.finish)
            stack.callback(timer.done, 200)
            chunks = upstream.chunks()
            relay = (relay_events(chunks, timer, ctx.wants, limit, ctx.answer) if ctx.body.stream
                     else relay_body(chunks, timer, limit, ctx.answer))
            return EngineStream(relay, stack.pop_all(), watch, headers=headers)

    async def refused(self, ctx: RequestContext, upstream: EngineAnswer, limit: int) -> APIError:
        """The engine's refusal as the caller's error; a failure of the engine's own counts against it."""
        if upstream.status >= 500:
            ctx.backend.failed()
        error = refusal(upstream.status, await upstream.read(limit), ctx.engine_model)
        if error.code == "adapter_load_failed":
            self.metrics.load_failures.labels(ctx.timer.adapter).inc()
            ctx.timer.load_failed = True
        return error


def sticky_key(request: Request, body: OpenAIRequest) -> str | None:
    """What keeps a caller on one side of a canary: its API key (hashed) and the OpenAI `user` field; None (chance)
    when it sends neither."""
    token = bearer(request.scope)
    if token is None and body.user is None:
        return None
    return f"{hash_key(token) if token else ''}:{body.user or ''}"


def check_compatible(serving: Serving, target: Target, param: str) -> None:
    """Refuses a version registered for another base model, or of a rank above the engine's limit."""
    version, settings = target.version, serving.settings
    manifest = version.manifest
    if manifest.get("base_fingerprint") != serving.base.fingerprint:
        raise APIError(400, f"adapter {version.key} was registered for another base model "
                            f"({manifest.get('base_model')}); this server runs {settings.base_model}",
                       param=param, code="adapter_incompatible")
    if manifest.get("rank", 0) > settings.max_lora_rank:
        raise APIError(400, f"adapter {version.key} has rank {manifest['rank']}, above the engine's "
                            f"limit of {settings.max_lora_rank}", param=param, code="adapter_incompatible")


def check_budget(serving: Serving, body: OpenAIRequest) -> None:
    """Refuses an output budget no request could use: more tokens than the model's whole context."""
    context = serving.settings.max_model_len or serving.base.context_len
    for param in ("max_tokens", "max_completion_tokens"):
        wanted = getattr(body, param, None)
        if context and wanted is not None and wanted > context:
            raise APIError(400, f"{param}: {wanted} is more than the model's context length of {context} tokens",
                           param=param, code="invalid_value")


def token_bound(serving: Serving, body: OpenAIRequest, size: int) -> int:
    """The most tokens a request can cost: n completions of its output limit per prompt, plus the request's size in
    bytes, which bounds its prompts' tokens. Without a limit vLLM stops a completion at 16 tokens and a chat answer
    at the context's end."""
    if isinstance(body, ChatCompletionRequest):
        most = (body.max_completion_tokens or body.max_tokens or serving.settings.max_model_len
                or serving.base.context_len or 0)
        prompts = 1
    else:
        most = body.max_tokens or COMPLETION_DEFAULT_TOKENS
        prompts = len(body.prompt) if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else 1
    return (body.n or 1) * prompts * most + size


def payload(serving: Serving, ctx: RequestContext) -> dict:
    """The body sent to the engine: the caller's, less what is the gateway's (`adapter`, `store`, `metadata`), naming
    the resolved version as the model."""
    body = ctx.body.model_dump(exclude_unset=True, exclude={"adapter", "store", "metadata"})
    body["model"] = ctx.engine_model or serving.settings.model_name
    if ctx.body.stream:
        # A stream is charged the engine's running count in each event, so that a caller who leaves pays what the
        # engine did until then; the counts the caller did not ask for are taken out again.
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True,
                                  "continuous_usage_stats": True}
    return body
