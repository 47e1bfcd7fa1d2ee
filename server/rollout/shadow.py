"""Shadow traffic: a copy of a share of an alias's requests goes to another version, whose answer is compared with
the served one (exact match, completion-token ratio) and timed, then dropped.

A copy leaves only once the served answer is complete, runs as a task of its own, and is shed (counted) when
LORAPLEX_SHADOW_MAX_IN_FLIGHT copies are running or its engine is busy: it never delays or fails the caller's
request, and it is the first work dropped under load. Streamed requests are not copied: their answer is relayed
without being kept."""

import asyncio
import json
import logging
import random
import time

from server.core.errors import APIError
from server.engine.client import EngineError, Unreachable
from server.engine.routing import Router
from server.observability.metrics import Metrics
from server.registry import Version

log = logging.getLogger("loraplex.shadow")


def answer_of(content: bytes) -> tuple[str, int] | None:
    """The first choice's text and the completion tokens of a non-streamed answer."""
    try:
        doc = json.loads(content)
        choice = doc["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        return text or "", int(doc["usage"]["completion_tokens"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class Shadows:
    def __init__(self, router: Router, metrics: Metrics, max_in_flight: int, engine_busy: int, limit: int):
        self.router, self.metrics = router, metrics
        self.max_in_flight, self.engine_busy, self.limit = max_in_flight, engine_busy, limit
        self._tasks: set[asyncio.Task] = set()

    def copy(self, percent: float, path: str, payload: dict, candidate: Version, served: bytes,
             request_id: str) -> None:
        """Sends the copy in the background, `percent`% of the time, unless it must be shed."""
        if random.uniform(0, 100) >= percent:
            return
        label = self.metrics.adapter_label(candidate.key)
        backend = self.router.choose(candidate.key)
        if len(self._tasks) >= self.max_in_flight or backend is None or backend.in_flight >= self.engine_busy:
            self.metrics.shadow_requests.labels(label, "shed").inc()
            return
        task = asyncio.create_task(self._run(backend, path, {**payload, "model": candidate.key}, label, served,
                                             f"{request_id}-shadow"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, backend, path: str, payload: dict, label: str, served: bytes, request_id: str) -> None:
        start = time.perf_counter()
        backend.in_flight += 1
        try:
            upstream = await backend.engine.send(path, payload, request_id)
            try:
                content = await upstream.read(self.limit)
            finally:
                await upstream.close()
            ok = upstream.status == 200
        except (APIError, EngineError, Unreachable, OSError) as e:
            log.info("shadow request to %s failed: %s", payload["model"], e)
            ok = False
        finally:
            backend.in_flight -= 1
        self._record(label, served, content if ok else None, time.perf_counter() - start)

    def _record(self, label: str, served: bytes, content: bytes | None, seconds: float) -> None:
        mine, theirs = answer_of(content) if content else None, answer_of(served)
        if mine is None or theirs is None:
            self.metrics.shadow_requests.labels(label, "failed").inc()
            return
        m = self.metrics
        m.shadow_requests.labels(label, "completed").inc()
        m.shadow_latency.labels(label).observe(seconds)
        if mine[0] == theirs[0]:
            m.shadow_exact.labels(label).inc()
        if theirs[1]:
            m.shadow_length_ratio.labels(label).observe(mine[1] / theirs[1])
