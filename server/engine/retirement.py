"""Dropping deleted adapter versions from every engine."""

import asyncio
import logging

from server.engine.client import EngineError, Unreachable
from server.engine.routing import Router

log = logging.getLogger("loraplex.gateway")


class Retirement:
    """Unloads deleted versions from every engine in the background: they take no new request there, and running
    ones finish (vLLM's requests hold their adapter, and the engine's cache keeps files a running request uses)."""

    def __init__(self, router: Router):
        self.router = router
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, deleted: list[str]) -> None:
        task = asyncio.create_task(self._unload(deleted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload(self, deleted: list[str]) -> None:
        for key in deleted:
            for backend in self.router.backends:
                try:
                    await backend.engine.unload_lora(key)
                except (EngineError, Unreachable) as e:
                    log.warning("unloading %s from %s failed: %s", key, backend.engine.url, e)
