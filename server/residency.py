"""Which adapter versions are loaded on one engine: single-flight loads, leases, LRU unloading."""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .metrics import Metrics

if TYPE_CHECKING:
    from .engine_client import EngineClient

log = logging.getLogger("loraplex.residency")


class Residency:
    """Loads a version on first use, keeps at most `capacity` idle ones, never unloads one in use."""

    def __init__(self, engine: "EngineClient", capacity: int, metrics: Metrics | None = None):
        self.engine = engine
        self.capacity = capacity
        self.metrics = metrics
        self._leases: OrderedDict[str, int] = OrderedDict()  # key -> requests using it; order is LRU
        self._loading: dict[str, asyncio.Task] = {}
        self._unloading: dict[str, asyncio.Task] = {}
        self._released = asyncio.Condition()
        self._generation = 0  # bumped when the engine restarted and lost every adapter

    def __contains__(self, key: str) -> bool:
        return key in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    @asynccontextmanager
    async def lease(self, key: str, path: str) -> AsyncIterator[None]:
        """Holds `key` loaded on the engine for the duration of the block."""
        await self._acquire(key, path)
        generation = self._generation
        try:
            await self._trim()
            yield
        finally:
            if generation == self._generation:
                self._leases[key] -= 1
            async with self._released:
                self._released.notify_all()
            await self._trim()

    def forget_all(self) -> None:
        """The engine restarted empty: every version must be loaded again on its next use."""
        self._generation += 1
        self._leases.clear()

    async def retire(self, key: str) -> None:
        """Unloads `key` once the requests using it have finished (its version was deleted)."""
        async with self._released:
            await self._released.wait_for(lambda: self._leases.get(key, 0) == 0 and key not in self._loading)
        if self._leases.pop(key, None) is not None:
            task = self._unloading[key] = asyncio.create_task(self._unload(key))
            await asyncio.shield(task)

    async def _acquire(self, key: str, path: str) -> None:
        while True:
            if key in self._leases:
                self._leases[key] += 1
                self._leases.move_to_end(key)
                return
            if key in self._unloading:
                await asyncio.shield(self._unloading[key])
                continue
            task = self._loading.get(key)
            if task is None:
                # A task of its own, so a caller that goes away does not cancel the load for the others.
                task = self._loading[key] = asyncio.create_task(self._load(key, path))
            await asyncio.shield(task)

    async def _load(self, key: str, path: str) -> None:
        label = self.metrics.adapter_label(key.split("@")[0]) if self.metrics else None
        start = time.perf_counter()
        try:
            await self.engine.load_lora(key, path)
            self._leases[key] = 0
        except Exception:
            if self.metrics:
                self.metrics.load_failures.labels(label).inc()
            raise
        finally:
            del self._loading[key]
            # A retire() waiting for this key to stop loading must wake now, not when another lease ends.
            async with self._released:
                self._released.notify_all()
        if self.metrics:
            self.metrics.load_latency.labels(label).observe(time.perf_counter() - start)

    async def _trim(self) -> None:
        while len(self._leases) > self.capacity:
            victim = next((k for k, n in self._leases.items() if n == 0), None)
            if victim is None:
                return  # every resident version is serving a request; trim again when one is released
            del self._leases[victim]
            task = self._unloading[victim] = asyncio.create_task(self._unload(victim))
            await asyncio.shield(task)

    async def _unload(self, key: str) -> None:
        try:
            await self.engine.unload_lora(key)
            if self.metrics:
                self.metrics.unloads.inc()
        except Exception:
            log.exception("unloading %s failed", key)
        finally:
            del self._unloading[key]
