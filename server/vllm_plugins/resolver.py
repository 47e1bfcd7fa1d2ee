"""loraplex's vLLM LoRA resolver: the engine fetches `name@version` from the registry itself, into its cache.

Loaded as a vLLM general plugin of its own (whatever LORAPLEX_LORA_OPS says). A request naming an adapter the engine
does not hold makes vLLM ask its resolvers; this one reads the version's manifest from the registry (directory or
object store, from the engine's LORAPLEX_* environment) and hands vLLM a verified copy from the adapter cache. What
the engine keeps, and when cached files may go, is decided by one owner, `server/vllm_plugins/residency.py`; the hooks below are
how it learns of vLLM's table, its loads and its requests.
"""

import asyncio
import importlib
import logging
import sys
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

from prometheus_client import Counter
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from server.core.config import Settings
from server.registry import InvalidReference, NotFound, open_registry, parse_ref
from server.vllm_plugins.adapter_cache import AdapterCache
from server.vllm_plugins.residency import Residency

# Under vLLM's logger, whose handlers are the only ones an engine process has.
log = logging.getLogger("vllm.loraplex.resolver")
# On the engine's own /metrics (vLLM serves prometheus_client's default registry), which the gateway proxies.
RESOLVES = Counter("loraplex_engine_adapter_resolves", "Adapter versions vLLM asked loraplex's resolver for, by "
                   "result: cached (a verified local copy), fetched (downloaded from the registry), missing.",
                   ["result"])
SERVING_MODELS = "vllm.entrypoints.openai.models.serving"
# vLLM's request handlers that run a model: each holds its adapter's name from its model check until it ends.
HANDLERS = (("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", "create_chat_completion"),
            ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", "create_completion"))


class RegistryResolver(LoRAResolver):
    """Resolves "name@VERSION" (the gateway always names the version) to a cached, verified local copy."""

    def __init__(self, settings: Settings):
        self.registry = open_registry(settings.registry)
        cache = AdapterCache(settings.adapter_cache, settings.adapter_cache_bytes, settings.max_resident_adapters)
        self.residency = Residency(cache, settings.max_resident_adapters)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            ref = parse_ref(lora_name)
        except InvalidReference:
            return None
        if ref.version is None:
            return None
        try:
            version = await asyncio.to_thread(self.registry.get, ref.name, ref.version)
            path, fetched = await self.residency.hand_out(version, self.registry)
        except NotFound:
            RESOLVES.labels("missing").inc()
            return None
        RESOLVES.labels("fetched" if fetched else "cached").inc()
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))  # vLLM renumbers it


def pinned(residency: Residency, handler: Callable) -> Callable:
    """Wraps a vLLM request handler so that the adapter it names is held from before vLLM looks it up until the
    answer (or its stream) ends."""

    async def handle(serving: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        release = _once(residency.pin(getattr(request, "model", None)))
        try:
            result = await handler(serving, request, *args, **kwargs)
        except BaseException:
            release()
            raise
        if isinstance(result, AsyncGenerator):
            stream = _releasing(result, release)
            weakref.finalize(stream, release)  # a stream dropped before its first chunk never runs its finally
            return stream
        release()
        return result

    return handle


async def _releasing(stream: AsyncGenerator, release: Callable[[], None]) -> AsyncGenerator:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        try:
            await stream.aclose()  # vLLM aborts the engine's request here, before the adapter is released
        finally:
            release()


def _once(release: Callable[[], None]) -> Callable[[], None]:
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            release()

    return once


def register() -> None:
    """vLLM general-plugin hook. Resolvers act in the API server only, the one process that has imported its
    serving models by the time plugins load; EngineCore and the workers skip it, as does a vLLM that loraplex did
    not start."""
    serving = sys.modules.get(SERVING_MODELS)
    settings = Settings()
    # Engines loraplex starts always name their cache; any other vLLM in this environment is left alone.
    if serving is None or settings.adapter_cache is None:
        return
    resolver = RegistryResolver(settings)
    install(serving.OpenAIServingModels, resolver.residency)
    install_handlers(resolver.residency)
    LoRAResolverRegistry.register_resolver("loraplex", resolver)
    log.info("loraplex resolver: adapters from %s, cache %s", resolver.registry.root,
             resolver.residency.cache.root)


def install(models_class: type, residency: Residency) -> None:
    """Hooks `residency` into vLLM's serving models: its table of adapters and its resolve."""
    models_init = models_class.__init__

    def capture(models: Any, *args: Any, **kwargs: Any) -> None:
        models_init(models, *args, **kwargs)
        residency.attach(models)

    models_class.__init__ = capture
    models_class.resolve_lora = residency.resolving(models_class.resolve_lora)


def install_handlers(residency: Residency) -> None:
    for module, cls, method in HANDLERS:
        handler_class = getattr(importlib.import_module(module), cls)
        setattr(handler_class, method, pinned(residency, getattr(handler_class, method)))
