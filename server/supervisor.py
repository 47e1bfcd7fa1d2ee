"""Keeps track of which engines serve, and restarts a spawned engine that dies, with backoff."""

import asyncio
import logging

from .metrics import Metrics
from .routing import Backend

log = logging.getLogger("loraplex.supervisor")


class Supervisor:
    def __init__(self, backends: list[Backend], metrics: Metrics, start_timeout: float, interval: float = 1.0,
                 max_backoff: float = 60.0, slow_probes_tolerated: int = 5):
        self.backends, self.metrics = backends, metrics
        self.start_timeout, self.interval, self.max_backoff = start_timeout, interval, max_backoff
        self.slow_probes_tolerated = slow_probes_tolerated

    async def run(self) -> None:
        """Starts spawned engines, then watches every engine until cancelled; a failing round is logged, never fatal."""
        await asyncio.gather(*(self._start(i, b) for i, b in enumerate(self.backends) if b.process))
        backoff = {i: 1.0 for i in range(len(self.backends))}
        slow = {i: 0 for i in range(len(self.backends))}
        while True:
            await asyncio.sleep(self.interval)
            for i, b in enumerate(self.backends):
                try:
                    if b.process is not None and b.process.proc.poll() is not None:
                        await self._restart(i, b, backoff)
                    else:
                        await self._probe(i, b, slow)
                except Exception:
                    b.up = False
                    log.exception("supervising engine %d (%s) failed; it counts as down until its next probe",
                                  i, b.engine.url)

    async def _probe(self, i: int, b: Backend, slow: dict[int, int]) -> None:
        healthy, was_up = await b.engine.healthy(), b.up
        if healthy is None:
            # An engine busy with long batches can miss a few probes while it still serves; taking
            # it out then would turn its load into 503s. A refused connection is down at once.
            slow[i] += 1
            b.up = b.up and slow[i] <= self.slow_probes_tolerated
        else:
            slow[i], b.up = 0, healthy
        if was_up != b.up:
            log.warning("engine %d (%s) is %s", i, b.engine.url, "up" if b.up else "down")
        if b.up:
            await self._count_adapters(b)

    async def _count_adapters(self, b: Backend) -> None:
        """The engine's own list of what it holds: residency is the engine's (its resolver and LRU), not ours."""
        held = await b.engine.adapters()
        if held is None:
            return
        self.metrics.adapter_loads.labels(b.label).inc(len(held - b.adapters))
        self.metrics.resident.labels(b.label).set(len(held))
        b.adapters = frozenset(held)

    async def _start(self, i: int, b: Backend) -> None:
        try:
            await b.process.wait_ready(b.engine, self.start_timeout)
            b.up = True
            log.info("engine %d ready at %s", i, b.engine.url)
        except Exception:
            log.exception("engine %d failed to start", i)

    async def _restart(self, i: int, b: Backend, backoff: dict[int, float]) -> None:
        b.up = False
        log.error("engine %d exited with code %s; restarting in %.0f s", i, b.process.proc.returncode, backoff[i])
        await asyncio.to_thread(b.process.stop)  # whatever is left of its process group
        await asyncio.sleep(backoff[i])
        backoff[i] = min(backoff[i] * 2, self.max_backoff)
        b.process.start()
        self.metrics.engine_restarts.labels(str(i)).inc()
        await self._start(i, b)
        if b.up:
            backoff[i] = 1.0
