"""The engine's residency: one owner of vLLM's adapter table and the cached files behind it, run over vLLM's own
serving models and model check against a stand-in engine whose workers load adapters from their files (as vLLM's
do, at `add_lora` and again at a step when their cache let the adapter go). A load that finds files missing is what
killed the engine (issue 24); here it is recorded as a death."""

import asyncio
import dataclasses
import logging
import random
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest
from vllm.exceptions import LoRAAdapterNotFoundError, VLLMNotFoundError

from server.core.config import Settings
from server.core.digest import sha256_file
from server.registry import NotFound
from server.registry.directory import DirectoryRegistry
from server.vllm_plugins import residency as residency_module
from server.vllm_plugins.resolver import RegistryResolver, install, pinned

CONFIG = "adapter_config.json"


class Engine:
    """vLLM's engine as residency sees it: workers with an LRU cache of `capacity` adapters, loading from files."""

    def __init__(self, capacity: int):
        self.capacity, self.workers = capacity, OrderedDict()
        self.deaths: list[str] = []
        self.output_processor = SimpleNamespace(request_states={})
        self.model_config = SimpleNamespace(model="base")
        self.renderer = self.input_processor = None

    def _load(self, request) -> None:
        config = Path(request.lora_path) / CONFIG
        if not config.is_file() or not (Path(request.lora_path) / "adapter_model.safetensors").is_file():
            raise LoRAAdapterNotFoundError(request.lora_name, request.lora_path)
        if b"broken" in config.read_bytes():
            raise ValueError("target module shapes do not match the model")
        self.workers[request.lora_int_id] = request
        self.workers.move_to_end(request.lora_int_id)
        while len(self.workers) > self.capacity:
            self.workers.popitem(last=False)

    async def add_lora(self, request) -> bool:
        await asyncio.sleep(0)  # a utility call to EngineCore
        self._load(request)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        await asyncio.sleep(0)
        return self.workers.pop(lora_id, None) is not None

    async def list_loras(self) -> set[int]:
        return set(self.workers)

    def step(self, request) -> None:
        """A scheduler step with `request` in the batch: an adapter the workers let go is loaded from its files."""
        if request.lora_int_id in self.workers:
            self.workers.move_to_end(request.lora_int_id)
            return
        try:
            self._load(request)
        except Exception as e:
            self.deaths.append(f"{request.lora_name}: {e}")


class Serving:
    """vLLM's completion handler in outline, with vLLM's own model check and adapter lookup."""

    _check_model = BaseServing._check_model
    _maybe_get_adapters = BaseServing._maybe_get_adapters
    create_error_response = staticmethod(BaseServing.create_error_response)
    request_logger = None

    def __init__(self, models: OpenAIServingModels, engine: Engine, rng: random.Random):
        self.models, self.engine, self.rng = models, engine, rng

    def _is_model_supported(self, name: str) -> bool:
        return name == "base"

    async def _pause(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)

    async def create_completion(self, request, stream: bool = False):
        error = await self._check_model(request)
        if error is not None:
            return error
        await self._pause()  # rendering and tokenizing
        lora = self._maybe_get_adapters(request)
        if stream:
            return self._run(lora)
        async for _ in self._run(lora):
            pass
        return "done"

    async def _run(self, lora):
        states = self.engine.output_processor.request_states
        key = object()
        states[key] = SimpleNamespace(lora_name=lora.lora_name)
        try:
            for _ in range(self.rng.randrange(1, 4)):
                await self._pause()
                self.engine.step(lora)
                yield "chunk"
        finally:
            del states[key]


def stack(tmp_path: Path, resident: int, capacity: int | None = None, max_bytes: int = 1 << 30):
    """Registry, resolver with its residency, vLLM's serving models hooked as the plugin hooks them, engine."""
    resolver = RegistryResolver(Settings(registry=str(tmp_path / "reg"), adapter_cache=tmp_path / "cache",
                                         max_resident_adapters=resident, adapter_cache_bytes=max_bytes))

    class Models(OpenAIServingModels):
        pass

    install(Models, resolver.residency)
    engine = Engine(capacity or resident)
    models = Models(engine, [BaseModelPath(name="base", model_path="base")])
    models.lora_resolvers = [resolver]
    return resolver, models, engine


