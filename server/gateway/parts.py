"""The gateway's parts, built once per app, and the domain steps that span them."""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from server.tenancy.admission import Admission
from server.observability.audit import AuditLog
from server.tenancy.keys import KeyStore
from server.core.base_model import BaseModel
from server.core.config import Settings
from server.engine.client import EngineError, Unreachable
from server.rollout.evaluation import EvalSet, Scorer, compare
from server.observability.metrics import Metrics
from server.core.protocol import APIError
from server.registry.directory import VERSION_RE, NotFound, Registry
from server.rollout.rollouts import Rollouts
from server.engine.routing import Router
from server.rollout.shadow import Shadows
from server.observability.tracing import Tracer
from server.tenancy.usage import UsageLedger

if TYPE_CHECKING:
    from server.registry.s3 import S3Registry

log = logging.getLogger("loraplex.gateway")


@dataclass
class Gateway:
    """Everything a request handler needs."""

    settings: Settings
    registry: "Registry | S3Registry"
    base: BaseModel
    session: aiohttp.ClientSession  # shared by every engine client
    router: Router
    keys: KeyStore
    audit: AuditLog
    metrics: Metrics
    admission: Admission
    usage: UsageLedger
    tracer: Tracer | None
    rollouts: Rollouts
    shadows: Shadows
    admin_token: str
    metrics_token: str | None
    archive_slots: asyncio.Semaphore  # LORAPLEX_ARCHIVE_WORKERS uploads unpacked at once
    started: float = field(default_factory=time.time)
    _cleanups: set = field(default_factory=set)

    async def follow_registry(self, known: dict[str, list[int]]) -> None:
        """Reads the registry (and keys and usage kept beside it) every REGISTRY_POLL seconds from the reading `known`,
        so that changes made through other gateways or the CLI take effect here, versions deleted anywhere are
        dropped from the engines, and budgets count every replica's tokens."""
        while True:
            await asyncio.sleep(self.settings.registry_poll)
            try:
                now = await asyncio.to_thread(self.registry.refresh)
                if self.keys.follow:
                    await asyncio.to_thread(self.keys.refresh)
                await self.usage.arefresh()
                await asyncio.to_thread(self.rollouts.tick)
            except Exception:
                log.exception("reading the registry failed; serving from the last reading")
                continue
            gone = [f"{name}@{v}" for name, versions in known.items() for v in set(versions) - set(now.get(name, []))]
            if gone:
                self.retire(gone)
            known = now

    async def evaluate(self, name: str, version: int, evalset: EvalSet, against: str, tenant: str | None) -> dict:
        """Scores NAME@version on an engine beside `against`: "base", an alias of the adapter (the version it points
        at, not its canary) or a version number. Admitted and charged to `tenant` as its requests are."""
        candidate = (await asyncio.to_thread(self.registry.get, name, version)).key
        reference = self.settings.model_name if against == "base" else await asyncio.to_thread(
            self._reference, name, against)
        backend = self.router.choose(candidate)
        if backend is None:
            raise APIError(503, "no engine is ready", type="server_error", code="engine_unavailable")
        held = self.usage.admit(tenant, await asyncio.to_thread(evalset.token_bound), whole=True)
        concurrency = self.settings.eval_concurrency
        scorer = Scorer(lambda path, body: backend.engine.call(path, body, candidate), concurrency)
        try:
            with self.admission.admit(tenant, backend, slots=concurrency):
                return await compare(scorer, candidate, reference, evalset)
        except Unreachable:
            backend.unreachable()
            raise APIError(503, "engine unavailable", type="server_error", code="engine_unavailable") from None
        finally:
            if tenant is not None:
                self.usage.add(tenant, scorer.prompt_tokens, scorer.completion_tokens, held)

    def _reference(self, name: str, against: str) -> str:
        if VERSION_RE.fullmatch(against):  # ASCII digits: "²" is a digit to str.isdigit, and no number to int
            return self.registry.get(name, int(against)).key
        version = self.registry.aliases(name).get(against)
        if version is None:
            raise NotFound(f"against: {name!r} has no alias {against!r}", "against")
        return f"{name}@{version}"

    def retire(self, deleted: list[str]) -> None:
        """Drops deleted versions from every engine: they take no new request there, and running ones finish
        (vLLM's requests hold their adapter, and the engine's cache keeps files a running request uses)."""
        async def unload() -> None:
            for key in deleted:
                for backend in self.router.backends:
                    try:
                        await backend.engine.unload_lora(key)
                    except (EngineError, Unreachable) as e:
                        log.warning("unloading %s from %s failed: %s", key, backend.engine.url, e)

        task = asyncio.create_task(unload())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
