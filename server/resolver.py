"""loraplex's vLLM LoRA resolver: the engine fetches `name@version` from the registry itself, into its cache.

Loaded as a vLLM general plugin of its own (whatever LORAPLEX_LORA_OPS says). A request naming an adapter the engine
does not hold makes vLLM ask its resolvers; this one reads the version's manifest from the registry (directory or
object store, from the engine's LORAPLEX_* environment), hands vLLM a verified copy from the adapter cache, and
lets the cache drop adapters no running request uses once it is over its bound.
"""

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from .adapter_cache import AdapterCache
from .config import Settings
from .registry import InvalidReference, NotFound, open_registry, parse_ref

log = logging.getLogger("loraplex.resolver")
# On the engine's own /metrics (vLLM serves prometheus_client's default registry), which the gateway proxies.
RESOLVES = Counter("loraplex_engine_adapter_resolves", "Adapter versions vLLM asked loraplex's resolver for, by "
                   "result: cached (a verified local copy), fetched (downloaded from the registry), missing.",
                   ["result"])
SERVING_MODELS = "vllm.entrypoints.openai.models.serving"


class RegistryResolver(LoRAResolver):
    """Resolves "name@VERSION" (the gateway always names the version) to a cached, verified local copy."""

    def __init__(self, settings: Settings):
        self.registry = open_registry(settings.registry)
        self.cache = AdapterCache(settings.adapter_cache, settings.adapter_cache_bytes, settings.max_resident_adapters,
                                  self._in_use)
        self.models: Any = None  # vLLM's OpenAIServingModels, once the API server has made it

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            ref = parse_ref(lora_name)
        except InvalidReference:
            return None
        if ref.version is None:
            return None
        try:
            version = await asyncio.to_thread(self.registry.get, ref.name, ref.version)
            path, fetched = await asyncio.to_thread(self.cache.path, version, self.registry)
        except NotFound:
            RESOLVES.labels("missing").inc()
            return None
        RESOLVES.labels("fetched" if fetched else "cached").inc()
        self.cache.trim(keep=path)
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))  # vLLM renumbers it

    def _in_use(self, entry: Path) -> bool:
        """Whether a running request uses the adapter at `entry`. One that is loaded but idle is unregistered, so
        its next request resolves (and fetches) it again instead of finding its files gone."""
        if self.models is None:
            return True  # cannot tell yet: keep it
        names = {n for n, r in list(self.models.lora_requests.items()) if Path(r.lora_path) == entry}
        running = {s.lora_name for s in list(self.models.engine_client.output_processor.request_states.values())}
        if names & running:
            return True
        for name in names:
            self.models.lora_requests.pop(name, None)
        return False


def register() -> None:
    """vLLM general-plugin hook. Resolvers act in the API server only, the one process that has imported its
    serving models by the time plugins load; EngineCore and the workers skip it."""
    serving = sys.modules.get(SERVING_MODELS)
    if serving is None:
        return
    resolver = RegistryResolver(Settings())
    models_init = serving.OpenAIServingModels.__init__

    def capture(models: Any, *args: Any, **kwargs: Any) -> None:
        models_init(models, *args, **kwargs)
        resolver.models = models  # the cache asks it which adapters running requests use

    serving.OpenAIServingModels.__init__ = capture
    LoRAResolverRegistry.register_resolver("loraplex", resolver)
    log.info("loraplex resolver: adapters from %s, cache %s", resolver.registry.root, resolver.cache.root)
