"""Keeps track of which engines serve, and restarts a spawned engine that dies, with backoff."""

import asyncio
import logging
from collections import defaultdict

from server.engine.routing import Backend
from server.observability.metrics import Metrics

log = logging.getLogger("loraplex.supervisor")


class Supervisor:
    def __init__(self, backends: list[Backend], metrics: Metrics, start_timeout: float, interval: float = 1.0,
                 max_backoff: float = 60.0, slow_probes_tolerated: int = 5):
        self.backends, self.metrics = backends, metrics
        self.start_timeout, self.interval, self.max_backoff = start_timeout, interval, max_backoff
        self.slow_probes_tolerated = slow_probes_tolerated

    async def run(self) -> None:
        """Starts spawned engines, then watches every engine until cancelled; a failing round is logged, never fatal.
        The list of engines may change between rounds (DNS discovery)."""
        await asyncio.gather(*(self._start(b) for b in self.backends if b.process))
        backoff: dict[Backend, float] = defaultdict(lambda: 1.0)
        slow: dict[Backend, int] = defaultdict(int)
        while True:
            await asyncio.sleep(self.interval)
            for b in list(self.backends):
                try:
                    if b.process is not None and b.process.proc.poll() is not None:
                        await self._restart(b, backoff)
                    else:
                        await self._probe(b, slow)
                except Exception:
                    b.up = False
                    log.exception("supervising engine %s (%s) failed; it counts as down until its next probe",
                                  b.label, b.engine.url)

    async def _probe(self, b: Backend, slow: dict[Backend, int]) -> None:
        healthy, was_up = await b.engine.healthy(), b.up
        if healthy is None:
            # An engine busy with long batches can miss a few probes while it still serves; taking
            # it out then would turn its load into 503s. A refused connection is down at once.
            slow[b] += 1
            b.up = b.up and slow[b] <= self.slow_probes_tolerated
        else:
            slow[b], b.up = 0, healthy
        if was_up != b.up:
            log.warning("engine %s (%s) is %s", b.label, b.engine.url, "up" if b.up else "down")
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

    async def _start(self, b: Backend) -> None:
        try:
            await b.process.wait_ready(b.engine, self.start_timeout)
            b.up = True
            log.info("engine %s ready at %s", b.label, b.engine.url)
        except Exception:
            log.exception("engine %s failed to start", b.label)

    async def _restart(self, b: Backend, backoff: dict[Backend, float]) -> None:
        b.up = False
        log.error("engine %s exited with code %s; restarting in %.0f s", b.label, b.process.proc.returncode,
                  backoff[b])
        await asyncio.to_thread(b.process.stop)  # whatever is left of its process group
        await asyncio.sleep(backoff[b])
        backoff[b] = min(backoff[b] * 2, self.max_backoff)
        b.process.start()
        self.metrics.engine_restarts.labels(b.label).inc()
        await self._start(b)
        if b.up:
            backoff[b] = 1.0