def register_many(reg: DirectoryRegistry, base, adapter_factory, names: int, contents: int) -> list[str]:
    """`names` versions over `contents` distinct sets of files (versions with equal files share a cache entry)."""
    sources = [adapter_factory(seed=i) for i in range(contents)]
    return [reg.register(f"a{i}", sources[i % contents], base=base, max_rank=64).key for i in range(names)]


def split(key: str) -> tuple[str, int]:
    name, version = key.split("@")
    return name, int(version)


def cached(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}


def request(name: str):
    return SimpleNamespace(model=name)


@pytest.fixture(autouse=True)
def runtime_loading(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")


async def test_a_trim_between_a_fetch_and_its_hand_out_cannot_take_the_files(tmp_path, base, adapter_factory):
    """Issue 24's interleaving: resolve A has fetched its files and handed them out, and before vLLM's workers load
    them, resolve B fetches and the cache is trimmed to its bound of one. A's load must still find its files."""
    resolver, models, engine = stack(tmp_path, resident=1)
    a, b = register_many(resolver.registry, base, adapter_factory, names=2, contents=2)
    handed_a, resume_a = asyncio.Event(), asyncio.Event()
    add_lora, refused = engine.add_lora, []

    async def gated(request) -> bool:
        if request.lora_name == a:
            handed_a.set()
            await resume_a.wait()  # fetched and handed out; the workers have not loaded it yet
        try:
            return await add_lora(request)
        except Exception as e:
            refused.append(e)
            raise

    engine.add_lora = resolver.residency.refusals(gated)
    first = asyncio.create_task(models.resolve_lora(a))
    await handed_a.wait()
    assert not hasattr(await models.resolve_lora(b), "error")
    await resolver.residency.settle()
    resume_a.set()
    loaded = await first
    assert refused == [] and not hasattr(loaded, "error") and loaded.lora_int_id in engine.workers
    await resolver.residency.settle()  # two listed, bound one: the least recently used goes, files and all
    assert len(models.lora_requests) == 1 and len(cached(tmp_path)) == 1


async def test_a_caller_leaving_during_the_engines_load_does_not_release_its_files(tmp_path, base, adapter_factory):
    """vLLM cancels the handler of a client that left; the load it started goes on in the engine and must find its
    files, and the adapter it loads must end up listed (else it would stay in the workers, unknown)."""
    resolver, models, engine = stack(tmp_path, resident=1)
    a, b = register_many(resolver.registry, base, adapter_factory, names=2, contents=2)
    loading, finish = asyncio.Event(), asyncio.Event()
    add_lora = engine.add_lora

    async def slow(request) -> bool:
        if request.lora_name == a:
            loading.set()
            await finish.wait()
        return await add_lora(request)

    engine.add_lora = resolver.residency.refusals(slow)
    caller = asyncio.create_task(models.resolve_lora(a))
    await loading.wait()
    caller.cancel()  # the client left
    assert not hasattr(await models.resolve_lora(b), "error")
    await resolver.residency.settle()  # b listed, the bound one: a's files are still being loaded
    finish.set()
    for _ in range(1000):  # the load goes on without its caller
        if a in models.lora_requests:
            break
        await asyncio.sleep(0)
    assert a in models.lora_requests and engine.deaths == [] and set(engine.workers) >= {models.lora_requests[a].lora_int_id}
    assert not resolver.residency.handing
    await resolver.residency.settle()
    assert len(models.lora_requests) == 1 and len(cached(tmp_path)) == 1


async def test_files_stay_while_a_request_runs_on_an_evicted_or_unloaded_version(tmp_path, base, adapter_factory):
    resolver, models, engine = stack(tmp_path, resident=1, capacity=1)
    a, b = register_many(resolver.registry, base, adapter_factory, names=2, contents=2)
    serving = Serving(models, engine, random.Random(0))
    release = resolver.residency.pin(a)  # a request on `a` has passed vLLM's model check
    assert await serving._check_model(request(a)) is None
    lora_a = serving._maybe_get_adapters(request(a))
    await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=a))  # its version was deleted
    assert await models.resolve_lora(b) is not None
    engine.workers.clear()  # the workers' cache let it go: the next step loads `a` from its files
    await resolver.residency.settle()
    engine.step(lora_a)
    assert engine.deaths == [] and lora_a.lora_int_id in engine.workers
    release()
    await resolver.residency.settle()
    assert lora_a.lora_int_id not in engine.workers  # out of the workers first (remove_lora) ...
    assert Path(models.lora_requests[b].lora_path).name in cached(tmp_path)
    assert cached(tmp_path) == {Path(models.lora_requests[b].lora_path).name}  # ... then its files


