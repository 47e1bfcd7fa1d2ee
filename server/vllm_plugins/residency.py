"""The one owner of what an engine holds: the adapter versions vLLM lists and the cached files behind them.

Runs in vLLM's API server, on its event loop; file work goes to threads. An entry's files are referenced from the
moment a hand-out to vLLM starts until vLLM no longer holds them: while the hand-out runs, while vLLM's table lists a
name on them, and while a name that left the table still has requests on it or is still in vLLM's workers. Only
unreferenced entries are deleted, and a name leaves the workers (`remove_lora`) before its files can go, so a worker
never reads files that are gone. Past MAX_RESIDENT_ADAPTERS the least recently used name no request holds is
evicted; names requests hold keep the engine over that bound (soft: logged, never refused or waited for).
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prometheus_client import Counter as Metric

from server.registry import Version
from server.vllm_plugins.adapter_cache import AdapterCache, Source, matches

log = logging.getLogger("vllm.loraplex.residency")
# On the engine's own /metrics (vLLM serves prometheus_client's default registry), which the gateway proxies.
EVICTIONS = Metric("loraplex_engine_adapter_evictions", "Adapter versions an engine let go, by reason: lru (past "
                   "MAX_RESIDENT_ADAPTERS), unloaded (deleted from the registry), files (cached files past the "
                   "cache's bounds).", ["reason"])
LOAD_FAILURES = Metric("loraplex_engine_adapter_load_failures", "Adapter loads vLLM refused, by reason: files_lost "
                       "(the cached files were damaged or gone: fetched again and retried once), invalid (the "
                       "version itself cannot be loaded).", ["reason"])
# The entries handed out during one resolve of vLLM's, with their versions, released when that resolve returns.
HANDED: ContextVar[list[tuple[Path, Version]] | None] = ContextVar("loraplex_handed", default=None)
# Why vLLM's engine refused an adapter during one resolve; vLLM itself answers every refusal alike.
REFUSED: ContextVar[list[BaseException] | None] = ContextVar("loraplex_refused", default=None)


class Table(dict):
    """vLLM's table of the adapters it holds (`OpenAIServingModels.lora_requests`), telling its owner of every change
    and noting when each name was last taken, for least-recently-used eviction."""

    def __init__(self, owner: "Residency", entries: dict):
        super().__init__(entries)
        self.owner, self.used = owner, {name: time.monotonic() for name in entries}

    def __getitem__(self, name: str) -> Any:
        self.used[name] = time.monotonic()
        return super().__getitem__(name)

    def __setitem__(self, name: str, request: Any) -> None:
        previous = super().get(name)
        self.used[name] = time.monotonic()
        super().__setitem__(name, request)
        if previous is not None and previous is not request:
            self.owner.unloaded(previous)
        self.owner.wake()

    def __delitem__(self, name: str) -> None:
        """vLLM's unload: the name goes at once, the adapter once no request is on it."""
        request = super().pop(name)
        self.used.pop(name, None)
        self.owner.unloaded(request)

    def evict(self, name: str) -> Any:
        self.used.pop(name, None)
        return super().pop(name)


