"""loraplex's vLLM LoRA resolver: the engine fetches `name@version` from the registry itself, into its cache.

Loaded as a vLLM general plugin of its own (whatever LORAPLEX_LORA_OPS says). A request naming an adapter the engine
does not hold makes vLLM ask its resolvers; this one reads the version's manifest from the registry (directory or
object store, from the engine's LORAPLEX_* environment) and hands vLLM a verified copy from the adapter cache. It
keeps the engine's list of adapters within MAX_RESIDENT_ADAPTERS by dropping versions no request uses, and the cache
never deletes the files of a version the engine still holds.
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
# Seconds a path handed to vLLM stays in use until vLLM lists it: vLLM loads an adapter into the workers before it
# lists it, and a worker whose CPU cache later drops the adapter reloads it from these files.
HANDED_OUT = 120.0
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
        self.max_resident = settings.max_resident_adapters
        self.models: Any = None  # vLLM's OpenAIServingModels, once the API server has made it
        self._trimmer: asyncio.Task | None = None
        self._handed: dict[Path, float] = {}  # paths returned to vLLM and not yet seen in its list

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
        self._handed[path] = time.monotonic()
        self._trim(keep=path)
        if self._trimmer is None:
            self._trimmer = asyncio.create_task(self._trim_idle())
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))  # vLLM renumbers it

    async def _trim_idle(self) -> None:
        """Trims again every GRACE seconds: adapters kept because requests used them a moment ago go once idle,
        without waiting for the next new adapter."""
        while True:
            await asyncio.sleep(GRACE)
            try:
                self._trim()
            except OSError:
                log.exception("trimming the adapter cache failed")

    def _trim(self, keep: Path | None = None) -> None:
        self._forget_idle()
        self.cache.trim(keep)

    def _forget_idle(self) -> None:
        """Past MAX_RESIDENT_ADAPTERS, unregisters the versions least recently looked up that no request uses: one
        running, or one that looked it up in the last GRACE seconds (between that lookup and reaching the engine a
        request is in no list). Their next request resolves them again."""
        models = self.models
        if models is None:
            return
        table = models.lora_requests
        excess = len(table) - self.max_resident
        if excess <= 0:
            return
        running = {s.lora_name for s in list(models.engine_client.output_processor.request_states.values())}
        recent = time.monotonic() - GRACE
        idle = sorted((table.used.get(n, 0.0), n) for n in list(table)
                      if n not in running and table.used.get(n, 0.0) <= recent)
        for _, name in idle[:excess]:
            table.pop(name, None)

    def _in_use(self, entry: Path) -> bool:
        """Whether the engine holds, or is loading, an adapter whose files are at `entry`: a worker that then finds
        them gone takes the whole engine down (seen in the e2e run when a trim fell between vLLM's load and its
        listing of the adapter)."""
        if self.models is None:
            return True  # cannot tell yet: keep it
        if any(Path(r.lora_path) == entry for r in list(self.models.lora_requests.values())):
            self._handed.pop(entry, None)
            return True
        handed = self._handed.get(entry)
        if handed is not None and time.monotonic() - handed >= HANDED_OUT:
            del self._handed[entry]  # vLLM never listed it: its load failed
            return False
        return handed is not None


class Lookups(dict):
    """vLLM's table of the adapters it holds, noting when each was last looked up (every request looks its adapter
    up by name), so the cache can tell an idle adapter from one a request is about to use."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.used: dict[str, float] = {}

    def __contains__(self, name: object) -> bool:
        # vLLM's model check asks `in` and only later, after awaits, takes the entry: a trim in between answered
        # the request 404 "does not exist" (seen in CI), so the check counts as a lookup too.
        held = super().__contains__(name)
        if held:
            self.used[name] = time.monotonic()
        return held

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
