"""loraplex's vLLM LoRA resolver: the engine fetches `name@version` from the registry itself, into its cache.

Loaded as a vLLM general plugin of its own (whatever LORAPLEX_LORA_OPS says). A request naming an adapter the engine
does not hold makes vLLM ask its resolvers; this one reads the version's manifest from the registry (directory or
object store, from the engine's LORAPLEX_* environment), hands vLLM a verified copy from the adapter cache, and
lets the cache drop adapters no running request uses once it is over its bound.
"""

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from .adapter_cache import AdapterCache
from .config import Settings
from .registry import InvalidReference, NotFound, open_registry, parse_ref

# Under vLLM's logger, whose handlers are the only ones an engine process has.
log = logging.getLogger("vllm.loraplex.resolver")
# Seconds an adapter stays in use after a request looked it up: the request reaches the engine well within it.
GRACE = 2.0
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
        self._trimmer: asyncio.Task | None = None

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
        if self._trimmer is None:
            self._trimmer = asyncio.create_task(self._trim_idle())
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))  # vLLM renumbers it

    async def _trim_idle(self) -> None:
        """Trims again every GRACE seconds: adapters kept because requests used them a moment ago go once idle,
        without waiting for the next new adapter."""
        while True:
            await asyncio.sleep(GRACE)
            try:
                self.cache.trim()
            except OSError:
                log.exception("trimming the adapter cache failed")

    def _in_use(self, entry: Path) -> bool:
        """Whether a request uses the adapter at `entry`: one running, or one that looked it up in the last GRACE
        seconds (between that lookup and reaching the engine a request is in no list, and a worker that then finds
        the files gone takes the whole engine down). One that is idle is unregistered, so its next request resolves
        (and fetches) it again instead of finding its files gone."""
        models = self.models
        if models is None:
            return True  # cannot tell yet: keep it
        names = {n for n, r in list(models.lora_requests.items()) if Path(r.lora_path) == entry}
        running = {s.lora_name for s in list(models.engine_client.output_processor.request_states.values())}
        recent = time.monotonic() - GRACE
        if names & running or any(models.lora_requests.used.get(n, 0.0) > recent for n in names):
            return True
        for name in names:
            models.lora_requests.pop(name, None)
        return False


class Lookups(dict):
    """vLLM's table of the adapters it holds, noting when each was last looked up (every request looks its adapter
    up by name), so the cache can tell an idle adapter from one a request is about to use."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.used: dict[str, float] = {}

    def __getitem__(self, name: str) -> Any:
        self.used[name] = time.monotonic()
        return super().__getitem__(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.used[name] = time.monotonic()
        super().__setitem__(name, value)


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
    models_init = serving.OpenAIServingModels.__init__

    def capture(models: Any, *args: Any, **kwargs: Any) -> None:
        models_init(models, *args, **kwargs)
        models.lora_requests = Lookups(models.lora_requests)
        resolver.models = models  # the cache asks it which adapters requests use

    serving.OpenAIServingModels.__init__ = capture
    LoRAResolverRegistry.register_resolver("loraplex", resolver)
    log.info("loraplex resolver: adapters from %s, cache %s", resolver.registry.root, resolver.cache.root)