class Residency:
    """Decides what an engine holds, and deletes cached files only once nothing can read them."""

    def __init__(self, cache: AdapterCache, max_resident: int):
        self.cache, self.max_resident = cache, max_resident
        self.table = Table(self, {})
        self.engine: Any = None  # vLLM's engine client: add_lora, remove_lora, list_loras
        self.running: Callable[[], set[str]] = set  # names of requests the engine runs
        self.pins: Counter[str] = Counter()  # requests from vLLM's model check until they end, by name
        self.handing: Counter[Path] = Counter()  # hand-outs in progress, by entry
        self.dropped: dict[int, Any] = {}  # out of vLLM's table but maybe not out of its workers, by lora_int_id
        self._locks: dict[Path, asyncio.Lock] = {}  # one file operation per entry at a time
        self._files_changed = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._warned_over = 0
        self._settling = asyncio.Lock()

    def attach(self, models: Any) -> None:
        """Takes over vLLM's table of adapters and learns its engine client."""
        self.table = Table(self, models.lora_requests)
        models.lora_requests = self.table
        self.engine = models.engine_client
        self.engine.add_lora = self.refusals(self.engine.add_lora)
        states = models.engine_client.output_processor.request_states
        self.running = lambda: {s.lora_name for s in list(states.values()) if s.lora_name}

    # Requests

    def pin(self, name: str | None) -> Callable[[], None]:
        """Holds `name` from before vLLM checks it until the returned release is called (the request ended)."""
        if not name:
            return lambda: None
        self.pins[name] += 1

        def release() -> None:
            self.pins[name] -= 1
            if self.pins[name] <= 0:
                del self.pins[name]
                if len(self.table) > self.max_resident or self.dropped:
                    self.wake()

        return release

    def busy(self) -> set[str]:
        return set(self.pins) | self.running()

    # Hand-outs

    async def hand_out(self, version: Version, source: Source) -> tuple[Path, bool]:
        """A verified local copy of `version` for vLLM to load, and whether it was downloaded. Referenced until the
        resolve it belongs to returns (see `resolving`; outside one, for good), then by vLLM's table if it loaded."""
        entry = self.cache.entry(version)
        self.handing[entry] += 1  # before any await: from here no trim can take it
        handed = HANDED.get()
        if handed is not None:
            handed.append((entry, version))
        try:
            async with self._lock(entry):
                fetched = await asyncio.to_thread(self.cache.ensure, version, source)
        except BaseException:
            if handed is None:
                self._release_handed([(entry, version)])
            raise
        self._files_changed |= fetched
        return entry, fetched

    def resolving(self, original: Callable) -> Callable:
        """Wraps `OpenAIServingModels.resolve_lora`: releases what its resolvers handed out once vLLM's load is
        done, and when the load failed because the files were lost, fetches them again and retries once."""

        async def resolve_lora(models: Any, lora_name: str) -> Any:
            # vLLM cancels a handler whose client leaves, and its resolve would then release the files while the
            # engine's load still reads them: the resolve runs to its end whoever waits for it.
            return await asyncio.shield(asyncio.ensure_future(self._resolve(original, models, lora_name)))

        return resolve_lora

    async def _resolve(self, original: Callable, models: Any, lora_name: str) -> Any:
        """vLLM's resolve, retried once when the load failed on lost files; an invalid version is said so."""
        result, handed, refused = await self._resolve_once(original, models, lora_name)
        failed = _load_failed(result)
        if failed and handed and await self._lost_files(handed):
            LOAD_FAILURES.labels("files_lost").inc()
            log.warning("loading %s failed on lost or damaged files: fetched again, loading once more", lora_name)
            result, handed, refused = await self._resolve_once(original, models, lora_name)
            failed = _load_failed(result)
        if failed and handed and not any(isinstance(e, asyncio.CancelledError) for e in refused):
            LOAD_FAILURES.labels("invalid").inc()
            reason = "; ".join(f"{type(e).__name__}: {e}" for e in refused) or "the engine refused it"
            log.warning("adapter %s is invalid: %s", lora_name, reason)
            result.error.message = f"LoRA adapter '{lora_name}' is invalid: the engine could not load its files"
        return result

    async def _resolve_once(self, original: Callable, models: Any, lora_name: str) -> tuple[Any, list, list]:
        handed: list[tuple[Path, Version]] = []
        refused: list[BaseException] = []
        tokens = HANDED.set(handed), REFUSED.set(refused)
        try:
            return await original(models, lora_name), handed, refused
        finally:
            HANDED.reset(tokens[0])
            REFUSED.reset(tokens[1])
            self._release_handed(handed)

    def _release_handed(self, handed: list[tuple[Path, Version]]) -> None:
        for entry, _ in handed:
            self.handing[entry] -= 1
            if self.handing[entry] <= 0:
                del self.handing[entry]
        self.wake()

    async def _lost_files(self, handed: list[tuple[Path, Version]]) -> bool:
        """Whether any entry handed out no longer matches its manifest (then it is removed, to be fetched again)."""
        lost = False
        for entry, version in handed:
            async with self._lock(entry):
                if not await asyncio.to_thread(matches, entry, version.manifest):
                    await asyncio.to_thread(self.cache.remove, entry)
                    lost = True
        return lost

    def refusals(self, add_lora: Callable) -> Callable:
        """Wraps the engine client's `add_lora` to note why a load failed, which vLLM's resolve does not say."""

        async def watched(lora_request: Any) -> Any:
            try:
                return await add_lora(lora_request)
            except BaseException as e:
                refused = REFUSED.get()
                if refused is not None:
                    refused.append(e)
                raise

        return watched

    # Eviction: one task, woken by changes

    def unloaded(self, request: Any) -> None:
        """A name vLLM's table let go of: its adapter leaves the workers once no request is on it."""
        self.dropped[request.lora_int_id] = request
        self.wake()

    def wake(self) -> None:
        if self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet (vLLM's start-up): the first request wakes it
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run())
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.settle()
            except Exception:
                log.exception("settling the engine's adapters failed")

    async def settle(self) -> None:
        """Evicts past the bound, takes unloaded adapters out of the workers, then trims the files."""
        async with self._settling:
            await self._evict_excess()
            await self._remove_dropped()
            if self._files_changed:
                self._files_changed = False
                await self._trim_files()

    async def _evict_excess(self) -> None:
        while len(self.table) > self.max_resident:
            busy = self.busy()
            idle = [(self.table.used.get(n, 0.0), n) for n in list(dict.keys(self.table)) if n not in busy]
            if not idle:
                self._over_bound(len(busy))
                return
            _, name = min(idle)
            request = self.table.evict(name)
            await self._remove(request, "lru")

    def _over_bound(self, busy: int) -> None:
        if len(self.table) != self._warned_over:
            self._warned_over = len(self.table)
            log.warning("engine holds %d adapters, over MAX_RESIDENT_ADAPTERS=%d: requests are running on %d of them",
                        len(self.table), self.max_resident, busy)

    async def _remove_dropped(self) -> None:
        if not self.dropped:
            return  # the usual settle, after a load: no scan of the engine's running requests
        busy = self.busy()
        for lora_id, request in list(self.dropped.items()):
            if request.lora_name not in busy and self.dropped.pop(lora_id, None) is not None:
                await self._remove(request, "unloaded")

    async def _remove(self, request: Any, reason: str) -> None:
        """Out of vLLM's workers first; its files are then unreferenced unless another name shares them."""
        try:
            await self.engine.remove_lora(request.lora_int_id)
        except Exception as e:
            log.warning("removing %s from the engine failed: %s", request.lora_name, e)
        EVICTIONS.labels(reason).inc()
        log.info("adapter %s left the engine (%s)", request.lora_name, reason)
        self._files_changed = True

    def referenced(self) -> set[Path]:
        held = list(dict.values(self.table)) + list(self.dropped.values())
        return {Path(r.lora_path) for r in held} | set(self.handing)

    async def _trim_files(self) -> None:
        stored = await asyncio.to_thread(self.cache.stored)
        for entry in self.cache.excess(stored, self.referenced()):
            async with self._lock(entry):
                if entry in self.referenced():
                    continue  # handed out again meanwhile
                await asyncio.to_thread(self.cache.remove, entry)
            EVICTIONS.labels("files").inc()
            log.info("cached files %s removed: past the cache's bounds, no adapter on them", entry.name)

    def _lock(self, entry: Path) -> asyncio.Lock:
        return self._locks.setdefault(entry, asyncio.Lock())


def _load_failed(result: Any) -> bool:
    """vLLM's answer when a resolver found the adapter but the engine would not load it."""
    error = getattr(result, "error", None)
    return error is not None and error.code == 400