async def test_the_bound_is_soft_while_requests_hold_adapters(tmp_path, base, adapter_factory, caplog):
    # An earlier test that builds vLLM's API server leaves the root logger at ERROR, which would hide the warning.
    caplog.set_level(logging.WARNING, logger="vllm.loraplex.residency")
    resolver, models, engine = stack(tmp_path, resident=2)
    names = register_many(resolver.registry, base, adapter_factory, names=4, contents=4)
    releases = [resolver.residency.pin(n) for n in names]
    for n in names:
        assert not hasattr(await models.resolve_lora(n), "error")
    await resolver.residency.settle()
    assert len(models.lora_requests) == 4 and "over MAX_RESIDENT_ADAPTERS=2" in caplog.text
    for release in releases[:3]:
        release()
    await resolver.residency.settle()
    assert sorted(models.lora_requests) == sorted(names[2:])  # least recently used of the free ones went
    assert len(cached(tmp_path)) == 2 and set(engine.workers) == {r.lora_int_id for r in
                                                                  models.lora_requests.values()}


async def test_lost_files_are_fetched_again_and_the_load_retried_once(tmp_path, base, adapter_factory):
    resolver, models, engine = stack(tmp_path, resident=4)
    (a,) = register_many(resolver.registry, base, adapter_factory, names=1, contents=1)
    real_load = engine._load
    lost = []

    def load_once_lost(request):
        if not lost:  # the files vanish between the cache's check and the workers' load
            lost.append(request.lora_path)
            Path(request.lora_path, CONFIG).unlink()
        real_load(request)

    engine._load = load_once_lost
    before = residency_module.LOAD_FAILURES.labels("files_lost")._value.get()
    loaded = await models.resolve_lora(a)
    assert not hasattr(loaded, "error") and Path(loaded.lora_path, CONFIG).is_file()
    assert residency_module.LOAD_FAILURES.labels("files_lost")._value.get() == before + 1


async def test_an_adapter_the_engine_cannot_load_answers_400_saying_it_is_invalid(tmp_path, base, adapter_factory):
    resolver, models, engine = stack(tmp_path, resident=4)
    (a,) = register_many(resolver.registry, base, adapter_factory, names=1, contents=1)
    version = resolver.registry.get(*split(a))
    # Files that match their manifest but that vLLM refuses (shapes it cannot load): rewrite both together.
    config = version.path / CONFIG
    config.write_bytes(config.read_bytes().replace(b"{", b'{"broken": 1, ', 1))
    manifest = dict(version.manifest, files=dict(version.manifest["files"]))
    manifest["files"][CONFIG] = {"sha256": sha256_file(config), "size": config.stat().st_size}
    resolver.registry.get = lambda name, v: dataclasses.replace(version, manifest=manifest)
    answer = await models.resolve_lora(a)
    assert answer.error.code == 400 and "is invalid" in answer.error.message
    assert a not in models.lora_requests and engine.deaths == []


@pytest.mark.parametrize("seed", range(6))
async def test_no_file_vllm_holds_ever_goes_missing_under_random_interleavings(tmp_path, base, adapter_factory,
                                                                               seed):
    """Many requests, streamed and not, over more versions than resident, with version deletes (vLLM's unload)
    and the cache's file work in threads, in a random order per seed: no load ever finds its files gone, every
    request is answered, 404 only for a deleted version."""
    rng = random.Random(seed)
    resolver, models, engine = stack(tmp_path, resident=3, capacity=2)
    names = register_many(resolver.registry, base, adapter_factory, names=12, contents=7)
    serving = Serving(models, engine, rng)
    serving.create_completion = pinned(resolver.residency, Serving.create_completion).__get__(serving)
    deleted: set[str] = set()
    outcomes: list[str] = []

    async def client() -> None:
        for _ in range(12):
            name = rng.choice(names)
            try:
                answer = await serving.create_completion(request(name), stream=rng.random() < 0.5)
                if hasattr(answer, "__aiter__"):
                    async for _ in answer:
                        pass
                    answer = "done"
            except VLLMNotFoundError as e:  # unloaded between vLLM's check and its lookup
                answer = SimpleNamespace(error=SimpleNamespace(code=404, message=str(e)))
            error = getattr(answer, "error", None)
            outcomes.append("ok" if answer == "done" else
                            "deleted" if error is not None and error.code == 404 and name in deleted else
                            f"{name}: {answer}")

    async def deleter() -> None:
        for name in rng.sample(names, 3):
            await asyncio.sleep(rng.random() * 0.05)
            resolver.registry.delete_version(*split(name))
            deleted.add(name)
            if name in models.lora_requests:
                await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))

    missing: list[str] = []

    async def watcher() -> None:
        while True:
            for held in [*models.lora_requests.values(), *engine.workers.values()]:
                if not Path(held.lora_path, CONFIG).is_file():
                    missing.append(held.lora_name)
            await asyncio.sleep(0)

    watch = asyncio.create_task(watcher())
    await asyncio.gather(*(client() for _ in range(16)), deleter())
    await resolver.residency.settle()
    watch.cancel()
    assert engine.deaths == [] and missing == []
    assert [o for o in outcomes if o not in ("ok", "deleted")] == []
    assert len(outcomes) == 16 * 12 and outcomes.count("ok") > 100
    assert len(models.lora_requests) <= 3 and not resolver.residency.pins and not resolver.residency.handing
    assert all(Path(r.lora_path, CONFIG).is_file() for r in models.lora_requests.values())
    assert set(engine.workers) <= {r.lora_int_id for r in models.lora_requests.values()}
    assert len(cached(tmp_path)) <= 3


def test_missing_versions_resolve_to_nothing(tmp_path):
    resolver = RegistryResolver(Settings(registry=str(tmp_path / "reg"), adapter_cache=tmp_path / "cache"))
    assert asyncio.run(resolver.resolve_lora("base", "nope@1")) is None
    assert asyncio.run(resolver.resolve_lora("base", "no-version")) is None
    with pytest.raises(NotFound):
        resolver.registry.get("nope", 1)


def test_vllm_still_has_what_residency_hooks():
    """Each private part of vLLM the hooks rely on, so that an upgrade that moves one fails here, loudly."""
    import importlib
    import inspect

    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState

    from server.vllm_plugins.resolver import HANDLERS

    for module, cls, method in HANDLERS:  # the handlers that pin their adapter
        assert inspect.iscoroutinefunction(getattr(getattr(importlib.import_module(module), cls), method))
    assert "request.model in self.models.lora_requests" in inspect.getsource(BaseServing._check_model)
    assert "self.models.lora_requests[request.model]" in inspect.getsource(BaseServing._maybe_get_adapters)
    resolve = inspect.getsource(OpenAIServingModels.resolve_lora)
    assert "self.lora_requests[lora_name] = lora_request" in resolve and "engine_client.add_lora" in resolve
    assert "del self.lora_requests[lora_name]" in inspect.getsource(OpenAIServingModels.unload_lora_adapter)
    assert "self.lora_name = lora_request.lora_name" in inspect.getsource(RequestState.__init__)
    assert "self.output_processor = OutputProcessor(" in inspect.getsource(AsyncLLM.__init__)
    assert "self.request_states: dict[str, RequestState]" in inspect.getsource(OutputProcessor.__init__)
    assert all(inspect.iscoroutinefunction(getattr(AsyncLLM, m)) for m in ("add_lora", "remove_lora"))
